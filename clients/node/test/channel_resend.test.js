// The durable-channel protocol of the Node client, step by step, against a
// scripted in-process ChannelService (grpc-js, the same contract): what a
// Publish call broken by UNAVAILABLE had carried goes first on the next
// call and acknowledged tasks never again; a call ends after 8,192 tasks;
// results() subscribes again naming how many results it has; close() waits
// for every acknowledgement and retries CloseChannel; release() retries and
// takes NOT_FOUND on a retry as done; past reattachTimeoutMs the first
// error is thrown. The bookkeeping itself (Outbox) is tested without I/O.
// Real orchestrators SIGKILLed under a channel: channel_durable.test.js.

import assert from 'node:assert/strict';
import { after, before, beforeEach, describe, test } from 'node:test';

import grpc from '@grpc/grpc-js';

import { Client, SquireError } from '@squire/client';

import { MAX_UNACKNOWLEDGED, Outbox } from '../src/channel.js';
import { loadApi } from '../src/proto.js';
import { waitUntil } from './harness.js';

const UNAVAILABLE = grpc.status.UNAVAILABLE;

/** @param {unknown} value */
const json = (value) => Buffer.from(JSON.stringify(value));

/**
 * A spec as Channel.publish encodes it, for the Outbox tests.
 * @param {number} taskId
 * @param {number} [inputBytes]
 */
function spec(taskId, inputBytes = 1) {
  return {
    taskId,
    operation: 'op',
    kind: 'TASK_KIND_APPLY',
    params: Buffer.alloc(0),
    input: Buffer.alloc(inputBytes),
    operands: [],
    serializer: 'SERIALIZER_JSON',
    metadata: Buffer.alloc(0),
  };
}

describe('Outbox: the publishing bookkeeping', () => {
  test('messages of at most 256 tasks; what a broken call carried goes first again', () => {
    const outbox = new Outbox();
    const mark = outbox.add(Array.from({ length: 600 }, (_, i) => spec(i)));
    assert.equal(mark, 600);
    const sizes = [];
    while (outbox.pending > 0) sizes.push(outbox.take().length);
    assert.deepEqual(sizes, [256, 256, 88]);
    assert.equal(outbox.handed, 600);
    assert.equal(outbox.unacknowledged, 600);
    outbox.add([spec(600)]);
    assert.equal(outbox.requeue(), 600);
    assert.equal(outbox.unacknowledged, 0);
    assert.equal(outbox.pending, 601);
    const again = outbox.take().map((s) => s.taskId);
    assert.deepEqual(again, Array.from({ length: 256 }, (_, i) => i), 'the broken call\'s tasks first, in order');
    assert.equal(outbox.handed, 600, 'sending again hands nothing new');
    while (outbox.pending > 0) outbox.take();
    assert.equal(outbox.handed, 601);
    assert.equal(outbox.acknowledge(), 601);
    assert.equal(outbox.requeue(), 0, 'acknowledged tasks never go again');
    assert.ok(outbox.empty);
  });

  test(`a call carries at most ${MAX_UNACKNOWLEDGED} tasks until its response; messages of about 4 MiB`, () => {
    const outbox = new Outbox();
    outbox.add(Array.from({ length: MAX_UNACKNOWLEDGED + 808 }, (_, i) => spec(i)));
    let taken = 0;
    for (let tasks = outbox.take(); tasks.length > 0; tasks = outbox.take()) taken += tasks.length;
    assert.equal(taken, MAX_UNACKNOWLEDGED);
    assert.equal(outbox.room, 0);
    assert.equal(outbox.pending, 808);
    assert.equal(outbox.acknowledge(), MAX_UNACKNOWLEDGED);
    assert.equal(outbox.take()[0].taskId, MAX_UNACKNOWLEDGED);

    const big = new Outbox();
    big.add([spec(1, 1 << 20), spec(2, 1 << 20), spec(3, 1 << 20), spec(4, 1 << 20), spec(5, 8 << 20)]);
    assert.deepEqual(big.take().map((s) => s.taskId), [1, 2, 3]);
    assert.deepEqual(big.take().map((s) => s.taskId), [4]);
    assert.deepEqual(big.take().map((s) => s.taskId), [5], 'a task over the limit goes alone');
  });
});

/**
 * One Publish call as the script sees it.
 * @typedef {object} PublishCall
 * @property {number[]} taskIds the ids it carried, in order
 * @property {number[]} messageSizes tasks per message
 * @property {boolean} halfClosed
 * @property {(predicate: () => boolean) => Promise<void>} until
 * @property {(response: { published: number, duplicates?: number }) => void} answer
 * @property {(code: number, details: string) => void} fail
 */

/**
 * @typedef {object} Script
 * @property {(call: PublishCall, number: number) => void | Promise<void>} [Publish]
 * @property {(call: any, number: number) => void | Promise<void>} [Subscribe]
 * @property {(number: number) => { code: number, details: string } | null} [CloseChannel]
 * @property {(number: number) => { code: number, details: string } | null} [ReleaseChannel]
 */

/** @type {Script} */
let script = {};
/** @type {PublishCall[]} */
let publishCalls = [];
/** @type {any[]} the SubscribeRequests, in order */
let subscribes = [];
let closes = 0;
let releases = 0;
const server = new grpc.Server();
/** @type {string} */
let target;
/** @type {Client[]} */
const clients = [];

before(async () => {
  const api = loadApi();
  server.addService(api.ChannelService.service, {
    LeaseChannel(/** @type {any} */ _call, /** @type {any} */ callback) {
      callback(null, { channelId: 'c1' });
    },
    Publish(/** @type {any} */ call, /** @type {any} */ callback) {
      /** @type {(() => void)[]} */
      let waiters = [];
      const notify = () => {
        const ws = waiters;
        waiters = [];
        ws.forEach((w) => w());
      };
      let answered = false;
      /** @type {PublishCall} */
      const scripted = {
        taskIds: [],
        messageSizes: [],
        halfClosed: false,
        until: async (predicate) => {
          while (!predicate()) await new Promise((resolve) => waiters.push(() => resolve(undefined)));
        },
        answer: (response) => {
          if (!answered) callback(null, { duplicates: 0, ...response });
          answered = true;
        },
        fail: (code, details) => {
          if (!answered) callback({ code, details });
          answered = true;
        },
      };
      publishCalls.push(scripted);
      call.on('data', (/** @type {any} */ request) => {
        assert.equal(request.channelId, 'c1');
        scripted.messageSizes.push(request.tasks.length);
        scripted.taskIds.push(...request.tasks.map((/** @type {any} */ t) => t.taskId));
        notify();
      });
      call.on('end', () => {
        scripted.halfClosed = true;
        notify();
      });
      call.on('error', () => undefined);
      void script.Publish?.(scripted, publishCalls.length);
    },
    Subscribe(/** @type {any} */ call) {
      subscribes.push(call.request);
      call.on('error', () => undefined);
      void script.Subscribe?.(call, subscribes.length);
    },
    CloseChannel(/** @type {any} */ _call, /** @type {any} */ callback) {
      closes += 1;
      const error = script.CloseChannel?.(closes) ?? null;
      callback(error, error ? undefined : {});
    },
    ReleaseChannel(/** @type {any} */ _call, /** @type {any} */ callback) {
      releases += 1;
      const error = script.ReleaseChannel?.(releases) ?? null;
      callback(error, error ? undefined : {});
    },
  });
  const port = await new Promise((resolve, reject) => {
    server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (err, bound) => (err ? reject(err) : resolve(bound)));
  });
  target = `127.0.0.1:${port}`;
});

beforeEach(() => {
  script = {};
  publishCalls = [];
  subscribes = [];
  closes = 0;
  releases = 0;
});

after(() => {
  for (const c of clients) c.close();
  server.forceShutdown();
});

/** @param {import('@squire/client').ClientOptions} [options] */
function newClient(options) {
  const client = new Client(target, options);
  clients.push(client);
  return client;
}

/** @param {number} from @param {number} to inclusive */
const ids = (from, to) => Array.from({ length: to - from + 1 }, (_, i) => from + i);

/**
 * A ResultBatch: task id i has the value i * 10.
 * @param {number[]} taskIds
 */
const batch = (taskIds) => ({
  results: taskIds.map((taskId) => ({ taskId, ok: { output: json(taskId * 10) }, attempt: 1 })),
});

test('a broken Publish call: its tasks go first on the next call; acknowledged ones never again', { timeout: 30_000 }, async () => {
  script.Publish = async (call, number) => {
    if (number === 1) {
      // Idle with its tasks sent: the client ends the call to have them acknowledged.
      await call.until(() => call.halfClosed);
      call.answer({ published: call.taskIds.length });
    } else if (number === 2) {
      await call.until(() => call.taskIds.length === 5);
      call.fail(UNAVAILABLE, 'Connection dropped');
    } else if (number === 3) {
      call.fail(UNAVAILABLE, 'failed to connect to all addresses');
    } else {
      await call.until(() => call.halfClosed);
      // Of 6..10 the orchestrator had journaled two before it went away.
      call.answer({ published: call.taskIds.length - 2, duplicates: 2 });
    }
  };
  script.CloseChannel = (number) => (number === 1 ? { code: UNAVAILABLE, details: 'Connection dropped' } : null);
  const channel = await newClient().leaseChannel();
  assert.deepEqual(await channel.publish(ids(1, 5).map((i) => ({ operation: 'op', input: i }))), ids(1, 5));
  await waitUntil(() => channel.published === 5, { timeoutMs: 5000, message: 'the first call acknowledged' });
  assert.deepEqual(await channel.publish(ids(6, 10).map((i) => ({ operation: 'op', input: i }))), ids(6, 10));
  await waitUntil(() => publishCalls.length >= 3, { timeoutMs: 5000, message: 'the broken call made again' });
  assert.equal(await channel.close(), 10, 'every task acknowledged, the duplicates included');
  assert.deepEqual(publishCalls.map((c) => c.taskIds), [ids(1, 5), ids(6, 10), publishCalls[2].taskIds, ids(6, 10)]);
  assert.ok(ids(6, 10).join().startsWith(publishCalls[2].taskIds.join()), 'the failing call got the same tasks, if any');
  assert.deepEqual([channel.published, channel.duplicates, channel.resent], [8, 2, 2]);
  assert.equal(closes, 2, 'CloseChannel made again after UNAVAILABLE');
  assert.equal(await channel.close(), 10, 'close() is idempotent');
  assert.equal(closes, 2);
});

test(`a Publish call ends after ${MAX_UNACKNOWLEDGED} tasks; the next call opens once its response came`, { timeout: 30_000 }, async () => {
  /** @type {string[]} */
  const order = [];
  script.Publish = async (call, number) => {
    order.push(`open ${number}`);
    await call.until(() => call.halfClosed);
    order.push(`answer ${number}`);
    call.answer({ published: call.taskIds.length });
  };
  const channel = await newClient().leaseChannel();
  const n = MAX_UNACKNOWLEDGED + 300;
  const published = await channel.publish(ids(1, n).map((i) => ({ operation: 'op', input: i })));
  assert.equal(published.length, n);
  assert.equal(await channel.close(), n);
  assert.deepEqual(publishCalls.map((c) => c.taskIds.length), [MAX_UNACKNOWLEDGED, 300]);
  assert.deepEqual(publishCalls.flatMap((c) => c.taskIds), ids(1, n));
  assert.ok(publishCalls.every((c) => c.messageSizes.every((size) => size > 0 && size <= 256)));
  assert.deepEqual(order, ['open 1', 'answer 1', 'open 2', 'answer 2']);
  assert.deepEqual([channel.published, channel.duplicates, channel.resent], [n, 0, 0]);
});

test('results() always says how many results it has, and subscribes again on UNAVAILABLE', { timeout: 30_000 }, async () => {
  script.Subscribe = (call, number) => {
    if (number === 1) {
      call.write(batch([3, 1]));
      call.write(batch([2]));
      call.emit('error', { code: UNAVAILABLE, details: 'Connection dropped' });
    } else if (number === 2) {
      call.emit('error', { code: UNAVAILABLE, details: 'failed to connect to all addresses' });
    } else if (number === 3) {
      call.write(batch([5, 4]));
      call.end();
    } else {
      call.end();
    }
  };
  const channel = await newClient().leaseChannel();
  /** @type {[number, unknown][]} */
  const got = [];
  for await (const result of channel.results()) got.push([result.taskId, result.ok ? result.value : result.error]);
  assert.deepEqual(got, [[3, 30], [1, 10], [2, 20], [5, 50], [4, 40]]);
  assert.deepEqual(subscribes.map((r) => r.received), [0, 3, 3], 'received is sent, 0 included');
  assert.deepEqual([channel.received, channel.resubscribed], [5, 2]);
  for await (const _ of channel.results()) assert.fail('nothing more');
  assert.equal(subscribes[3].received, 5, 'a later results() goes on after what this channel has');

  // A loop left early: what it had received and not yielded comes first next time.
  const early = await newClient().leaseChannel();
  subscribes = [];
  script.Subscribe = (call, number) => {
    if (number === 1) call.write(batch([7, 8, 9])); // and stays open until cancelled
    else call.end();
  };
  for await (const result of early.results()) {
    assert.equal(result.taskId, 7);
    break;
  }
  assert.equal(early.received, 3);
  const rest = [];
  for await (const result of early.results()) rest.push(result.taskId);
  assert.deepEqual(rest, [8, 9]);
  assert.deepEqual(subscribes.map((r) => r.received), [0, 3]);

  // Anything but UNAVAILABLE ends the iteration with that error.
  script.Subscribe = (call) => call.emit('error', { code: grpc.status.ABORTED, details: 'another Subscribe call took over' });
  await assert.rejects(async () => {
    for await (const _ of channel.results()) assert.fail('nothing');
  }, (err) => err instanceof SquireError && err.code === 'ABORTED');
});

test('release() retries UNAVAILABLE; NOT_FOUND on a retry is done, on the first try an error', { timeout: 30_000 }, async () => {
  script.ReleaseChannel = (number) => (number === 1
    ? { code: UNAVAILABLE, details: 'Connection dropped' }
    : { code: grpc.status.NOT_FOUND, details: "unknown channel id 'c1'" });
  const client = newClient();
  await (await client.leaseChannel()).release();
  assert.equal(releases, 2);

  releases = 0;
  script.ReleaseChannel = () => ({ code: grpc.status.NOT_FOUND, details: "unknown channel id 'c1'" });
  await assert.rejects((await client.leaseChannel()).release(), (err) => err instanceof SquireError && err.code === 'NOT_FOUND');
  assert.equal(releases, 1);
});

test('release() during a backoff stops it: publish() and results() end', { timeout: 30_000 }, async () => {
  script.Publish = (call) => call.fail(UNAVAILABLE, 'failed to connect to all addresses');
  script.Subscribe = (call) => call.emit('error', { code: UNAVAILABLE, details: 'failed to connect to all addresses' });
  const channel = await newClient().leaseChannel();
  const publishing = channel.publish(ids(1, 3).map((i) => ({ operation: 'op', input: i })));
  publishing.catch(() => undefined);
  const receiving = (async () => {
    for await (const _ of channel.results()) assert.fail('nothing');
  })();
  await waitUntil(() => publishCalls.length >= 3 && subscribes.length >= 3, { timeoutMs: 10_000, message: 'retries under way' });
  await channel.release();
  await receiving; // ends, as results() does on release
  // The tasks were handed to a call (which failed) before the release: publish() resolved.
  assert.deepEqual(await publishing, ids(1, 3));
  await assert.rejects(channel.close(), (err) => err instanceof SquireError && err.code === 'CANCELLED');
  await assert.rejects(channel.publish([{ operation: 'op', input: 4 }]), /closed/);
});

test('past reattachTimeoutMs every call rejects with the error it first failed with', { timeout: 30_000 }, async () => {
  script.Publish = (call, number) => call.fail(UNAVAILABLE, number === 1 ? 'Connection dropped' : 'failed to connect');
  script.Subscribe = (call, number) => call.emit('error', { code: UNAVAILABLE, details: number === 1 ? 'Connection dropped' : 'failed to connect' });
  script.ReleaseChannel = () => ({ code: UNAVAILABLE, details: 'failed to connect' });
  const client = newClient({ reattachTimeoutMs: 400 });
  const channel = await client.leaseChannel();
  const t0 = Date.now();
  const first = (/** @type {unknown} */ err) => err instanceof SquireError && err.code === 'UNAVAILABLE' && err.details === 'Connection dropped';
  await assert.rejects(channel.publish([{ operation: 'op', input: 1 }]).then(() => channel.close()), first);
  assert.ok(Date.now() - t0 >= 350, 'it tried for the time given');
  assert.ok(publishCalls.length >= 3, `${publishCalls.length} Publish calls`);
  await assert.rejects(channel.publish([{ operation: 'op', input: 2 }]), /closed/);
  await assert.rejects(async () => {
    for await (const _ of channel.results()) assert.fail('nothing');
  }, first);
  assert.ok(subscribes.length >= 3);
  await assert.rejects(channel.release(), (err) => err instanceof SquireError && err.code === 'UNAVAILABLE');

  await assert.rejects(client.leaseChannel({ reattachTimeoutMs: -1 }), RangeError);

  // reattachTimeoutMs: 0 does not try again at all.
  publishCalls = [];
  const once = await newClient({ reattachTimeoutMs: 0 }).leaseChannel();
  await assert.rejects(once.publish([{ operation: 'op', input: 1 }]).then(() => once.close()), first);
  assert.equal(publishCalls.length, 1);
  // A per-channel reattachTimeoutMs wins over the client's.
  publishCalls = [];
  const own = await newClient({ reattachTimeoutMs: 0 }).leaseChannel({ reattachTimeoutMs: 300 });
  await assert.rejects(own.publish([{ operation: 'op', input: 1 }]).then(() => own.close()), first);
  assert.ok(publishCalls.length >= 3);
});

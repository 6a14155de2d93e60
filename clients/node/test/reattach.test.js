// The reattach protocol against a scripted in-process server (grpc-js, same
// contract), where every step can be checked exactly: what the AttachDirective
// says the run has, which inputs it sends again (only those after
// DirectiveStarted.received), that an index the server sends twice reaches
// the caller once, that a refusal ends the run with that refusal, and that a
// server answering UNAVAILABLE past reattachTimeoutMs gives the first error.
// Real orchestrators killed mid-directive: durable.test.js.

import assert from 'node:assert/strict';
import { after, before, beforeEach, test } from 'node:test';

import grpc from '@grpc/grpc-js';

import { Client, SquireError, stream } from '@squire/client';

import { waitUntil } from './harness.js';
import { loadApi } from '../src/proto.js';

/** @param {unknown} value */
const json = (value) => Buffer.from(JSON.stringify(value));
/** @param {Buffer} data */
const parse = (data) => JSON.parse(data.toString());

/**
 * One RunDirective call as the script sees it: the requests so far, a way
 * to wait for more, and the replies.
 * @typedef {object} ScriptedCall
 * @property {any[]} requests
 * @property {(predicate: (requests: any[]) => boolean) => Promise<void>} until
 * @property {boolean} halfClosed
 * @property {(event: object) => void} write
 * @property {() => void} end
 * @property {(code: number, details: string) => void} fail
 */

/** @type {((call: ScriptedCall, number: number) => void | Promise<void>) | null} */
let script = null;
/** @type {ScriptedCall[]} */
let calls = [];
const server = new grpc.Server();
/** @type {string} */
let target;
/** @type {Client[]} */
const clients = [];

before(async () => {
  const api = loadApi();
  server.addService(api.DirectiveService.service, {
    RunDirective(/** @type {any} */ call) {
      /** @type {(() => void)[]} */
      let waiters = [];
      const notify = () => {
        const ws = waiters;
        waiters = [];
        ws.forEach((w) => w());
      };
      /** @type {ScriptedCall} */
      const scripted = {
        requests: [],
        halfClosed: false,
        until: async (predicate) => {
          while (!predicate(scripted.requests)) await new Promise((resolve) => waiters.push(() => resolve(undefined)));
        },
        write: (event) => call.write(event),
        end: () => call.end(),
        fail: (code, details) => call.emit('error', { code, details }),
      };
      calls.push(scripted);
      call.on('data', (/** @type {any} */ message) => {
        scripted.requests.push(message);
        notify();
      });
      call.on('end', () => {
        scripted.halfClosed = true;
        notify();
      });
      call.on('error', () => undefined);
      void script?.(scripted, calls.length);
    },
  });
  const port = await new Promise((resolve, reject) => {
    server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (err, bound) => (err ? reject(err) : resolve(bound)));
  });
  target = `127.0.0.1:${port}`;
});

beforeEach(() => {
  calls = [];
  script = null;
});

after(() => {
  for (const c of clients) c.close();
  server.forceShutdown();
});

/** @param {import('@squire/client').ClientOptions} [options] */
function newClient(options) {
  const client = new Client(target, { session: false, ...options });
  clients.push(client);
  return client;
}

/** The input values a call sent, in order. @param {any[]} requests */
const inputsOf = (requests) => requests.filter((r) => r.kind === 'inputs').flatMap((r) => r.inputs.items.map(parse));

test('the run reattaches with what it has and resends only the inputs not journaled', { timeout: 30_000 }, async () => {
  calls = [];
  script = async (call, number) => {
    if (number === 1) {
      await call.until((rs) => inputsOf(rs).length === 10);
      call.write({ started: { directiveId: 'd1' } });
      call.write({ progress: { received: 4 } });
      call.write({ items: { items: [{ index: 0, value: json(0) }, { index: 2, skipped: true, error: 'E' }, { index: 1, value: json(10) }] } });
      call.fail(grpc.status.UNAVAILABLE, 'Connection dropped');
      return;
    }
    if (number === 2) {
      // The orchestrator is not back yet.
      call.fail(grpc.status.UNAVAILABLE, 'failed to connect');
      return;
    }
    await call.until((rs) => rs.length >= 1);
    assert.equal(call.requests[0].kind, 'attach');
    assert.deepEqual({ ...call.requests[0].attach }, { directiveId: 'd1', valuesReceived: 2, skippedReceived: 1 });
    call.write({ started: { directiveId: 'd1', attached: true, received: 6, serializer: 'SERIALIZER_JSON' } });
    await call.until(() => call.halfClosed);
    assert.deepEqual(inputsOf(call.requests), [6, 7, 8, 9], 'only the inputs after the journaled ones');
    // Index 1 again: the caller must not see it twice.
    call.write({ items: { items: [{ index: 1, value: json(10) }, ...[3, 4, 5, 6, 7, 8, 9].map((i) => ({ index: i, value: json(i * 10) }))] } });
    call.end();
  };
  const client = newClient();
  const run = stream(Array.from({ length: 10 }, (_, i) => i)).map('x').events(client);
  /** @type {any[]} */
  const events = [];
  for await (const event of run) events.push(event);
  assert.equal(events.filter((e) => e.type === 'started').length, 1, 'the caller sees one started event');
  const indices = events.filter((e) => e.type === 'items').flatMap((e) => e.items.map((/** @type {any} */ item) => item.index));
  assert.deepEqual(indices.sort((a, b) => a - b), [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
  assert.equal(run.reattached, 1);
  assert.equal(run.duplicatesDropped, 1);
  assert.equal(calls.length, 3);
  assert.equal(calls[0].requests[0].kind, 'plan');
});

test('an input still being read goes on on the reattached call; input_closed sends nothing more', { timeout: 30_000 }, async () => {
  /** @type {() => void} */
  let release = () => undefined;
  const held = new Promise((resolve) => {
    release = () => resolve(undefined);
  });
  async function* inputs() {
    yield 0;
    yield 1;
    await held;
    yield 2;
  }
  calls = [];
  script = async (call, number) => {
    if (number === 1) {
      await call.until((rs) => inputsOf(rs).length === 2);
      call.write({ started: { directiveId: 'd2' } });
      call.fail(grpc.status.UNAVAILABLE, 'Connection dropped');
      return;
    }
    call.write({ started: { directiveId: 'd2', attached: true, received: 1 } });
    await call.until((rs) => inputsOf(rs).length === 1);
    assert.deepEqual(inputsOf(call.requests), [1], 'the element taken but not journaled');
    release();
    await call.until(() => call.halfClosed);
    assert.deepEqual(inputsOf(call.requests), [1, 2]);
    call.write({ items: { items: [0, 1, 2].map((i) => ({ index: i, value: json(i) })) } });
    call.end();
  };
  assert.deepEqual(await stream(inputs()).map('x').run(newClient()), [0, 1, 2]);

  calls = [];
  script = async (call, number) => {
    if (number === 1) {
      await call.until(() => call.halfClosed);
      call.write({ started: { directiveId: 'd3' } });
      call.fail(grpc.status.UNAVAILABLE, 'Connection dropped');
      return;
    }
    call.write({ started: { directiveId: 'd3', attached: true, received: 2, inputClosed: true } });
    await call.until(() => call.halfClosed);
    assert.deepEqual(inputsOf(call.requests), []);
    call.write({ fold: { value: json(42) } });
    call.end();
  };
  assert.equal(await stream([1, 2]).fold('sum').run(newClient()), 42);
});

test('a refusal of the attach ends the run with it; the time passing gives the first error', { timeout: 30_000 }, async () => {
  calls = [];
  script = async (call, number) => {
    if (number === 1) {
      await call.until(() => call.halfClosed);
      call.write({ started: { directiveId: 'd4' } });
      call.fail(grpc.status.UNAVAILABLE, 'Connection dropped');
      return;
    }
    call.fail(grpc.status.NOT_FOUND, "no directive 'd4'");
  };
  await assert.rejects(stream([1]).map('x').run(newClient()),
    (err) => err instanceof SquireError && err.code === 'NOT_FOUND' && err.details === "no directive 'd4'");

  calls = [];
  script = async (call, number) => {
    if (number === 1) {
      await call.until(() => call.halfClosed);
      call.write({ started: { directiveId: 'd5' } });
      call.fail(grpc.status.UNAVAILABLE, 'Connection dropped');
      return;
    }
    call.fail(grpc.status.UNAVAILABLE, 'failed to connect to all addresses');
  };
  const t0 = Date.now();
  await assert.rejects(stream([1]).map('x').run(newClient({ reattachTimeoutMs: 400 })),
    (err) => err instanceof SquireError && err.code === 'UNAVAILABLE' && err.details === 'Connection dropped');
  assert.ok(Date.now() - t0 >= 350, 'it tried for the time given');
  assert.ok(calls.length >= 3, `it tried ${calls.length - 1} times`);

  // Before the started event there is no id to reattach to.
  calls = [];
  script = (call) => call.fail(grpc.status.UNAVAILABLE, 'Connection dropped');
  await assert.rejects(stream([1]).map('x').run(newClient()), (err) => err instanceof SquireError && err.code === 'UNAVAILABLE');
  // (A late attach of the run before, for d5, may still arrive.)
  const attaches = calls.filter((c) => c.requests.some((r) => r.kind === 'attach' && r.attach.directiveId !== 'd5'));
  assert.deepEqual(attaches, [], 'no attach without an id');

});

test('cancelling (or closing the client) during the backoff stops reattaching', { timeout: 30_000 }, async () => {
  calls = [];
  script = async (call, number) => {
    if (number === 1) {
      await call.until(() => call.halfClosed);
      call.write({ started: { directiveId: 'd6' } });
      call.fail(grpc.status.UNAVAILABLE, 'Connection dropped');
      return;
    }
    call.fail(grpc.status.UNAVAILABLE, 'failed to connect');
  };
  const controller = new AbortController();
  const reason = new Error('enough');
  const running = stream([1]).map('x').run(newClient(), { signal: controller.signal });
  await waitUntil(() => calls.length >= 3, { timeoutMs: 10_000, message: 'two attach attempts' });
  controller.abort(reason);
  await assert.rejects(running, (err) => err === reason);

  calls = [];
  const client = newClient();
  const closing = stream([1]).map('x').run(client);
  await waitUntil(() => calls.length >= 3, { timeoutMs: 10_000, message: 'two attach attempts' });
  client.close();
  await assert.rejects(closing, (err) => err instanceof SquireError && err.code === 'UNAVAILABLE');
});

test('attach(id) retries while the orchestrator is away, and reads on from what it has', { timeout: 30_000 }, async () => {
  script = async (call, number) => {
    await call.until((rs) => rs.length >= 1);
    assert.equal(call.requests[0].kind, 'attach');
    const { valuesReceived, skippedReceived } = call.requests[0].attach;
    if (number === 1) {
      call.fail(grpc.status.UNAVAILABLE, 'failed to connect');
      return;
    }
    call.write({ started: { directiveId: 'd7', attached: true, received: 3, inputClosed: true, serializer: 'SERIALIZER_MSGPACK' } });
    if (number === 2) {
      assert.deepEqual([valuesReceived, skippedReceived], [0, 0]);
      call.write({ items: { items: [{ index: 2, value: Buffer.from([0x2a]) }] } });
      call.fail(grpc.status.UNAVAILABLE, 'Connection dropped');
      return;
    }
    assert.deepEqual([valuesReceived, skippedReceived], [1, 0]);
    call.write({ items: { items: [{ index: 0, value: Buffer.from([0x01]) }, { index: 1, value: Buffer.from([0x02]) }] } });
    call.end();
  };
  const run = newClient().attach('d7');
  /** @type {any[]} */
  const events = [];
  for await (const event of run) events.push(event);
  assert.deepEqual(events.map((e) => e.type), ['started', 'items', 'items']);
  const values = events.filter((e) => e.type === 'items').flatMap((e) => e.items.map((/** @type {any} */ i) => [i.index, i.value]));
  assert.deepEqual(values.sort(), [[0, 1], [1, 2], [2, 42]], 'msgpack, as the started event said');
  assert.equal(run.reattached, 2);
  assert.equal(run.inputsSent, 3);
});

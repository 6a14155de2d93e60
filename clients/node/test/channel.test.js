// The low-level channel API against a live orchestrator and Python workers:
// lease, publish, close, results, release.

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';

import { Client, SquireError } from '@squire/client';

import { startCluster, waitUntil } from './harness.js';

/** @type {import('./harness.js').Cluster} */
let cluster;
/** @type {Client} */
let client;

before(async () => {
  cluster = await startCluster({ orchestratorArgs: ['--no-worker-timeout', '1', '--grace', '2'] });
  client = /** @type {Client} */ (cluster.client);
});
after(() => cluster?.close());

/**
 * Every result of a channel, by task id.
 * @param {import('@squire/client').Channel} channel
 */
async function resultsById(channel) {
  const byId = new Map();
  for await (const result of channel.results()) {
    assert.ok(!byId.has(result.taskId), `task ${result.taskId} reported twice`);
    byId.set(result.taskId, result);
  }
  return byId;
}

test('publish, close, then every result arrives and the stream ends', async () => {
  const channel = await client.leaseChannel();
  try {
    assert.equal(typeof channel.channelId, 'string');
    const ids = await channel.publish([1, 2, 3, 4, 5, 6, 7, 8, 9, 10].map((n) => ({ operation: 'fib_at', input: n })));
    assert.deepEqual(ids, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
    assert.equal(await channel.close(), 10);
    assert.equal(await channel.close(), 10, 'close() is idempotent');
    const byId = await resultsById(channel);
    assert.deepEqual([...byId.keys()].sort((a, b) => a - b), ids);
    const values = ids.map((id) => {
      const result = byId.get(id);
      assert.equal(result.ok, true);
      assert.equal(result.attempt, 1);
      return result.value;
    });
    assert.deepEqual(values, [1, 1, 2, 3, 5, 8, 13, 21, 34, 55]);
  } finally {
    await channel.release();
  }
});

test('subscribing before publishing; several publish calls; task ids keep growing', async () => {
  const channel = await client.leaseChannel();
  try {
    const collected = resultsById(channel);
    const first = await channel.publish([{ operation: 'length', input: 'abc' }]);
    const second = await channel.publish([{ operation: 'length', input: 'de' }, { operation: 'length', input: '' }]);
    assert.deepEqual([...first, ...second], [1, 2, 3]);
    await channel.close();
    const byId = await collected;
    assert.deepEqual([1, 2, 3].map((id) => byId.get(id).value), [3, 2, 0]);
  } finally {
    await channel.release();
  }
});

test('combine tasks, params, chosen task ids and metadata', async () => {
  const channel = await client.leaseChannel();
  try {
    const ids = await channel.publish([
      { operation: 'concat', operands: ['a', 'b', 'c'], taskId: 100, metadata: 'left-fold' },
      { operation: 'sum', operands: [], taskId: 7 },
      { operation: 'multiply_by', input: 21, params: { factor: 2 }, metadata: Buffer.from([0, 1, 2]) },
    ]);
    assert.deepEqual(ids, [100, 7, 101]);
    await channel.close();
    const byId = await resultsById(channel);
    assert.equal(byId.get(100).value, 'abc');
    assert.equal(byId.get(100).metadata.toString(), 'left-fold');
    assert.equal(byId.get(7).value, 0, 'zero operands give empty()');
    assert.equal(byId.get(101).value, 42);
    assert.deepEqual([...byId.get(101).metadata], [0, 1, 2]);
  } finally {
    await channel.release();
  }
});

test('a failing task is a result with ok: false, not an exception', async () => {
  const channel = await client.leaseChannel();
  try {
    await channel.publish([{ operation: 'length', input: 5 }, { operation: 'no_such_op', input: 1 }]);
    await channel.close();
    const byId = await resultsById(channel);
    const failed = byId.get(1);
    assert.equal(failed.ok, false);
    assert.equal(failed.error.type, 'TypeError');
    assert.equal(failed.error.kind, 'ERROR_KIND_OPERATION');
    assert.equal(failed.error.strategy, 'FATAL_STRATEGY_TERMINATE');
    const unknown = byId.get(2);
    assert.equal(unknown.ok, false);
    assert.equal(unknown.error.kind, 'ERROR_KIND_UNKNOWN_OPERATION');
    assert.match(unknown.error.message, /no_such_op/);
  } finally {
    await channel.release();
  }
});

test('executionSeconds is the time the worker spent on the task', async () => {
  const channel = await client.leaseChannel();
  try {
    await channel.publish([0.05, 0.05, 0.05, 0].map((seconds) => ({ operation: 'sleep', input: seconds })));
    await channel.close();
    const byId = await resultsById(channel);
    for (const id of [1, 2, 3]) {
      const result = byId.get(id);
      assert.equal(result.ok, true);
      assert.ok(result.executionSeconds >= 0.05 && result.executionSeconds < 5, `task ${id}: ${result.executionSeconds}`);
    }
    const fast = byId.get(4).executionSeconds;
    assert.ok(fast > 0 && fast < 0.05, `a sleep of 0 took ${fast} s`);
  } finally {
    await channel.release();
  }
});

test('MessagePack channels', async () => {
  const channel = await client.leaseChannel({ serializer: 'msgpack' });
  try {
    assert.equal(channel.serializer, 'msgpack');
    await channel.publish([
      { operation: 'length', input: new Uint8Array([9, 9, 9, 9]) },
      { operation: 'concat', operands: ['x', 'y'] },
    ]);
    await channel.close();
    const byId = await resultsById(channel);
    assert.equal(byId.get(1).value, 4);
    assert.equal(byId.get(2).value, 'xy');
  } finally {
    await channel.release();
  }
});

test('release frees the channel, ends results() and is idempotent', async () => {
  const channel = await client.leaseChannel();
  // A task no worker offers stays queued until the no-worker timeout: release drops it.
  await channel.publish([{ operation: 'no_such_op', input: 1 }]);
  const pending = resultsById(channel);
  await waitUntil(async () => (await client.status()).channels.some((/** @type {any} */ c) => c.channelId === channel.channelId && c.published === 1), {
    message: 'the task to be published',
  });
  await channel.release();
  await channel.release();
  assert.ok((await pending).size <= 1);
  const status = await client.status();
  assert.ok(!status.channels.some((/** @type {any} */ c) => c.channelId === channel.channelId), 'the channel is gone');
  await assert.rejects(channel.publish([{ operation: 'fib_at', input: 1 }]), /closed/);
  await assert.rejects(async () => {
    for await (const _result of channel.results()) {
      // never reached
    }
  }, (err) => err instanceof SquireError && err.code === 'NOT_FOUND');
});

test('publishing after close is refused; bad tasks are refused before anything is sent', async () => {
  const channel = await client.leaseChannel();
  try {
    await assert.rejects(channel.publish(/** @type {any} */ ([{ operation: 'fib_at', input: 1 }, { input: 2 }])), TypeError);
    await assert.rejects(channel.publish([{ operation: 'fib_at', input: Number.POSITIVE_INFINITY }]), { code: 'INVALID_ARGUMENT' });
    assert.equal(await channel.close(), 0, 'nothing was published');
    await assert.rejects(channel.publish([{ operation: 'fib_at', input: 1 }]), /closed/);
  } finally {
    await channel.release();
  }
});

test('an unknown serializer is refused before leasing', async () => {
  await assert.rejects(client.leaseChannel({ serializer: 'xml' }), RangeError);
});

// Durable leased channels with the Node client against real services: an
// orchestrator journaling to its --state-dir (the default SQLite store) is
// SIGKILLed (or SIGTERMed) while a channel streams, tasks paced behind their results so
// that a Publish call is open and a Subscribe stream mid-way, and restarted
// on the same port and state directory. The channel sends again what the
// broken Publish call had not had acknowledged (the orchestrator leaves out
// ids it has), subscribes again with how many results it has, and every
// task's result arrives exactly once with its value. (The protocol step by
// step, against a scripted server: channel_resend.test.js.)

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';

import { Client } from '@squire/client';

import { startCluster, waitUntil } from './harness.js';

/** @type {import('./harness.js').Cluster} */
let cluster;
/** @type {Client[]} */
const clients = [];

before(async () => {
  cluster = await startCluster({
    orchestratorArgs: ['--no-worker-timeout', '30', '--grace', '1'],
    workers: { count: 2, executor: 'thread', concurrency: 4 },
  });
});
after(async () => {
  for (const c of clients) c.close();
  await cluster?.close();
});

/**
 * Distinct inputs for the 'sleep' operation, which returns its input: the
 * value of task i must be seconds(i), so a result for the wrong task shows.
 * @param {number} i
 */
const seconds = (i) => 0.002 + i * 1e-6;

/** The orchestrator answers again (a fresh client each time: no stale backoff). */
async function serving() {
  await waitUntil(async () => {
    const probe = new Client(cluster.target);
    try {
      return (await probe.status({ timeoutMs: 1000 })).state === 'running';
    } catch {
      return false;
    } finally {
      probe.close();
    }
  }, { timeoutMs: 30_000, intervalMs: 100, message: 'the orchestrator serving' });
}

/**
 * Publish n tasks paced behind their results, the orchestrator stopped with
 * `signal` right after task 1000 is handed to its Publish call and started
 * again on its journal; check every result and the counts.
 * @param {import('node:test').TestContext} t
 * @param {NodeJS.Signals} signal
 */
async function acrossRestart(t, signal) {
  await serving();
  const client = new Client(cluster.target);
  clients.push(client);
  const channel = await client.leaseChannel();
  const n = 2000;
  const ahead = 200; // tasks published ahead of the results
  const killAt = 1000; // right after publishing task 1000: its Publish call is open
  /** @type {Map<number, number>} */
  const counts = new Map();
  /** @type {Map<number, unknown>} */
  const values = new Map();
  /** @type {(() => void)[]} */
  let waiting = [];
  const resultCame = () => {
    const ws = waiting;
    waiting = [];
    ws.forEach((wake) => wake());
  };
  /** @type {Promise<void> | null} */
  let restart = null;
  let closed = -1;

  const publisher = (async () => {
    for (let i = 0; i < n; i += 1) {
      while (counts.size < i - ahead) await new Promise((resolve) => waiting.push(() => resolve(undefined)));
      await channel.publish([{ operation: 'sleep', input: seconds(i), taskId: i }]);
      if (i === killAt) restart = cluster.restartOrchestrator(signal);
    }
    closed = await channel.close();
  })();
  publisher.catch(() => undefined);

  for await (const result of channel.results()) {
    assert.equal(result.ok, true, `task ${result.taskId}: ${JSON.stringify(!result.ok && result.error)}`);
    counts.set(result.taskId, (counts.get(result.taskId) ?? 0) + 1);
    if (result.ok) values.set(result.taskId, result.value);
    resultCame();
  }
  await publisher;
  await restart;
  assert.ok(restart !== null, 'the orchestrator was killed mid-channel');

  const lost = [];
  const wrong = [];
  for (let i = 0; i < n; i += 1) {
    if (!counts.has(i)) lost.push(i);
    else if (values.get(i) !== seconds(i)) wrong.push(i);
  }
  const twice = [...counts].filter(([, c]) => c > 1).map(([i]) => i);
  assert.deepEqual({ lost: lost.slice(0, 10), twice: twice.slice(0, 10), wrong: wrong.slice(0, 10) },
    { lost: [], twice: [], wrong: [] }, `${lost.length} lost, ${twice.length} twice, ${wrong.length} wrong`);
  assert.equal(counts.size, n);
  assert.equal(channel.received, n);
  assert.ok(channel.resubscribed >= 1, `resubscribed ${channel.resubscribed} times`);
  assert.ok(channel.resent >= 1, `Publish calls made again: ${channel.resent}`);
  assert.equal(channel.published + channel.duplicates, n,
    `published ${channel.published} + duplicates ${channel.duplicates}`);
  assert.equal(closed, n, 'close() counts every task acknowledged');
  t.diagnostic(`published ${channel.published}, duplicates ${channel.duplicates}, `
    + `Publish calls made again ${channel.resent}, resubscribed ${channel.resubscribed}`);
  await channel.release();
  const status = await client.status();
  assert.ok(!status.channels.some((/** @type {any} */ c) => c.channelId === channel.channelId), 'released');
}

test('a channel across an orchestrator SIGKILL: every result exactly once, with its value', { timeout: 120_000 },
  (t) => acrossRestart(t, 'SIGKILL'));

test('a channel across an orchestrator SIGTERM (a graceful restart): the same', { timeout: 120_000 },
  (t) => acrossRestart(t, 'SIGTERM'));

test('a channel leased before a restart is there after it: publish, close and read on', { timeout: 90_000 }, async () => {
  await serving();
  const client = new Client(cluster.target);
  clients.push(client);
  const channel = await client.leaseChannel();
  await channel.publish([1, 2, 3].map((i) => ({ operation: 'sleep', input: seconds(i), taskId: i })));
  // Read one result, then the orchestrator goes away (idle, SIGKILL) and comes back.
  const results = channel.results();
  const firstResult = await results.next();
  assert.equal(firstResult.done, false);
  await waitUntil(() => channel.published === 3, { timeoutMs: 10_000, message: 'the tasks acknowledged' });
  await cluster.restartOrchestrator();
  await channel.publish([4, 5].map((i) => ({ operation: 'sleep', input: seconds(i), taskId: i })));
  assert.equal(await channel.close(), 5);
  /** @type {Map<number, unknown>} */
  const got = new Map();
  if (!firstResult.done && firstResult.value.ok) got.set(firstResult.value.taskId, firstResult.value.value);
  for await (const result of { [Symbol.asyncIterator]: () => results }) {
    assert.ok(!got.has(result.taskId), `task ${result.taskId} twice`);
    if (result.ok) got.set(result.taskId, result.value);
  }
  assert.deepEqual([...got.keys()].sort(), [1, 2, 3, 4, 5]);
  for (const [id, value] of got) assert.equal(value, seconds(id));
  assert.equal(channel.received, 5);
  assert.deepEqual([channel.published, channel.duplicates], [5, 0], 'nothing was unacknowledged at the kill');
  await channel.release();
});

// Durable directives with the Node client against real services (issue 15):
// an orchestrator journaling to its --state-dir (the default SQLite store) is
// SIGKILLed mid-directive (a map, a chain ending in a fold, session calls)
// and restarted on the same port and state directory; the client's runs
// reattach by themselves and every index arrives exactly once with its
// exact value. Detached directives: submit,
// leave, attach from another client (across a kill too); list and cancel by
// id; and a run whose orchestrator does not come back in time rejects with
// the error its call failed with.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import { Client, SquireError, stream } from '@squire/client';

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

/** @param {import('@squire/client').ClientOptions} [options] */
function newClient(options) {
  const client = new Client(cluster.target, options);
  clients.push(client);
  return client;
}

/**
 * Distinct inputs for the 'sleep' operation, which returns its input: the
 * value at index i must be seconds(i), so a result at the wrong index shows.
 * @param {number} i
 */
const seconds = (i) => 0.002 + i * 1e-6;

/** @param {number} n */
const range = (n) => Array.from({ length: n }, (_, i) => i);

/** A promise and the function that resolves it. */
function gate() {
  /** @type {() => void} */
  let open = () => undefined;
  const opened = new Promise((resolve) => {
    open = () => resolve(undefined);
  });
  return { opened, open };
}

/**
 * Every index exactly once, each with its value.
 * @param {Map<number, number>} counts deliveries per index
 * @param {Map<number, unknown>} values
 * @param {number} n
 * @param {(i: number) => number} [expected] the value at index i
 */
function assertExactlyOnce(counts, values, n, expected = seconds) {
  const lost = range(n).filter((i) => !counts.has(i));
  const twice = [...counts].filter(([, c]) => c > 1).map(([i]) => i);
  assert.deepEqual({ lost: lost.slice(0, 10), twice: twice.slice(0, 10) }, { lost: [], twice: [] },
    `${lost.length} lost, ${twice.length} delivered twice`);
  assert.equal(counts.size, n);
  const wrong = range(n).filter((i) => values.get(i) !== expected(i));
  assert.deepEqual(wrong.slice(0, 10), [], `${wrong.length} wrong values`);
}

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

describe('a run reattaches across an orchestrator SIGKILL', () => {
  test('a streamed map: killed mid-directive, restarted on its journal: every index exactly once', { timeout: 90_000 }, async () => {
    const client = newClient();
    const n = 1600;
    // Half the input goes out at once; the rest waits until the orchestrator
    // is back, so the input continues on the reattached call.
    const rest = gate();
    async function* inputs() {
      for (let i = 0; i < n / 2; i += 1) yield seconds(i);
      await rest.opened;
      for (let i = n / 2; i < n; i += 1) yield seconds(i);
    }
    const run = stream(inputs()).map('sleep').events(client);
    /** @type {Map<number, number>} */
    const counts = new Map();
    /** @type {Map<number, unknown>} */
    const values = new Map();
    /** @type {Promise<void> | null} */
    let restart = null;
    for await (const event of run) {
      if (event.type !== 'items') continue;
      for (const { index, value } of event.items) {
        counts.set(index, (counts.get(index) ?? 0) + 1);
        values.set(index, value);
      }
      if (restart === null && counts.size >= 300) {
        restart = cluster.restartOrchestrator().then(() => rest.open());
      }
    }
    await restart;
    assertExactlyOnce(counts, values, n);
    assert.ok(run.reattached >= 1, `reattached ${run.reattached} times`);
    assert.equal(run.duplicatesDropped, 0, 'the orchestrator sent no index twice');
    assert.equal(run.inputsSent, n);
  });

  test('a chain map -> map -> fold: killed mid-directive, the fold value exact', { timeout: 90_000 }, async () => {
    await serving();
    const client = newClient();
    const n = 1600;
    // Multiples of 2^-10: their sums are exact in any grouping the tree reduction takes.
    const xs = range(n).map((i) => ((i % 8) + 1) / 1024);
    const run = stream(xs).map('sleep').map('multiply_by', { factor: 2 }).fold('sum').events(client);
    /** @type {Promise<void> | null} */
    let restart = null;
    /** @type {unknown[]} */
    const folds = [];
    for await (const event of run) {
      // A fold emits no items: kill on the progress clock.
      if (event.type === 'progress' && restart === null && event.progress.completed >= 300) {
        restart = cluster.restartOrchestrator();
      } else if (event.type === 'fold') {
        folds.push(event.value);
      }
    }
    await restart;
    assert.ok(restart !== null, 'killed during the directive');
    assert.deepEqual(folds, [2 * xs.reduce((a, b) => a + b, 0)]);
    assert.ok(run.reattached >= 1, `reattached ${run.reattached} times`);
  });

  test('run() and small session calls in flight complete across the kill', { timeout: 90_000 }, async () => {
    await serving();
    const client = newClient();
    // Small arrays ride the session; the larger one a RunDirective call. A
    // progress event comes after the call's started event: then it knows its
    // directive id and can reattach.
    const progressed = new Set();
    const options = (/** @type {number} */ k) => ({ onProgress: () => progressed.add(k) });
    const small = range(4).map((k) => stream(range(16).map((i) => seconds(k * 16 + i) + 0.1))
      .map('sleep').run(client, options(k)));
    const big = stream(range(400).map(seconds)).map('sleep').run(client, options(4));
    const all = Promise.all([...small, big]);
    all.catch(() => undefined);
    await waitUntil(() => progressed.size === 5, { timeoutMs: 20_000, message: 'every call started' });
    await cluster.restartOrchestrator();
    const got = await Promise.all(small);
    got.forEach((values, k) => assert.deepEqual(values, range(16).map((i) => seconds(k * 16 + i) + 0.1)));
    assert.deepEqual(await big, range(400).map(seconds));
  });
});

describe('detached directives', () => {
  test('submit, leave; the orchestrator is SIGKILLed; another client attaches and gets every result', { timeout: 90_000 }, async () => {
    await serving();
    const n = 300;
    const slow = (/** @type {number} */ i) => seconds(i) + 0.02; // about 0.8 s on 8 slots
    const submitter = newClient();
    const id = await stream(range(n).map(slow)).map('sleep').submit(submitter);
    assert.equal(typeof id, 'string');
    submitter.close();
    const listed = (await newClient().directives()).find((d) => d.directiveId === id);
    assert.ok(listed, `${id} is listed`);
    assert.equal(listed.detached, true);
    assert.equal(listed.attached, false);
    assert.equal(listed.received, n);
    assert.equal(listed.state, 'running', 'killed while it runs');
    await cluster.restartOrchestrator();
    const reader = newClient();
    const run = reader.attach(id);
    /** @type {number[]} */
    const order = [];
    /** @type {Map<number, number>} */
    const counts = new Map();
    /** @type {Map<number, unknown>} */
    const values = new Map();
    /** @type {any[]} */
    const events = [];
    for await (const event of run) {
      events.push(event);
      if (event.type !== 'items') continue;
      for (const { index, value } of event.items) {
        order.push(index);
        counts.set(index, (counts.get(index) ?? 0) + 1);
        values.set(index, value);
      }
    }
    assert.deepEqual(events[0], { type: 'started', directiveId: id });
    assertExactlyOnce(counts, values, n, slow);
    assert.equal(run.inputsSent, n);
    // Read again: the same results, in the same order.
    const again = [];
    for await (const event of newClient().attach(id)) {
      if (event.type === 'items') again.push(...event.items.map((item) => item.index));
    }
    assert.deepEqual(again, order);
  });

  test('attach(id).result(): a detached fold', { timeout: 60_000 }, async () => {
    await serving();
    const client = newClient();
    const id = await stream(range(50)).map('multiply_by', { factor: 3 }).fold('sum').submit(client, { serializer: 'msgpack' });
    const run = newClient().attach(id);
    assert.equal(await run.result(), 3 * (49 * 50) / 2);
    assert.equal(run.fold, true);
    assert.equal(await newClient().attach(id).result(), 3675, 'a second reader gets the same value');
  });

  test('list and cancel by id; unknown ids are NOT_FOUND', { timeout: 60_000 }, async () => {
    await serving();
    const client = newClient();
    const id = await stream(range(2000).map(() => 0.05)).map('sleep').submit(client);
    const info = (await client.directives()).find((d) => d.directiveId === id);
    assert.equal(info?.state, 'running');
    assert.equal(info?.plan, 'map(sleep)');
    await client.cancel(id);
    await waitUntil(async () => !(await client.directives()).some((d) => d.directiveId === id),
      { timeoutMs: 10_000, message: 'the cancelled directive to be gone' });
    const notFound = (/** @type {unknown} */ err) => err instanceof SquireError && err.code === 'NOT_FOUND';
    await assert.rejects(client.cancel(id), notFound);
    await assert.rejects(client.attach(id).result(), notFound);
    await assert.rejects(client.cancel('no-such-directive'), notFound);
  });
});

describe('when the orchestrator does not come back in time', () => {
  test('reattachTimeoutMs passes: the run rejects with the error its call failed with', { timeout: 60_000 }, async () => {
    await serving();
    const client = newClient({ reattachTimeoutMs: 1500 });
    const started = gate();
    const run = stream(range(400).map(() => 0.05)).map('sleep').events(client);
    const consumed = (async () => {
      for await (const event of run) if (event.type === 'started') started.open();
    })();
    consumed.catch(() => undefined);
    await started.opened;
    await cluster.killOrchestrator();
    const killedAt = Date.now();
    await assert.rejects(consumed, (err) => err instanceof SquireError && err.code === 'UNAVAILABLE');
    const waited = Date.now() - killedAt;
    assert.ok(waited >= 1000 && waited < 15_000, `rejected after ${waited} ms`);
    // reattachTimeoutMs: 0 does not try at all.
    await cluster.restartOrchestrator();
    await serving();
    const single = newClient({ reattachTimeoutMs: 0 });
    const going = gate();
    const failing = (async () => {
      for await (const event of stream(range(400).map(() => 0.05)).map('sleep').events(single)) {
        if (event.type === 'started') going.open();
      }
    })();
    failing.catch(() => undefined);
    await going.opened;
    await cluster.killOrchestrator();
    const t0 = Date.now();
    await assert.rejects(failing, (err) => err instanceof SquireError && err.code === 'UNAVAILABLE');
    assert.ok(Date.now() - t0 < 1000, 'no reattaching');
    await cluster.restartOrchestrator();
  });
});

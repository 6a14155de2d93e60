// The shared RunDirectives session against a live orchestrator and Python
// workers: small array directives ride one stream, concurrent calls each get
// their own results, a failing call ends only itself, aborting cancels the
// call on the orchestrator, `session: false` uses RunDirective, and, with
// reattaching off, a killed orchestrator rejects the calls in flight instead
// of leaving them hanging (with it on, they reattach: durable.test.js).
//
// Which RPCs a client makes is observed with a grpc-js interceptor provider
// (passed through channelOptions), so the counts are the calls on the wire.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import { Client, SquireError, stream } from '@squire/client';

import { startCluster, waitUntil } from './harness.js';

const range = (/** @type {number} */ lo, /** @type {number} */ hi) => Array.from({ length: hi - lo }, (_, i) => lo + i);
const fib = (/** @type {number} */ n) => {
  let [a, b] = [0, 1];
  for (let i = 0; i < n; i += 1) [a, b] = [b, a + b];
  return a;
};
const RUN_DIRECTIVE = '/squire.api.v1.DirectiveService/RunDirective';
const RUN_DIRECTIVES = '/squire.api.v1.DirectiveService/RunDirectives';

/** @type {import('./harness.js').Cluster} */
let cluster;
/** @type {Client[]} */
const clients = [];

before(async () => {
  // Nobody offers 'nobody_offers': calls of it wait in the queue for 30 s.
  cluster = await startCluster({ orchestratorArgs: ['--no-worker-timeout', '30', '--grace', '2'] });
});
after(async () => {
  for (const c of clients) c.close();
  await cluster?.close();
});

/**
 * A client of the cluster that records the path of every call it starts.
 * @param {import('@squire/client').ClientOptions} [options]
 */
function countingClient(options = {}) {
  /** @type {string[]} */
  const paths = [];
  const client = new Client(cluster.target, {
    ...options,
    channelOptions: {
      interceptor_providers: [(/** @type {any} */ method) => {
        paths.push(method.path);
        return undefined;
      }],
    },
  });
  clients.push(client);
  const count = (/** @type {string} */ path) => paths.filter((p) => p === path).length;
  return { client, count };
}

/** The orchestrator as the cluster's own client sees it. */
const status = () => /** @type {Client} */ (cluster.client).status();

/** No directive left on the orchestrator (cancelled ones are dropped). */
async function noDirectivesLeft() {
  /** @type {any[]} */
  let left = [];
  await waitUntil(async () => {
    left = (await status()).directives;
    return left.length === 0;
  }, { timeoutMs: 10_000, message: () => `the orchestrator to drop every directive; left: ${JSON.stringify(left)}` });
}

/** @param {number} n */
async function queued(n) {
  let depth = -1;
  await waitUntil(async () => {
    depth = (await status()).queueDepth;
    return depth === n;
  }, { timeoutMs: 10_000, message: () => `${n} queued tasks (queue depth ${depth})` });
}

describe('small directives share one RunDirectives stream', () => {
  test('many concurrent small calls on one client each get their own results', async () => {
    const { client, count } = countingClient();
    const folds = range(0, 40).map((n) => stream(range(0, n)).map('fib_at').fold('sum').run(client));
    const maps = range(1, 21).map((n) => stream(range(0, n)).map('multiply_by', { factor: n }).run(client));
    const words = stream(['hel', 'lo']).map('length').run(client, { serializer: 'msgpack' });
    assert.deepEqual(await Promise.all(folds), range(0, 40).map((n) => range(0, n).map(fib).reduce((a, b) => a + b, 0)));
    assert.deepEqual(await Promise.all(maps), range(1, 21).map((n) => range(0, n).map((x) => x * n)));
    assert.deepEqual(await words, [3, 2]);
    assert.equal(count(RUN_DIRECTIVES), 1, 'one session stream for all 61 calls');
    assert.equal(count(RUN_DIRECTIVE), 0);
  });

  test('a session call has the events, directiveId, progress and inputsSent of a RunDirective call', async () => {
    const { client, count } = countingClient();
    /** @type {any[]} */
    const progress = [];
    const run = stream(range(1, 11)).map('fib_at').fold('sum').events(client, { onProgress: (p) => progress.push(p) });
    const events = [];
    for await (const event of run) events.push(event);
    assert.equal(count(RUN_DIRECTIVES), 1);
    assert.equal(count(RUN_DIRECTIVE), 0);
    assert.equal(events[0].type, 'started');
    assert.equal(typeof run.directiveId, 'string');
    assert.equal(events[0].directiveId, run.directiveId);
    assert.deepEqual(events.at(-1), { type: 'fold', value: 143 });
    assert.equal(run.inputsSent, 10);
    assert.ok(progress.length >= 1, 'onProgress was called');
    assert.equal(progress.at(-1).completed, 10);
    assert.deepEqual(run.progress, progress.at(-1));
  });

  test('more than 64 inputs, or a generator, use RunDirective', async () => {
    const { client, count } = countingClient();
    assert.deepEqual(await stream(range(0, 64)).fold('sum').run(client), 2016);
    assert.equal(count(RUN_DIRECTIVES), 1);
    assert.equal(await stream(range(0, 65)).fold('sum').run(client), 2080);
    assert.equal(await stream(range(0, 3).values()).fold('sum').run(client), 3);
    assert.equal(count(RUN_DIRECTIVE), 2);
    assert.equal(count(RUN_DIRECTIVES), 1);
  });

  test('session: false runs every directive on its own RunDirective call', async () => {
    const { client, count } = countingClient({ session: false });
    assert.deepEqual(await stream([1, 2, 3]).map('fib_at').run(client), [1, 1, 2]);
    assert.equal(await stream([4]).fold('sum').run(client), 4);
    assert.equal(count(RUN_DIRECTIVE), 2);
    assert.equal(count(RUN_DIRECTIVES), 0);
  });
});

describe('errors on the session', () => {
  test('a failing call rejects with its own error; the calls beside it succeed', async () => {
    const { client, count } = countingClient();
    // Every promise gets its handler at once: none may reject unobserved.
    const good = Promise.all(range(0, 20).map((n) => stream([n]).map('fib_at').run(client)));
    const [fatal, badPlan, notMonoid, badBytes] = [
      stream(['ok', 5]).map('length').run(client),
      client.run([{ fold: 'sum' }, { map: 'fib_at' }], [1]),
      stream(['a', 'b']).fold('length').run(client),
      client.run([{ map: 'length' }], ['{oops'], { raw: true }),
    ].map((promise) => promise.then(() => assert.fail('expected a rejection')));
    await Promise.allSettled([good, fatal, badPlan, notMonoid, badBytes]);
    await assert.rejects(fatal, (err) => err instanceof SquireError && err.code === 'ABORTED'
      && /^Fatal operation error: .*has no len/.test(err.details));
    await assert.rejects(badPlan, (err) => err instanceof SquireError && err.code === 'INVALID_ARGUMENT'
      && /must be the last stage/.test(err.details));
    await assert.rejects(notMonoid, (err) => err instanceof SquireError && err.code === 'INVALID_ARGUMENT'
      && /not a monoid/.test(err.details));
    await assert.rejects(badBytes, (err) => err instanceof SquireError && err.code === 'INVALID_ARGUMENT'
      && /not valid JSON/.test(err.details));
    assert.deepEqual(await good, range(0, 20).map((n) => [fib(n)]));
    // The session survived the failures.
    assert.deepEqual(await stream([10]).map('fib_at').run(client), [55]);
    assert.equal(count(RUN_DIRECTIVES), 1);
    assert.equal(count(RUN_DIRECTIVE), 0);
  });
});

describe('cancelling a session call', () => {
  test('an AbortSignal cancels the call on the orchestrator and rejects with its reason', async () => {
    const { client, count } = countingClient();
    const controller = new AbortController();
    const reason = new Error('stop waiting');
    const run = stream([1]).map('nobody_offers').run(client, { signal: controller.signal });
    await queued(1);
    controller.abort(reason);
    await assert.rejects(run, (err) => err === reason);
    await noDirectivesLeft();
    assert.equal(count(RUN_DIRECTIVES), 1);
    // The session goes on.
    assert.deepEqual(await stream([5]).map('fib_at').run(client), [5]);
  });

  test('leaving the event loop early cancels the call', async () => {
    const { client } = countingClient();
    const run = stream([1, 2]).map('nobody_offers').events(client);
    for await (const event of run) {
      assert.equal(event.type, 'started');  // sent on the progress clock while the call waits
      break;
    }
    await noDirectivesLeft();
  });
});

describe('the orchestrator goes away, reattaching off', () => {
  test('calls in flight reject instead of hanging; calls work again once it is back', { timeout: 90_000 }, async () => {
    const { client, count } = countingClient({ reattachTimeoutMs: 0 });
    assert.deepEqual(await stream([3]).map('fib_at').run(client).catch((err) => assert.fail(`${err}\n${cluster.log('orchestrator')}`)), [2]);
    const inFlight = Promise.allSettled(range(0, 4).map((i) => stream([i]).map('nobody_offers').run(client)));
    await queued(4);
    await cluster.killOrchestrator();
    const settled = await inFlight;
    for (const outcome of settled) {
      assert.equal(outcome.status, 'rejected');
      const err = /** @type {PromiseRejectedResult} */ (outcome).reason;
      assert.ok(err instanceof SquireError, `not a SquireError: ${err}`);
      assert.equal(err.code, 'UNAVAILABLE');
    }
    // While it is down, a new call rejects too.
    await assert.rejects(stream([3]).map('fib_at').run(client), (err) => err instanceof SquireError && err.code === 'UNAVAILABLE');
    await cluster.restartOrchestrator();
    // Once it is back, the same client opens a new session (after gRPC's reconnect backoff).
    /** @type {unknown} */
    let last;
    const result = await waitUntil(async () => {
      try {
        return await stream([3]).map('fib_at').run(client);
      } catch (err) {
        last = err;
        return null;
      }
    }, { timeoutMs: 60_000, intervalMs: 200, message: () => `a call to succeed again (last error: ${last})` });
    assert.deepEqual(result, [2]);
    assert.ok(count(RUN_DIRECTIVES) >= 2, 'a new session stream');
    assert.equal(count(RUN_DIRECTIVE), 0);
  });
});

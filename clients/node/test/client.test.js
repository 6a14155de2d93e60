// The Client against a live orchestrator and Python workers: directives
// (map, fold, chains), iteration and events, cancellation, errors, MessagePack,
// status, and the fib_sum example.

import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { once } from 'node:events';
import { createServer } from 'node:net';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { after, before, describe, test } from 'node:test';

import { Client, PayloadError, SquireError, stream } from '@squire/client';

import { startCluster, waitUntil } from './harness.js';

const EXAMPLE = fileURLToPath(new URL('../examples/fib_sum.js', import.meta.url));
const range = (/** @type {number} */ lo, /** @type {number} */ hi) => Array.from({ length: hi - lo }, (_, i) => lo + i);
const fib = (/** @type {number} */ n) => {
  let [a, b] = [0, 1];
  for (let i = 0; i < n; i += 1) [a, b] = [b, a + b];
  return a;
};

/** @type {import('./harness.js').Cluster} */
let cluster;
/** @type {Client} */
let client;

before(async () => {
  cluster = await startCluster({ orchestratorArgs: ['--no-worker-timeout', '1', '--grace', '2'] });
  client = /** @type {Client} */ (cluster.client);
});
after(() => cluster?.close());

/** No directive left on the orchestrator (cancelled ones are dropped). */
async function noDirectivesLeft() {
  /** @type {any[]} */
  let left = [];
  await waitUntil(async () => {
    left = (await client.status()).directives;
    return left.length === 0;
  }, {
    timeoutMs: 10_000,
    message: () => `the orchestrator to drop every directive; left: ${JSON.stringify(left)}`,
  });
}

describe('the fib_sum example', () => {
  test('prints 143 for the target given as an argument', async () => {
    const { stdout } = await promisify(execFile)(process.execPath, [EXAMPLE, cluster.target]);
    assert.equal(stdout, '143\n');
  });

  test('reads SQUIRE_TARGET when no argument is given', async () => {
    const env = { ...process.env, SQUIRE_TARGET: cluster.target };
    const { stdout } = await promisify(execFile)(process.execPath, [EXAMPLE], { env });
    assert.equal(stdout, '143\n');
  });
});

describe('run', () => {
  test('map gives the results in input order', async () => {
    assert.deepEqual(await stream(['hel', 'lo', ' world', '!']).map('length').run(client), [3, 2, 6, 1]);
  });

  test('map over many elements keeps every index', async () => {
    const inputs = range(1, 71);
    assert.deepEqual(await stream(inputs).map('fib_at').run(client), inputs.map(fib));
  });

  test('fold, including an empty and a single-element input', async () => {
    assert.equal(await stream(range(1, 101)).fold('sum').run(client), 5050);
    assert.equal(await stream([]).fold('sum').run(client), 0);
    assert.equal(await stream(['solo']).fold('concat').run(client), 'solo');
  });

  test('a non-commutative fold is the left fold', async () => {
    const words = range(0, 50).map((i) => `${i},`);
    assert.equal(await stream(words).fold('concat').run(client), words.join(''));
  });

  test('chains: map -> fold and map -> map -> fold with params', async () => {
    assert.equal(await stream(range(1, 11)).map('fib_at').fold('sum').run(client), 143);
    assert.equal(await stream(range(1, 6)).map('multiply_by', { factor: 2 }).fold('multiply').run(client), 3840);
    const chained = stream(range(1, 6)).map('fib_at').map('multiply_by', { factor: 10 });
    assert.deepEqual(await chained.run(client), [10, 10, 20, 30, 50]);
  });

  test('client.run takes a plan as data', async () => {
    assert.equal(await client.run([{ map: 'fib_at' }, { fold: 'sum' }], range(1, 11)), 143);
    const plan = { stages: [{ map: 'length' }], taskTimeoutSeconds: 30 };
    assert.deepEqual(await client.run(plan, ['ab', 'c']), [2, 1]);
  });

  test('inputs from a lazy generator and a slow async generator', async () => {
    function* numbers() {
      for (let i = 1; i <= 2000; i += 1) yield i;
    }
    const doubled = await stream(numbers()).map('multiply_by', { factor: 2 }).run(client);
    assert.equal(doubled.length, 2000);
    assert.deepEqual(doubled.slice(0, 3), [2, 4, 6]);
    assert.equal(doubled[1999], 4000);

    async function* slow() {
      for (let i = 1; i <= 5; i += 1) {
        await new Promise((resolve) => setImmediate(resolve));
        yield i;
      }
    }
    assert.equal(await stream(slow()).map('fib_at').fold('sum').run(client), 12);
  });

  test('raw inputs are sent verbatim', async () => {
    const raw = ['"abc"', Buffer.from('[1,2]')];
    assert.deepEqual(await client.run([{ map: 'length' }], raw, { raw: true }), [3, 2]);
  });
});

describe('iter and events', () => {
  test('iter yields {index, value} for every element once', async () => {
    const inputs = range(1, 41);
    const seen = new Map();
    for await (const { index, value } of stream(inputs).map('fib_at').iter(client)) {
      assert.ok(!seen.has(index), `index ${index} twice`);
      seen.set(index, value);
    }
    assert.deepEqual([...seen.keys()].sort((a, b) => a - b), range(0, 40));
    for (const [index, value] of seen) assert.equal(value, fib(inputs[index]));
  });

  test('iter refuses a plan that ends in a fold', () => {
    assert.throws(() => stream([1]).fold('sum').iter(client), TypeError);
  });

  test('events: started first, progress along the way, the fold value last', async () => {
    /** @type {any[]} */
    const progress = [];
    const run = stream(range(1, 21)).map('fib_at').fold('sum').events(client, {
      onProgress: (p) => progress.push(p),
    });
    const events = [];
    for await (const event of run) events.push(event);
    assert.equal(events[0].type, 'started');
    assert.equal(typeof run.directiveId, 'string');
    assert.equal(events[0].directiveId, run.directiveId);
    assert.deepEqual(events.at(-1), { type: 'fold', value: range(1, 21).map(fib).reduce((a, b) => a + b) });
    assert.ok(progress.length >= 1, 'onProgress was called');
    const last = progress.at(-1);
    assert.equal(last.completed, 20);
    assert.equal(last.total, 20);
    assert.deepEqual(run.progress, last);
    assert.equal(run.inputsSent, 20);
  });

  test('a run can be iterated only once', async () => {
    const run = stream([1]).map('fib_at').events(client);
    for await (const _event of run) {
      // drain
    }
    await assert.rejects(async () => {
      for await (const _event of run) {
        // never reached
      }
    }, /only once/);
  });
});

describe('cancellation', () => {
  test('leaving iter early cancels the directive', async () => {
    for await (const item of stream(range(1, 500)).map('fib_at').iter(client)) {
      assert.equal(typeof item.index, 'number');
      break;
    }
    await noDirectivesLeft();
  });

  test('an AbortSignal cancels a run and rejects with its reason', async () => {
    const controller = new AbortController();
    const reason = new Error('stop now');
    async function* endless() {
      for (let i = 1; ; i += 1) {
        if (i === 50) controller.abort(reason);
        yield (i % 20) + 1;
      }
    }
    await assert.rejects(stream(endless()).map('fib_at').run(client, { signal: controller.signal }), (err) => err === reason);
    await noDirectivesLeft();
  });

  test('an already aborted signal rejects before anything is sent', async () => {
    const signal = AbortSignal.abort();
    await assert.rejects(stream([1]).map('fib_at').run(client, { signal }), { name: 'AbortError' });
  });

  test('an error from the input iterable rejects the run with that error', async () => {
    const boom = new Error('the source broke');
    function* broken() {
      yield 1;
      throw boom;
    }
    await assert.rejects(stream(broken()).map('fib_at').run(client), (err) => err === boom);
    await noDirectivesLeft();
  });
});

describe('errors', () => {
  /**
   * @param {Promise<unknown>} promise
   * @param {string} code
   * @param {RegExp} details
   */
  async function rejectsWith(promise, code, details) {
    await assert.rejects(promise, (err) => {
      assert.ok(err instanceof SquireError, `not a SquireError: ${err}`);
      assert.equal(err.code, code);
      assert.match(err.details, details);
      assert.ok(err.message.includes(err.details));
      return true;
    });
  }

  test('an unknown operation: FAILED_PRECONDITION', async () => {
    await rejectsWith(stream([1]).map('no_such_op').run(client), 'FAILED_PRECONDITION', /no connected worker offers operation 'no_such_op'/);
  });

  test('a fatal operation error: ABORTED, "Fatal operation error: ..."', async () => {
    await rejectsWith(stream(['ok', 5]).map('length').run(client), 'ABORTED', /^Fatal operation error: .*has no len/);
  });

  test('a bad plan: INVALID_ARGUMENT', async () => {
    await rejectsWith(client.run([{ fold: 'sum' }, { map: 'fib_at' }], [1]), 'INVALID_ARGUMENT', /must be the last stage/);
    await rejectsWith(client.run([{ fold: 'length' }], ['a', 'b']), 'INVALID_ARGUMENT', /not a monoid/);
    assert.throws(() => stream([1]).fold('sum').map('fib_at'), /fold must be the last stage/);
  });

  test('params are checked when a worker calls the operation, as the README says', async () => {
    // The plan is accepted: the orchestrator does not know multiply_by's signature.
    await rejectsWith(stream([1, 2]).map('multiply_by').run(client), 'ABORTED',
      /^Fatal operation error: multiply_by\(\) missing 1 required keyword-only argument: 'factor' \[TypeError in 'multiply_by' at element \d\]/);
    await rejectsWith(stream(['abc']).map('length', { unit: 'chars' }).run(client), 'ABORTED',
      /unexpected keyword argument 'unit'/);
    // No element, no call: nothing fails.
    assert.deepEqual(await stream([]).map('multiply_by').run(client), []);
    // Params that are not a mapping: this client refuses them before sending
    // (the orchestrator would answer INVALID_ARGUMENT when the plan arrives).
    await assert.rejects(async () => client.run([{ map: 'multiply_by', params: /** @type {any} */ ([2]) }], [1]),
      TypeError);
  });

  test('an undecodable payload: INVALID_ARGUMENT', async () => {
    await rejectsWith(client.run([{ map: 'length' }], ['{oops'], { raw: true }), 'INVALID_ARGUMENT', /not valid JSON/);
  });

  test('a value JSON cannot carry fails locally with PayloadError', async () => {
    await assert.rejects(stream([1, Number.NaN]).map('fib_at').run(client), (err) => {
      assert.ok(err instanceof PayloadError);
      assert.equal(/** @type {PayloadError} */ (err).code, 'INVALID_ARGUMENT');
      return true;
    });
    await noDirectivesLeft();
  });

  test('an orchestrator that is not there: UNAVAILABLE', async () => {
    const server = createServer().listen(0, '127.0.0.1');
    await once(server, 'listening');
    const { port } = /** @type {import('node:net').AddressInfo} */ (server.address());
    await new Promise((resolve) => server.close(resolve));
    const absent = new Client(`127.0.0.1:${port}`);
    try {
      await rejectsWith(absent.status({ timeoutMs: 5000 }), 'UNAVAILABLE', /./);
    } finally {
      absent.close();
    }
  });
});

describe('MessagePack', () => {
  test('map, fold and chains with msgpack payloads', async () => {
    const serializer = 'msgpack';
    assert.deepEqual(await stream(['hel', 'lo', ' world', '!']).map('length').run(client, { serializer }), [3, 2, 6, 1]);
    assert.equal(await stream(range(1, 11)).map('fib_at').fold('sum').run(client, { serializer }), 143);
    assert.equal(await stream(['a', 'b', 'c']).fold('concat').run(client, { serializer }), 'abc');
    assert.equal(await stream([]).fold('multiply').run(client, { serializer }), 1);
  });

  test('binary values travel as msgpack bin (bytes on the Python side)', async () => {
    const blobs = [new Uint8Array([1, 2, 3]), Buffer.alloc(0), { a: 1, b: [2] }];
    assert.deepEqual(await stream(blobs).map('length').run(client, { serializer: 'msgpack' }), [3, 0, 2]);
  });

  test('params are encoded with the run serializer', async () => {
    const result = await stream([1, 2]).map('multiply_by', { factor: 0.5 }).run(client, { serializer: 'msgpack' });
    assert.deepEqual(result, [0.5, 1]);
  });
});

describe('status', () => {
  test('shows the state and the connected workers with their operations', async () => {
    const status = await client.status();
    assert.equal(status.state, 'running');
    const ids = status.workers.map((/** @type {any} */ w) => w.workerId).sort();
    assert.deepEqual(ids, ['node-test-0', 'node-test-1']);
    for (const worker of status.workers) {
      assert.ok(worker.operations.includes('fib_at'));
      assert.ok(worker.monoids.includes('sum'));
      assert.equal(worker.capacity, 1);
    }
    assert.equal(typeof status.queueDepth, 'number');
  });

  test('a closed client refuses calls', () => {
    const closed = new Client(cluster.target);
    closed.close();
    closed.close();
    assert.throws(() => closed.status(), /closed/);
  });
});

// The conformance suite, run with the Node client: every case of
// tests/conformance/cases.json against a live orchestrator and Python workers
// started as the file's "harness" says. The Python SDK runs the same file
// (tests/conformance/test_conformance.py); both must agree.
//
// A case goes through the fluent API (stream(...).map(...).fold(...).run)
// when it can express it; a plan the builder refuses (a fold before the last
// stage) is sent as data with client.run(), which leaves judging it to the
// orchestrator, and raw input bytes use client.run(..., {raw: true}).
//
// The "wire_cases" send bytes to a method and read bytes back, below any
// client API: frames that do not parse, and server reflection on both
// protocol versions (grpc-js with pass-through serializers).
//
// The "directive_cases" are steps on durable directives by id: a detached
// submit, attach, ListDirectives and CancelDirective, through the client's
// submit(), attach(), directives() and cancel().

import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { after, before, describe, test } from 'node:test';

import grpc from '@grpc/grpc-js';
import { SquireError, stream } from '@squire/client';

import { CASES_FILE, startCluster } from './harness.js';

const suite = JSON.parse(readFileSync(CASES_FILE, 'utf8'));

/**
 * @param {any} testCase
 * @returns {import('@squire/client').IndexedStream}
 */
function build(testCase) {
  let built = stream(testCase.inputs);
  for (const stage of testCase.plan) {
    built = 'map' in stage ? built.map(stage.map, stage.params) : built.fold(stage.fold, stage.params);
  }
  return built;
}

/**
 * @param {import('@squire/client').Client} client
 * @param {any} testCase
 * @returns {Promise<{ value?: unknown, code?: string, message?: string }>}
 */
async function run(client, testCase) {
  const options = { serializer: testCase.serializer ?? 'json' };
  try {
    if ('raw_inputs' in testCase) {
      return { value: await client.run(testCase.plan, testCase.raw_inputs, { ...options, raw: true }) };
    }
    let built;
    try {
      built = build(testCase);
    } catch (err) {
      // The builder refuses this plan before sending it; the orchestrator must too.
      assert.equal(testCase.expect.error_code, 'INVALID_ARGUMENT', `the builder refused the plan: ${err}`);
      return { value: await client.run(testCase.plan, testCase.inputs, options) };
    }
    return { value: await built.run(client, options) };
  } catch (err) {
    if (!(err instanceof SquireError)) throw err;
    return { code: err.code, message: err.details };
  }
}

/** @param {Buffer} data */
const identity = (data) => data;

/**
 * Send a wire case's one request frame (then half-close): the response
 * frames, or how the call failed.
 * @param {string} target
 * @param {any} testCase
 * @returns {Promise<{ responses: Buffer[], code?: string, message?: string }>}
 */
function callWire(target, testCase) {
  const client = new grpc.Client(target, grpc.credentials.createInsecure());
  const request = Buffer.from(testCase.request_hex, 'hex');
  const deadline = Date.now() + 60_000;
  /** @type {Buffer[]} */
  const responses = [];
  return new Promise((resolve) => {
    /** @param {grpc.ServiceError | null} err */
    const end = (err) => {
      client.close();
      resolve(err ? { responses, code: grpc.status[err.code], message: err.details } : { responses });
    };
    if (testCase.kind === 'unary') {
      client.makeUnaryRequest(testCase.method, identity, identity, request, { deadline }, (err, response) => {
        if (response) responses.push(response);
        end(err);
      });
      return;
    }
    const call = client.makeBidiStreamRequest(testCase.method, identity, identity, { deadline });
    call.on('data', (/** @type {Buffer} */ data) => responses.push(data));
    call.on('error', (/** @type {grpc.ServiceError} */ err) => end(err));
    call.on('end', () => end(null));
    call.write(request);
    call.end();
  });
}

/**
 * @param {any} testCase
 * @param {{ value?: unknown, code?: string, message?: string }} outcome
 */
function check(testCase, outcome) {
  const expect = testCase.expect;
  if ('error_code' in expect) {
    assert.equal(outcome.code, expect.error_code, `expected ${expect.error_code}, got ${JSON.stringify(outcome)}`);
    if ('message_contains' in expect) assert.ok(outcome.message?.includes(expect.message_contains), outcome.message);
    if ('message_starts_with' in expect) assert.ok(outcome.message?.startsWith(expect.message_starts_with), outcome.message);
    return;
  }
  assert.equal(outcome.code, undefined, `expected success, got ${outcome.code}: ${outcome.message}`);
  assert.deepStrictEqual(outcome.value, 'items' in expect ? expect.items : expect.value);
}

/** @param {string} name snake_case, as the cases (and the proto) name fields */
const camel = (name) => name.replace(/_([a-z])/g, (_, c) => c.toUpperCase());

/**
 * Attach by id and read to the end: the fold value if one came, else the map
 * results in index order (every index from 0 exactly once).
 * @param {import('@squire/client').Client} client
 * @param {string} directiveId
 * @returns {Promise<{ value?: unknown, code?: string, message?: string }>}
 */
async function attach(client, directiveId) {
  /** @type {Map<number, unknown>} */
  const values = new Map();
  /** @type {unknown[]} */
  const folds = [];
  try {
    for await (const event of client.attach(directiveId)) {
      if (event.type === 'items') {
        for (const { index, value } of event.items) {
          assert.ok(!values.has(index), `index ${index} delivered twice`);
          values.set(index, value);
        }
      } else if (event.type === 'fold') {
        folds.push(event.value);
      }
    }
  } catch (err) {
    if (!(err instanceof SquireError)) throw err;
    return { code: err.code, message: err.details };
  }
  if (folds.length > 0) {
    assert.ok(folds.length === 1 && values.size === 0, `one fold value and no items, got ${folds}`);
    return { value: folds[0] };
  }
  const items = Array.from({ length: values.size }, (_, i) => {
    assert.ok(values.has(i), `missing the result of ${i}`);
    return values.get(i);
  });
  return { value: items };
}

/**
 * @param {Promise<unknown>} promise
 * @returns {Promise<{ value?: unknown, code?: string, message?: string }>}
 */
async function outcomeOf(promise) {
  try {
    return { value: await promise };
  } catch (err) {
    if (!(err instanceof SquireError)) throw err;
    return { code: err.code, message: err.details };
  }
}

/**
 * Run a directive case's steps.
 * @param {import('@squire/client').Client} client
 * @param {any} testCase
 */
async function runSteps(client, testCase) {
  /** @type {Map<string, string>} */
  const ids = new Map();
  /** @param {{ id?: string, ref?: string }} target */
  const idOf = (target) => (target.ref !== undefined ? /** @type {string} */ (ids.get(target.ref)) : String(target.id));
  for (const [number, step] of testCase.steps.entries()) {
    const where = `step ${number} of ${testCase.name}`;
    if ('submit' in step) {
      const spec = step.submit;
      const outcome = await outcomeOf(build(spec).submit(client, { serializer: spec.serializer ?? 'json' }));
      if (step.expect !== undefined && !('ok' in step.expect)) {
        check(step, outcome);
      } else {
        assert.equal(outcome.code, undefined, `${where}: ${JSON.stringify(outcome)}`);
        if (step.as !== undefined) ids.set(step.as, /** @type {string} */ (outcome.value));
      }
    } else if ('list' in step) {
      const rows = new Map((await client.directives()).map((row) => [row.directiveId, row]));
      if ('includes' in step.list) {
        const { ref, ...fields } = step.list.includes;
        const row = /** @type {any} */ (rows.get(/** @type {string} */ (ids.get(ref))));
        assert.ok(row, `${where}: ${ids.get(ref)} not listed in ${JSON.stringify([...rows.values()])}`);
        for (const [field, value] of Object.entries(fields)) {
          assert.deepStrictEqual(row[camel(field)], value, `${where}: ${field} of ${JSON.stringify(row)}`);
        }
      } else {
        assert.ok(!rows.has(/** @type {string} */ (ids.get(step.list.excludes.ref))), `${where}: still listed`);
      }
    } else if ('attach' in step) {
      check(step, await attach(client, idOf(step.attach)));
    } else {
      const outcome = await outcomeOf(client.cancel(idOf(step.cancel)));
      if ('ok' in step.expect) assert.equal(outcome.code, undefined, `${where}: ${JSON.stringify(outcome)}`);
      else check(step, outcome);
    }
  }
}

describe('conformance: tests/conformance/cases.json', () => {
  /** @type {import('./harness.js').Cluster} */
  let cluster;
  before(async () => {
    cluster = await startCluster({
      orchestratorArgs: suite.harness.orchestrator_args,
      workers: suite.harness.workers,
    });
  });
  after(() => cluster?.close());

  test('the cases file is well formed', () => {
    const names = suite.cases.map((/** @type {any} */ c) => c.name);
    assert.equal(new Set(names).size, names.length, 'case names must be unique');
    for (const testCase of suite.cases) {
      assert.ok(('inputs' in testCase) !== ('raw_inputs' in testCase), testCase.name);
      assert.ok(['json', 'msgpack'].includes(testCase.serializer ?? 'json'), testCase.name);
      const keys = Object.keys(testCase.expect).sort().join(',');
      assert.ok(['value', 'items', 'error_code,message_contains', 'error_code,message_starts_with'].includes(keys), testCase.name);
    }
  });

  for (const testCase of suite.cases) {
    test(testCase.name, { timeout: 60_000 }, async () => {
      check(testCase, await run(/** @type {import('@squire/client').Client} */ (cluster.client), testCase));
    });
  }

  test('the directive cases are well formed', () => {
    const names = [...suite.cases, ...suite.wire_cases, ...suite.directive_cases].map((/** @type {any} */ c) => c.name);
    assert.equal(new Set(names).size, names.length, 'case names must be unique');
    const kinds = ['submit', 'attach', 'list', 'cancel'];
    for (const testCase of suite.directive_cases) {
      for (const step of testCase.steps) {
        assert.equal(kinds.filter((kind) => kind in step).length, 1, testCase.name);
      }
    }
  });

  for (const testCase of suite.directive_cases) {
    test(`directives: ${testCase.name}`, { timeout: 60_000 }, async () => {
      await runSteps(/** @type {import('@squire/client').Client} */ (cluster.client), testCase);
    });
  }

  for (const testCase of suite.wire_cases) {
    test(`wire: ${testCase.name}`, { timeout: 60_000 }, async () => {
      const outcome = await callWire(cluster.target, testCase);
      if ('error_code' in testCase.expect) {
        check(testCase, outcome);
        return;
      }
      assert.equal(outcome.code, undefined, `expected success, got ${outcome.code}: ${outcome.message}`);
      const answer = Buffer.concat(outcome.responses);
      const missing = testCase.expect.response_contains.filter((/** @type {string} */ text) => !answer.includes(text));
      assert.deepEqual(missing, [], `the answer lacks ${missing}`);
    });
  }
});

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
//
// The "tenant_cases" are such steps, each made by a named tenant (a client
// per tenant, with its token) against a second orchestrator, the
// "tenant_harness", started with a tenants file of random tokens: isolation
// of list, attach, cancel and status between tenants, an operator who sees
// everyone's work, max_directives, and tokens that name no tenant.

import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';

import grpc from '@grpc/grpc-js';
import { Client, SquireError, stream } from '@squire/client';

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

/** @typedef {{ value?: unknown, code?: string, message?: string }} Outcome */

/**
 * The rows a ListDirectives (or GetStatus) call gives, by directive id.
 * @param {() => Promise<any[]>} call
 * @returns {Promise<Outcome>}
 */
async function rowsOf(call) {
  const outcome = await outcomeOf(call());
  if (outcome.code !== undefined) return outcome;
  return { value: new Map(/** @type {any[]} */ (outcome.value).map((row) => [row.directiveId, row])) };
}

/**
 * A list or status step: the directive is in the rows (with those fields),
 * or is not; or the call fails as `expect` says.
 * @param {any} step
 * @param {'list' | 'status'} kind
 * @param {Outcome} outcome
 * @param {Map<string, string>} ids
 * @param {string} where
 */
function checkRows(step, kind, outcome, ids, where) {
  if (step.expect !== undefined) {
    check(step, outcome);
    return;
  }
  assert.equal(outcome.code, undefined, `${where}: ${JSON.stringify(outcome)}`);
  const rows = /** @type {Map<string, any>} */ (outcome.value);
  const spec = step[kind];
  if ('includes' in spec) {
    const { ref, ...fields } = spec.includes;
    const row = rows.get(/** @type {string} */ (ids.get(ref)));
    assert.ok(row, `${where}: ${ids.get(ref)} not listed in ${JSON.stringify([...rows.values()])}`);
    for (const [field, value] of Object.entries(fields)) {
      assert.deepStrictEqual(row[camel(field)], value, `${where}: ${field} of ${JSON.stringify(row)}`);
    }
  } else {
    assert.ok(!rows.has(/** @type {string} */ (ids.get(spec.excludes.ref))), `${where}: still listed`);
  }
}

/**
 * "message_as_unknown_id": the same call by the same caller for a made-up id
 * fails alike, with the same message once each id reads ID.
 * @param {any} step
 * @param {Outcome} outcome
 * @param {string} directiveId
 * @param {(id: string) => Promise<Outcome>} again
 * @param {string} where
 */
async function checkAsUnknown(step, outcome, directiveId, again, where) {
  if (step.expect.message_as_unknown_id !== true) return;
  const unknownId = randomBytes(16).toString('hex');
  const unknown = await again(unknownId);
  assert.equal(unknown.code, outcome.code, `${where}: an unknown id gave ${JSON.stringify(unknown)}`);
  assert.equal(outcome.message?.replaceAll(directiveId, 'ID'), unknown.message?.replaceAll(unknownId, 'ID'), where);
}

/**
 * Run a case's steps in order, each with `clientOf(step)`. Each id a submit
 * names is also put in `submitted` with the client that made it.
 * @param {(step: any) => Client} clientOf
 * @param {any} testCase
 * @param {Map<string, [string, Client]>} [submitted]
 */
async function runSteps(clientOf, testCase, submitted) {
  /** @type {Map<string, string>} */
  const ids = new Map();
  /** @param {{ id?: string, ref?: string }} target */
  const idOf = (target) => (target.ref !== undefined ? /** @type {string} */ (ids.get(target.ref)) : String(target.id));
  for (const [number, step] of testCase.steps.entries()) {
    const where = `step ${number} of ${testCase.name}`;
    const client = clientOf(step);
    if ('submit' in step) {
      const spec = step.submit;
      const outcome = await outcomeOf(build(spec).submit(client, { serializer: spec.serializer ?? 'json' }));
      if (step.expect !== undefined && !('ok' in step.expect)) {
        check(step, outcome);
      } else {
        assert.equal(outcome.code, undefined, `${where}: ${JSON.stringify(outcome)}`);
        if (step.as !== undefined) {
          ids.set(step.as, /** @type {string} */ (outcome.value));
          submitted?.set(step.as, [/** @type {string} */ (outcome.value), client]);
        }
      }
    } else if ('list' in step) {
      checkRows(step, 'list', await rowsOf(() => client.directives()), ids, where);
    } else if ('status' in step) {
      checkRows(step, 'status', await rowsOf(async () => (await client.status()).directives), ids, where);
    } else if ('attach' in step) {
      const directiveId = idOf(step.attach);
      const outcome = await attach(client, directiveId);
      check(step, outcome);
      await checkAsUnknown(step, outcome, directiveId, (id) => attach(client, id), where);
    } else {
      const directiveId = idOf(step.cancel);
      const outcome = await outcomeOf(client.cancel(directiveId));
      if ('ok' in step.expect) {
        assert.equal(outcome.code, undefined, `${where}: ${JSON.stringify(outcome)}`);
      } else {
        check(step, outcome);
        await checkAsUnknown(step, outcome, directiveId, (id) => outcomeOf(client.cancel(id)), where);
      }
    }
  }
}

/**
 * The tenants file: each tenant's options, and its token's SHA-256.
 * @param {Record<string, Record<string, number | boolean>>} tenants
 * @param {Record<string, string>} tokens
 */
function tenantsToml(tenants, tokens) {
  const lines = [];
  for (const [name, options] of Object.entries(tenants)) {
    const digest = createHash('sha256').update(tokens[name]).digest('hex');
    lines.push(`[tenants.${name}]`, `token_sha256 = ["${digest}"]`);
    // JSON's integers and booleans are TOML's too.
    for (const [key, value] of Object.entries(options)) lines.push(`${key} = ${JSON.stringify(value)}`);
    lines.push('');
  }
  return lines.join('\n');
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
    const names = [...suite.cases, ...suite.wire_cases, ...suite.directive_cases, ...suite.tenant_cases]
      .map((/** @type {any} */ c) => c.name);
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
      const client = /** @type {Client} */ (cluster.client);
      await runSteps(() => client, testCase);
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

describe('conformance: the tenant cases of tests/conformance/cases.json', () => {
  const harness = suite.tenant_harness;
  /** @type {import('./harness.js').Cluster} */
  let cluster;
  /** @type {Map<string, Client>} a client per identity: each tenant's name, 'token:unknown', 'token:worker' */
  const clients = new Map();
  const dir = mkdtempSync(path.join(tmpdir(), 'squire-node-tenants-'));
  /** @param {any} step */
  const clientOf = (step) => {
    const client = clients.get('tenant' in step ? step.tenant : `token:${step.token}`);
    assert.ok(client, `no client for ${JSON.stringify(step)}`);
    return client;
  };

  before(async () => {
    /** @type {Record<string, string>} */
    const tokens = Object.fromEntries(Object.keys(harness.tenants)
      .map((name) => [name, `${name}-${randomBytes(16).toString('hex')}`]));
    const workerToken = `worker-${randomBytes(16).toString('hex')}`;
    const file = path.join(dir, 'tenants.toml');
    writeFileSync(file, tenantsToml(harness.tenants, tokens), { mode: 0o600 });
    cluster = await startCluster({
      orchestratorArgs: [...harness.orchestrator_args, '--tenants', file],
      workers: suite.harness.workers,
      // Both the orchestrator (which accepts it) and the workers (which send it).
      env: { SQUIRE_WORKER_TOKEN: workerToken },
      clientOptions: { token: Object.values(tokens)[0] },
    });
    const identities = { ...tokens, 'token:unknown': `unknown-${randomBytes(16).toString('hex')}`, 'token:worker': workerToken };
    for (const [who, token] of Object.entries(identities)) clients.set(who, new Client(cluster.target, { token }));
  });
  after(async () => {
    for (const client of clients.values()) client.close();
    await cluster?.close();
    rmSync(dir, { recursive: true, force: true });
  });

  test('the tenant cases are well formed', () => {
    assert.ok(!harness.orchestrator_args.includes('--tenants'), 'the runner adds --tenants');
    const kinds = ['submit', 'attach', 'list', 'cancel', 'status'];
    for (const testCase of suite.tenant_cases) {
      for (const step of testCase.steps) {
        assert.equal(kinds.filter((kind) => kind in step).length, 1, testCase.name);
        assert.ok(('tenant' in step) !== ('token' in step), `${testCase.name}: a step names a tenant or a token`);
        if ('tenant' in step) assert.ok(step.tenant in harness.tenants, testCase.name);
        else assert.ok(['unknown', 'worker'].includes(step.token), testCase.name);
      }
    }
  });

  for (const testCase of suite.tenant_cases) {
    test(`tenants: ${testCase.name}`, { timeout: 60_000 }, async () => {
      /** @type {Map<string, [string, Client]>} */
      const submitted = new Map();
      try {
        await runSteps(clientOf, testCase, submitted);
      } finally {
        // Leave no directive running for the next case (max_directives counts
        // them), whether or not this one got to its last step.
        for (const [directiveId, owner] of submitted.values()) await outcomeOf(owner.cancel(directiveId));
      }
    });
  }
});

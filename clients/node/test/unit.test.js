// Pieces that need no orchestrator: the public exports, payload encoding,
// plan building and checking, errors.

import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import path from 'node:path';
import { describe, test } from 'node:test';

import * as squire from '@squire/client';
import { Client, IndexedStream, PayloadError, SquireError, stream } from '@squire/client';

import { fromGrpcError } from '../src/errors.js';
import { normalizePlan, planMessage } from '../src/plan.js';
import { PROTO_FILE, PROTO_ROOT, loadApi } from '../src/proto.js';
import { decode, encode, encodeParams, parseSerializer, rawPayload } from '../src/serde.js';

test('the public API is exactly this', () => {
  assert.deepEqual(Object.keys(squire).sort(), [
    'Channel', 'Client', 'DirectiveRun', 'IndexedStream', 'PayloadError', 'Skipped', 'SquireError', 'stream',
  ]);
});

test("the contract is loaded from the repository's proto/ folder", () => {
  assert.ok(existsSync(path.join(PROTO_ROOT, PROTO_FILE)));
  assert.equal(path.basename(PROTO_ROOT), 'proto');
  const api = loadApi();
  for (const service of ['DirectiveService', 'ChannelService', 'StatusService', 'WorkerService']) {
    assert.equal(typeof api[service], 'function', service);
  }
});

describe('payloads', () => {
  test('JSON is compact UTF-8 and round-trips', () => {
    assert.equal(encode({ a: [1, 'é'] }).toString('utf8'), '{"a":[1,"é"]}');
    assert.deepEqual(decode(encode({ a: [1, 'é', null, true] })), { a: [1, 'é', null, true] });
  });

  test('MessagePack round-trips, bytes included', () => {
    const value = { n: 1, f: 0.5, s: 'x', l: [1, [2]], b: new Uint8Array([1, 2]) };
    assert.deepEqual(decode(encode(value, 'msgpack'), 'msgpack'), value);
  });

  test('values a serializer cannot carry are a PayloadError (INVALID_ARGUMENT)', () => {
    for (const value of [Number.NaN, Number.POSITIVE_INFINITY, undefined, 10n, [1, Number.NaN]]) {
      assert.throws(() => encode(value), (err) => err instanceof PayloadError && err.code === 'INVALID_ARGUMENT');
    }
  });

  test('undecodable bytes are a PayloadError naming what was decoded', () => {
    assert.throws(() => decode(Buffer.from('{oops'), 'json', 'the fold value'), /the fold value is not valid json/);
    assert.throws(() => decode(Buffer.from([0xc1]), 'msgpack'), PayloadError);
  });

  test('params: none is empty bytes; otherwise an encoded mapping', () => {
    assert.equal(encodeParams(undefined, 'json').length, 0);
    assert.equal(encodeParams({}, 'json').length, 0);
    assert.equal(encodeParams({ factor: 2 }, 'json').toString(), '{"factor":2}');
    assert.deepEqual(decode(encodeParams({ factor: 2 }, 'msgpack'), 'msgpack'), { factor: 2 });
    assert.throws(() => encodeParams(/** @type {any} */ ([1]), 'json'), TypeError);
    assert.throws(() => encodeParams(/** @type {any} */ (3), 'json'), TypeError);
  });

  test('raw payloads: bytes as they are, strings as UTF-8', () => {
    assert.deepEqual([...rawPayload('é')], [0xc3, 0xa9]);
    assert.deepEqual([...rawPayload(new Uint8Array([1, 2]))], [1, 2]);
    assert.throws(() => rawPayload(3), TypeError);
  });

  test('serializer names', () => {
    assert.equal(parseSerializer(undefined), 'json');
    assert.equal(parseSerializer('MsgPack'), 'msgpack');
    assert.throws(() => parseSerializer('pickle'), RangeError);
  });
});

describe('plans', () => {
  test('the builder is immutable and describes its plan', () => {
    const base = stream([1, 2]);
    const mapped = base.map('fib_at');
    const folded = mapped.map('multiply_by', { factor: 2 }).fold('sum');
    assert.ok(folded instanceof IndexedStream);
    assert.equal(base.describe(), 'identity');
    assert.equal(mapped.describe(), 'map(fib_at)');
    assert.equal(folded.describe(), 'map(fib_at) -> map(multiply_by) -> fold(sum)');
    assert.deepEqual(folded.withTaskTimeout(5).plan(), {
      stages: [{ map: 'fib_at' }, { map: 'multiply_by', params: { factor: 2 } }, { fold: 'sum' }],
      taskTimeoutSeconds: 5,
      priority: 0,
    });
    const urgent = folded.withPriority(7);
    assert.equal(urgent.plan().priority, 7);
    assert.equal(urgent.withTaskTimeout(5).plan().priority, 7);
    assert.equal(planMessage(normalizePlan(urgent.plan()), 'json', 0).priority, 7);
  });

  test('the builder refuses malformed plans early', () => {
    assert.throws(() => stream([]).fold('sum').map('fib_at'), /fold must be the last stage/);
    assert.throws(() => stream([]).fold('sum').fold('sum'), /fold must be the last stage/);
    assert.throws(() => stream([]).map(''), TypeError);
    assert.throws(() => stream([]).map(/** @type {any} */ (3)), TypeError);
    assert.throws(() => stream([]).withTaskTimeout(-1), RangeError);
    assert.throws(() => stream([]).withPriority(1001), RangeError);
    assert.throws(() => stream([]).withPriority(1.5), RangeError);
    assert.throws(() => normalizePlan({ stages: [], priority: -1001 }), RangeError);
  });

  test('a plan as data is checked for shape only', () => {
    assert.deepEqual(normalizePlan([{ fold: 'sum' }, { map: 'x' }]).fold, false);
    assert.equal(normalizePlan({ stages: [{ map: 'x' }, { fold: 'sum' }] }).fold, true);
    assert.throws(() => normalizePlan(/** @type {any} */ ([{ map: 'x', fold: 'y' }])), /exactly one/);
    assert.throws(() => normalizePlan(/** @type {any} */ ([{ reduce: 'x' }])), /exactly one/);
    assert.throws(() => normalizePlan(/** @type {any} */ ([{ map: '' }])), /non-empty/);
    assert.throws(() => normalizePlan(/** @type {any} */ ('map(x)')), TypeError);
    assert.throws(() => normalizePlan({ stages: [], taskTimeoutSeconds: -1 }), RangeError);
  });

  test('the Plan message carries params encoded with the serializer', () => {
    const message = planMessage(normalizePlan([{ map: 'multiply_by', params: { factor: 2 } }, { fold: 'sum' }]), 'json', 3);
    assert.equal(message.serializer, 'SERIALIZER_JSON');
    assert.equal(message.expectedItems, 3);
    assert.equal(message.stages[0].map?.params.toString(), '{"factor":2}');
    assert.equal(message.stages[1].fold?.monoid, 'sum');
    assert.equal(message.stages[1].fold?.params.length, 0);
  });

  test('events() checks the plan and the inputs before any call', () => {
    const client = new Client('127.0.0.1:1');
    try {
      assert.throws(() => client.events(/** @type {any} */ ([{ bogus: 1 }]), []), TypeError);
      assert.throws(() => client.events([{ map: 'x' }], /** @type {any} */ (42)), /iterable/);
      assert.throws(() => client.events([{ map: 'x', params: /** @type {any} */ ([1]) }], []), TypeError);
      assert.throws(() => client.events([{ map: 'x' }], [], { serializer: 'yaml' }), RangeError);
    } finally {
      client.close();
    }
  });
});

describe('errors', () => {
  test('a gRPC error becomes a SquireError with the status name and the details', () => {
    const grpcError = Object.assign(new Error('10 ABORTED: Fatal operation error: x'), { code: 10, details: 'Fatal operation error: x' });
    const err = /** @type {SquireError} */ (fromGrpcError(grpcError));
    assert.ok(err instanceof SquireError);
    assert.equal(err.code, 'ABORTED');
    assert.equal(err.details, 'Fatal operation error: x');
    assert.equal(err.cause, grpcError);
    assert.equal(err.message, 'ABORTED: Fatal operation error: x');
  });

  test('other errors pass through unchanged', () => {
    const plain = new TypeError('not grpc');
    assert.equal(fromGrpcError(plain), plain);
  });

  test('Client needs a target', () => {
    assert.throws(() => new Client(/** @type {any} */ (undefined)), TypeError);
  });
});

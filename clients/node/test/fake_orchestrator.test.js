// The Client against a scripted in-process gRPC server (grpc-js, same
// contract): the event kinds a live cluster with the example operations never
// produces, such as skipped elements, a fold value the client cannot decode,
// and what the client does with the requests it sends.

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';

import grpc from '@grpc/grpc-js';

import { Client, PayloadError, Skipped, SquireError, stream } from '@squire/client';

import { loadApi } from '../src/proto.js';

/** @type {((call: any) => void) | null} */
let script = null;
/** @type {any[]} */
let received = [];
const server = new grpc.Server();
/** @type {Client} */
let client;

before(async () => {
  const api = loadApi();
  server.addService(api.DirectiveService.service, {
    RunDirective(/** @type {any} */ call) {
      received = [];
      call.on('data', (/** @type {any} */ message) => received.push(message));
      call.on('error', () => undefined); // a cancelled call
      call.on('end', () => {
        if (script) script(call);
      });
    },
  });
  const port = await new Promise((resolve, reject) => {
    server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (err, bound) => (err ? reject(err) : resolve(bound)));
  });
  client = new Client(`127.0.0.1:${port}`);
});

after(() => {
  client?.close();
  server.forceShutdown();
});

/** @param {unknown} value */
const json = (value) => Buffer.from(JSON.stringify(value));

test('the requests: the plan first, then input batches in order, then half-close', async () => {
  script = (call) => call.end();
  const inputs = Array.from({ length: 600 }, (_, i) => i);
  await stream(inputs).map('multiply_by', { factor: 2 }).withTaskTimeout(3).run(client).catch(() => undefined);
  assert.equal(received[0].kind, 'plan');
  const plan = received[0].plan;
  assert.equal(plan.serializer, 'SERIALIZER_JSON');
  assert.equal(plan.expectedItems, 600);
  assert.equal(plan.taskTimeoutSeconds, 3);
  assert.equal(plan.stages[0].map.operation, 'multiply_by');
  assert.equal(plan.stages[0].map.params.toString(), '{"factor":2}');
  const items = received.slice(1).flatMap((message) => {
    assert.equal(message.kind, 'inputs');
    return message.inputs.items.map((/** @type {Buffer} */ b) => JSON.parse(b.toString()));
  });
  assert.deepEqual(items, inputs);
  assert.ok(received.length > 2, 'inputs are sent in several batches');
});

test('skipped elements are Skipped values; unknown event kinds are ignored', async () => {
  script = (call) => {
    call.write({ started: { directiveId: 'd1' } });
    call.write({});  // an event kind this client does not know
    call.write({ items: { items: [{ index: 1, skipped: true, error: 'ValueError: bad' }, { index: 0, value: json('ok') }] } });
    call.end();
  };
  const results = await stream(['a', 'b']).map('op').run(client);
  assert.equal(results[0], 'ok');
  assert.ok(results[1] instanceof Skipped);
  assert.equal(results[1].index, 1);
  assert.equal(results[1].error, 'ValueError: bad');
});

test('a map that ends with missing results is an error, not a short array', async () => {
  script = (call) => {
    call.write({ items: { items: [{ index: 0, value: json(1) }] } });
    call.end();
  };
  await assert.rejects(stream([1, 2, 3]).map('op').run(client), /1 results for 3 inputs; missing indices 1, 2/);
});

test('a fold that ends without a value is an error', async () => {
  script = (call) => call.end();
  await assert.rejects(stream([1, 2]).fold('sum').run(client), (err) => err instanceof SquireError && /without a fold value/.test(err.details));
});

test('a value the client cannot decode is a PayloadError', async () => {
  script = (call) => {
    call.write({ fold: { value: Buffer.from('{not json') } });
    call.end();
  };
  await assert.rejects(stream([1, 2]).fold('sum').run(client), PayloadError);
});

test("the server's status code and message reach the caller unchanged", async () => {
  script = (call) => call.emit('error', { code: grpc.status.RESOURCE_EXHAUSTED, details: 'too many directives for this client' });
  await assert.rejects(stream([1]).map('op').run(client), (err) => {
    assert.ok(err instanceof SquireError);
    assert.equal(err.code, 'RESOURCE_EXHAUSTED');
    assert.equal(err.details, 'too many directives for this client');
    return true;
  });
});

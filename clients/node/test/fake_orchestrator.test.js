// The Client against a scripted in-process gRPC server (grpc-js, same
// contract): the event kinds a live cluster with the example operations never
// produces, such as skipped elements, a fold value the client cannot decode,
// and what the client does with the requests it sends. The scripted events
// are tested both ways a directive travels: a RunDirective call of its own
// (`session: false`) and a call of the shared RunDirectives session.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import grpc from '@grpc/grpc-js';

import { Client, PayloadError, Skipped, SquireError, stream } from '@squire/client';

import { waitUntil } from './harness.js';
import { loadApi } from '../src/proto.js';

/**
 * What a script answers a directive with, whichever way it came.
 * @typedef {{ write: (event: object) => void, end: () => void, fail: (code: number, details: string) => void }} Reply
 */

/** @type {((reply: Reply) => void) | null} */
let script = null;
/** @type {any[]} the requests of the last RunDirective call */
let received = [];
/** @type {any[]} every SessionRequest */
let sessionRequests = [];
/** @type {any[]} the RunDirectives calls */
const sessions = [];
let directiveCalls = 0;
const server = new grpc.Server();
/** @type {string} */
let target;
/** @type {Client} a client with `session: false`: every directive is a RunDirective call */
let client;
/** @type {Client} a client with the session (the default) */
let sessionClient;

before(async () => {
  const api = loadApi();
  server.addService(api.DirectiveService.service, {
    RunDirective(/** @type {any} */ call) {
      directiveCalls += 1;
      received = [];
      call.on('data', (/** @type {any} */ message) => received.push(message));
      call.on('error', () => undefined); // a cancelled call
      call.on('end', () => {
        script?.({
          write: (event) => call.write(event),
          end: () => call.end(),
          fail: (code, details) => call.emit('error', { code, details }),
        });
      });
    },
    RunDirectives(/** @type {any} */ call) {
      sessions.push(call);
      call.on('error', () => undefined);
      call.on('end', () => call.end());
      call.on('data', (/** @type {any} */ request) => {
        sessionRequests.push(request);
        if (request.cancel) return;
        const callId = request.callId;
        script?.({
          write: (event) => call.write({ callId, events: [event] }),
          end: () => call.write({ callId, events: [], end: { code: 0, message: '' } }),
          fail: (code, details) => call.write({ callId, end: { code, message: details } }),
        });
      });
    },
  });
  const port = await new Promise((resolve, reject) => {
    server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (err, bound) => (err ? reject(err) : resolve(bound)));
  });
  target = `127.0.0.1:${port}`;
  client = new Client(target, { session: false });
  sessionClient = new Client(target);
});

after(() => {
  client?.close();
  sessionClient?.close();
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

const both = /** @type {const} */ (['RunDirective', 'session']);
/** @param {typeof both[number]} way */
const clientFor = (way) => (way === 'session' ? sessionClient : client);

for (const way of both) {
  describe(`scripted events, ${way}`, () => {
    test('skipped elements are Skipped values; unknown event kinds are ignored', async () => {
      script = (reply) => {
        reply.write({ started: { directiveId: 'd1' } });
        reply.write({});  // an event kind this client does not know
        reply.write({ items: { items: [{ index: 1, skipped: true, error: 'ValueError: bad' }, { index: 0, value: json('ok') }] } });
        reply.end();
      };
      const results = await stream(['a', 'b']).map('op').run(clientFor(way));
      assert.equal(results[0], 'ok');
      assert.ok(results[1] instanceof Skipped);
      assert.equal(results[1].index, 1);
      assert.equal(results[1].error, 'ValueError: bad');
    });

    test('a map that ends with missing results is an error, not a short array', async () => {
      script = (reply) => {
        reply.write({ items: { items: [{ index: 0, value: json(1) }] } });
        reply.end();
      };
      await assert.rejects(stream([1, 2, 3]).map('op').run(clientFor(way)), /1 results for 3 inputs; missing indices 1, 2/);
    });

    test('a fold that ends without a value is an error', async () => {
      script = (reply) => reply.end();
      await assert.rejects(stream([1, 2]).fold('sum').run(clientFor(way)), (err) => err instanceof SquireError && /without a fold value/.test(err.details));
    });

    test('a value the client cannot decode is a PayloadError', async () => {
      script = (reply) => {
        reply.write({ fold: { value: Buffer.from('{not json') } });
        reply.end();
      };
      await assert.rejects(stream([1, 2]).fold('sum').run(clientFor(way)), PayloadError);
    });

    test("the server's status code and message reach the caller unchanged", async () => {
      script = (reply) => reply.fail(grpc.status.RESOURCE_EXHAUSTED, 'too many directives for this client');
      await assert.rejects(stream([1]).map('op').run(clientFor(way)), (err) => {
        assert.ok(err instanceof SquireError);
        assert.equal(err.code, 'RESOURCE_EXHAUSTED');
        assert.equal(err.details, 'too many directives for this client');
        return true;
      });
    });

    test('events, directiveId, progress, inputsSent and onProgress', async () => {
      const progress = { received: 2, completed: 2, skipped: 0, total: 2, queued: 0, leased: 0, retries: 0, tasksDone: 3, waiting: '' };
      script = (reply) => {
        reply.write({ started: { directiveId: 'd7' } });
        reply.write({ progress });
        reply.write({ fold: { value: json(5) } });
        reply.end();
      };
      /** @type {any[]} */
      const seen = [];
      const run = stream([2, 3]).fold('sum').events(clientFor(way), { onProgress: (p) => seen.push(p) });
      const events = [];
      for await (const event of run) events.push(event);
      assert.deepEqual(events, [
        { type: 'started', directiveId: 'd7' },
        { type: 'progress', progress },
        { type: 'fold', value: 5 },
      ]);
      assert.equal(run.directiveId, 'd7');
      assert.deepEqual(run.progress, progress);
      assert.deepEqual(seen, [progress]);
      assert.equal(run.inputsSent, 2);
    });
  });
}

describe('the session (RunDirectives)', () => {
  test('a small array travels as one SessionRequest: plan, every input, end of input', async () => {
    script = (reply) => {
      reply.write({ items: { items: [{ index: 0, value: json(2) }, { index: 1, value: json(4) }] } });
      reply.end();
    };
    const before = { directiveCalls, requests: sessionRequests.length };
    const result = await stream([1, 2]).map('multiply_by', { factor: 2 }).withTaskTimeout(3).run(sessionClient, { serializer: 'json' });
    assert.deepEqual(result, [2, 4]);
    assert.equal(directiveCalls, before.directiveCalls, 'no RunDirective call');
    const requests = sessionRequests.slice(before.requests);
    assert.equal(requests.length, 1);
    const [request] = requests;
    assert.ok(request.callId > 0);
    assert.equal(request.endInput, true);
    assert.equal(request.cancel, false);
    assert.equal(request.plan.expectedItems, 2);
    assert.equal(request.plan.taskTimeoutSeconds, 3);
    assert.equal(request.plan.stages[0].map.operation, 'multiply_by');
    assert.equal(request.plan.stages[0].map.params.toString(), '{"factor":2}');
    assert.deepEqual(request.inputs.items.map((/** @type {Buffer} */ b) => b.toString()), ['1', '2']);
  });

  test('raw and msgpack inputs are encoded as on RunDirective', async () => {
    script = (reply) => reply.end();
    const start = sessionRequests.length;
    await sessionClient.run([{ fold: 'sum' }], ['"abc"', Buffer.from('[1]')], { raw: true }).catch(() => undefined);
    await sessionClient.run([{ fold: 'sum' }], ['a'], { serializer: 'msgpack' }).catch(() => undefined);
    const [raw, packed] = sessionRequests.slice(start);
    assert.deepEqual(raw.inputs.items.map((/** @type {Buffer} */ b) => b.toString()), ['"abc"', '[1]']);
    assert.equal(packed.plan.serializer, 'SERIALIZER_MSGPACK');
    assert.deepEqual([...packed.inputs.items[0]], [0xa1, 0x61]);
  });

  test('more than 64 inputs, or inputs that are not an array, use RunDirective', async () => {
    script = (reply) => reply.end();
    const start = { directiveCalls, requests: sessionRequests.length };
    await stream(Array.from({ length: 65 }, (_, i) => i)).fold('sum').run(sessionClient).catch(() => undefined);
    await stream(new Set([1, 2])).fold('sum').run(sessionClient).catch(() => undefined);
    assert.equal(directiveCalls, start.directiveCalls + 2);
    assert.equal(sessionRequests.length, start.requests);
  });

  test('concurrent calls share one stream and each gets its own answer, in any order', async () => {
    const fresh = new Client(target);
    try {
      /** @type {(() => void)[]} */
      const held = [];
      script = (reply) => {
        const n = sessionRequests.at(-1).inputs.items.length;
        held.push(() => {
          reply.write({ fold: { value: json(n) } });
          reply.end();
        });
        if (held.length === 20) held.reverse().forEach((answer) => answer());
      };
      const opened = sessions.length;
      const results = await Promise.all(Array.from({ length: 20 }, (_, n) => stream(Array.from({ length: n }, () => 1)).fold('sum').run(fresh)));
      assert.deepEqual(results, Array.from({ length: 20 }, (_, n) => n));
      assert.equal(sessions.length, opened + 1, 'one RunDirectives stream for every call');
    } finally {
      fresh.close();
    }
  });

  test('an input that cannot be encoded rejects before anything is sent', async () => {
    script = (reply) => reply.end();
    const start = sessionRequests.length;
    await assert.rejects(stream([1, Number.NaN]).map('op').run(sessionClient), PayloadError);
    assert.equal(sessionRequests.length, start);
  });

  test('an AbortSignal sends cancel for the call and rejects with its reason', async () => {
    script = (reply) => reply.write({ started: { directiveId: 'slow' } });  // never ends
    const controller = new AbortController();
    const reason = new Error('enough');
    const start = sessionRequests.length;
    const run = stream([1]).map('op').events(sessionClient, { signal: controller.signal });
    const done = (async () => {
      for await (const event of run) {
        if (event.type === 'started') controller.abort(reason);
      }
    })();
    await assert.rejects(done, (err) => err === reason);
    const [first] = sessionRequests.slice(start);
    await waitUntil(() => sessionRequests.slice(start).some((r) => r.cancel && r.callId === first.callId), {
      timeoutMs: 5000, message: 'the cancel request',
    });
  });

  test('leaving the loop early sends cancel for the call', async () => {
    script = (reply) => reply.write({ items: { items: [{ index: 0, value: json(1) }] } });  // never ends
    const start = sessionRequests.length;
    for await (const item of stream([1, 2]).map('op').iter(sessionClient)) {
      assert.deepEqual(item, { index: 0, value: 1 });
      break;
    }
    const [first] = sessionRequests.slice(start);
    await waitUntil(() => sessionRequests.slice(start).some((r) => r.cancel && r.callId === first.callId), {
      timeoutMs: 5000, message: 'the cancel request',
    });
  });

  test('a stream that breaks rejects every call in flight with its status; the next call opens a new one', async () => {
    const fresh = new Client(target);
    try {
      let waiting = 0;
      script = () => {
        waiting += 1;  // no answer
      };
      const opened = sessions.length;
      const calls = [1, 2, 3].map((n) => stream([n]).map('op').run(fresh));
      await waitUntil(() => waiting === 3, { timeoutMs: 5000, message: '3 calls on the server' });
      sessions[opened].emit('error', { code: grpc.status.INTERNAL, details: 'the session broke' });
      for (const call of calls) {
        await assert.rejects(call, (err) => err instanceof SquireError && err.code === 'INTERNAL' && err.details === 'the session broke');
      }
      script = (reply) => {
        reply.write({ fold: { value: json(9) } });
        reply.end();
      };
      assert.equal(await stream([9]).fold('sum').run(fresh), 9);
      assert.equal(sessions.length, opened + 2);
    } finally {
      fresh.close();
    }
  });

  test('close() rejects the calls in flight with UNAVAILABLE', async () => {
    const fresh = new Client(target);
    let waiting = 0;
    script = () => {
      waiting += 1;
    };
    const call = stream([1]).map('op').run(fresh);
    await waitUntil(() => waiting === 1, { timeoutMs: 5000, message: 'the call on the server' });
    fresh.close();
    await assert.rejects(call, (err) => err instanceof SquireError && err.code === 'UNAVAILABLE');
  });

  test('an idle session stream is half-closed, and the next call opens a new one', async () => {
    const fresh = new Client(target);
    try {
      script = (reply) => {
        reply.write({ fold: { value: json(1) } });
        reply.end();
      };
      const opened = sessions.length;
      assert.equal(await stream([1]).fold('sum').run(fresh), 1);
      const stream1 = sessions[opened];
      let ended = false;
      stream1.on('end', () => {
        ended = true;
      });
      await waitUntil(() => ended || stream1.readableEnded, { timeoutMs: 10_000, message: 'the idle session to be half-closed' });
      assert.equal(await stream([1]).fold('sum').run(fresh), 1);
      assert.equal(sessions.length, opened + 2);
    } finally {
      fresh.close();
    }
  });

  test('session: false sends every directive on its own RunDirective call', async () => {
    script = (reply) => reply.end();
    const start = { directiveCalls, requests: sessionRequests.length, sessions: sessions.length };
    await stream([1]).map('op').run(client).catch(() => undefined);
    await stream([1, 2]).fold('sum').run(client).catch(() => undefined);
    assert.equal(directiveCalls, start.directiveCalls + 2);
    assert.equal(sessionRequests.length, start.requests);
    assert.equal(sessions.length, start.sessions);
  });
});

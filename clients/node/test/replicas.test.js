// Several orchestrator addresses ('h1:p1,h2:p2', issue 16) against scripted
// in-process replicas: each answers grpc.health.v1 Check (service '')
// SERVING while it leads and NOT_SERVING while it stands by, and a standby
// refuses directive calls with UNAVAILABLE the way the orchestrator does
// ('this orchestrator is a standby; the leader is h:p (epoch n)'). The
// client goes to the leader whichever address comes first, makes a call the
// standby refused again on the leader once there is one, and gives up after
// reattachTimeoutMs with the refusal. (Against real replicas on Postgres,
// with the leader SIGKILLed and SIGTERMed mid-map: tests/test_node_ha.py.)

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import grpc from '@grpc/grpc-js';

import { Client, SquireError, stream } from '@squire/client';

import { loadApi } from '../src/proto.js';
import { healthService, namedLeader, splitTarget } from '../src/replicas.js';
import { waitUntil } from './harness.js';

const UNAVAILABLE = 14;

/** The one leased channel, as the replicas' shared journal holds it: task id -> encoded input. */
const journal = { tasks: new Map() };

class FakeReplica {
  /** @type {'leader' | 'standby'} */
  role = 'standby';
  /** @type {string | null} the leader a refusal names */
  leader = null;
  address = '';
  refused = 0;
  served = 0;
  /** Publish calls it answered. */
  published = 0;
  server = new grpc.Server();

  refusal() {
    return this.leader === null
      ? 'this orchestrator is a standby and no leader holds the lease right now (a takeover is under way): try again shortly'
      : `this orchestrator is a standby; the leader is ${this.leader} (epoch 2)`;
  }

  async start() {
    const api = loadApi();
    this.server.addService(healthService().service, {
      Check: (/** @type {any} */ _call, /** @type {any} */ callback) => {
        callback(null, { status: this.role === 'leader' ? 'SERVING' : 'NOT_SERVING' });
      },
    });
    this.server.addService(api.DirectiveService.service, {
      RunDirective: (/** @type {any} */ call) => {
        call.on('error', () => undefined);
        if (this.role !== 'leader') {
          this.refused += 1;
          call.emit('error', { code: UNAVAILABLE, details: this.refusal() });
          return;
        }
        /** @type {Buffer[]} */
        const inputs = [];
        call.on('data', (/** @type {any} */ message) => {
          if (message.kind === 'inputs') inputs.push(...message.inputs.items);
        });
        call.on('end', () => {
          this.served += 1;
          call.write({ started: { directiveId: `d${this.served}` } });
          call.write({ items: { items: inputs.map((value, index) => ({ index, value })) } });
          call.end();
        });
      },
      RunDirectives: (/** @type {any} */ call) => {
        call.on('error', () => undefined);
        if (this.role !== 'leader') {
          this.refused += 1;
          call.emit('error', { code: UNAVAILABLE, details: this.refusal() });
          return;
        }
        call.on('end', () => call.end());
        call.on('data', (/** @type {any} */ request) => {
          if (request.cancel) return;
          if (this.role !== 'leader') { // it stood down: its streams end, as the process does
            this.refused += 1;
            call.emit('error', { code: UNAVAILABLE, details: this.refusal() });
            return;
          }
          this.served += 1;
          const items = request.inputs.items.map((/** @type {Buffer} */ value, /** @type {number} */ index) => ({ index, value }));
          call.write({
            callId: request.callId,
            events: [{ started: { directiveId: `s${this.served}` } }, { items: { items } }],
            end: { code: 0, message: '' },
          });
        });
      },
      ListDirectives: (/** @type {any} */ _call, /** @type {any} */ callback) => {
        if (this.role !== 'leader') {
          this.refused += 1;
          callback({ code: UNAVAILABLE, details: this.refusal() });
          return;
        }
        callback(null, { directives: [{ directiveId: `on-${this.address}` }] });
      },
    });
    /** @param {any} callback */
    const refuse = (callback) => {
      this.refused += 1;
      callback({ code: UNAVAILABLE, details: this.refusal() });
    };
    /** @param {(callback: any) => void} serve */
    const unaryCall = (serve) => (/** @type {any} */ _call, /** @type {any} */ callback) => {
      if (this.role !== 'leader') refuse(callback);
      else serve(callback);
    };
    this.server.addService(api.ChannelService.service, {
      LeaseChannel: unaryCall((callback) => callback(null, { channelId: 'ch' })),
      Publish: (/** @type {any} */ call, /** @type {any} */ callback) => {
        call.on('error', () => undefined);
        if (this.role !== 'leader') {
          refuse(callback);
          return;
        }
        let added = 0;
        let duplicates = 0;
        call.on('data', (/** @type {any} */ request) => {
          for (const task of request.tasks) {
            if (journal.tasks.has(task.taskId)) duplicates += 1;
            else {
              journal.tasks.set(task.taskId, task.input);
              added += 1;
            }
          }
        });
        call.on('end', () => {
          this.published += 1;
          callback(null, { published: added, duplicates });
        });
      },
      Subscribe: (/** @type {any} */ call) => {
        call.on('error', () => undefined);
        if (this.role !== 'leader') {
          this.refused += 1;
          call.emit('error', { code: UNAVAILABLE, details: this.refusal() });
          return;
        }
        const results = [...journal.tasks].slice(call.request.received)
          .map(([taskId, input]) => ({ taskId, ok: { output: input }, attempt: 1 }));
        call.write({ results });
        call.end();
      },
      CloseChannel: unaryCall((callback) => callback(null, {})),
      ReleaseChannel: unaryCall((callback) => callback(null, {})),
    });
    const port = await new Promise((resolve, reject) => {
      this.server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(),
        (err, bound) => (err ? reject(err) : resolve(bound)));
    });
    this.address = `127.0.0.1:${port}`;
  }
}

const a = new FakeReplica();
const b = new FakeReplica();
/** @type {Client[]} */
const clients = [];

/**
 * @param {string} target
 * @param {import('@squire/client').ClientOptions} [options]
 */
function newClient(target, options) {
  const client = new Client(target, options);
  clients.push(client);
  return client;
}

/** b leads, a stands by naming it. */
function bLeads() {
  b.role = 'leader';
  b.leader = null;
  a.role = 'standby';
  a.leader = b.address;
}

before(async () => {
  await a.start();
  await b.start();
});
after(() => {
  for (const client of clients) client.close();
  a.server.forceShutdown();
  b.server.forceShutdown();
});

const inputs = [1, 2, 3, 4, 5];

test('a target of several addresses; one is used as given', () => {
  assert.deepEqual(splitTarget('127.0.0.1:1'), ['127.0.0.1:1']);
  assert.deepEqual(splitTarget('dns:///orchestrator:50051'), ['dns:///orchestrator:50051']);
  assert.deepEqual(splitTarget(' h1:1, h2:2 ,'), ['h1:1', 'h2:2']);
  assert.deepEqual(splitTarget('h1:1,h1:1,[::1]:3'), ['h1:1', '[::1]:3']);
  assert.throws(() => splitTarget('h1:1,h2'), /"h2" is not host:port/);
  assert.throws(() => new Client('h1:1,:2'), TypeError);
  assert.equal(namedLeader(new SquireError('UNAVAILABLE', 'this orchestrator is a standby; the leader is 10.0.0.7:50051 (epoch 3)')), '10.0.0.7:50051');
  assert.equal(namedLeader(new SquireError('UNAVAILABLE', 'connection refused')), null);
});

for (const session of [false, true]) {
  describe(session ? 'session calls' : 'RunDirective calls', () => {
    test('the standby first: calls go to the leader', async () => {
      bLeads();
      const client = newClient(`${a.address},${b.address}`, { session });
      assert.deepEqual(await stream(inputs).map('identity').run(client), inputs);
      assert.deepEqual((await client.directives()).map((d) => d.directiveId), [`on-${b.address}`]);
    });

    test('no leader yet: a refused call is made again on the replica that comes to lead', async () => {
      a.role = 'standby';
      b.role = 'standby';
      a.leader = null;
      b.leader = null;
      const refusedBefore = a.refused + b.refused;
      const client = newClient(`${a.address},${b.address}`, { session });
      const running = stream(inputs).map('identity').run(client);
      const listing = client.directives();
      // Let it be refused a few times before a replica takes over.
      for (let i = 0; i < 200 && a.refused + b.refused < refusedBefore + 2; i += 1) {
        await new Promise((resolve) => setTimeout(resolve, 10));
      }
      assert.ok(a.refused + b.refused >= refusedBefore + 2, 'the calls were refused meanwhile');
      bLeads();
      assert.deepEqual(await running, inputs);
      assert.deepEqual((await listing).map((d) => d.directiveId), [`on-${b.address}`]);
    });

    test('a leader that moves: the next calls follow it', async () => {
      bLeads();
      const client = newClient(`${a.address},${b.address}`, { session });
      assert.deepEqual(await stream(inputs).map('identity').run(client), inputs);
      const servedByA = a.served;
      // b resigns, a takes over: b's refusal names a.
      a.role = 'leader';
      a.leader = null;
      b.role = 'standby';
      b.leader = a.address;
      assert.deepEqual(await stream(inputs).map('identity').run(client), inputs);
      assert.equal(a.served, servedByA + 1);
    });

    test('no leader within reattachTimeoutMs: the run rejects with the refusal', async () => {
      a.role = 'standby';
      b.role = 'standby';
      a.leader = null;
      b.leader = null;
      const client = newClient(`${a.address},${b.address}`, { session, reattachTimeoutMs: 300 });
      const started = Date.now();
      await assert.rejects(stream(inputs).map('identity').run(client), (err) => {
        assert.ok(err instanceof SquireError);
        assert.equal(err.code, 'UNAVAILABLE');
        assert.match(err.details, /this orchestrator is a standby/);
        return true;
      });
      assert.ok(Date.now() - started >= 250, 'it kept trying for about reattachTimeoutMs');
    });
  });
}

test('a channel follows the leader: what a standby refuses goes again to the one it names', async () => {
  journal.tasks.clear();
  bLeads();
  const client = newClient(`${a.address},${b.address}`);
  const channel = await client.leaseChannel();
  await channel.publish([1, 2, 3].map((input) => ({ operation: 'identity', input })));
  await waitUntil(() => channel.published === 3, { timeoutMs: 5000, message: 'the tasks acknowledged by b' });
  assert.equal(b.published, 1);
  // b resigns, a takes over: b's refusal names a.
  a.role = 'leader';
  a.leader = null;
  b.role = 'standby';
  b.leader = a.address;
  const refusedByB = b.refused;
  await channel.publish([4, 5].map((input) => ({ operation: 'identity', input })));
  assert.equal(await channel.close(), 5);
  assert.ok(b.refused > refusedByB, 'b refused the next call');
  assert.equal(a.published, 1, 'a took the rest');
  assert.ok(channel.resent >= 1);
  const values = [];
  for await (const result of channel.results()) values.push(result.ok && result.value);
  assert.deepEqual(values, [1, 2, 3, 4, 5]);
  assert.deepEqual([channel.published, channel.duplicates, channel.received], [5, 0, 5]);
  await channel.release();
});

test('a closed client stops making calls again at once', async () => {
  a.role = 'standby';
  b.role = 'standby';
  const client = newClient(`${a.address},${b.address}`, { session: false });
  const running = stream(inputs).map('identity').run(client);
  running.catch(() => undefined);
  await new Promise((resolve) => setTimeout(resolve, 100));
  const closed = Date.now();
  client.close();
  await assert.rejects(running, SquireError);
  assert.ok(Date.now() - closed < 2000);
});

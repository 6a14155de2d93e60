// Tokens: an orchestrator started with client and worker token files takes
// calls only with 'authorization: Bearer <token>' of the right role.

import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, before, test } from 'node:test';

import { Client, SquireError, stream } from '@squire/client';

import { startCluster } from './harness.js';

const CLIENT_TOKEN = 'client-token-0123456789abcdef';
const WORKER_TOKEN = 'worker-token-0123456789abcdef';
const dir = mkdtempSync(path.join(tmpdir(), 'squire-node-tokens-'));
const file = (/** @type {string} */ name, /** @type {string} */ text) => {
  const target = path.join(dir, name);
  writeFileSync(target, `${text}\n`, { mode: 0o600 });
  return target;
};

/** @type {import('./harness.js').Cluster} */
let cluster;

before(async () => {
  cluster = await startCluster({
    orchestratorArgs: [
      '--client-token-file', file('clients', CLIENT_TOKEN),
      '--worker-token-file', file('workers', WORKER_TOKEN),
    ],
    workers: { count: 1, args: ['--token-file', file('worker-token', WORKER_TOKEN)] },
    clientOptions: { token: CLIENT_TOKEN },
  });
});
after(async () => {
  await cluster?.close();
  rmSync(dir, { recursive: true, force: true });
});

test('with the client token, directives and channels work', async () => {
  const client = /** @type {Client} */ (cluster.client);
  assert.equal(await stream([1, 2, 3, 4, 5, 6, 7, 8, 9, 10]).map('fib_at').fold('sum').run(client), 143);
  const channel = await client.leaseChannel();
  await channel.publish([{ operation: 'length', input: 'abc' }]);
  await channel.close();
  for await (const result of channel.results()) assert.equal(result.ok && result.value, 3);
  await channel.release();
});

/**
 * @param {string | undefined} token
 * @param {string} code
 */
async function refused(token, code) {
  const client = new Client(cluster.target, token === undefined ? {} : { token });
  try {
    await assert.rejects(client.status(), (err) => err instanceof SquireError && err.code === code);
    await assert.rejects(stream([1]).map('fib_at').run(client), (err) => err instanceof SquireError && err.code === code);
  } finally {
    client.close();
  }
}

test('without a token: UNAUTHENTICATED', () => refused(undefined, 'UNAUTHENTICATED'));
test('with a wrong token: UNAUTHENTICATED', () => refused('not-a-token-0123456789', 'UNAUTHENTICATED'));
test("with a worker's token: PERMISSION_DENIED", () => refused(WORKER_TOKEN, 'PERMISSION_DENIED'));

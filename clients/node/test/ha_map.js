// @ts-check
// Driven by tests/test_node_ha.py (not a node --test file): a map over the
// replicas of one orchestrator, given as 'h1:p1,h2:p2', while the test kills
// or stops the leader. Prints one JSON line per event on stdout:
//   {"delivered": k}                    as items arrive (k: items so far)
//   {"done": true, ...}                 the ledger at the end
//   {"error": "...", "code": "..."}     a run rejected
//
//   node test/ha_map.js <addresses> <n> <seconds per element>
//
// The main map streams its inputs from a generator (RunDirective calls);
// meanwhile small array maps (session calls) run one after another until the
// main one ends, so that calls start while no replica leads as well.

import { Client, SquireError, stream } from '@squire/client';

const [target, nArg, sleepArg] = process.argv.slice(2);
const n = Number(nArg);
const sleep = Number(sleepArg);

/** The input of element i; the 'sleep' operation returns its input, so the value shows the index. */
const input = (/** @type {number} */ i) => sleep + i * 1e-6;

/** @param {object} line */
const say = (line) => process.stdout.write(`${JSON.stringify(line)}\n`);

function* inputs() {
  for (let i = 0; i < n; i += 1) yield input(i);
}

const client = new Client(target, { reattachTimeoutMs: 60_000 });
/** @type {number[]} */
const deliveries = new Array(n).fill(0);
/** @type {object[]} */
const wrong = [];
let delivered = 0;
let mainDone = false;
let smallRuns = 0;
/** @type {object[]} */
const smallErrors = [];

async function small() {
  while (!mainDone) {
    const values = await stream([0, 1, 2, 3, 4, 5, 6, 7].map((i) => 0.001 + i * 1e-6)).map('sleep').run(client);
    values.forEach((/** @type {unknown} */ v, /** @type {number} */ i) => {
      if (v !== 0.001 + i * 1e-6) smallErrors.push({ i, v });
    });
    smallRuns += 1;
  }
}

try {
  const smallLoop = small();
  smallLoop.catch(() => undefined);
  const run = stream(inputs()).map('sleep').events(client, { expectedItems: n });
  for await (const event of run) {
    if (event.type !== 'items') continue;
    for (const { index, value } of event.items) {
      deliveries[index] += 1;
      if (value !== input(index)) wrong.push({ index, value });
    }
    delivered += event.items.length;
    say({ delivered });
  }
  mainDone = true;
  await smallLoop;
  say({
    done: true,
    n,
    delivered,
    lost: deliveries.flatMap((c, i) => (c === 0 ? [i] : [])).slice(0, 20),
    duplicated: deliveries.flatMap((c, i) => (c > 1 ? [i] : [])).slice(0, 20),
    wrong: wrong.slice(0, 20),
    reattached: run.reattached,
    duplicatesDropped: run.duplicatesDropped,
    smallRuns,
    smallErrors: smallErrors.slice(0, 20),
  });
} catch (err) {
  mainDone = true;
  say({ error: String(err), code: err instanceof SquireError ? err.code : null });
  process.exitCode = 1;
} finally {
  client.close();
}

#!/usr/bin/env node
// fib_at over 1..10, then fold with sum, evaluated by the orchestrator and
// Python workers (squire-worker --ops squire_examples.ops). Prints 143.
//
//   node examples/fib_sum.js [host:port]     (default: $SQUIRE_TARGET, else 127.0.0.1:50051)

import { Client, stream } from '@squire/client';

const target = process.argv[2] ?? process.env.SQUIRE_TARGET ?? '127.0.0.1:50051';
const client = new Client(target);
try {
  const numbers = Array.from({ length: 10 }, (_, i) => i + 1);
  const total = await stream(numbers).map('fib_at').fold('sum').run(client);
  console.log(total);
} catch (err) {
  console.error(`fib_sum against ${target} failed: ${err instanceof Error ? err.message : err}`);
  process.exitCode = 1;
} finally {
  client.close();
}

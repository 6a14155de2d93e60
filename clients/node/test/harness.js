// @ts-check
/**
 * Real processes for the Node tests: a squire-orchestrator and Python
 * squire-worker processes on 127.0.0.1, started from their console entry
 * points, waited for by polling (never by fixed sleeps), and stopped by close().
 *
 * The entry points are found, in this order, in:
 *   1. $SQUIRE_BIN, a directory (e.g. /path/to/venv/bin);
 *   2. $PATH (CI activates the venv, which puts its bin/ there);
 *   3. the bin/ of `python3 -c 'import sys; print(sys.prefix)'`.
 * If none has them the tests fail, saying so: nothing is skipped.
 */

import { execFileSync, spawn } from 'node:child_process';
import { accessSync, closeSync, constants, mkdtempSync, openSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';

import { Client } from '@squire/client';

/** The conformance cases and the cluster they run against, shared with the Python runner. */
export const CASES_FILE = new URL('../../../tests/conformance/cases.json', import.meta.url);

/**
 * Poll `predicate` until it returns something truthy; reject after `timeoutMs`.
 * @template T
 * @param {() => T | Promise<T>} predicate
 * @param {{ timeoutMs?: number, intervalMs?: number, message?: string | (() => string) }} [options]
 * @returns {Promise<T>}
 */
export async function waitUntil(predicate, { timeoutMs = 30_000, intervalMs = 20, message = 'a condition' } = {}) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await predicate();
    if (value) return value;
    if (Date.now() > deadline) {
      const what = typeof message === 'function' ? message() : message;
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    }
    await delay(intervalMs);
  }
}

/** @param {string} file */
function isExecutable(file) {
  try {
    accessSync(file, constants.X_OK);
    return true;
  } catch {
    return false;
  }
}

/**
 * The path of a Squire console entry point such as 'squire-orchestrator'.
 * @param {string} name
 */
export function entryPoint(name) {
  const dirs = [];
  if (process.env.SQUIRE_BIN) dirs.push(process.env.SQUIRE_BIN);
  dirs.push(...(process.env.PATH ?? '').split(path.delimiter).filter(Boolean));
  for (const dir of dirs) {
    const candidate = path.join(dir, name);
    if (isExecutable(candidate)) return candidate;
  }
  try {
    const prefix = execFileSync('python3', ['-c', 'import sys; print(sys.prefix)'], { encoding: 'utf8' }).trim();
    const candidate = path.join(prefix, 'bin', name);
    if (isExecutable(candidate)) return candidate;
  } catch {
    // no python3 on PATH: fall through to the error below
  }
  throw new Error(
    `${name} not found in $SQUIRE_BIN, $PATH or python3's sys.prefix/bin: `
      + "activate the venv where squire is installed (pip install -e '.[dev]') or set SQUIRE_BIN",
  );
}

/** @type {Set<import('node:child_process').ChildProcess>} */
const running = new Set();
// If the test process dies without close(), take the services with it.
process.on('exit', () => {
  for (const child of running) child.kill('SIGKILL');
});

/**
 * @typedef {object} WorkerSpec
 * @property {number} count
 * @property {string} ops
 * @property {string} executor
 * @property {number} concurrency
 * @property {string[]} [args] more squire-worker arguments
 */

export class Cluster {
  /** @type {Map<string, import('node:child_process').ChildProcess>} */
  processes = new Map();

  /**
   * @param {{ orchestratorArgs?: string[], workers?: Partial<WorkerSpec>, clientOptions?: import('@squire/client').ClientOptions, env?: Record<string, string> }} [options]
   *   `env`: more environment for every process of the cluster (e.g. SQUIRE_WORKER_TOKEN)
   */
  constructor({ orchestratorArgs = [], workers = {}, clientOptions = {}, env = {} } = {}) {
    this.clientOptions = clientOptions;
    this.env = env;
    this.dir = mkdtempSync(path.join(tmpdir(), 'squire-node-test-'));
    this.orchestratorArgs = orchestratorArgs;
    /** @type {WorkerSpec} */
    this.workerSpec = { count: 2, ops: 'squire_examples.ops', executor: 'inline', concurrency: 1, ...workers };
    this.target = '';
    /** @type {Client | null} */
    this.client = null;
  }

  async start() {
    const portFile = path.join(this.dir, 'port');
    this.#spawn('orchestrator', entryPoint('squire-orchestrator'), [
      '--host', '127.0.0.1', '--port', '0', '--port-file', portFile, '--metrics-port', '0',
      '--state-dir', path.join(this.dir, 'state'), ...this.orchestratorArgs,
    ]);
    const port = await this.#waitFor(() => readIfExists(portFile), "the orchestrator's port file", ['orchestrator']);
    this.target = `127.0.0.1:${port}`;
    this.client = new Client(this.target, this.clientOptions);
    /** @type {string[]} */
    const ids = [];
    const spec = this.workerSpec;
    for (let i = 0; i < spec.count; i += 1) {
      const id = `node-test-${i}`;
      ids.push(id);
      this.#spawn(`worker-${id}`, entryPoint('squire-worker'), [
        '--orchestrator', this.target, '--ops', spec.ops, '--executor', spec.executor,
        '--concurrency', String(spec.concurrency), '--metrics-port', '0', '--worker-id', id,
        ...(spec.args ?? []),
      ]);
    }
    const client = this.client;
    await this.#waitFor(async () => {
      const status = await client.status({ timeoutMs: 2000 }).catch(() => null);
      const connected = new Set((status?.workers ?? []).map((/** @type {any} */ w) => w.workerId));
      return ids.every((id) => connected.has(id));
    }, `workers ${ids.join(', ')} to connect`, [...this.processes.keys()]);
    return this;
  }

  /**
   * Kill the orchestrator with SIGKILL (no graceful shutdown; or `signal`,
   * e.g. SIGTERM: it stops gracefully) and wait for it to exit.
   * @param {NodeJS.Signals} [signal]
   */
  async killOrchestrator(signal = 'SIGKILL') {
    const child = this.processes.get('orchestrator');
    if (!child || child.exitCode !== null || child.signalCode !== null) return;
    const exited = new Promise((resolve) => child.once('exit', resolve));
    child.kill(signal);
    await exited;
  }

  /**
   * Start the orchestrator again on the port it had (after killing it with
   * `signal`, SIGKILL by default), and wait until every worker has
   * reconnected to it.
   * @param {NodeJS.Signals} [signal]
   */
  async restartOrchestrator(signal = 'SIGKILL') {
    await this.killOrchestrator(signal);
    const port = this.target.split(':').at(-1) ?? '';
    this.#spawn('orchestrator', entryPoint('squire-orchestrator'), [
      '--host', '127.0.0.1', '--port', port, '--metrics-port', '0',
      '--state-dir', path.join(this.dir, 'state'), ...this.orchestratorArgs,
    ]);
    const client = /** @type {Client} */ (this.client);
    const ids = Array.from({ length: this.workerSpec.count }, (_, i) => `node-test-${i}`);
    await this.#waitFor(async () => {
      const status = await client.status({ timeoutMs: 2000 }).catch(() => null);
      const connected = new Set((status?.workers ?? []).map((/** @type {any} */ w) => w.workerId));
      return ids.every((id) => connected.has(id));
    }, `workers ${ids.join(', ')} to reconnect`, ['orchestrator']);
  }

  /**
   * @param {string} name
   * @param {string} command
   * @param {string[]} args
   */
  #spawn(name, command, args) {
    const log = openSync(path.join(this.dir, `${name}.log`), 'a');
    const child = spawn(command, args, {
      stdio: ['ignore', log, log],
      env: { ...process.env, ...this.env, PYTHONUNBUFFERED: '1' },
    });
    closeSync(log);
    running.add(child);
    child.on('exit', () => running.delete(child));
    this.processes.set(name, child);
  }

  /**
   * waitUntil, failing early (with the log) if one of `names` exits.
   * @template T
   * @param {() => T | Promise<T>} predicate
   * @param {string} message
   * @param {string[]} names
   * @returns {Promise<T>}
   */
  async #waitFor(predicate, message, names) {
    try {
      return await waitUntil(async () => {
        for (const name of names) {
          const child = this.processes.get(name);
          if (child && child.exitCode !== null) {
            throw new Error(`${name} exited with ${child.exitCode}:\n${this.log(name)}`);
          }
        }
        return predicate();
      }, { message });
    } catch (err) {
      const logs = names.map((name) => `--- ${name}.log\n${this.log(name)}`).join('\n');
      throw new Error(`${err instanceof Error ? err.message : err}\n${logs}`);
    }
  }

  /** The tail of a process's log. @param {string} name */
  log(name) {
    return readIfExists(path.join(this.dir, `${name}.log`)).slice(-4000);
  }

  async close() {
    this.client?.close();
    const children = [...this.processes.values()].filter((c) => c.exitCode === null && c.signalCode === null);
    const exits = children.map((child) => new Promise((resolve) => child.once('exit', resolve)));
    for (const child of children) child.kill('SIGTERM');
    const timer = setTimeout(() => children.forEach((child) => child.kill('SIGKILL')), 15_000);
    await Promise.all(exits);
    clearTimeout(timer);
    rmSync(this.dir, { recursive: true, force: true });
  }
}

/** @param {string} file */
function readIfExists(file) {
  try {
    return readFileSync(file, 'utf8');
  } catch {
    return '';
  }
}

/**
 * Start a cluster (orchestrator + workers) and wait until every worker is connected.
 * @param {ConstructorParameters<typeof Cluster>[0]} [options]
 */
export async function startCluster(options) {
  const cluster = new Cluster(options);
  try {
    return await cluster.start();
  } catch (err) {
    await cluster.close();
    throw err;
  }
}

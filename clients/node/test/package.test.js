// @squire/client as a user gets it: `npm pack` here, the tarball installed
// into a fresh project outside the repository (its dependencies from the npm
// cache or registry), and the fib_sum example run from that project against
// real services, with the contract the package carries and its types.

import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { after, before, test } from 'node:test';

import { startCluster } from './harness.js';

const run = promisify(execFile);
const PACKAGE_DIR = fileURLToPath(new URL('..', import.meta.url));
const TSC = path.join(PACKAGE_DIR, 'node_modules', 'typescript', 'bin', 'tsc');
const NPM = process.platform === 'win32' ? 'npm.cmd' : 'npm';
const QUIET = ['--no-audit', '--no-fund', '--prefer-offline', '--loglevel', 'error'];

/** @type {import('./harness.js').Cluster} */
let cluster;
/** @type {string} */
let project;
/** @type {string} */
let installed;

before(async () => {
  const dir = mkdtempSync(path.join(tmpdir(), 'squire-node-package-'));
  const packed = await run(NPM, ['pack', '--json', '--pack-destination', dir, ...QUIET], { cwd: PACKAGE_DIR });
  const [{ filename }] = JSON.parse(packed.stdout);
  project = path.join(dir, 'project');
  mkdirSync(project);
  writeFileSync(path.join(project, 'package.json'),
    JSON.stringify({ name: 'my-app', version: '1.0.0', private: true, type: 'module' }, null, 2));
  await run(NPM, ['install', path.join(dir, filename), ...QUIET], { cwd: project });
  installed = path.join(project, 'node_modules', '@squire', 'client');
  cluster = await startCluster();
});

after(async () => {
  await cluster?.close();
  if (project) rmSync(path.dirname(project), { recursive: true, force: true });
});

test('the package carries its contract, its types and no test files', () => {
  assert.ok(existsSync(path.join(installed, 'proto', 'squire', 'api', 'v1', 'squire.proto')));
  assert.ok(existsSync(path.join(installed, 'types', 'index.d.ts')));
  assert.ok(existsSync(path.join(installed, 'src', 'index.js')));
  assert.ok(!existsSync(path.join(installed, 'test')));
  // The checkout's proto/ is only a fallback: it is not next to the installed package.
  assert.ok(!existsSync(path.join(installed, '..', '..', '..', 'proto')));
});

test('the example runs from the project against real services', async () => {
  copyFileSync(path.join(installed, 'examples', 'fib_sum.js'), path.join(project, 'fib_sum.js'));
  const { stdout } = await run(process.execPath, ['fib_sum.js', cluster.target], { cwd: project });
  assert.equal(stdout, '143\n');
});

test("the project's own code imports it and type-checks against its declarations", async () => {
  writeFileSync(path.join(project, 'app.ts'), [
    "import { Client, DirectiveInfo, DirectiveRun, SquireError, stream } from '@squire/client';",
    'declare const target: string;',
    'const client: Client = new Client(target, { reattachTimeoutMs: 60_000 });',
    "const total: unknown = await stream([1, 2, 3]).map('multiply_by', { factor: 2 }).fold('sum').run(client);",
    'const failure: SquireError | undefined = undefined;',
    "const submitted = async (): Promise<string> => stream([1]).map('fib_at').submit(client);",
    'const listed = async (): Promise<DirectiveInfo[]> => client.directives({ timeoutMs: 1000 });',
    'const attached = (id: string): DirectiveRun => client.attach(id, { reattachTimeoutMs: 0 });',
    'const read = async (id: string): Promise<unknown> => attached(id).result();',
    'const cancelled = async (id: string): Promise<void> => client.cancel(id);',
    'export { total, failure, submitted, listed, read, cancelled };',
    'client.close();',
    '',
  ].join('\n'));
  writeFileSync(path.join(project, 'app.js'), [
    "import { Client, SquireError, stream } from '@squire/client';",
    'const client = new Client(process.argv[2]);',
    "const total = await stream([1, 2, 3]).map('multiply_by', { factor: 2 }).fold('sum').run(client);",
    'console.log(total, SquireError.name);',
    'client.close();',
    '',
  ].join('\n'));
  // No @types/node in the project: the declarations must stand without it.
  writeFileSync(path.join(project, 'tsconfig.json'), JSON.stringify({
    compilerOptions: {
      noEmit: true, strict: true, target: 'es2022', module: 'nodenext', moduleResolution: 'nodenext',
      skipLibCheck: true, types: [],
    },
    files: ['app.ts'],
  }));
  await run(process.execPath, [TSC, '-p', '.'], { cwd: project })
    .catch((/** @type {any} */ err) => assert.fail(`tsc: ${err.stdout}${err.stderr}`));
  const { stdout } = await run(process.execPath, ['app.js', cluster.target], { cwd: project });
  assert.equal(stdout, '12 SquireError\n');
});

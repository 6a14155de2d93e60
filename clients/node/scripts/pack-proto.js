#!/usr/bin/env node
// @ts-check
// `npm pack` / `npm publish` put the contract inside the package: prepack
// copies the repository's proto/ file into ./proto/, postpack removes it, so
// the repository keeps one copy and a packed package carries the one it was
// built from.
//
//   node scripts/pack-proto.js copy | remove

import { copyFileSync, mkdirSync, rmSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import path from 'node:path';

const FILE = 'squire/api/v1/squire.proto';
const repoProto = fileURLToPath(new URL('../../../proto/', import.meta.url));
const packageProto = fileURLToPath(new URL('../proto/', import.meta.url));

const action = process.argv[2];
if (action === 'copy') {
  mkdirSync(path.dirname(path.join(packageProto, FILE)), { recursive: true });
  copyFileSync(path.join(repoProto, FILE), path.join(packageProto, FILE));
} else if (action === 'remove') {
  rmSync(packageProto, { recursive: true, force: true });
} else {
  console.error('usage: node scripts/pack-proto.js copy | remove');
  process.exitCode = 2;
}

// @ts-check
/**
 * The contract, loaded at run time. In the repository it is proto/ at the
 * root (the single source of truth: no copy here that could drift); a packed
 * package carries the file it was built from in its own proto/ folder
 * (scripts/pack-proto.js, run by `npm pack`).
 */

import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import path from 'node:path';

import grpc from '@grpc/grpc-js';
import protoLoader from '@grpc/proto-loader';

const PACKAGE_PROTO = fileURLToPath(new URL('../proto/', import.meta.url));
const REPOSITORY_PROTO = fileURLToPath(new URL('../../../proto/', import.meta.url));

/** The folder the contract is loaded from: the package's own, else the repository's. */
export const PROTO_ROOT = existsSync(PACKAGE_PROTO) ? PACKAGE_PROTO : REPOSITORY_PROTO;
export const PROTO_FILE = 'squire/api/v1/squire.proto';

// camelCase fields, uint64 as Number (indices and ids stay far below 2^53),
// enums as their names, every field present with its default, and the name of
// the set oneof member on each message (e.g. event.kind === 'items').
const LOAD_OPTIONS = {
  keepCase: false,
  longs: Number,
  enums: String,
  defaults: true,
  oneofs: true,
  includeDirs: [PROTO_ROOT],
};

/** @type {any} */
let api;

/**
 * The squire.api.v1 package: service client constructors by name.
 * @returns {any}
 */
export function loadApi() {
  if (api === undefined) {
    const file = path.join(PROTO_ROOT, PROTO_FILE);
    if (!existsSync(file)) {
      throw new Error(`the Squire contract is not at ${file}: a packed @squire/client carries it in proto/, a checkout loads it from the repository's proto/ folder`);
    }
    const definition = protoLoader.loadSync(PROTO_FILE, LOAD_OPTIONS);
    api = /** @type {any} */ (grpc.loadPackageDefinition(definition)).squire.api.v1;
  }
  return api;
}

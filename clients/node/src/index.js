// @ts-check
/**
 * @squire/client: run Squire directives (map, fold, chains) and use result
 * channels from Node.js. The contract is proto/squire/api/v1/squire.proto.
 *
 * - talk to an orchestrator: {@link Client}
 * - build plans fluently: {@link stream} / {@link IndexedStream}
 * - directive runs and their events: {@link DirectiveRun}, {@link Skipped}
 * - the low-level channel API: {@link Channel}
 * - errors: {@link SquireError}, {@link PayloadError}
 */

export { Channel } from './channel.js';
export { Client } from './client.js';
/** @typedef {import('./client.js').ClientOptions} ClientOptions */
/** @typedef {import('./client.js').DirectiveInfo} DirectiveInfo */
/** @typedef {import('./directive.js').RunOptions} RunOptions */
/** @typedef {import('./directive.js').DirectiveEvent} DirectiveEvent */
/** @typedef {import('./directive.js').Progress} Progress */
/** @typedef {import('./directive.js').Item} Item */
/** @typedef {import('./channel.js').TaskInput} TaskInput */
/** @typedef {import('./channel.js').TaskResult} TaskResult */
/** @typedef {import('./plan.js').Plan} Plan */
/** @typedef {import('./plan.js').Stage} Stage */
export { DirectiveRun, Skipped } from './directive.js';
export { PayloadError, SquireError } from './errors.js';
export { IndexedStream, stream } from './stream.js';

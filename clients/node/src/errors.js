// @ts-check
/**
 * The errors this package throws, one tree:
 *
 *     SquireError          .code: a gRPC status name such as 'INVALID_ARGUMENT'
 *     │                    .details: the orchestrator's message, unchanged
 *     └── PayloadError     a value cannot be encoded, or bytes cannot be decoded
 *                          (code 'INVALID_ARGUMENT', raised on this side of the wire)
 *
 * A failed gRPC call becomes a SquireError in one place: {@link fromGrpcError}.
 * Misusing the API itself (a stage without a name, a second iteration of a
 * run) throws the built-in TypeError / RangeError / Error instead.
 */

import grpc from '@grpc/grpc-js';

export class SquireError extends Error {
  /**
   * @param {string} code a gRPC status name, e.g. 'ABORTED'
   * @param {string} details the orchestrator's message (or ours, for a local error)
   * @param {{cause?: unknown}} [options]
   */
  constructor(code, details, options) {
    super(`${code}: ${details}`, options);
    this.name = 'SquireError';
    /** @type {string} */
    this.code = code;
    /** @type {string} */
    this.details = details;
  }
}

export class PayloadError extends SquireError {
  /**
   * @param {string} details what could not be encoded or decoded, and why
   * @param {{cause?: unknown}} [options]
   */
  constructor(details, options) {
    super('INVALID_ARGUMENT', details, options);
    this.name = 'PayloadError';
  }
}

/**
 * The status name of a numeric gRPC code ('UNKNOWN' for a code grpc-js does not know).
 * @param {number} code
 * @returns {string}
 */
export function statusName(code) {
  const name = /** @type {Record<number, string>} */ (/** @type {unknown} */ (grpc.status))[code];
  return typeof name === 'string' ? name : 'UNKNOWN';
}

/**
 * Translate what grpc-js rejected a call with. Errors that are not gRPC
 * statuses (a bug, an input iterator that threw) pass through unchanged.
 * @param {unknown} err
 * @returns {unknown}
 */
export function fromGrpcError(err) {
  if (err instanceof SquireError) return err;
  if (err instanceof Error && typeof (/** @type {any} */ (err).code) === 'number') {
    const code = statusName(/** @type {any} */ (err).code);
    const details = /** @type {any} */ (err).details || `the orchestrator answered ${code} without details`;
    return new SquireError(code, details, { cause: err });
  }
  return err;
}

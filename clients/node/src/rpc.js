// @ts-check
/** The one way this package makes a unary call: a deadline, and errors translated. */

import { fromGrpcError } from './errors.js';

/**
 * @param {any} stub a grpc-js service client
 * @param {string} method
 * @param {object} request
 * @param {number | undefined} timeoutMs undefined or 0: no deadline
 * @returns {Promise<any>}
 */
export function unary(stub, method, request, timeoutMs) {
  const options = timeoutMs ? { deadline: Date.now() + timeoutMs } : {};
  return new Promise((resolve, reject) => {
    stub[method](request, options, (/** @type {unknown} */ err, /** @type {any} */ response) => {
      if (err) reject(fromGrpcError(err));
      else resolve(response);
    });
  });
}

/**
 * Write one message to a client stream, waiting for 'drain' when its buffer
 * is full. Resolves false once the call has ended: nothing more can be sent.
 * @param {any} call a grpc-js writable call
 * @param {() => boolean} ended
 * @param {object} message
 * @returns {Promise<boolean>}
 */
export async function writeMessage(call, ended, message) {
  if (ended()) return false;
  if (!call.write(message)) {
    await new Promise((resolve) => {
      const done = () => {
        call.off('drain', done);
        call.off('status', done);
        resolve(undefined);
      };
      call.on('drain', done);
      call.on('status', done);
    });
  }
  return !ended();
}

/**
 * Cancel a grpc-js call, reliably.
 *
 * grpc-js (1.14.7) loses a cancel that arrives before the call has created
 * its transport stream: ResolvingCall creates its child call in a promise
 * callback without checking whether it was cancelled meanwhile, so the HTTP/2
 * stream opens anyway, is never reset, and the orchestrator keeps the
 * directive (and this process its connection). Cancelling once more after
 * those promise callbacks have run reaches the late child; on a call that
 * already ended it does nothing.
 * @param {any} call a grpc-js call
 */
export function cancelCall(call) {
  call.cancel();
  setImmediate(() => call.cancel());
}

// @ts-check
/**
 * Small directives over one long-lived RunDirectives stream.
 *
 * A new RPC per directive costs more than the directive itself when it has a
 * handful of elements. A Client therefore runs directives whose inputs are an
 * array of at most {@link SESSION_MAX_ITEMS} elements as calls of one shared
 * session stream: the plan, the inputs and the end of input go out in one
 * SessionRequest, and the call's events come back in SessionEvents keyed by
 * its call id, the last one carrying the CallEnd (the status RunDirective
 * would have ended with). Everything else uses its own RunDirective call,
 * which streams inputs lazily with flow control.
 *
 * The stream opens on the first call, is shared by every call of the client,
 * and is re-opened by the next call after it breaks; calls in flight when it
 * breaks reject with UNAVAILABLE (or the status the stream ended with),
 * unless they had started: those reattach to their directive with a
 * RunDirective call of their own (see directive.js). An
 * idle stream is half-closed after {@link SESSION_IDLE_MS}, so that it does
 * not keep the process alive on its own.
 */

import { SquireError, fromGrpcError, statusName } from './errors.js';
import { cancelCall } from './rpc.js';

/** The longest array input that rides the session instead of a RunDirective call. */
export const SESSION_MAX_ITEMS = 64;

/** How long a session stream with no call in flight stays open. */
export const SESSION_IDLE_MS = 1000;

/**
 * What a call of the session is told: each SessionEvent for its call id, or
 * the error that ended the whole stream (after which nothing more comes).
 * @typedef {object} SessionHandler
 * @property {(message: any) => void} message a SessionEvent as proto-loader decodes it
 * @property {(error: unknown) => void} fail
 */

/** The details of the error a call gets when its client closed the session. */
export const CLOSED_MESSAGE = 'the directive session was closed';
/** ... and when the stream ended without an error while the call was in flight. */
export const ENDED_MESSAGE = 'the directive session stream ended';

const closedError = () => new SquireError('UNAVAILABLE', CLOSED_MESSAGE);

/** The shared RunDirectives stream of one Client. */
export class DirectiveSession {
  #stub;
  /** @type {any} the open RunDirectives call, or null */
  #call = null;
  #nextId = 1;
  /** @type {Map<number, SessionHandler>} calls in flight on #call */
  #calls = new Map();
  #closed = false;
  /** @type {NodeJS.Timeout | null} */
  #idleTimer = null;

  /** @param {any} stub the DirectiveService client */
  constructor(stub) {
    this.#stub = stub;
  }

  /**
   * Start a call: send its one request (plan, inputs, end_input), opening the
   * stream if there is none.
   * @param {object} request a SessionRequest without its call id
   * @param {SessionHandler} handler
   * @returns {number} the call id
   */
  start(request, handler) {
    if (this.#closed) throw closedError();
    this.#clearIdle();
    if (this.#call === null) this.#open();
    const callId = this.#nextId;
    this.#nextId += 1;
    this.#calls.set(callId, handler);
    this.#call.write({ ...request, callId });
    return callId;
  }

  /**
   * Cancel a call in flight: the server cancels its directive; whatever it
   * still sends for the call is dropped.
   * @param {number} callId
   */
  cancel(callId) {
    if (this.#calls.delete(callId) && this.#call !== null) {
      this.#call.write({ callId, cancel: true });
    }
    this.#maybeIdle();
  }

  /**
   * The call has its end: forget it.
   * @param {number} callId
   */
  done(callId) {
    this.#calls.delete(callId);
    this.#maybeIdle();
  }

  /** Fail every call in flight with UNAVAILABLE and end the stream. Idempotent. */
  close() {
    if (this.#closed) return;
    this.#closed = true;
    this.#clearIdle();
    const call = this.#call;
    this.#call = null;
    this.#failAll(closedError());
    if (call !== null) {
      call.end();
      cancelCall(call);
    }
  }

  #open() {
    const call = this.#stub.RunDirectives();
    this.#call = call;
    call.on('data', (/** @type {any} */ message) => {
      if (this.#call !== call) return;
      this.#calls.get(message.callId)?.message(message);
    });
    /** @type {unknown} */
    let error = null;
    call.on('error', (/** @type {unknown} */ err) => {
      error = fromGrpcError(err);
    });
    call.on('status', () => {
      if (this.#call !== call) return; // closed or idled out: nobody is waiting on it
      this.#call = null; // broken: the next call opens a new stream
      this.#clearIdle();
      this.#failAll(error ?? new SquireError('UNAVAILABLE', ENDED_MESSAGE));
    });
  }

  /** @param {unknown} error */
  #failAll(error) {
    const handlers = [...this.#calls.values()];
    this.#calls.clear();
    for (const handler of handlers) handler.fail(error);
  }

  #maybeIdle() {
    if (this.#call === null || this.#calls.size > 0 || this.#idleTimer !== null) return;
    const call = this.#call;
    this.#idleTimer = setTimeout(() => {
      this.#idleTimer = null;
      if (this.#call !== call || this.#calls.size > 0) return;
      this.#call = null;
      // Half-close: the server ends the stream once its calls (cancelled
      // ones included) have ended.
      call.end();
    }, SESSION_IDLE_MS);
    this.#idleTimer.unref();
  }

  #clearIdle() {
    if (this.#idleTimer !== null) {
      clearTimeout(this.#idleTimer);
      this.#idleTimer = null;
    }
  }
}

/**
 * The SquireError of a call that ended with a non-OK CallEnd: the same as
 * RunDirective ending with that status.
 * @param {number} code a gRPC status code number
 * @param {string} message
 * @returns {SquireError}
 */
export function callEndError(code, message) {
  const name = statusName(code);
  return new SquireError(name, message || `the orchestrator answered ${name} without details`);
}

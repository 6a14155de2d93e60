// @ts-check
/**
 * Waiting out an orchestrator that went away (a crash, a restart, a
 * failover): the one backoff every retry of this package uses. A call that
 * fails with UNAVAILABLE after its work was accepted (journaled) is tried
 * again, 50 ms doubling to 1 s between tries, until `reattachTimeoutMs`
 * has passed since the first failure. Directive runs reattach by id
 * (directive.js); leased channels resend what was not acknowledged and
 * resubscribe with how many results they have (channel.js); unary calls to
 * replicas are tried again until their deadline (replicas.js).
 */

import { SquireError, fromGrpcError } from './errors.js';

/** How long a run or a channel keeps trying by default (ClientOptions.reattachTimeoutMs). */
export const DEFAULT_REATTACH_TIMEOUT_MS = 120_000;
export const FIRST_BACKOFF_MS = 50;
export const MAX_BACKOFF_MS = 1000;

/** The delays of one outage: null once `timeoutMs` has passed since it began. */
export class Backoff {
  #delay = FIRST_BACKOFF_MS;

  /** @param {number} timeoutMs Infinity: no end */
  constructor(timeoutMs) {
    /** When the outage is given up (a Date.now() value). */
    this.deadline = Date.now() + timeoutMs;
  }

  /** Whether the deadline has passed. */
  get expired() {
    return Date.now() >= this.deadline;
  }

  /**
   * The next pause (never past the deadline), or null once it passed.
   * @returns {number | null}
   */
  next() {
    const left = this.deadline - Date.now();
    if (left <= 0) return null;
    const delay = Math.min(this.#delay, left);
    this.#delay = Math.min(this.#delay * 2, MAX_BACKOFF_MS);
    return delay;
  }
}

/**
 * Whether an error is a gRPC UNAVAILABLE (the orchestrator went away, a
 * standby refused the call).
 * @param {unknown} error
 */
export function unavailable(error) {
  const err = fromGrpcError(error);
  return err instanceof SquireError && err.code === 'UNAVAILABLE';
}

/**
 * Wait `ms`, or less if one of `signals` aborts meanwhile.
 * @param {number} ms
 * @param {(AbortSignal | undefined)[]} [signals]
 * @returns {Promise<void>}
 */
export function sleep(ms, signals = []) {
  const live = /** @type {AbortSignal[]} */ (signals.filter((s) => s !== undefined));
  if (live.some((s) => s.aborted)) return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      for (const s of live) s.removeEventListener('abort', done);
      resolve();
    };
    const timer = setTimeout(done, Math.max(0, ms));
    for (const s of live) s.addEventListener('abort', done, { once: true });
  });
}

/**
 * @typedef {object} RetryOptions
 * @property {number} timeoutMs how long to keep trying after the first UNAVAILABLE; 0: never
 * @property {string} [doneIf] a status name that, on a retry, means the first try took
 *   effect before its answer was lost (e.g. NOT_FOUND for a release): resolves undefined
 * @property {(AbortSignal | undefined)[]} [signals] any of them aborted: stop trying
 * @property {import('./replicas.js').Replicas | null} [replicas] look for the leader before each retry
 */

/**
 * `attempt()`, tried again while it rejects with UNAVAILABLE, with backoff,
 * for `timeoutMs`; then (or on any other error) it rejects with the last
 * error, as a SquireError.
 * @template T
 * @param {() => Promise<T>} attempt
 * @param {RetryOptions} options
 * @returns {Promise<T | undefined>}
 */
export async function retrying(attempt, { timeoutMs, doneIf, signals = [], replicas = null }) {
  /** @type {Backoff | null} */
  let backoff = null;
  for (;;) {
    try {
      return await attempt();
    } catch (err) {
      const error = fromGrpcError(err);
      if (backoff !== null && doneIf !== undefined && error instanceof SquireError && error.code === doneIf) {
        return undefined;
      }
      if (!unavailable(error) || timeoutMs <= 0 || signals.some((s) => s?.aborted)) throw error;
      backoff ??= new Backoff(timeoutMs);
      const delay = backoff.next();
      if (delay === null) throw error;
      replicas?.failed(error);
      await sleep(delay, signals);
      if (signals.some((s) => s?.aborted)) throw error;
      await replicas?.find();
    }
  }
}

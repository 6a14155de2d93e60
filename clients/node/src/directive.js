// @ts-check
/**
 * One directive run. Usually one RunDirective call: the plan and the input
 * items stream out, events stream back. Inputs are pulled lazily as gRPC flow
 * control lets them through, so a generator of a million elements is never
 * held in memory and results arrive while inputs are still being sent.
 *
 * A short array input (at most SESSION_MAX_ITEMS elements) runs as a call of
 * the client's shared RunDirectives session instead (see session.js): the
 * plan and every encoded input go out in one message. The events, errors and
 * options are the same either way.
 */

import { SquireError, fromGrpcError } from './errors.js';
import { planMessage } from './plan.js';
import { cancelCall, writeMessage } from './rpc.js';
import { decode, encode, parseSerializer, rawPayload } from './serde.js';
import { SESSION_MAX_ITEMS, callEndError } from './session.js';

const MAX_BATCH_ITEMS = 256;
const MAX_BATCH_BYTES = 1024 * 1024;

/**
 * Stands in for the value of an element whose operation failed with
 * FATAL_STRATEGY_IGNORE: a map result holds it at that index; a fold lets the
 * element contribute empty().
 */
export class Skipped {
  /**
   * @param {number} index
   * @param {string} error why the element was skipped
   */
  constructor(index, error) {
    this.index = index;
    this.error = error;
  }
}

/**
 * @typedef {object} Progress
 * @property {number} received input items received so far
 * @property {number} completed elements through every map stage (or skipped)
 * @property {number} skipped
 * @property {number} total known total, or 0 while the input is open
 * @property {number} queued tasks waiting for a worker
 * @property {number} leased tasks at workers (executing or buffered there)
 * @property {number} retries
 * @property {number} tasksDone every finished task, fold combines included
 * @property {string} waiting what it waits for (a worker offering an operation), or 
 *
 * @typedef {{ index: number, value: unknown }} Item  value is a Skipped for an ignored failure
 *
 * @typedef {{ type: 'started', directiveId: string }
 *   | { type: 'items', items: Item[] }
 *   | { type: 'progress', progress: Progress }
 *   | { type: 'fold', value: unknown }} DirectiveEvent
 *
 * @typedef {object} RunOptions
 * @property {string} [serializer] 'json' (default) or 'msgpack'
 * @property {boolean} [raw] inputs are already encoded: each a Uint8Array, or a
 *   string sent as its UTF-8 bytes, verbatim (results are still decoded)
 * @property {(progress: Progress) => void} [onProgress] called on every progress event
 * @property {AbortSignal} [signal] aborting cancels the directive; the run rejects with signal.reason
 * @property {number} [expectedItems] progress total hint (default: the length of an array input)
 */

/**
 * A directive running on the orchestrator. Iterate it (once) with
 * `for await` for its {@link DirectiveEvent}s; the call starts with the first
 * iteration. A failed directive throws a SquireError (ABORTED for a fatal
 * operation error); an error thrown by the input iterable is rethrown as is.
 * Leaving the loop early cancels the directive.
 *
 * An array input of at most 64 elements runs on the client's shared
 * RunDirectives session (unless the client was created with
 * `{ session: false }`); anything else gets a RunDirective call of its own.
 */
export class DirectiveRun {
  /** @type {string | null} */
  directiveId = null;
  /** @type {Progress | null} */
  progress = null;
  /** Input elements taken from the iterable and encoded so far. */
  inputsSent = 0;

  #stub;
  #plan;
  #inputs;
  #serializer;
  #raw;
  #onProgress;
  #signal;
  #expectedItems;
  /** @type {any} */
  #call = null;
  #ended = false;
  /** @type {() => void} */
  #markEnded = () => {};
  /** Settles when the call has its status. */
  #endedPromise = new Promise((resolve) => {
    this.#markEnded = () => resolve(undefined);
  });
  /** @type {object} */
  #planMessage;
  #iterated = false;
  /** @type {{ error: unknown } | null} */
  #inputFailure = null;
  /** @type {import('./session.js').DirectiveSession | null} */
  #session;
  /** @type {{ callId: number, wake: (error: unknown) => void } | null} the session call in flight */
  #sessionCall = null;

  /**
   * @param {any} stub the DirectiveService client
   * @param {import('./plan.js').NormalizedPlan} plan
   * @param {Iterable<unknown> | AsyncIterable<unknown>} inputs
   * @param {RunOptions} [options]
   * @param {import('./session.js').DirectiveSession | null} [session] the client's
   *   session, for a short array input (internal: the Client passes it)
   */
  constructor(stub, plan, inputs, options = {}, session = null) {
    if (inputs == null || (typeof (/** @type {any} */ (inputs)[Symbol.iterator]) !== 'function'
      && typeof (/** @type {any} */ (inputs)[Symbol.asyncIterator]) !== 'function')) {
      throw new TypeError('inputs must be an iterable or an async iterable');
    }
    this.#stub = stub;
    this.#plan = plan;
    this.#inputs = inputs;
    this.#serializer = parseSerializer(options.serializer);
    this.#raw = options.raw === true;
    this.#onProgress = options.onProgress;
    this.#signal = options.signal;
    this.#expectedItems = options.expectedItems ?? (Array.isArray(inputs) ? inputs.length : 0);
    // Encode params now, so a bad one fails the caller before anything is sent.
    this.#planMessage = planMessage(plan, this.#serializer, this.#expectedItems);
    this.#session = session;
  }

  /** Whether the plan ends with a fold. */
  get fold() {
    return this.#plan.fold;
  }

  /** Cancel the directive if it still runs: its queued tasks are dropped, running ones aborted. */
  cancel() {
    if (this.#call !== null && !this.#ended) cancelCall(this.#call);
    const sessionCall = this.#sessionCall;
    if (sessionCall !== null && !this.#ended) {
      this.#ended = true;
      this.#session?.cancel(sessionCall.callId);
      sessionCall.wake(new SquireError('CANCELLED', 'Cancelled on client'));
    }
  }

  /** @returns {AsyncGenerator<DirectiveEvent, void, undefined>} */
  async *[Symbol.asyncIterator]() {
    if (this.#iterated) throw new Error('a DirectiveRun can be iterated only once');
    this.#iterated = true;
    const inputs = this.#inputs;
    if (this.#session !== null && Array.isArray(inputs) && inputs.length <= SESSION_MAX_ITEMS) {
      yield* this.#sessionEvents(this.#session, inputs);
      return;
    }
    const signal = this.#signal;
    signal?.throwIfAborted();
    const call = this.#stub.RunDirective();
    this.#call = call;
    call.on('status', () => {
      this.#ended = true;
      this.#markEnded();
    });
    const onAbort = () => this.cancel();
    signal?.addEventListener('abort', onAbort, { once: true });
    this.#feed();
    try {
      for await (const message of call) {
        const event = this.#event(message);
        if (event !== undefined) yield event;
      }
    } catch (err) {
      if (this.#inputFailure !== null) throw this.#inputFailure.error;
      if (signal?.aborted) throw signal.reason;
      throw fromGrpcError(err);
    } finally {
      signal?.removeEventListener('abort', onAbort);
      this.cancel();
    }
  }

  /**
   * The run as a call of the client's session: every input encoded first (an
   * encoding error rejects before anything is sent), then plan, inputs and
   * end of input in one request; the call's events come back in session
   * messages, the last one with its end.
   * @param {import('./session.js').DirectiveSession} session
   * @param {unknown[]} inputs
   * @returns {AsyncGenerator<DirectiveEvent, void, undefined>}
   */
  async *#sessionEvents(session, inputs) {
    const signal = this.#signal;
    signal?.throwIfAborted();
    const items = inputs.map((value) => (this.#raw ? rawPayload(value) : encode(value, this.#serializer)));
    /** @type {any[]} */
    const inbox = [];
    /** @type {{ failure: { error: unknown } | null }} why the call ended without its end, if it did */
    const state = { failure: null };
    /** @type {(() => void) | null} */
    let wakeUp = null;
    const wake = () => {
      const resolve = wakeUp;
      wakeUp = null;
      resolve?.();
    };
    const request = { plan: this.#planMessage, inputs: { items }, endInput: true };
    const callId = session.start(request, {
      message: (message) => {
        inbox.push(message);
        wake();
      },
      fail: (error) => {
        this.#ended = true;
        state.failure ??= { error };
        wake();
      },
    });
    this.inputsSent = items.length;
    this.#sessionCall = {
      callId,
      wake: (error) => {
        state.failure ??= { error };
        wake();
      },
    };
    const onAbort = () => this.cancel();
    signal?.addEventListener('abort', onAbort, { once: true });
    try {
      for (;;) {
        while (inbox.length === 0 && state.failure === null) {
          await new Promise((resolve) => {
            wakeUp = () => resolve(undefined);
          });
        }
        const message = inbox.shift();
        if (message === undefined) throw state.failure?.error;
        for (const raw of message.events) {
          const event = this.#event(raw);
          if (event !== undefined) yield event;
        }
        if (message.end != null) {
          this.#ended = true;
          session.done(callId);
          if (message.end.code !== 0) throw callEndError(message.end.code, message.end.message);
          return;
        }
      }
    } catch (err) {
      if (signal?.aborted) throw signal.reason;
      throw err;
    } finally {
      signal?.removeEventListener('abort', onAbort);
      this.cancel();
    }
  }

  /**
   * The request side: the plan, input batches, then half-close. Never
   * rejects: an input or encoding error cancels the call and is rethrown by
   * the event loop instead of the CANCELLED status it sees.
   */
  async #feed() {
    const call = this.#call;
    const ended = () => this.#ended;
    /** @type {Buffer[]} */
    let items = [];
    let bytes = 0;
    const flush = async () => {
      if (items.length === 0) return true;
      const batch = items;
      items = [];
      bytes = 0;
      return writeMessage(call, ended, { inputs: { items: batch } });
    };
    /** @param {unknown} value @returns {boolean} whether the batch is full */
    const add = (value) => {
      const data = this.#raw ? rawPayload(value) : encode(value, this.#serializer);
      items.push(data);
      bytes += data.length;
      this.inputsSent += 1;
      return items.length >= MAX_BATCH_ITEMS || bytes >= MAX_BATCH_BYTES;
    };
    try {
      if (!(await writeMessage(call, ended, { plan: this.#planMessage }))) return;
      const inputs = /** @type {any} */ (this.#inputs);
      if (typeof inputs[Symbol.asyncIterator] === 'function') {
        if (!(await this.#feedAsync(inputs[Symbol.asyncIterator](), add, flush, () => items.length > 0))) return;
      } else {
        for (const value of inputs) {
          if (add(value) && !(await flush())) return;
        }
      }
      if (!(await flush())) return;
      if (!this.#ended) call.end();
    } catch (err) {
      if (this.#ended) return; // the call is over; its own status says why
      this.#inputFailure = { error: err };
      cancelCall(call);
    }
  }

  /**
   * Pull an async iterator. A partial batch is sent as soon as the source
   * makes us wait, so a slow source does not hold back its first elements;
   * and the call ending (a failure, a cancel) stops the wait for the source.
   * @param {AsyncIterator<unknown>} iterator
   * @param {(value: unknown) => boolean} add
   * @param {() => Promise<boolean>} flush
   * @param {() => boolean} pending
   * @returns {Promise<boolean>} false if the call ended first
   */
  async #feedAsync(iterator, add, flush, pending) {
    const tick = Symbol('tick');
    const ended = Symbol('ended');
    const callEnded = this.#endedPromise.then(() => ended);
    for (;;) {
      const next = iterator.next();
      /** @type {Promise<IteratorResult<unknown> | symbol>[]} */
      const waits = [next, callEnded];
      if (pending()) waits.push(new Promise((resolve) => setImmediate(resolve, tick)));
      let result = await Promise.race(waits);
      if (result === tick) {
        if (!(await flush())) result = ended;
        else result = await Promise.race([next, callEnded]);
      }
      if (result === ended) {
        // Stop the source without waiting for it: it may be stuck.
        next.then(() => iterator.return?.(), () => undefined).catch(() => undefined);
        return false;
      }
      const step = /** @type {IteratorResult<unknown>} */ (result);
      if (step.done) return true;
      if (add(step.value) && !(await flush())) {
        Promise.resolve(iterator.return?.()).catch(() => undefined);
        return false;
      }
    }
  }

  /**
   * @param {any} message a DirectiveEvent as proto-loader decodes it
   * @returns {DirectiveEvent | undefined} undefined for an event kind this client does not know
   */
  #event(message) {
    const serializer = this.#serializer;
    switch (message.kind) {
      case 'started':
        this.directiveId = message.started.directiveId;
        return { type: 'started', directiveId: message.started.directiveId };
      case 'items':
        return {
          type: 'items',
          items: message.items.items.map((/** @type {any} */ item) => ({
            index: item.index,
            value: item.skipped
              ? new Skipped(item.index, item.error)
              : decode(item.value, serializer, `the result of element ${item.index}`),
          })),
        };
      case 'progress': {
        /** @type {Progress} */
        const progress = { ...message.progress };
        this.progress = progress;
        this.#onProgress?.(progress);
        return { type: 'progress', progress };
      }
      case 'fold':
        return { type: 'fold', value: decode(message.fold.value, serializer, 'the fold value') };
      default:
        return undefined;
    }
  }
}

/**
 * Run to the end: the fold value, or the map results in input order.
 * @param {DirectiveRun} run
 * @returns {Promise<unknown>}
 */
export async function collect(run) {
  /** @type {Map<number, unknown>} */
  const values = new Map();
  let folded = false;
  /** @type {unknown} */
  let foldValue;
  for await (const event of run) {
    if (event.type === 'items') {
      for (const item of event.items) values.set(item.index, item.value);
    } else if (event.type === 'fold') {
      folded = true;
      foldValue = event.value;
    }
  }
  if (run.fold) {
    if (!folded) throw new SquireError('INTERNAL', 'the directive ended without a fold value');
    return foldValue;
  }
  checkComplete(values.keys(), run.inputsSent);
  return Array.from({ length: run.inputsSent }, (_, index) => values.get(index));
}

/**
 * `{index, value}` for every element, in completion order.
 * @param {DirectiveRun} run
 * @returns {AsyncGenerator<Item, void, undefined>}
 */
export async function* items(run) {
  /** @type {Set<number>} */
  const seen = new Set();
  for await (const event of run) {
    if (event.type !== 'items') continue;
    for (const item of event.items) {
      seen.add(item.index);
      yield item;
    }
  }
  checkComplete(seen, run.inputsSent);
}

/**
 * @param {Iterable<number>} indices
 * @param {number} inputsSent
 */
function checkComplete(indices, inputsSent) {
  const seen = new Set(indices);
  if (seen.size === inputsSent && [...seen].every((i) => i < inputsSent)) return;
  const missing = [];
  for (let i = 0; i < inputsSent && missing.length < 10; i += 1) if (!seen.has(i)) missing.push(i);
  throw new SquireError(
    'INTERNAL',
    `the directive ended with ${seen.size} results for ${inputsSent} inputs`
      + (missing.length ? `; missing indices ${missing.join(', ')}` : ''),
  );
}

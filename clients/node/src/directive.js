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
 *
 * When the orchestrator goes away mid-directive (a crash, a restart, a
 * rolling upgrade: the call fails with UNAVAILABLE after the directive
 * started, so its plan is journaled), the run reattaches by itself: new
 * RunDirective calls with AttachDirective and the counts of values and
 * skipped items it has, with backoff, for up to `reattachTimeoutMs`. The new
 * orchestrator replays what the caller lacks and goes on; the inputs it had
 * not journaled are sent again (feeder.js). The caller sees every index
 * exactly once, and a slower directive instead of an error.
 */

import { SquireError, fromGrpcError } from './errors.js';
import { Feeder } from './feeder.js';
import { planMessage } from './plan.js';
import { Backoff, DEFAULT_REATTACH_TIMEOUT_MS } from './reconnect.js';
import { cancelCall } from './rpc.js';
import { decode, encode, parseSerializer, rawPayload, serializerFromWire } from './serde.js';
import { CLOSED_MESSAGE, ENDED_MESSAGE, SESSION_MAX_ITEMS, callEndError } from './session.js';

/** How long a run keeps trying to reattach by default (ClientOptions.reattachTimeoutMs). */
export { DEFAULT_REATTACH_TIMEOUT_MS };

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
 * @property {number} [reattachTimeoutMs] how long this run keeps trying to reattach when the
 *   orchestrator goes away mid-directive (default: the client's, 120 s); 0 turns it off
 *
 * @typedef {object} RunContext internal: what the Client gives its runs
 * @property {import('./session.js').DirectiveSession | null} [session] the client's session,
 *   for a short array input
 * @property {number} [reattachTimeoutMs] the client's default
 * @property {AbortSignal} [closed] aborted when the client closes: no more reattaching
 * @property {boolean} [detached] submit the plan detached (Client.submit)
 * @property {import('./replicas.js').Replicas | null} [replicas] several orchestrator
 *   addresses: calls go to the leader, and a call that fails before its directive
 *   started is made again on the leader
 *
 * @typedef {object} Attempt one RunDirective call of the run
 * @property {any} call
 * @property {AsyncIterator<any>} messages
 * @property {boolean} ended it has its status
 * @property {Promise<unknown>} endedPromise settles with the call's status
 * @property {any} status the call's status once it has it
 */

/**
 * A directive running on the orchestrator. Iterate it (once) with
 * `for await` for its {@link DirectiveEvent}s; the call starts with the first
 * iteration. A failed directive throws a SquireError (ABORTED for a fatal
 * operation error); an error thrown by the input iterable is rethrown as is.
 * Leaving the loop early cancels the directive (a detached one runs on).
 *
 * An array input of at most 64 elements runs on the client's shared
 * RunDirectives session (unless the client was created with
 * `{ session: false }`); anything else gets a RunDirective call of its own.
 * Either way the run reattaches by itself when the orchestrator goes away
 * mid-directive (see `reattachTimeoutMs`); `reattached` counts how often.
 */
export class DirectiveRun {
  /** @type {string | null} */
  directiveId = null;
  /** @type {Progress | null} */
  progress = null;
  /** Times the run resumed after the orchestrator went away. */
  reattached = 0;

  #stub;
  #plan;
  #inputs;
  #serializer;
  #raw;
  #onProgress;
  #signal;
  #expectedItems;
  #reattachTimeoutMs;
  /** @type {AbortSignal | undefined} */
  #clientClosed;
  #detached;
  /** @type {object} */
  #planMessage;
  #iterated = false;
  /** @type {import('./session.js').DirectiveSession | null} */
  #session;
  /** @type {{ callId: number, wake: (error: unknown) => void } | null} the session call in flight */
  #sessionCall = null;
  /** @type {Feeder} */
  #feeder;
  /** @type {Attempt | null} the RunDirective call in flight */
  #attempt = null;
  /** The directive id to attach to on the first call (Client.attach), else null. */
  #attachTo;
  /** The caller has seen the started event. */
  #startedSeen = false;
  /** Items received so far, as the orchestrator counts them for AttachDirective. */
  #values = 0;
  #skipped = 0;
  /** Inputs of an attached directive (its DirectiveStarted.received once its input ended). */
  #attachedInputs = 0;
  /** @type {Uint8Array} a bit per index delivered to the caller */
  #delivered = new Uint8Array(1024);
  /** Items the orchestrator sent twice and this run dropped (0 unless something is wrong). */
  duplicatesDropped = 0;
  #cancelled = false;
  #finished = false;
  /** @type {DirectiveEvent | undefined} what the first message of a reattached call gave the caller */
  #resumedEvent = undefined;
  /** @type {(() => void) | null} wakes a reattach backoff */
  #wakeBackoff = null;
  /** @type {import('./replicas.js').Replicas | null} */
  #replicas;

  /**
   * @param {any} stub the DirectiveService client
   * @param {import('./plan.js').NormalizedPlan | null} plan null: attach to `attachTo`
   * @param {Iterable<unknown> | AsyncIterable<unknown> | null} inputs
   * @param {RunOptions} [options]
   * @param {RunContext} [context] internal: the Client passes it
   * @param {string | null} [attachTo] internal: Client.attach
   */
  constructor(stub, plan, inputs, options = {}, context = {}, attachTo = null) {
    this.#attachTo = attachTo;
    this.#stub = stub;
    this.#serializer = parseSerializer(options.serializer);
    this.#raw = options.raw === true;
    this.#onProgress = options.onProgress;
    this.#signal = options.signal;
    this.#clientClosed = context.closed;
    this.#detached = context.detached === true;
    const timeout = options.reattachTimeoutMs ?? context.reattachTimeoutMs ?? DEFAULT_REATTACH_TIMEOUT_MS;
    if (typeof timeout !== 'number' || !(timeout >= 0)) {
      throw new RangeError(`reattachTimeoutMs is a number of milliseconds >= 0, got ${timeout}`);
    }
    this.#reattachTimeoutMs = timeout;
    this.#session = context.session ?? null;
    this.#replicas = context.replicas ?? null;
    if (attachTo !== null) {
      if (typeof attachTo !== 'string' || attachTo === '') {
        throw new TypeError(`a directive id is a non-empty string, got ${JSON.stringify(attachTo)}`);
      }
      this.#plan = { stages: [], taskTimeoutSeconds: 0, fold: false };
      this.#inputs = null;
      this.#expectedItems = 0;
      this.#planMessage = {};
      this.#session = null;
      this.directiveId = attachTo;
      this.#feeder = new Feeder(null, () => Buffer.alloc(0));
      return;
    }
    if (inputs == null || (typeof (/** @type {any} */ (inputs)[Symbol.iterator]) !== 'function'
      && typeof (/** @type {any} */ (inputs)[Symbol.asyncIterator]) !== 'function')) {
      throw new TypeError('inputs must be an iterable or an async iterable');
    }
    this.#plan = /** @type {import('./plan.js').NormalizedPlan} */ (plan);
    this.#inputs = inputs;
    this.#expectedItems = options.expectedItems ?? (Array.isArray(inputs) ? inputs.length : 0);
    // Encode params now, so a bad one fails the caller before anything is sent.
    this.#planMessage = { ...planMessage(this.#plan, this.#serializer, this.#expectedItems), detached: this.#detached };
    this.#feeder = new Feeder(inputs, (value) => this.#encodeInput(value));
    if (this.#detached) this.#session = null;
  }

  /** Whether the plan ends with a fold (for an attached run: once its fold value came). */
  get fold() {
    return this.#plan.fold;
  }

  /** Input elements taken from the iterable and encoded so far (an attached run: its directive's inputs). */
  get inputsSent() {
    return this.#attachTo !== null ? this.#attachedInputs : this.#feeder.sent;
  }

  /** Whether the plan was submitted detached (see Client.submit). */
  get detached() {
    return this.#detached;
  }

  /**
   * Cancel the directive if it still runs: its queued tasks are dropped,
   * running ones aborted. A detached directive runs on: only this call ends
   * (cancel it by id with Client.cancel).
   */
  cancel() {
    if (this.#finished) return;
    this.#cancelled = true;
    this.#wakeBackoff?.();
    const attempt = this.#attempt;
    if (attempt !== null && !attempt.ended) cancelCall(attempt.call);
    const sessionCall = this.#sessionCall;
    if (sessionCall !== null) {
      this.#sessionCall = null;
      this.#session?.cancel(sessionCall.callId);
      sessionCall.wake(new SquireError('CANCELLED', 'Cancelled on client'));
    }
  }

  /**
   * Run to the end: the fold value for a plan ending in a fold, otherwise
   * the map results in input order (for an attached run, a fold value if
   * one came, otherwise the map results).
   * @returns {Promise<unknown>}
   */
  result() {
    return collect(this);
  }

  /** @returns {AsyncGenerator<DirectiveEvent, void, undefined>} */
  async *[Symbol.asyncIterator]() {
    if (this.#iterated) throw new Error('a DirectiveRun can be iterated only once');
    this.#iterated = true;
    const signal = this.#signal;
    const onAbort = () => this.cancel();
    try {
      signal?.throwIfAborted();
      this.#checkClient();
      signal?.addEventListener('abort', onAbort, { once: true });
      const inputs = this.#inputs;
      if (this.#replicas !== null) await this.#replicas.ready();
      if (this.#session !== null && Array.isArray(inputs) && inputs.length <= SESSION_MAX_ITEMS) {
        yield* this.#sessionEvents(this.#session, inputs);
      } else {
        yield* this.#callEvents(this.#open(true));
      }
    } catch (err) {
      if (signal?.aborted) throw signal.reason;
      throw err;
    } finally {
      signal?.removeEventListener('abort', onAbort);
      this.cancel();
      this.#finished = true;
      this.#feeder.stop();
    }
  }

  /**
   * The run as a call of the client's session: every input encoded first (an
   * encoding error rejects before anything is sent), then plan, inputs and
   * end of input in one request; the call's events come back in session
   * messages, the last one with its end. If the orchestrator goes away
   * after the call started, the run goes on with a RunDirective call that
   * attaches to the directive.
   * @param {import('./session.js').DirectiveSession} session
   * @param {unknown[]} inputs
   * @returns {AsyncGenerator<DirectiveEvent, void, undefined>}
   */
  async *#sessionEvents(session, inputs) {
    const items = inputs.map((value) => this.#encodeInput(value));
    this.#feeder.preload(items);
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
        state.failure ??= { error };
        wake();
      },
    });
    this.#sessionCall = {
      callId,
      wake: (error) => {
        state.failure ??= { error };
        wake();
      },
    };
    for (;;) {
      while (inbox.length === 0 && state.failure === null) {
        await new Promise((resolve) => {
          wakeUp = () => resolve(undefined);
        });
      }
      const message = inbox.shift();
      if (message === undefined) {
        this.#sessionCall = null;
        const error = state.failure?.error;
        const detail = error instanceof SquireError ? error.details : '';
        if (detail !== CLOSED_MESSAGE && detail !== ENDED_MESSAGE && this.#mayReattach(error)) {
          // The orchestrator went away: go on with a call of its own.
          this.#replicas?.failed(error);
          const attempt = await this.#reattach(/** @type {SquireError} */ (error));
          this.#resumedEvent = undefined; // the caller saw its started event
          yield* this.#callEvents(attempt);
          return;
        }
        if (detail !== CLOSED_MESSAGE && this.#mayStartAgain(error)) {
          // Refused by a standby, or the leader went away before the
          // directive started: start it on the leader, as a call of its own.
          this.#replicas?.failed(error);
          const attempt = await this.#startAgain(/** @type {SquireError} */ (error));
          const started = this.#resumedEvent;
          this.#resumedEvent = undefined;
          if (started !== undefined) yield started;
          yield* this.#callEvents(attempt);
          return;
        }
        throw error;
      }
      for (const raw of message.events) {
        const event = this.#event(raw);
        if (event !== undefined) yield event;
      }
      if (message.end != null) {
        this.#sessionCall = null;
        session.done(callId);
        if (message.end.code !== 0) throw callEndError(message.end.code, message.end.message);
        return;
      }
    }
  }

  /**
   * Open a RunDirective call. The first call of a run sends the plan (or,
   * for Client.attach, the AttachDirective) and, with the plan, starts
   * feeding the inputs; a reattaching call sends the AttachDirective.
   * @param {boolean} first
   * @returns {Attempt}
   */
  #open(first) {
    const call = this.#stub.RunDirective();
    /** @type {Attempt} */
    const attempt = {
      call,
      messages: call[Symbol.asyncIterator](),
      ended: false,
      status: null,
      endedPromise: new Promise((resolve) => {
        call.on('status', (/** @type {any} */ status) => {
          attempt.ended = true;
          attempt.status = status;
          resolve(status);
        });
      }),
    };
    this.#attempt = attempt;
    if (first && this.#attachTo === null) {
      call.write({ plan: this.#planMessage });
      this.#feed(attempt, 0);
    } else {
      call.write({
        attach: {
          directiveId: this.directiveId,
          valuesReceived: this.#values,
          skippedReceived: this.#skipped,
        },
      });
    }
    return attempt;
  }

  /**
   * The next message of a call; done only once the call ended OK. (grpc-js
   * ends the message stream before it emits the error of a failed call, so
   * the end alone does not say how the call ended.)
   * @param {Attempt} attempt
   * @returns {Promise<IteratorResult<any>>}
   */
  async #next(attempt) {
    const step = await attempt.messages.next();
    if (!step.done) return step;
    const status = /** @type {any} */ (await attempt.endedPromise);
    if (status.code !== 0) {
      const error = Object.assign(new Error(`${status.code} ${status.details}`), status);
      throw fromGrpcError(error);
    }
    return step;
  }

  /**
   * @param {Attempt} attempt
   * @param {number} from
   */
  #feed(attempt, from) {
    void this.#feeder.feed(attempt.call, () => attempt.ended, attempt.endedPromise, from, cancelCall);
  }

  /**
   * The events of RunDirective calls: this one's, then those of the calls
   * that reattach after it, until the directive ends.
   * @param {Attempt} first
   * @returns {AsyncGenerator<DirectiveEvent, void, undefined>}
   */
  async *#callEvents(first) {
    let attempt = first;
    for (;;) {
      /** @type {unknown} */
      let failure;
      try {
        for (;;) {
          const step = await this.#next(attempt);
          if (step.done) return;
          const event = this.#event(step.value, attempt);
          if (event !== undefined) yield event;
        }
      } catch (err) {
        failure = err;
      }
      if (this.#feeder.failure !== null) throw this.#feeder.failure.error;
      const error = fromGrpcError(failure);
      this.#replicas?.failed(error);
      if (this.#mayStartAgain(error)) {
        attempt = await this.#startAgain(/** @type {SquireError} */ (error));
      } else if (this.#mayReattach(error)) {
        attempt = await this.#reattach(/** @type {SquireError} */ (error));
      } else {
        throw error;
      }
      const resumed = this.#resumedEvent;
      this.#resumedEvent = undefined;
      if (resumed !== undefined) yield resumed;
    }
  }

  /**
   * Whether a failed call resumes: the orchestrator went away (UNAVAILABLE)
   * after the directive started, and nothing on this side ended it.
   * @param {unknown} error
   */
  #mayReattach(error) {
    return error instanceof SquireError && error.code === 'UNAVAILABLE'
      // A run knows its directive is journaled from its started event; one
      // that attaches by id knows it from the start.
      && this.directiveId !== null && (this.#startedSeen || this.#attachTo !== null)
      && this.#reattachTimeoutMs > 0
      && this.#feeder.failure === null
      && !this.#cancelled && !this.#signal?.aborted && !this.#clientClosed?.aborted;
  }

  /**
   * Whether a failed call is made again from the start, on the leader: the
   * client has several orchestrator addresses, and the call failed with
   * UNAVAILABLE (a standby's refusal, a replica gone) before its directive
   * started, so nothing of it was accepted.
   * @param {unknown} error
   */
  #mayStartAgain(error) {
    return this.#replicas !== null
      && error instanceof SquireError && error.code === 'UNAVAILABLE'
      && !this.#startedSeen && this.#attachTo === null && this.directiveId === null
      && this.#reattachTimeoutMs > 0
      && this.#feeder.failure === null
      && !this.#cancelled && !this.#signal?.aborted && !this.#clientClosed?.aborted;
  }

  /**
   * Start the directive again on the leader (plan, then every input from the
   * first: the Feeder keeps them until they are journaled), with backoff,
   * until a call gets its DirectiveStarted or `reattachTimeoutMs` passes
   * (then `original` is thrown). The started event is left in
   * #resumedEvent for the caller.
   * @param {SquireError} original
   * @returns {Promise<Attempt>}
   */
  async #startAgain(original) {
    return this.#retry(original, { fresh: true });
  }

  /**
   * The orchestrator went away mid-directive: attach to the directive again,
   * with backoff, until a call gets its DirectiveStarted or
   * `reattachTimeoutMs` passes (then `original` is thrown). A call refused
   * for good (NOT_FOUND: the orchestrator does not hold the directive;
   * FAILED_PRECONDITION: it has no journal) throws that refusal.
   * @param {SquireError} original
   * @returns {Promise<Attempt>} the call, its started event read
   */
  async #reattach(original) {
    return this.#retry(original, { fresh: false });
  }

  /**
   * The loop both share: with backoff until the deadline, find the leader,
   * open the call (`fresh`: the directive anew; else an attach) and read its
   * first message; UNAVAILABLE tries again, anything else is thrown.
   * @param {SquireError} original
   * @param {{fresh: boolean}} how
   * @returns {Promise<Attempt>}
   */
  async #retry(original, { fresh }) {
    const backoff = new Backoff(this.#reattachTimeoutMs);
    for (let delay = backoff.next(); delay !== null; delay = backoff.next()) {
      await this.#sleep(delay);
      if (this.#cancelled || this.#clientClosed?.aborted || backoff.expired) break;
      await this.#replicas?.find();
      if (this.#cancelled || this.#clientClosed?.aborted) break;
      const attempt = this.#open(fresh);
      /** @type {IteratorResult<any> | null} */
      let step;
      try {
        step = await this.#firstMessage(attempt, backoff.deadline);
      } catch (err) {
        const error = fromGrpcError(err);
        if (fresh && this.#feeder.failure !== null) throw this.#feeder.failure.error;
        if (error instanceof SquireError && (error.code === 'UNAVAILABLE'
          || (!fresh && error.code === 'FAILED_PRECONDITION'
            && error.details.includes('already has a caller')))) {
          this.#replicas?.failed(error);
          continue;
        }
        if (this.#cancelled || this.#clientClosed?.aborted) break;
        throw error;
      }
      if (step === null) break; // the deadline passed while the call waited
      if (!fresh) this.reattached += 1;
      // (Its started event is news to the caller only for an attach by id
      // whose first call failed, or for a directive started anew.)
      if (!step.done) this.#resumedEvent = this.#event(step.value, attempt);
      return attempt;
    }
    if (this.#cancelled) throw new SquireError('CANCELLED', 'Cancelled on client');
    throw original;
  }

  /**
   * The first message of a reattaching call, or null once `deadline` passed
   * (the call is then cancelled).
   * @param {Attempt} attempt
   * @param {number} deadline
   * @returns {Promise<IteratorResult<any> | null>}
   */
  async #firstMessage(attempt, deadline) {
    /** @type {NodeJS.Timeout | undefined} */
    let timer;
    const next = this.#next(attempt);
    next.catch(() => undefined);
    const timeout = new Promise((resolve) => {
      timer = setTimeout(resolve, Math.max(0, deadline - Date.now()), null);
    });
    try {
      const step = /** @type {IteratorResult<any> | null} */ (await Promise.race([next, timeout]));
      if (step === null) cancelCall(attempt.call);
      return step;
    } finally {
      clearTimeout(timer);
    }
  }

  /**
   * Wait `ms`, or less if the run is cancelled meanwhile.
   * @param {number} ms
   */
  #sleep(ms) {
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer);
        this.#clientClosed?.removeEventListener('abort', done);
        this.#wakeBackoff = null;
        resolve(undefined);
      };
      const timer = setTimeout(done, Math.max(0, ms));
      this.#wakeBackoff = done;
      this.#clientClosed?.addEventListener('abort', done, { once: true });
    });
  }

  #checkClient() {
    if (this.#clientClosed?.aborted) throw new Error('the client is closed; create a new one');
  }

  /** @param {unknown} value */
  #encodeInput(value) {
    return this.#raw ? rawPayload(value) : encode(value, this.#serializer);
  }

  /**
   * Mark `index` delivered; false if it was already.
   * @param {number} index
   */
  #deliver(index) {
    const byte = index >>> 3;
    if (byte >= this.#delivered.length) {
      const grown = new Uint8Array(Math.max(byte + 1, this.#delivered.length * 2));
      grown.set(this.#delivered);
      this.#delivered = grown;
    }
    const bit = 1 << (index & 7);
    if (this.#delivered[byte] & bit) return false;
    this.#delivered[byte] |= bit;
    return true;
  }

  /**
   * @param {any} message a DirectiveEvent as proto-loader decodes it
   * @param {Attempt} [attempt] the RunDirective call it came on (none: the session)
   * @returns {DirectiveEvent | undefined} undefined for an event the caller does not see
   */
  #event(message, attempt) {
    switch (message.kind) {
      case 'started': {
        const started = message.started;
        if (started.attached) {
          // A call that attached: where the input goes on.
          if (attempt !== undefined) {
            if (started.inputClosed) {
              this.#feeder.acknowledge(started.received);
              if (!attempt.ended) attempt.call.end();
            } else {
              this.#feed(attempt, started.received);
            }
          }
          if (this.#attachTo !== null && !this.#startedSeen) {
            // Attached by id: the caller's first sight of the directive.
            this.#serializer = serializerFromWire(started.serializer) ?? this.#serializer;
            this.#attachedInputs = started.received;
            this.#startedSeen = true;
            return { type: 'started', directiveId: started.directiveId };
          }
          if (this.#attachTo !== null) this.#attachedInputs = started.received;
          return undefined; // the caller saw its directive start once
        }
        this.directiveId = started.directiveId;
        this.#startedSeen = true;
        return { type: 'started', directiveId: started.directiveId };
      }
      case 'items': {
        const serializer = this.#serializer;
        /** @type {Item[]} */
        const items = [];
        for (const item of message.items.items) {
          if (item.skipped) this.#skipped += 1;
          else this.#values += 1;
          if (!this.#deliver(item.index)) {
            this.duplicatesDropped += 1;
            continue;
          }
          items.push({
            index: item.index,
            value: item.skipped
              ? new Skipped(item.index, item.error)
              : decode(item.value, serializer, `the result of element ${item.index}`),
          });
        }
        return items.length > 0 ? { type: 'items', items } : undefined;
      }
      case 'progress': {
        /** @type {Progress} */
        const progress = { ...message.progress };
        this.#feeder.acknowledge(progress.received);
        if (this.#attachTo !== null && progress.total > 0) this.#attachedInputs = progress.total;
        this.progress = progress;
        this.#onProgress?.(progress);
        return { type: 'progress', progress };
      }
      case 'fold':
        if (this.#attachTo !== null) this.#plan = { ...this.#plan, fold: true };
        return { type: 'fold', value: decode(message.fold.value, this.#serializer, 'the fold value') };
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

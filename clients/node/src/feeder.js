// @ts-check
/**
 * The request side of a RunDirective call: input batches and the half-close,
 * across as many calls as the directive needs.
 *
 * A directive's first call sends the plan and its inputs; when the
 * orchestrator goes away mid-directive the run reattaches with a new call
 * (AttachDirective), and that call goes on with the inputs the orchestrator
 * had not journaled. So the Feeder keeps every encoded element the
 * orchestrator has not yet confirmed as journaled (Progress.received,
 * DirectiveStarted.received), resends from where the new orchestrator stands,
 * then pulls the rest of the source: no element is lost, none is sent twice,
 * and the source is read once, lazily, by one puller, whatever happens to
 * the calls.
 */

import { SquireError } from './errors.js';
import { writeMessage } from './rpc.js';

const MAX_BATCH_ITEMS = 256;
const MAX_BATCH_BYTES = 1024 * 1024;

export class Feeder {
  /** Input elements taken from the source and encoded so far. */
  sent = 0;
  /** Every element was taken from the source. */
  exhausted = false;
  /** @type {{ error: unknown } | null} what the source (or encoding) threw */
  failure = null;

  /** @type {Buffer[]} encoded elements from index #keptFrom on (from #head in the array) */
  #kept = [];
  #head = 0;
  #keptFrom = 0;
  /** @type {Iterator<unknown> | AsyncIterator<unknown> | null} */
  #iterator = null;
  #async = false;
  /** @type {Promise<IteratorResult<unknown>> | null} an async pull not yet consumed */
  #pending = null;
  #encode;
  /** Bumped by every feed() and by stop(): an older feed stops writing. */
  #generation = 0;
  #stopped = false;

  /**
   * @param {Iterable<unknown> | AsyncIterable<unknown> | null} inputs null: nothing to pull (see preload)
   * @param {(value: unknown) => Buffer} encode
   */
  constructor(inputs, encode) {
    this.#encode = encode;
    if (inputs === null) {
      this.exhausted = true;
      return;
    }
    const source = /** @type {any} */ (inputs);
    this.#async = typeof source[Symbol.asyncIterator] === 'function';
    this.#iterator = this.#async ? source[Symbol.asyncIterator]() : source[Symbol.iterator]();
  }

  /**
   * Every input was sent already, encoded (a session call): keep them all,
   * pull nothing more.
   * @param {Buffer[]} items
   */
  preload(items) {
    this.#kept = items.slice();
    this.#head = 0;
    this.#keptFrom = 0;
    this.sent = items.length;
    this.exhausted = true;
    this.#iterator = null;
  }

  /**
   * The orchestrator holds the first `journaled` elements for good: forget them.
   * @param {number} journaled
   */
  acknowledge(journaled) {
    const drop = Math.min(journaled - this.#keptFrom, this.#kept.length - this.#head);
    if (drop <= 0) return;
    this.#head += drop;
    this.#keptFrom += drop;
    if (this.#head >= 1024 && this.#head * 2 >= this.#kept.length) {
      this.#kept = this.#kept.slice(this.#head);
      this.#head = 0;
    }
  }

  /**
   * Feed `call` from element `from` on: the elements taken already that the
   * orchestrator lacks, then the rest of the source, then half-close.
   * Resolves once that is done or the call ended (or a later feed / stop()
   * took over); never rejects: an error of the source is kept in `failure`
   * and the call cancelled, so that the event reader reports it instead of
   * the CANCELLED status it sees.
   * @param {any} call a grpc-js duplex call
   * @param {() => boolean} ended whether the call has its status
   * @param {Promise<unknown>} callEnded settles when the call has its status
   * @param {number} from the index the orchestrator's input goes on from
   * @param {(call: any) => void} cancel cancels the call
   */
  async feed(call, ended, callEnded, from, cancel) {
    this.#generation += 1;
    const generation = this.#generation;
    const live = () => !ended() && generation === this.#generation && !this.#stopped;
    /** @type {Buffer[]} */
    let batch = [];
    let bytes = 0;
    const flush = async () => {
      if (batch.length === 0) return live();
      const items = batch;
      batch = [];
      bytes = 0;
      return live() && writeMessage(call, () => !live(), { inputs: { items } });
    };
    /** @param {Buffer} data @returns {boolean} whether the batch is full */
    const push = (data) => {
      batch.push(data);
      bytes += data.length;
      return batch.length >= MAX_BATCH_ITEMS || bytes >= MAX_BATCH_BYTES;
    };
    try {
      if (from < this.#keptFrom) {
        throw new SquireError('INTERNAL', `the orchestrator holds ${from} input elements `
          + `but had acknowledged ${this.#keptFrom} as journaled`);
      }
      this.acknowledge(from);
      // What was taken already and the orchestrator lacks: sent again.
      for (let i = this.#head + (from - this.#keptFrom); i < this.#kept.length; i += 1) {
        if (push(this.#kept[i]) && !(await flush())) return;
      }
      if (!(await flush())) return;
      /** @param {unknown} value */
      const add = (value) => {
        const data = this.#encode(value);
        this.#kept.push(data);
        this.sent += 1;
        return push(data);
      };
      if (!this.exhausted) {
        const iterator = /** @type {Iterator<unknown> | AsyncIterator<unknown>} */ (this.#iterator);
        if (this.#async) {
          if (!(await this.#pullAsync(/** @type {AsyncIterator<unknown>} */ (iterator), add, flush, () => batch.length > 0, callEnded, live))) return;
        } else {
          for (;;) {
            if (!live()) return;
            const step = /** @type {Iterator<unknown>} */ (iterator).next();
            if (step.done) {
              this.exhausted = true;
              break;
            }
            if (add(step.value) && !(await flush())) return;
          }
        }
      }
      if (!(await flush())) return;
      if (live()) call.end();
    } catch (err) {
      this.failure ??= { error: err };
      if (live()) cancel(call);
    }
  }

  /**
   * Pull an async iterator. A partial batch is sent as soon as the source
   * makes us wait, so a slow source does not hold back its first elements;
   * the call ending stops the wait without losing the pull: the next call's
   * feed takes the element it gives.
   * @param {AsyncIterator<unknown>} iterator
   * @param {(value: unknown) => boolean} add
   * @param {() => Promise<boolean>} flush
   * @param {() => boolean} pending a partial batch waits
   * @param {Promise<unknown>} callEnded
   * @param {() => boolean} live
   * @returns {Promise<boolean>} false if the call ended first
   */
  async #pullAsync(iterator, add, flush, pending, callEnded, live) {
    const tick = Symbol('tick');
    const ended = Symbol('ended');
    const callEnd = callEnded.then(() => ended);
    for (;;) {
      if (!live()) return false;
      this.#pending ??= iterator.next();
      const next = this.#pending;
      /** @type {Promise<IteratorResult<unknown> | symbol>[]} */
      const waits = [next, callEnd];
      if (pending()) waits.push(new Promise((resolve) => setImmediate(resolve, tick)));
      let result = await Promise.race(waits);
      if (result === tick) {
        if (!(await flush())) result = ended;
        else result = await Promise.race([next, callEnd]);
      }
      // The pull stays pending for the next call unless this one takes it.
      if (result === ended || !live()) return false;
      this.#pending = null;
      const step = /** @type {IteratorResult<unknown>} */ (result);
      if (step.done) {
        this.exhausted = true;
        return true;
      }
      if (add(step.value) && !(await flush())) return false;
    }
  }

  /** The run is over: stop feeding and close the source if it was not read to its end. */
  stop() {
    if (this.#stopped) return;
    this.#stopped = true;
    this.#generation += 1;
    const iterator = this.#iterator;
    this.#iterator = null;
    this.#kept = [];
    this.#head = 0;
    if (iterator === null || this.exhausted) return;
    this.exhausted = true;
    const close = () => {
      try {
        Promise.resolve(iterator.return?.()).catch(() => undefined);
      } catch {
        // a source whose return() throws: nothing more to do
      }
    };
    // Stop an async source without waiting for it: it may be stuck.
    if (this.#pending !== null) this.#pending.then(close, () => undefined);
    else close();
  }
}

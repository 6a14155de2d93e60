// @ts-check
/**
 * Leased result channels: the low-level API every gRPC client gets.
 *
 *     const channel = await client.leaseChannel();
 *     const ids = await channel.publish([{ operation: 'fib_at', input: 10 }]);
 *     await channel.close();                         // no more tasks
 *     for await (const result of channel.results())  // ends after the last result
 *       console.log(result.taskId, result.ok ? result.value : result.error);
 *     await channel.release();
 *
 * Tasks go out over one Publish call at a time. A call ends once it has
 * carried MAX_UNACKNOWLEDGED tasks, once it has had nothing more to send for
 * ACK_IDLE_MS, or at close(); its response acknowledges what it carried
 * (with a journal: committed), and until then those tasks are kept. When
 * the orchestrator's queue for the channel is full, gRPC flow control makes
 * publish() wait.
 *
 * A channel rides out an orchestrator that goes away (a crash, a restart,
 * a failover to a standby on the same store), with the backoff of
 * reconnect.js for the client's reattachTimeoutMs: a Publish call that
 * fails with UNAVAILABLE is made again with the tasks it had not had
 * acknowledged first (the orchestrator leaves out ids the channel already
 * has, so none runs twice); results() subscribes again naming how many
 * results it has (SubscribeRequest.received) and gets the rest, each once;
 * close() and release() are tried again.
 */

import { SquireError, fromGrpcError } from './errors.js';
import { Backoff, DEFAULT_REATTACH_TIMEOUT_MS, retrying, sleep, unavailable } from './reconnect.js';
import { cancelCall, unary, writeMessage } from './rpc.js';
import { decode, encode, encodeParams, rawPayload, wireSerializer } from './serde.js';

/**
 * Tasks one Publish call carries before it ends and its response
 * acknowledges them: at most this many are kept to send again after a
 * broken call.
 */
export const MAX_UNACKNOWLEDGED = 8192;
/** A Publish call with tasks unacknowledged and nothing more to send for this long ends. */
export const ACK_IDLE_MS = 100;
const MAX_TASKS_PER_MESSAGE = 256;
const MAX_BYTES_PER_MESSAGE = 4 * 1024 * 1024;
const EMPTY = Buffer.alloc(0);

/**
 * @typedef {object} TaskInput
 * @property {string} operation the operation (or, with operands, the monoid) name
 * @property {unknown} [input] the input of an apply task
 * @property {unknown[]} [operands] makes it a combine task: the monoid over operands, left to right
 * @property {Record<string, unknown>} [params] keyword parameters
 * @property {number} [taskId] unique within the channel; default: one above every id used so far
 * @property {Uint8Array | string} [metadata] opaque bytes echoed in the result
 *
 * @typedef {object} TaskError
 * @property {string} type e.g. the exception class name
 * @property {string} message
 * @property {string} kind an ErrorKind name, e.g. 'ERROR_KIND_OPERATION'
 * @property {string} strategy a FatalStrategy name
 * @property {boolean} retriesExhausted
 *
 * @typedef {object} TaskResultBase
 * @property {number} taskId
 * @property {Buffer} metadata
 * @property {number} attempt
 * @property {number} retries
 * @property {number} executionSeconds
 *
 * @typedef {TaskResultBase & ({ ok: true, value: unknown } | { ok: false, error: TaskError })} TaskResult
 *
 * @typedef {object} TaskSpec a TaskSpec message, encoded
 * @property {number} taskId
 * @property {string} operation
 * @property {string} kind
 * @property {Buffer} params
 * @property {Buffer} input
 * @property {Buffer[]} operands
 * @property {string} serializer
 * @property {Buffer} metadata
 *
 * @typedef {object} ChannelContext internal: what the Client gives its channels
 * @property {number} [reattachTimeoutMs] how long to keep trying while the
 *   orchestrator is away (default 120 s); 0: not at all
 * @property {AbortSignal} [closed] aborted when the client closes: no more retrying
 * @property {import('./replicas.js').Replicas | null} [replicas] several orchestrator
 *   addresses: look for the leader before each retry
 *
 * @typedef {object} PublishCall one Publish call
 * @property {any} call
 * @property {boolean} ended it has its status
 * @property {Promise<any>} response its PublishResponse
 */

/**
 * The size of a TaskSpec on the wire, about.
 * @param {TaskSpec} spec
 */
function specBytes(spec) {
  let bytes = 32 + spec.operation.length + spec.params.length + spec.input.length + spec.metadata.length;
  for (const operand of spec.operands) bytes += operand.length + 4;
  return bytes;
}

/**
 * The publishing side's bookkeeping, and no I/O: the tasks not sent yet
 * (pending, in order), and those sent on the open Publish call that its
 * response has not acknowledged yet. A call that broke puts what it carried
 * back in front of the pending ones, so the next call sends it first.
 */
export class Outbox {
  /** Every task added before this one has been handed to a call at least once. */
  handed = 0;

  /** @type {{ seq: number, spec: TaskSpec }[]} pending from #head on */
  #pending = [];
  #head = 0;
  /** @type {{ seq: number, spec: TaskSpec }[]} */
  #unacknowledged = [];
  #added = 0;

  /**
   * Queue tasks; returns the value `handed` reaches once every one of them went out.
   * @param {TaskSpec[]} specs
   * @returns {number}
   */
  add(specs) {
    for (const spec of specs) {
      this.#pending.push({ seq: this.#added, spec });
      this.#added += 1;
    }
    return this.#added;
  }

  /** Tasks not sent on the open call (or on any, yet). */
  get pending() {
    return this.#pending.length - this.#head;
  }

  /** Tasks sent on the open call, not acknowledged yet. */
  get unacknowledged() {
    return this.#unacknowledged.length;
  }

  /** How many more tasks the open call may carry. */
  get room() {
    return MAX_UNACKNOWLEDGED - this.#unacknowledged.length;
  }

  /** Nothing waits to be sent or acknowledged. */
  get empty() {
    return this.pending === 0 && this.unacknowledged === 0;
  }

  /**
   * The tasks of the next message: the first pending ones, at most 256,
   * about 4 MiB (at least one) and `room`. They are unacknowledged from now on.
   * @returns {TaskSpec[]}
   */
  take() {
    const limit = Math.min(MAX_TASKS_PER_MESSAGE, this.room);
    /** @type {TaskSpec[]} */
    const tasks = [];
    let bytes = 0;
    while (tasks.length < limit && this.#head < this.#pending.length) {
      const entry = this.#pending[this.#head];
      const size = specBytes(entry.spec);
      if (tasks.length > 0 && bytes + size > MAX_BYTES_PER_MESSAGE) break;
      this.#head += 1;
      bytes += size;
      tasks.push(entry.spec);
      this.#unacknowledged.push(entry);
      if (entry.seq >= this.handed) this.handed = entry.seq + 1;
    }
    if (this.#head >= 1024 && this.#head * 2 >= this.#pending.length) {
      this.#pending = this.#pending.slice(this.#head);
      this.#head = 0;
    }
    return tasks;
  }

  /**
   * The open call's response came: the orchestrator has every task it carried.
   * @returns {number} how many
   */
  acknowledge() {
    const count = this.#unacknowledged.length;
    this.#unacknowledged = [];
    return count;
  }

  /**
   * The open call broke: what it carried goes first on the next one.
   * @returns {number} how many tasks go again
   */
  requeue() {
    const back = this.#unacknowledged;
    this.#unacknowledged = [];
    if (back.length > 0) {
      this.#pending = back.concat(this.#pending.slice(this.#head));
      this.#head = 0;
    }
    return back.length;
  }

  /** Forget every task (the channel was released, or publishing failed). */
  clear() {
    this.#pending = [];
    this.#head = 0;
    this.#unacknowledged = [];
  }
}

/**
 * A leased channel. `published` and `duplicates` count what the Publish
 * responses acknowledged: tasks the orchestrator added, and tasks whose id
 * it had already (sent again after a broken call: left out); `resent`
 * counts Publish calls made again after UNAVAILABLE. `received` counts the
 * results results() has yielded, `resubscribed` how often it subscribed
 * again after UNAVAILABLE.
 */
export class Channel {
  /**
   * Results received, over every Subscribe call (what SubscribeRequest.received
   * says): yielded by results(), or left by a loop that ended early for the next.
   */
  received = 0;
  /** Times results() subscribed again after the orchestrator went away. */
  resubscribed = 0;
  /** Tasks the orchestrator added to the channel, as the Publish responses say. */
  published = 0;
  /** Tasks the orchestrator had already and left out (sent again after a broken call). */
  duplicates = 0;
  /** Publish calls made again after one failed with UNAVAILABLE. */
  resent = 0;

  #stub;
  #timeoutMs;
  #reattachTimeoutMs;
  /** @type {AbortSignal | undefined} */
  #clientClosed;
  /** @type {import('./replicas.js').Replicas | null} */
  #replicas;
  /** Aborted by release(): a backoff under way ends. */
  #releasing = new AbortController();
  #outbox = new Outbox();
  /** @type {PublishCall | null} the Publish call open now */
  #call = null;
  /** The publishing loop (#pump) runs. */
  #pumping = false;
  /** close() was called: no more tasks. */
  #inputEnded = false;
  /** @type {{ error: unknown } | null} why publishing stopped for good */
  #failure = null;
  /** @type {(() => void)[]} woken by #notify */
  #waiters = [];
  #nextTaskId = 1;
  /** @type {Promise<number> | null} */
  #closing = null;
  #released = false;
  /** @type {Set<any>} */
  #subscriptions = new Set();
  /** @type {any[]} results received and not yielded yet (a loop left early) */
  #unread = [];

  /**
   * @param {any} stub the ChannelService client
   * @param {string} channelId
   * @param {import('./serde.js').SerializerName} serializer
   * @param {number} timeoutMs deadline of the unary calls
   * @param {ChannelContext} [context] internal: the Client passes it
   */
  constructor(stub, channelId, serializer, timeoutMs, context = {}) {
    this.#stub = stub;
    this.channelId = channelId;
    this.serializer = serializer;
    this.#timeoutMs = timeoutMs;
    const reattach = context.reattachTimeoutMs ?? DEFAULT_REATTACH_TIMEOUT_MS;
    if (typeof reattach !== 'number' || !(reattach >= 0)) {
      throw new RangeError(`reattachTimeoutMs is a number of milliseconds >= 0, got ${reattach}`);
    }
    this.#reattachTimeoutMs = reattach;
    this.#clientClosed = context.closed;
    this.#replicas = context.replicas ?? null;
  }

  /**
   * Publish tasks; resolves with their task ids once they are handed to
   * gRPC (each sent on a Publish call at least once). Every task is encoded
   * before any is sent, so a bad one sends none. While the orchestrator is
   * away this waits for it to be back (up to reattachTimeoutMs); then, or
   * when the orchestrator refuses the tasks, it rejects with why. How many
   * tasks the orchestrator acknowledged is what close() returns.
   * @param {Iterable<TaskInput>} tasks
   * @returns {Promise<number[]>}
   */
  async publish(tasks) {
    if (this.#closing !== null || this.#released) {
      throw new Error(`the sender of channel ${this.channelId} is closed`);
    }
    if (this.#failure !== null) throw this.#failure.error;
    const specs = [];
    let nextTaskId = this.#nextTaskId;
    for (const task of tasks) {
      const spec = this.#spec(task, task?.taskId ?? nextTaskId);
      nextTaskId = Math.max(nextTaskId, spec.taskId + 1);
      specs.push(spec);
    }
    this.#nextTaskId = nextTaskId;
    const mark = this.#outbox.add(specs);
    this.#kick();
    while (this.#outbox.handed < mark) {
      this.#checkPublishing();
      await this.#changed();
    }
    return specs.map((spec) => spec.taskId);
  }

  /**
   * No more tasks: wait until the orchestrator has acknowledged every task
   * published (sending again what a broken call carried), then close the
   * sender on the orchestrator (tried again while it is away). results()
   * ends once every published task has its result. Resolves with the
   * number of tasks the orchestrator acknowledged: every one published,
   * those it had already included (`published + duplicates`). Idempotent.
   * @returns {Promise<number>}
   */
  close() {
    this.#closing ??= (async () => {
      this.#inputEnded = true;
      this.#kick();
      while (!this.#outbox.empty || this.#call !== null || this.#pumping) {
        this.#checkPublishing();
        await this.#changed();
      }
      this.#checkPublishing();
      await retrying(() => unary(this.#stub, 'CloseChannel', { channelId: this.channelId }, this.#timeoutMs), {
        timeoutMs: this.#reattachTimeoutMs,
        signals: this.#signals(),
        replicas: this.#replicas,
      });
      return this.published + this.duplicates;
    })();
    return this.#closing;
  }

  /**
   * The channel's results in completion order. Subscribing before or after
   * publishing both work; the iteration ends once the sender is closed and
   * every task has its result, or when release() is called. Each Subscribe
   * call says how many results this channel has received (`received`), and
   * when the orchestrator goes away the iteration subscribes again by itself
   * (`resubscribed`) and gets the rest, each result once. A later results()
   * goes on where the last one stopped (first the results a loop left early
   * had received and not yielded). Iterate one results() at a time: a new
   * Subscribe call displaces an open one (that one rejects with ABORTED).
   * @returns {AsyncGenerator<TaskResult, void, undefined>}
   */
  async *results() {
    /** @type {Backoff | null} */
    let outage = null;
    /** @type {unknown} the error the outage began with */
    let first = null;
    for (;;) {
      while (this.#unread.length > 0) yield this.#result(this.#unread.shift());
      const call = this.#stub.Subscribe({ channelId: this.channelId, received: this.received });
      call.on('error', () => undefined); // observed through the iteration or the status
      /** @type {Promise<any>} */
      const ended = new Promise((resolve) => {
        call.on('status', resolve);
      });
      this.#subscriptions.add(call);
      /** @type {unknown} */
      let failure;
      try {
        for await (const batch of call) {
          outage = null;
          first = null;
          this.received += batch.results.length;
          this.#unread.push(...batch.results);
          while (this.#unread.length > 0) yield this.#result(this.#unread.shift());
        }
        // (grpc-js may end the message stream before it reports a failure.)
        const status = await ended;
        if (status.code === 0) return;
        failure = Object.assign(new Error(`${status.code} ${status.details}`), status);
      } catch (err) {
        failure = err;
      } finally {
        this.#subscriptions.delete(call);
        cancelCall(call);
      }
      const error = fromGrpcError(failure);
      if (this.#released && error instanceof SquireError && error.code === 'CANCELLED') return;
      if (!this.#mayRetry(error)) throw error;
      first ??= error;
      outage ??= new Backoff(this.#reattachTimeoutMs);
      const delay = outage.next();
      if (delay === null) throw first;
      this.#replicas?.failed(error);
      await sleep(delay, this.#signals());
      if (this.#released) return;
      if (this.#clientClosed?.aborted) throw first;
      await this.#replicas?.find();
      this.resubscribed += 1;
    }
  }

  /**
   * Free the channel: the orchestrator drops its queued tasks and aborts
   * running ones; results not received yet are lost. Tried again while the
   * orchestrator is away (NOT_FOUND on a retry: the first try released it
   * before its answer was lost). Idempotent.
   * @returns {Promise<void>}
   */
  async release() {
    if (this.#released) return;
    this.#released = true;
    this.#releasing.abort();
    this.#outbox.clear();
    this.#unread = [];
    if (this.#call !== null) cancelCall(this.#call.call);
    for (const call of this.#subscriptions) cancelCall(call);
    this.#notify();
    await retrying(() => unary(this.#stub, 'ReleaseChannel', { channelId: this.channelId }, this.#timeoutMs), {
      timeoutMs: this.#reattachTimeoutMs,
      doneIf: 'NOT_FOUND',
      signals: [this.#clientClosed],
      replicas: this.#replicas,
    });
  }

  /** `await using channel = await client.leaseChannel()` releases it on scope exit. */
  async [Symbol.asyncDispose]() {
    await this.release();
  }

  /** Make sure the publishing loop runs (it stops when it has nothing to do). */
  #kick() {
    this.#notify();
    if (this.#pumping || this.#failure !== null || this.#released) return;
    this.#pumping = true;
    void this.#pump();
  }

  /**
   * The publishing loop: open a Publish call, send what is pending (within
   * what one call may carry), end the call when it is full, idle or the
   * input ended, and count its response; a call broken by UNAVAILABLE puts
   * what it carried back in front and is made again, with backoff. Returns
   * once nothing is pending and no call is open; an error it cannot get
   * past is kept in #failure, for publish() and close() to reject with.
   */
  async #pump() {
    const outbox = this.#outbox;
    /** @type {Backoff | null} */
    let outage = null;
    /** @type {unknown} the error the outage began with */
    let first = null;
    try {
      for (;;) {
        if (this.#released) return;
        const call = this.#call ?? (outbox.pending > 0 ? this.#openPublish() : null);
        if (call === null) return; // nothing to do (close() sees it)
        while (outbox.pending > 0 && outbox.room > 0 && !call.ended) {
          const tasks = outbox.take();
          this.#notify(); // publish() waits for its tasks to be handed
          if (!(await writeMessage(call.call, () => call.ended, { channelId: this.channelId, tasks }))) break;
        }
        if (this.#released) return;
        if (!call.ended && outbox.room > 0 && !this.#inputEnded) {
          // Nothing more to send now: wait for more tasks, close() or the
          // call's end; a call idle that long ends, to have its tasks acknowledged.
          if (await this.#changed(ACK_IDLE_MS)) continue;
          if (outbox.pending > 0 || call.ended || this.#inputEnded) continue;
        }
        if (!call.ended) call.call.end();
        /** @type {any} */
        let response;
        try {
          response = await call.response;
        } catch (err) {
          this.#call = null;
          if (this.#released) return;
          const error = fromGrpcError(err);
          if (!this.#mayRetry(error)) throw error;
          first ??= error;
          outage ??= new Backoff(this.#reattachTimeoutMs);
          const delay = outage.next();
          if (delay === null) throw first;
          outbox.requeue(); // what the broken call carried goes first on the next one
          this.#replicas?.failed(error);
          await sleep(delay, this.#signals());
          if (this.#released) return;
          if (this.#clientClosed?.aborted) throw first;
          await this.#replicas?.find();
          this.resent += 1;
          continue;
        }
        this.#call = null;
        this.published += response.published;
        this.duplicates += response.duplicates;
        outbox.acknowledge();
        outage = null;
        first = null;
        this.#notify();
      }
    } catch (err) {
      this.#failure ??= { error: err };
      outbox.clear();
    } finally {
      this.#pumping = false;
      this.#notify();
    }
  }

  /** @returns {PublishCall} */
  #openPublish() {
    /** @type {(value: any) => void} */
    let resolve = () => undefined;
    /** @type {(reason: unknown) => void} */
    let reject = () => undefined;
    /** @type {Promise<any>} */
    const response = new Promise((res, rej) => {
      resolve = res;
      reject = rej;
    });
    response.catch(() => undefined); // observed by #pump
    /** @type {PublishCall} */
    const opened = { call: null, ended: false, response };
    opened.call = this.#stub.Publish((/** @type {unknown} */ err, /** @type {any} */ reply) => {
      opened.ended = true;
      if (err) reject(err);
      else resolve(reply);
      this.#notify();
    });
    opened.call.on('status', () => {
      opened.ended = true;
      this.#notify();
    });
    this.#call = opened;
    return opened;
  }

  /**
   * Whether a failed call is made again: UNAVAILABLE (the orchestrator went
   * away, or a standby refused it), trying again is on, and neither the
   * channel was released nor the client closed.
   * @param {unknown} error
   */
  #mayRetry(error) {
    return unavailable(error) && this.#reattachTimeoutMs > 0 && !this.#released && !this.#clientClosed?.aborted;
  }

  /** What ends a backoff early. */
  #signals() {
    return [this.#releasing.signal, this.#clientClosed];
  }

  /** Throw why publishing stopped, if it did: an error it could not get past, or release(). */
  #checkPublishing() {
    if (this.#failure !== null) throw this.#failure.error;
    if (this.#released) throw new SquireError('CANCELLED', `channel ${this.channelId} was released`);
  }

  /** Wake everything waiting in #changed. */
  #notify() {
    const waiters = this.#waiters;
    this.#waiters = [];
    for (const wake of waiters) wake();
  }

  /**
   * Resolves true at the next #notify, or false after `timeoutMs` if given.
   * @param {number} [timeoutMs]
   * @returns {Promise<boolean>}
   */
  #changed(timeoutMs) {
    return new Promise((resolve) => {
      /** @type {NodeJS.Timeout | undefined} */
      let timer;
      const wake = () => {
        clearTimeout(timer);
        resolve(true);
      };
      this.#waiters.push(wake);
      if (timeoutMs !== undefined) {
        timer = setTimeout(() => {
          this.#waiters = this.#waiters.filter((w) => w !== wake);
          resolve(false);
        }, timeoutMs);
      }
    });
  }

  /**
   * @param {TaskInput} task
   * @param {number} taskId
   */
  #spec(task, taskId) {
    if (task == null || typeof task.operation !== 'string' || task.operation === '') {
      throw new TypeError('a task needs an operation name: {operation, input} or {operation, operands}');
    }
    if (!Number.isSafeInteger(taskId) || taskId < 0) {
      throw new RangeError(`taskId must be an integer >= 0, got ${taskId}`);
    }
    const serializer = this.serializer;
    const combine = task.operands !== undefined;
    if (combine && (!Array.isArray(task.operands) || 'input' in task)) {
      throw new TypeError('a combine task has an array of operands and no input');
    }
    return {
      taskId,
      operation: task.operation,
      kind: combine ? 'TASK_KIND_COMBINE' : 'TASK_KIND_APPLY',
      params: encodeParams(task.params, serializer),
      input: combine ? EMPTY : encode(task.input, serializer),
      operands: combine ? /** @type {unknown[]} */ (task.operands).map((v) => encode(v, serializer)) : [],
      serializer: wireSerializer(serializer),
      metadata: task.metadata === undefined ? EMPTY : rawPayload(task.metadata),
    };
  }

  /**
   * @param {any} result a TaskResult as proto-loader decodes it
   * @returns {TaskResult}
   */
  #result(result) {
    const base = {
      taskId: result.taskId,
      metadata: result.metadata,
      attempt: result.attempt,
      retries: result.retries,
      executionSeconds: result.executionSeconds,
    };
    if (result.outcome === 'ok') {
      const value = decode(result.ok.output, this.serializer, `the output of task ${result.taskId}`);
      return { ...base, ok: true, value };
    }
    const err = result.err ?? {};
    return {
      ...base,
      ok: false,
      error: {
        type: err.errorType,
        message: err.message,
        kind: err.kind,
        strategy: err.strategy,
        retriesExhausted: err.retriesExhausted,
      },
    };
  }
}

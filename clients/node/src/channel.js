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
 * Tasks go out over one Publish call, opened by the first publish() and ended
 * by close(); when the orchestrator's queue for the channel is full, gRPC flow
 * control makes publish() wait.
 */

import { fromGrpcError } from './errors.js';
import { cancelCall, unary, writeMessage } from './rpc.js';
import { decode, encode, encodeParams, rawPayload, wireSerializer } from './serde.js';

const MAX_TASKS_PER_MESSAGE = 256;
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
 */

export class Channel {
  #stub;
  #timeoutMs;
  /** @type {any} */
  #publishCall = null;
  /** @type {Promise<number> | null} */
  #published = null;
  #publishEnded = false;
  #nextTaskId = 1;
  /** @type {Promise<number> | null} */
  #closing = null;
  #released = false;
  /** @type {Set<any>} */
  #subscriptions = new Set();

  /**
   * @param {any} stub the ChannelService client
   * @param {string} channelId
   * @param {import('./serde.js').SerializerName} serializer
   * @param {number} timeoutMs deadline of the unary calls
   */
  constructor(stub, channelId, serializer, timeoutMs) {
    this.#stub = stub;
    this.channelId = channelId;
    this.serializer = serializer;
    this.#timeoutMs = timeoutMs;
  }

  /**
   * Publish tasks; resolves with their task ids once they are handed to gRPC.
   * Every task is encoded before any is sent, so a bad one sends none. How
   * many the orchestrator accepted is what close() returns.
   * @param {Iterable<TaskInput>} tasks
   * @returns {Promise<number[]>}
   */
  async publish(tasks) {
    if (this.#closing !== null || this.#released) {
      throw new Error(`the sender of channel ${this.channelId} is closed`);
    }
    const specs = [];
    let nextTaskId = this.#nextTaskId;
    for (const task of tasks) {
      const spec = this.#spec(task, task?.taskId ?? nextTaskId);
      nextTaskId = Math.max(nextTaskId, spec.taskId + 1);
      specs.push(spec);
    }
    this.#nextTaskId = nextTaskId;
    const call = this.#openPublish();
    const ended = () => this.#publishEnded;
    for (let start = 0; start < specs.length; start += MAX_TASKS_PER_MESSAGE) {
      const message = { channelId: this.channelId, tasks: specs.slice(start, start + MAX_TASKS_PER_MESSAGE) };
      if (!(await writeMessage(call, ended, message))) {
        await this.#published; // rejects with why the orchestrator ended the call
        throw new Error(`the orchestrator ended the Publish stream of channel ${this.channelId} early`);
      }
    }
    return specs.map((spec) => spec.taskId);
  }

  /**
   * No more tasks: finish publishing, then close the sender on the
   * orchestrator. results() ends once every published task has its result.
   * Resolves with the number of tasks the orchestrator accepted. Idempotent.
   * @returns {Promise<number>}
   */
  close() {
    this.#closing ??= (async () => {
      let published = 0;
      if (this.#publishCall !== null) {
        this.#publishCall.end();
        published = await /** @type {Promise<number>} */ (this.#published);
      }
      await unary(this.#stub, 'CloseChannel', { channelId: this.channelId }, this.#timeoutMs);
      return published;
    })();
    return this.#closing;
  }

  /**
   * The channel's results in completion order. Subscribing before or after
   * publishing both work; the iteration ends once the sender is closed and
   * every task has its result, or when release() is called.
   * @returns {AsyncGenerator<TaskResult, void, undefined>}
   */
  async *results() {
    const call = this.#stub.Subscribe({ channelId: this.channelId });
    this.#subscriptions.add(call);
    try {
      for await (const batch of call) {
        for (const result of batch.results) yield this.#result(result);
      }
    } catch (err) {
      if (this.#released && /** @type {any} */ (err)?.code === 1 /* CANCELLED */) return;
      throw fromGrpcError(err);
    } finally {
      this.#subscriptions.delete(call);
      cancelCall(call);
    }
  }

  /**
   * Free the channel: the orchestrator drops its queued tasks and aborts
   * running ones; results not received yet are lost. Idempotent.
   * @returns {Promise<void>}
   */
  async release() {
    if (this.#released) return;
    this.#released = true;
    if (this.#publishCall !== null) cancelCall(this.#publishCall);
    for (const call of this.#subscriptions) cancelCall(call);
    await unary(this.#stub, 'ReleaseChannel', { channelId: this.channelId }, this.#timeoutMs);
  }

  /** `await using channel = await client.leaseChannel()` releases it on scope exit. */
  async [Symbol.asyncDispose]() {
    await this.release();
  }

  #openPublish() {
    if (this.#publishCall === null) {
      this.#published = new Promise((resolve, reject) => {
        this.#publishCall = this.#stub.Publish((/** @type {unknown} */ err, /** @type {any} */ response) => {
          if (err) reject(fromGrpcError(err));
          else resolve(response.published);
        });
      });
      // Observed by close() or the next publish(); never an unhandled rejection.
      this.#published.catch(() => undefined);
      this.#publishCall.on('status', () => {
        this.#publishEnded = true;
      });
    }
    return this.#publishCall;
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

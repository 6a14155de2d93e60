// @ts-check
/**
 * The client of one orchestrator. Every call this package makes starts from
 * a Client: directive runs and channels get their stubs from it.
 */

import grpc from '@grpc/grpc-js';

import { Channel } from './channel.js';
import { SquireError } from './errors.js';
import { DirectiveRun, collect, items } from './directive.js';
import { normalizePlan } from './plan.js';
import { loadApi } from './proto.js';
import { DEFAULT_REATTACH_TIMEOUT_MS } from './reconnect.js';
import { unary } from './rpc.js';
import { Replicas, healthService, splitTarget } from './replicas.js';
import { parseSerializer } from './serde.js';
import { DirectiveSession } from './session.js';

const MAX_MESSAGE_BYTES = 64 * 1024 * 1024;

/**
 * @typedef {object} ClientOptions
 * @property {grpc.ChannelCredentials} [credentials] default: insecure (plaintext);
 *   e.g. grpc.credentials.createSsl(ca) for an orchestrator serving TLS
 * @property {string} [token] a client token, sent with every call as
 *   'authorization: Bearer <token>' (orchestrators started with --client-token-file)
 * @property {grpc.ChannelOptions} [channelOptions] extra gRPC channel options
 * @property {number} [timeoutMs] deadline of unary calls (status, lease, close, release); default 10 s
 * @property {boolean} [session] default true: directives whose inputs are an array of at
 *   most 64 elements run as calls of one shared RunDirectives stream (opened on first
 *   use, re-opened after it breaks) instead of a RunDirective call each; false gives
 *   every directive its own RunDirective call
 * @property {number} [reattachTimeoutMs] default 120 000 (120 s): how long a directive's run
 *   keeps trying to reattach when the orchestrator goes away mid-directive (a crash, a
 *   restart, a rolling upgrade). The run resumes where it was, every index exactly once:
 *   the caller sees a slower directive, not an error. Once it passes, the run rejects with
 *   the error the call first failed with (UNAVAILABLE). 0 turns reattaching off. Needs an
 *   orchestrator with a journal (its default store); RunOptions.reattachTimeoutMs
 *   overrides it per run
 */

/**
 * What ListDirectives says of a directive (Client.directives).
 * @typedef {object} DirectiveInfo
 * @property {string} directiveId
 * @property {string} plan e.g. 'map(fib_at) -> fold(sum)'
 * @property {string} state running | done | failed | cancelled
 * @property {boolean} detached
 * @property {boolean} attached a caller is attached now
 * @property {number} ageSeconds since it was accepted
 * @property {number} received input elements
 * @property {number} completed elements through every map stage (or skipped)
 * @property {string} message why it failed or was cancelled
 */

export class Client {
  #directives;
  #channels;
  #status;
  /** @type {DirectiveSession | null} */
  #session = null;
  #closed = false;
  /** Aborted by close(): runs stop reattaching. */
  #closing = new AbortController();
  #reattachTimeoutMs;
  /** @type {Replicas | null} several addresses: the replicas, following the leader */
  #replicas = null;

  /**
   * @param {string} target host:port of the orchestrator, e.g. '127.0.0.1:50051', or the
   *   addresses of its replicas on a shared store, separated by commas
   *   ('h1:p1,h2:p2'): every call goes to the one that leads, and follows it on a failover
   * @param {ClientOptions} [options]
   */
  constructor(target, options = {}) {
    if (typeof target !== 'string' || target === '') {
      throw new TypeError("a target is 'host:port', e.g. '127.0.0.1:50051'");
    }
    const api = loadApi();
    const credentials = options.credentials ?? grpc.credentials.createInsecure();
    const channelOptions = {
      'grpc.max_send_message_length': MAX_MESSAGE_BYTES,
      'grpc.max_receive_message_length': MAX_MESSAGE_BYTES,
      ...options.channelOptions,
    };
    this.target = target;
    this.timeoutMs = options.timeoutMs ?? 10_000;
    const reattach = options.reattachTimeoutMs ?? DEFAULT_REATTACH_TIMEOUT_MS;
    if (typeof reattach !== 'number' || !(reattach >= 0)) {
      throw new RangeError(`reattachTimeoutMs is a number of milliseconds >= 0, got ${reattach}`);
    }
    this.#reattachTimeoutMs = reattach;
    const interceptors = options.token === undefined ? [] : [bearer(options.token)];
    const addresses = splitTarget(target);
    /** @param {string} address */
    const connect = (address) => {
      const status = new api.StatusService(address, credentials, { ...channelOptions, interceptors });
      // One connection for every service.
      const shared = { ...channelOptions, interceptors, channelOverride: status.getChannel() };
      return {
        address,
        status,
        directives: new api.DirectiveService(address, credentials, shared),
        channels: new api.ChannelService(address, credentials, shared),
        health: addresses.length > 1 ? new (healthService())(address, credentials, shared) : null,
      };
    };
    if (addresses.length > 1) {
      this.#replicas = new Replicas(addresses, connect);
      this.#status = null;
      this.#directives = this.#replicas.directives;
      this.#channels = null;
    } else {
      const one = connect(addresses[0]);
      this.#status = one.status;
      this.#directives = one.directives;
      this.#channels = one.channels;
    }
    // The stream itself opens with the first small directive.
    if (options.session !== false) this.#session = new DirectiveSession(this.#directives);
  }

  /**
   * The orchestrator's GetStatusResponse as a plain object (camelCase fields):
   * state, workers, queues, queueDepth, channels, directives, version.
   * @param {{ timeoutMs?: number }} [options]
   * @returns {Promise<any>}
   */
  status(options = {}) {
    this.#checkOpen();
    return this.#unary('status', 'GetStatus', {}, options.timeoutMs ?? this.timeoutMs);
  }

  /**
   * Run a plan over inputs to the end: the fold value for a plan ending in a
   * fold, otherwise the map results as an array in input order.
   * @param {import('./plan.js').Plan} plan
   * @param {Iterable<unknown> | AsyncIterable<unknown>} inputs
   * @param {import('./directive.js').RunOptions} [options]
   * @returns {Promise<any>}
   */
  async run(plan, inputs, options) {
    return collect(this.events(plan, inputs, options));
  }

  /**
   * `{index, value}` per element as they complete (a map plan only); leaving
   * the loop early cancels the directive.
   * @param {import('./plan.js').Plan} plan
   * @param {Iterable<unknown> | AsyncIterable<unknown>} inputs
   * @param {import('./directive.js').RunOptions} [options]
   * @returns {AsyncGenerator<import('./directive.js').Item, void, undefined>}
   */
  iter(plan, inputs, options) {
    const run = this.events(plan, inputs, options);
    if (run.fold) throw new TypeError('iter() yields map results; a plan ending in a fold has one value: use run()');
    return items(run);
  }

  /**
   * Start a directive lazily and return its event stream: iterate it with
   * `for await` for started / items / progress / fold events. An array of at
   * most 64 inputs runs on the client's shared session stream (see
   * {@link ClientOptions}), anything else on a RunDirective call of its own.
   * @param {import('./plan.js').Plan} plan
   * @param {Iterable<unknown> | AsyncIterable<unknown>} inputs
   * @param {import('./directive.js').RunOptions} [options]
   * @returns {DirectiveRun}
   */
  events(plan, inputs, options) {
    this.#checkOpen();
    return new DirectiveRun(this.#directives, normalizePlan(plan), inputs, options, this.#context(false));
  }

  /**
   * Start the plan *detached* and resolve with its directive id once the
   * orchestrator has journaled the plan, every input and the end of the
   * input, and has let go of this call (the id can be attached to at once). The directive runs on without this caller (leaving never cancels
   * it); read its results later, from any client, with {@link attach}, list
   * it with {@link directives}, cancel it with {@link cancel}. The
   * orchestrator keeps its results until they are read, or for its
   * --retention. Needs an orchestrator with a journal (FAILED_PRECONDITION
   * otherwise). The inputs always go on a RunDirective call of their own.
   * @param {import('./plan.js').Plan} plan
   * @param {Iterable<unknown> | AsyncIterable<unknown>} inputs
   * @param {Omit<import('./directive.js').RunOptions, 'expectedItems'>} [options]
   * @returns {Promise<string>}
   */
  async submit(plan, inputs, options = {}) {
    this.#checkOpen();
    // No progress hint: Progress.total stays 0 until the end of the input is journaled.
    const run = new DirectiveRun(this.#directives, normalizePlan(plan), inputs,
      { ...options, expectedItems: 0 }, this.#context(true));
    let left = false;
    for await (const event of run) {
      // Progress counts journaled inputs only, and its total is set once the
      // end of the input is journaled too: then the directive is safe.
      if (event.type === 'progress' && run.inputsSent > 0
        && event.progress.total === run.inputsSent && event.progress.received === run.inputsSent) {
        left = true;
        break; // leaving ends the call; a detached directive runs on
      }
    }
    const id = run.directiveId;
    if (id === null) throw new SquireError('INTERNAL', 'the directive ended without starting');
    // The orchestrator lets go of the call a moment after it was cancelled;
    // until then an attach is refused ("already has a caller attached").
    // Resolve once the id can be attached to.
    if (left) await this.#untilDetached(id, Date.now() + this.timeoutMs);
    return id;
  }

  /**
   * Poll ListDirectives until `id` has no caller attached (or is gone), or `deadline`.
   * @param {string} id
   * @param {number} deadline
   */
  async #untilDetached(id, deadline) {
    for (let pause = 5; ; pause = Math.min(pause * 2, 200)) {
      const rows = await this.directives({ timeoutMs: Math.max(1, deadline - Date.now()) }).catch(() => null);
      const row = rows?.find((d) => d.directiveId === id);
      if (rows !== null && (row === undefined || !row.attached)) return;
      if (Date.now() + pause >= deadline || this.#closed) return;
      await new Promise((resolve) => setTimeout(resolve, pause));
    }
  }

  /**
   * Attach to a directive accepted earlier (a detached one, see
   * {@link submit}, or one whose caller went away) and stream its events
   * from the start: started, its items, progress, the fold value, the end.
   * Iterate the run with `for await`, or `await run.result()`. Rejects (on
   * iteration) with NOT_FOUND for an id the orchestrator does not hold, and
   * FAILED_PRECONDITION when another caller is attached or the orchestrator
   * has no journal. If the directive's input was still open, attaching ends
   * it. Reattaches by itself like any run (see reattachTimeoutMs).
   * @param {string} directiveId
   * @param {Pick<import('./directive.js').RunOptions, 'onProgress' | 'signal' | 'reattachTimeoutMs'>} [options]
   * @returns {DirectiveRun}
   */
  attach(directiveId, options = {}) {
    this.#checkOpen();
    const { onProgress, signal, reattachTimeoutMs } = options;
    return new DirectiveRun(this.#directives, null, null, { onProgress, signal, reattachTimeoutMs },
      this.#context(false), directiveId);
  }

  /**
   * The directives the orchestrator holds: running ones, and finished ones
   * kept for a caller to read (detached, or left by their caller).
   * @param {{ timeoutMs?: number }} [options]
   * @returns {Promise<DirectiveInfo[]>}
   */
  async directives(options = {}) {
    this.#checkOpen();
    const response = await this.#unary('directives', 'ListDirectives', {}, options.timeoutMs ?? this.timeoutMs);
    return response.directives.map((/** @type {any} */ d) => ({ ...d }));
  }

  /**
   * Cancel a directive by id: its queued tasks are dropped, running ones
   * aborted; a finished one is dropped with its results. Rejects with
   * NOT_FOUND if the orchestrator holds no such directive.
   * @param {string} directiveId
   * @param {{ timeoutMs?: number }} [options]
   * @returns {Promise<void>}
   */
  async cancel(directiveId, options = {}) {
    this.#checkOpen();
    if (typeof directiveId !== 'string' || directiveId === '') {
      throw new TypeError(`a directive id is a non-empty string, got ${JSON.stringify(directiveId)}`);
    }
    await this.#unary('directives', 'CancelDirective', { directiveId }, options.timeoutMs ?? this.timeoutMs);
  }

  /**
   * A unary call: to the one orchestrator, or to the leader of the replicas
   * (tried again while none serves, until its deadline).
   * @param {'status' | 'directives' | 'channels'} service
   * @param {string} method
   * @param {object} request
   * @param {number} timeoutMs
   * @returns {Promise<any>}
   */
  async #unary(service, method, request, timeoutMs) {
    if (this.#replicas !== null) {
      return (await this.#replicas.unary(service, method, request, timeoutMs)).response;
    }
    const stub = service === 'status' ? this.#status : service === 'directives' ? this.#directives : this.#channels;
    return unary(stub, method, request, timeoutMs);
  }

  /**
   * @param {boolean} detached
   * @returns {import('./directive.js').RunContext}
   */
  #context(detached) {
    return {
      session: detached ? null : this.#session,
      reattachTimeoutMs: this.#reattachTimeoutMs,
      closed: this.#closing.signal,
      detached,
      replicas: this.#replicas,
    };
  }

  /**
   * Lease a fresh result channel (see {@link Channel}). With a journal (the
   * orchestrator's default store) the channel outlives the orchestrator
   * going away: its calls are made again, with backoff, for
   * `reattachTimeoutMs` (this channel's, over the client's).
   * @param {{ serializer?: string, reattachTimeoutMs?: number }} [options]
   * @returns {Promise<Channel>}
   */
  async leaseChannel(options = {}) {
    this.#checkOpen();
    const serializer = parseSerializer(options.serializer);
    const reattachTimeoutMs = options.reattachTimeoutMs ?? this.#reattachTimeoutMs;
    if (typeof reattachTimeoutMs !== 'number' || !(reattachTimeoutMs >= 0)) { // before a lease it would leak
      throw new RangeError(`reattachTimeoutMs is a number of milliseconds >= 0, got ${reattachTimeoutMs}`);
    }
    const context = { reattachTimeoutMs, closed: this.#closing.signal, replicas: this.#replicas };
    if (this.#replicas !== null) {
      // The channel is in the shared journal: its calls follow the leader.
      const { response } = await this.#replicas.unary('channels', 'LeaseChannel', {}, this.timeoutMs);
      return new Channel(this.#replicas.channels, response.channelId, serializer, this.timeoutMs, context);
    }
    const response = await unary(this.#channels, 'LeaseChannel', {}, this.timeoutMs);
    return new Channel(this.#channels, response.channelId, serializer, this.timeoutMs, context);
  }

  /**
   * Close the connection; calls still running are cancelled (those on the
   * session reject with UNAVAILABLE). Idempotent.
   */
  close() {
    if (this.#closed) return;
    this.#closed = true;
    this.#closing.abort();
    this.#session?.close();
    this.#status?.close();
    this.#replicas?.close();
  }

  #checkOpen() {
    if (this.#closed) throw new Error(`the client of ${this.target} is closed; create a new one`);
  }
}

/**
 * A client interceptor that adds the token to every call's metadata. (Call
 * credentials would do the same but grpc-js allows them on TLS channels only,
 * and a token over plaintext on loopback is legitimate in tests.)
 * @param {string} token
 * @returns {grpc.Interceptor}
 */
function bearer(token) {
  if (typeof token !== 'string' || token.trim() === '') throw new TypeError('token must be a non-empty string');
  return (options, nextCall) => new grpc.InterceptingCall(nextCall(options), {
    start(metadata, listener, next) {
      metadata.set('authorization', `Bearer ${token}`);
      next(metadata, listener);
    },
  });
}

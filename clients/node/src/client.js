// @ts-check
/**
 * The client of one orchestrator. Every call this package makes starts from
 * a Client: directive runs and channels get their stubs from it.
 */

import grpc from '@grpc/grpc-js';

import { Channel } from './channel.js';
import { DirectiveRun, collect, items } from './directive.js';
import { normalizePlan } from './plan.js';
import { loadApi } from './proto.js';
import { unary } from './rpc.js';
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
 */

export class Client {
  #directives;
  #channels;
  #status;
  /** @type {DirectiveSession | null} */
  #session = null;
  #closed = false;

  /**
   * @param {string} target host:port of the orchestrator, e.g. '127.0.0.1:50051'
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
    const interceptors = options.token === undefined ? [] : [bearer(options.token)];
    this.#status = new api.StatusService(target, credentials, { ...channelOptions, interceptors });
    // One connection for all three services.
    const shared = { ...channelOptions, interceptors, channelOverride: this.#status.getChannel() };
    this.#directives = new api.DirectiveService(target, credentials, shared);
    this.#channels = new api.ChannelService(target, credentials, shared);
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
    return unary(this.#status, 'GetStatus', {}, options.timeoutMs ?? this.timeoutMs);
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
    return new DirectiveRun(this.#directives, normalizePlan(plan), inputs, options, this.#session);
  }

  /**
   * Lease a fresh result channel (see {@link Channel}).
   * @param {{ serializer?: string }} [options]
   * @returns {Promise<Channel>}
   */
  async leaseChannel(options = {}) {
    this.#checkOpen();
    const serializer = parseSerializer(options.serializer);
    const response = await unary(this.#channels, 'LeaseChannel', {}, this.timeoutMs);
    return new Channel(this.#channels, response.channelId, serializer, this.timeoutMs);
  }

  /**
   * Close the connection; calls still running are cancelled (those on the
   * session reject with UNAVAILABLE). Idempotent.
   */
  close() {
    if (this.#closed) return;
    this.#closed = true;
    this.#session?.close();
    this.#status.close();
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

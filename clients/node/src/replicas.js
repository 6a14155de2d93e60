// @ts-check
/**
 * Several orchestrator addresses: the replicas of one orchestrator on a
 * shared store (Postgres), of which one leads and the others stand by.
 *
 * The Python SDK gives gRPC all the addresses with round_robin and
 * client-side health checking (gRPC A17), so that only the replica that
 * answers health SERVING gets calls. @grpc/grpc-js (1.14.7) does not
 * implement client-side health checking: its service config parser knows no
 * `healthCheckConfig` and no load balancer watches grpc.health.v1. So this
 * client does it itself: one channel per address, the leader found by the
 * standard grpc.health.v1 Check (service ""), every call of the client sent
 * to the replica last found leading, and a call refused by a standby
 * ("this orchestrator is a standby; the leader is h:p") or failing to
 * connect makes the client look again (straight at the leader the refusal
 * names, when it is one of the addresses). What a failed call does next is
 * the caller's: directive runs retry what had not started and reattach what
 * had (directive.js), channels resend, resubscribe and retry (channel.js),
 * unary calls retry until their deadline (here).
 */

import grpc from '@grpc/grpc-js';
import protoLoader from '@grpc/proto-loader';

import { SquireError, fromGrpcError } from './errors.js';
import { Backoff } from './reconnect.js';

/** How long one health check of one replica may take. */
const PROBE_TIMEOUT_MS = 1000;

// grpc.health.v1 (grpc/health/v1/health.proto), the part a client needs.
const HEALTH_PROTO = {
  nested: {
    grpc: {
      nested: {
        health: {
          nested: {
            v1: {
              nested: {
                HealthCheckRequest: { fields: { service: { type: 'string', id: 1 } } },
                HealthCheckResponse: {
                  fields: { status: { type: 'ServingStatus', id: 1 } },
                  nested: {
                    ServingStatus: { values: { UNKNOWN: 0, SERVING: 1, NOT_SERVING: 2, SERVICE_UNKNOWN: 3 } },
                  },
                },
                Health: {
                  methods: { Check: { requestType: 'HealthCheckRequest', responseType: 'HealthCheckResponse' } },
                },
              },
            },
          },
        },
      },
    },
  },
};

/** @type {any} */
let healthClient;

/** The grpc.health.v1.Health client constructor. */
export function healthService() {
  if (healthClient === undefined) {
    const definition = protoLoader.fromJSON(/** @type {any} */ (HEALTH_PROTO), { enums: String, defaults: true });
    healthClient = /** @type {any} */ (grpc.loadPackageDefinition(definition)).grpc.health.v1.Health;
  }
  return healthClient;
}

/**
 * The addresses of a target: one, or several separated by commas
 * ('h1:p1,h2:p2'). Each of several must be host:port.
 * @param {string} target
 * @returns {string[]}
 */
export function splitTarget(target) {
  const parts = target.split(',').map((part) => part.trim()).filter((part) => part !== '');
  if (parts.length <= 1) return [target.trim()];
  for (const part of parts) {
    const colon = part.lastIndexOf(':');
    const host = part.slice(0, colon).replace(/^\[|\]$/g, '');
    const port = part.slice(colon + 1);
    if (colon <= 0 || host === '' || !/^\d+$/.test(port)) {
      throw new TypeError(`orchestrator address ${JSON.stringify(part)} is not host:port`);
    }
  }
  return [...new Set(parts)];
}

/**
 * What a standby's refusal says of the leader: 'this orchestrator is a
 * standby; the leader is 127.0.0.1:50051 (epoch 3)'.
 * @param {unknown} error
 * @returns {string | null}
 */
export function namedLeader(error) {
  if (!(error instanceof SquireError) || error.code !== 'UNAVAILABLE') return null;
  const match = /this orchestrator is a standby; the leader is (\S+) \(epoch/.exec(error.details);
  return match ? match[1] : null;
}

/**
 * @typedef {object} Replica one address and its stubs, on one channel
 * @property {string} address
 * @property {any} status StatusService
 * @property {any} directives DirectiveService
 * @property {any} channels ChannelService
 * @property {any} health grpc.health.v1.Health
 */

/** Follows the leader among the replicas of one orchestrator. */
export class Replicas {
  /** @type {Replica[]} */
  entries;
  #current = 0;
  /** The current one answered SERVING and no call has failed since. */
  #confirmed = false;
  /** @type {Promise<boolean> | null} the probe under way */
  #probe = null;
  #closed = false;

  /**
   * @param {string[]} addresses
   * @param {(address: string) => Replica} connect
   */
  constructor(addresses, connect) {
    this.entries = addresses.map(connect);
  }

  /** The replica calls go to now. */
  get current() {
    return this.entries[this.#current];
  }

  /**
   * A DirectiveService stub whose calls go to the replica leading when each
   * call starts (for directive runs and the session).
   */
  get directives() {
    return {
      RunDirective: (/** @type {any[]} */ ...args) => this.current.directives.RunDirective(...args),
      RunDirectives: (/** @type {any[]} */ ...args) => this.current.directives.RunDirectives(...args),
    };
  }

  /**
   * A ChannelService stub whose calls go to the replica leading when each
   * call starts: a channel is in the shared journal, so after a failover
   * the new leader has it (channel.js resends, resubscribes and retries).
   */
  get channels() {
    /** @param {string} method */
    const forward = (method) => (/** @type {any[]} */ ...args) => this.current.channels[method](...args);
    return {
      Publish: forward('Publish'),
      Subscribe: forward('Subscribe'),
      CloseChannel: forward('CloseChannel'),
      ReleaseChannel: forward('ReleaseChannel'),
    };
  }

  /**
   * Make sure calls go to a replica that answered SERVING (unless none
   * does: then they go to the last one believed to, and fail UNAVAILABLE).
   * @returns {Promise<boolean>} whether a leader was found
   */
  async ready() {
    if (this.#confirmed) return true;
    return this.find();
  }

  /**
   * A call failed with `error`: if the replica is not serving (a standby's
   * refusal, a connection that failed), look for the leader again: at once
   * at the one a refusal names.
   * @param {unknown} error
   */
  failed(error) {
    const err = fromGrpcError(error);
    if (!(err instanceof SquireError) || err.code !== 'UNAVAILABLE') return;
    this.#confirmed = false;
    const leader = namedLeader(err);
    const index = leader === null ? -1 : this.entries.findIndex((e) => e.address === leader);
    if (index >= 0) this.#current = index;
  }

  /**
   * Health-check every replica at once; calls go to the first that answers
   * SERVING. None does (a takeover under way): calls go to the next address.
   * @returns {Promise<boolean>} whether one serves
   */
  find() {
    this.#probe ??= this.#check().finally(() => {
      this.#probe = null;
    });
    return this.#probe;
  }

  async #check() {
    if (this.#closed) return false;
    const start = this.#current;
    const found = await new Promise((resolve) => {
      let pending = this.entries.length;
      this.entries.forEach((entry, index) => {
        entry.health.Check({ service: '' }, { deadline: Date.now() + PROBE_TIMEOUT_MS },
          (/** @type {unknown} */ err, /** @type {any} */ reply) => {
            if (!err && reply?.status === 'SERVING') resolve(index);
            pending -= 1;
            if (pending === 0) resolve(-1);
          });
      });
    });
    if (found >= 0) {
      this.#current = /** @type {number} */ (found);
      this.#confirmed = true;
      return true;
    }
    // A failure moved the calls already (a refusal named the leader): keep that.
    if (this.#current === start) this.#current = (start + 1) % this.entries.length;
    return false;
  }

  /**
   * A unary call to the leader, tried again on UNAVAILABLE (a standby's
   * refusal, a replica gone) with backoff until its deadline.
   * @param {'status' | 'directives' | 'channels'} service
   * @param {string} method
   * @param {object} request
   * @param {number | undefined} timeoutMs undefined or 0: no deadline
   * @returns {Promise<{ response: any, replica: Replica }>}
   */
  async unary(service, method, request, timeoutMs) {
    const backoff = new Backoff(timeoutMs ? timeoutMs : Infinity);
    const deadline = backoff.deadline;
    for (;;) {
      await this.ready();
      const replica = this.current;
      const stub = replica[service];
      const left = deadline - Date.now();
      try {
        const response = await new Promise((resolve, reject) => {
          stub[method](request, Number.isFinite(left) ? { deadline: Date.now() + Math.max(1, left) } : {},
            (/** @type {unknown} */ err, /** @type {any} */ reply) => (err ? reject(fromGrpcError(err)) : resolve(reply)));
        });
        return { response, replica };
      } catch (err) {
        const delay = backoff.next();
        // (No try left once the pause would reach the deadline.)
        if (!(err instanceof SquireError) || err.code !== 'UNAVAILABLE' || this.#closed
          || delay === null || Date.now() + delay >= deadline) throw err;
        this.failed(err);
        await new Promise((resolve) => setTimeout(resolve, delay));
      }
    }
  }

  close() {
    this.#closed = true;
    for (const entry of this.entries) entry.status.close();
  }
}

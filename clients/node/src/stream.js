// @ts-check
/**
 * The fluent way to build and run a plan:
 *
 *     await stream(range(1, 11)).map('fib_at').fold('sum').run(client);           // 143
 *     await stream(['a', 'bb']).map('length').run(client);                        // [1, 2]
 *     for await (const { index, value } of stream(xs).map('fib_at').iter(client)) ...
 */

import { describePlan } from './plan.js';

/**
 * Inputs indexed by position (from 0) plus map stages and an optional final
 * fold. Immutable: map() and fold() return new streams.
 */
export class IndexedStream {
  #inputs;
  /** @type {import('./plan.js').Stage[]} */
  #stages;
  #taskTimeoutSeconds;
  #priority;

  /**
   * @param {Iterable<unknown> | AsyncIterable<unknown>} inputs
   * @param {import('./plan.js').Stage[]} [stages]
   * @param {number} [taskTimeoutSeconds]
   * @param {number} [priority]
   */
  constructor(inputs, stages = [], taskTimeoutSeconds = 0, priority = 0) {
    this.#inputs = inputs;
    this.#stages = stages;
    this.#taskTimeoutSeconds = taskTimeoutSeconds;
    this.#priority = priority;
  }

  /**
   * Apply `operation(element, **params)` to every element.
   * @param {string} operation
   * @param {Record<string, unknown>} [params] keyword parameters
   */
  map(operation, params) {
    return this.#with({ map: this.#name(operation, `map(${operation})`), ...(params && { params }) });
  }

  /**
   * Reduce the elements with a monoid; must be the last stage.
   * @param {string} monoid
   * @param {Record<string, unknown>} [params]
   */
  fold(monoid, params) {
    return this.#with({ fold: this.#name(monoid, `fold(${monoid})`), ...(params && { params }) });
  }

  /**
   * Fail any single task that runs longer than `seconds` (0: no limit).
   * @param {number} seconds
   */
  withTaskTimeout(seconds) {
    if (typeof seconds !== 'number' || !(seconds >= 0)) {
      throw new RangeError(`a task timeout is a number of seconds >= 0, got ${seconds}`);
    }
    return new IndexedStream(this.#inputs, this.#stages, seconds, this.#priority);
  }

  /**
   * Serve this directive before its tenant's lower-priority ones (strictly,
   * within the tenant's share of the workers; other tenants are not
   * affected). An integer from -1000 to 1000; default 0.
   * @param {number} priority
   */
  withPriority(priority) {
    if (!Number.isInteger(priority) || priority < -1000 || priority > 1000) {
      throw new RangeError(`a priority is an integer from -1000 to 1000, got ${priority}`);
    }
    return new IndexedStream(this.#inputs, this.#stages, this.#taskTimeoutSeconds, priority);
  }

  /** The plan the orchestrator will evaluate. @returns {import('./plan.js').PlanObject} */
  plan() {
    return {
      stages: [...this.#stages], taskTimeoutSeconds: this.#taskTimeoutSeconds,
      priority: this.#priority,
    };
  }

  /** E.g. 'map(fib_at) -> fold(sum)'. */
  describe() {
    return describePlan(this.#stages);
  }

  /**
   * Run to the end: the map results in input order, or the fold value.
   * @param {import('./client.js').Client} client
   * @param {import('./directive.js').RunOptions} [options]
   */
  run(client, options) {
    return client.run(this.plan(), this.#inputs, options);
  }

  /**
   * `{index, value}` per element in completion order (map plans only).
   * @param {import('./client.js').Client} client
   * @param {import('./directive.js').RunOptions} [options]
   */
  iter(client, options) {
    return client.iter(this.plan(), this.#inputs, options);
  }

  /**
   * Start the directive detached: resolves with its id once the orchestrator
   * has journaled it and every input (see Client.submit).
   * @param {import('./client.js').Client} client
   * @param {Omit<import('./directive.js').RunOptions, 'expectedItems'>} [options]
   */
  submit(client, options) {
    return client.submit(this.plan(), this.#inputs, options);
  }

  /**
   * The raw event stream (started, items, progress, fold).
   * @param {import('./client.js').Client} client
   * @param {import('./directive.js').RunOptions} [options]
   */
  events(client, options) {
    return client.events(this.plan(), this.#inputs, options);
  }

  /** @param {import('./plan.js').Stage} stage */
  #with(stage) {
    return new IndexedStream(
      this.#inputs, [...this.#stages, stage], this.#taskTimeoutSeconds, this.#priority,
    );
  }

  /**
   * @param {unknown} name
   * @param {string} what
   * @returns {string}
   */
  #name(name, what) {
    if (typeof name !== 'string' || name === '') {
      throw new TypeError(`an operation name must be a non-empty string, got ${JSON.stringify(name)}`);
    }
    const last = this.#stages[this.#stages.length - 1];
    if (last !== undefined && 'fold' in last) {
      throw new Error(`cannot add ${what} after fold(${last.fold}): fold must be the last stage`);
    }
    return name;
  }
}

/**
 * A stream over `inputs` (any iterable or async iterable, read lazily once per run).
 * @param {Iterable<unknown> | AsyncIterable<unknown>} inputs
 */
export function stream(inputs) {
  return new IndexedStream(inputs);
}

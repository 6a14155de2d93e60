// @ts-check
/**
 * Plans: what a directive does. A plan is a list of stages, zero or more maps
 * optionally followed by one fold:
 *
 *     [{ map: 'fib_at' }, { map: 'multiply_by', params: { factor: 2 } }, { fold: 'sum' }]
 *
 * or an object { stages, taskTimeoutSeconds, priority }. {@link IndexedStream} builds
 * plans fluently and refuses malformed ones early; a plan given as data is
 * sent as it is and the orchestrator validates it (INVALID_ARGUMENT).
 */

import { encodeParams, wireSerializer } from './serde.js';

/**
 * @typedef {{ map: string, params?: Record<string, unknown> }} MapStage
 * @typedef {{ fold: string, params?: Record<string, unknown> }} FoldStage
 * @typedef {MapStage | FoldStage} Stage
 * @typedef {{ stages: Stage[], taskTimeoutSeconds?: number, priority?: number }} PlanObject
 * @typedef {Stage[] | PlanObject} Plan
 * @typedef {{ stages: Stage[], taskTimeoutSeconds: number, priority: number, fold: boolean }} NormalizedPlan
 */

/**
 * Check a plan's shape (not its meaning, which is the orchestrator's to judge).
 * @param {Plan} plan
 * @returns {NormalizedPlan}
 */
export function normalizePlan(plan) {
  const stages = Array.isArray(plan) ? plan : plan?.stages;
  if (!Array.isArray(stages)) {
    throw new TypeError('a plan is an array of stages ({map: name} or {fold: name}) or {stages: [...]}');
  }
  const taskTimeoutSeconds = Array.isArray(plan) ? 0 : (plan.taskTimeoutSeconds ?? 0);
  if (typeof taskTimeoutSeconds !== 'number' || !(taskTimeoutSeconds >= 0)) {
    throw new RangeError(`taskTimeoutSeconds must be a number >= 0, got ${taskTimeoutSeconds}`);
  }
  const priority = Array.isArray(plan) ? 0 : (plan.priority ?? 0);
  if (!Number.isInteger(priority) || priority < -1000 || priority > 1000) {
    throw new RangeError(`priority must be an integer from -1000 to 1000, got ${priority}`);
  }
  stages.forEach((stage, position) => {
    const keys = ['map', 'fold'].filter((k) => stage != null && Object.hasOwn(stage, k));
    if (keys.length !== 1) {
      throw new TypeError(`plan stage ${position} must have exactly one of "map" or "fold"`);
    }
    const name = /** @type {any} */ (stage)[keys[0]];
    if (typeof name !== 'string' || name === '') {
      throw new TypeError(`plan stage ${position}: ${keys[0]} needs a non-empty operation name`);
    }
  });
  const last = stages[stages.length - 1];
  return { stages, taskTimeoutSeconds, priority, fold: last !== undefined && 'fold' in last };
}

/**
 * The Plan message of the contract.
 * @param {NormalizedPlan} plan
 * @param {import('./serde.js').SerializerName} serializer
 * @param {number} expectedItems 0 = unknown
 */
export function planMessage(plan, serializer, expectedItems) {
  return {
    stages: plan.stages.map((stage) =>
      'fold' in stage
        ? { fold: { monoid: stage.fold, params: encodeParams(stage.params, serializer) } }
        : { map: { operation: stage.map, params: encodeParams(stage.params, serializer) } },
    ),
    serializer: wireSerializer(serializer),
    expectedItems,
    taskTimeoutSeconds: plan.taskTimeoutSeconds,
    priority: plan.priority,
  };
}

/**
 * E.g. 'map(fib_at) -> fold(sum)', as `squire status` shows plans.
 * @param {Stage[]} stages
 */
export function describePlan(stages) {
  return stages.map((s) => ('fold' in s ? `fold(${s.fold})` : `map(${s.map})`)).join(' -> ') || 'identity';
}

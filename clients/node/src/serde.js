// @ts-check
/**
 * Payload encoding: JSON (the default) or MessagePack, the two serializers of
 * the contract (squire.api.v1.Serializer). Every value that crosses the wire
 * (inputs, outputs, params, operands) is bytes in one of these formats.
 */

import { decode as msgpackDecode, encode as msgpackEncode } from '@msgpack/msgpack';

import { PayloadError } from './errors.js';

/** @typedef {'json' | 'msgpack'} SerializerName */

const WIRE = /** @type {const} */ ({ json: 'SERIALIZER_JSON', msgpack: 'SERIALIZER_MSGPACK' });
const EMPTY = Buffer.alloc(0);

/**
 * Accept 'json' / 'msgpack' in any case; undefined means JSON.
 * @param {string | undefined} name
 * @returns {SerializerName}
 */
export function parseSerializer(name) {
  if (name === undefined) return 'json';
  const lower = String(name).toLowerCase();
  if (lower === 'json' || lower === 'msgpack') return lower;
  throw new RangeError(`unknown serializer ${JSON.stringify(name)}: use 'json' or 'msgpack'`);
}

/**
 * The proto enum name of a serializer.
 * @param {SerializerName} serializer
 */
export function wireSerializer(serializer) {
  return WIRE[serializer];
}

/**
 * The serializer of a proto enum name (UNSPECIFIED is JSON); undefined for one this client does not know.
 * @param {string | number | undefined} wire
 * @returns {SerializerName | undefined}
 */
export function serializerFromWire(wire) {
  if (wire === 'SERIALIZER_MSGPACK' || wire === 2) return 'msgpack';
  if (wire === 'SERIALIZER_JSON' || wire === 'SERIALIZER_UNSPECIFIED' || wire === 1 || wire === 0) return 'json';
  return undefined;
}

/**
 * @param {string} _key
 * @param {unknown} value
 */
function strictJson(_key, value) {
  // The Python side refuses NaN and Infinity too (json.dumps(allow_nan=False)):
  // silently turning them into null would change the computation.
  if (typeof value === 'number' && !Number.isFinite(value)) {
    throw new TypeError(`${value} is not representable in JSON`);
  }
  return value;
}

/**
 * Encode one value.
 * @param {unknown} value
 * @param {SerializerName} [serializer]
 * @returns {Buffer}
 */
export function encode(value, serializer = 'json') {
  try {
    if (serializer === 'msgpack') {
      const bytes = msgpackEncode(value);
      return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    }
    const text = JSON.stringify(value, strictJson);
    if (text === undefined) throw new TypeError(`${typeof value} is not representable in JSON`);
    return Buffer.from(text, 'utf8');
  } catch (err) {
    const message = err instanceof Error ? err.message : String(err);
    throw new PayloadError(`cannot encode a value as ${serializer}: ${message}`, { cause: err });
  }
}

/**
 * Decode one payload; `what` names it in the error message.
 * @param {Uint8Array} bytes
 * @param {SerializerName} [serializer]
 * @param {string} [what]
 * @returns {unknown}
 */
export function decode(bytes, serializer = 'json', what = 'payload') {
  try {
    // A plain Uint8Array view, so that bin values decode as Uint8Array, not Buffer.
    if (serializer === 'msgpack') return msgpackDecode(new Uint8Array(bytes.buffer, bytes.byteOffset, bytes.byteLength));
    return JSON.parse(Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString('utf8'));
  } catch (err) {
    const message = err instanceof Error ? err.message : String(err);
    throw new PayloadError(`${what} is not valid ${serializer}: ${message}`, { cause: err });
  }
}

/**
 * Keyword parameters: a plain object of names to values. No parameters (or
 * an empty object) is sent as empty bytes, which the contract reads as "none".
 * @param {Record<string, unknown> | undefined | null} params
 * @param {SerializerName} serializer
 * @returns {Buffer}
 */
export function encodeParams(params, serializer) {
  if (params === undefined || params === null) return EMPTY;
  if (typeof params !== 'object' || Array.isArray(params)) {
    throw new TypeError(`params must be an object of keyword parameters, got ${describe(params)}`);
  }
  return Object.keys(params).length === 0 ? EMPTY : encode(params, serializer);
}

/**
 * A payload given pre-encoded: bytes as they are, a string as its UTF-8 bytes.
 * @param {unknown} value
 * @returns {Buffer}
 */
export function rawPayload(value) {
  if (typeof value === 'string') return Buffer.from(value, 'utf8');
  if (value instanceof Uint8Array) return Buffer.from(value.buffer, value.byteOffset, value.byteLength);
  throw new TypeError(`a raw payload must be a Uint8Array or a string, got ${describe(value)}`);
}

/** @param {unknown} value */
function describe(value) {
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'an array';
  return typeof value;
}

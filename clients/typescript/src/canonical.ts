/**
 * Content identity of a state, independent of key order: PostgreSQL's jsonb stores object
 * keys in its own order (https://www.postgresql.org/docs/current/datatype-json.html), so a
 * state read back, or a copy that went through another process, need not serialise like
 * the object that was written.
 */

function isPlainObject(value: unknown): value is Record<string, unknown> {
  if (value === null || typeof value !== "object" || Array.isArray(value)) return false;
  const proto: unknown = Object.getPrototypeOf(value);
  return proto === Object.prototype || proto === null;
}

/**
 * JSON of `value` as the server would store it (JSON.stringify's rules: toJSON, undefined
 * members dropped), with the keys of every object sorted. Objects are rebuilt with sorted
 * keys; JavaScript still lists integer-like keys first, but it does so for every input, so
 * two equal documents always give the same text.
 */
export function canonicalJson(value: unknown): string {
  const text = JSON.stringify(value, (_key, member: unknown) => {
    if (!isPlainObject(member)) return member;
    const sorted: Record<string, unknown> = {};
    for (const key of Object.keys(member).sort()) sorted[key] = member[key];
    return sorted;
  });
  if (text === undefined) throw new TypeError("The value has no JSON form.");
  return text;
}

const encoder = new TextEncoder();

/** A short fingerprint of canonical JSON, so that remembering many states costs little memory. */
export async function fingerprint(canonical: string): Promise<string> {
  const digest = await globalThis.crypto.subtle.digest("SHA-256", encoder.encode(canonical));
  let hex = "";
  for (const byte of new Uint8Array(digest)) hex += byte.toString(16).padStart(2, "0");
  return hex;
}

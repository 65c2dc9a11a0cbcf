/**
 * HttpMachineMemory: Arvo's IMachineMemory over the REST API of django-machine-memory.
 * Every id travels as the query parameter `?id=` (URLSearchParams), so any id, "." and
 * ".." included, reaches the server unchanged.
 */

import { canonicalJson, fingerprint } from "./canonical.js";
import {
  LockError,
  LockLostError,
  MachineMemoryError,
  ReadError,
  RequestError,
  WriteConflictError,
  WriteError,
  WriteOutcomeUnknownError,
  type ErrorCode,
} from "./errors.js";
import { etagVersion, exchange, TransportFailure, type FetchLike, type HttpAnswer } from "./http.js";
import type { IMachineMemory } from "./interface.js";

export interface Logger {
  warn(message: string, context?: Record<string, unknown>): void;
}

export interface HttpMachineMemoryOptions {
  /** The API's root, e.g. "https://example.com/api/machine-memory/" (a missing final "/" is added). */
  baseUrl: string | URL;
  /** A DRF token key, sent as `Authorization: Token <key>`. */
  token?: string | undefined;
  /** More headers for every request (another auth scheme, tracing); a function is called per request. */
  headers?:
    | Record<string, string>
    | (() => Record<string, string> | Promise<Record<string, string>>)
    | undefined;
  /** Milliseconds one request may take before it is abandoned. Default 5000. */
  timeoutMs?: number | undefined;
  /** Milliseconds a whole read() may take, retries and backoff included. Default 1000. */
  readTimeoutMs?: number | undefined;
  /** Extra attempts of read() after a transient failure. Default 2. */
  readRetries?: number | undefined;
  /** Milliseconds before the first read retry; doubles each retry. Default 100. */
  readBackoffMs?: number | undefined;
  /** Seconds a lock lives unless extended or released. Default: the server's LOCK_TTL. */
  lockTtl?: number | undefined;
  /** Seconds the server may wait for a held lock before refusing (0 to 1). Default 0. */
  lockWait?: number | undefined;
  /** Extra attempts of lock() after a denial. Default 3. */
  lockRetries?: number | undefined;
  /** Milliseconds before the first lock retry; doubles each retry, ±10 % jitter. Default 50. */
  lockBackoffMs?: number | undefined;
  /** Extra attempts of unlock() after a transient failure. Default 2. */
  unlockRetries?: number | undefined;
  /** Milliseconds before the first unlock retry; doubles each retry. Default 50. */
  unlockBackoffMs?: number | undefined;
  /** How many ids' last-seen versions to remember for plain-object prevData. Default 10000. */
  rememberIds?: number | undefined;
  /** The fetch to use. Default: the global fetch (which keeps connections alive). */
  fetch?: FetchLike | undefined;
  /** Where unlock() reports the failures it swallows. Default: console; null for silence. */
  logger?: Logger | null | undefined;
}

export interface LockOptions {
  /** Seconds this lock lives; overrides the `lockTtl` option. */
  ttl?: number | undefined;
  /** Seconds the server may wait for a held lock (0 to 1); overrides the `lockWait` option. */
  wait?: number | undefined;
}

interface Seen {
  version: number;
  print: string;
}

interface Known {
  id: string;
  version: number;
}

type Method = "GET" | "PUT" | "POST" | "PATCH" | "DELETE";
type Resource = "state/" | "lock/";

// A read attempt with less time than this left is not worth starting.
const MIN_ATTEMPT_MS = 50;
// Statuses worth another attempt: the server or a proxy in front of it failed.
const TRANSIENT = new Set([500, 502, 503, 504]);
// An id the server cannot receive intact: UTF-8 encoding (URLSearchParams) would replace a
// lone surrogate with U+FFFD and so address another id.
const LONE_SURROGATE = /[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/;

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));
const now = (): number => performance.now();

function option(value: number | undefined, fallback: number, name: string, integer = false): number {
  const result = value ?? fallback;
  if (!Number.isFinite(result) || result < 0 || (integer && !Number.isInteger(result))) {
    throw new RangeError(`${name} must be a non-negative ${integer ? "integer" : "number"}; got ${String(value)}.`);
  }
  return result;
}

function isRecord(value: unknown): value is Record<string, unknown> {
  return value !== null && typeof value === "object" && !Array.isArray(value);
}

function versionField(value: unknown): number | undefined {
  return typeof value === "number" && Number.isSafeInteger(value) && value > 0 ? value : undefined;
}

function describe(answer: HttpAnswer): string {
  const code = answer.code === undefined ? "" : ` ${answer.code}`;
  const detail = answer.detail === undefined ? "" : `: ${answer.detail}`;
  return `HTTP ${answer.status}${code}${detail}`;
}

function answerOptions(id: string, answer: HttpAnswer): {
  code: ErrorCode;
  status: number;
  id: string;
  detail: string | undefined;
} {
  return { code: answer.code ?? "unexpected_response", status: answer.status, id, detail: answer.detail };
}

function failureCode(failure: TransportFailure): ErrorCode {
  return failure.timedOut ? "timeout" : "network_error";
}

/** The request was refused as it is (bad input, auth, a wrong URL): nothing happened. */
function refusal(operation: string, id: string, answer: HttpAnswer): RequestError {
  return new RequestError(`${operation}(${JSON.stringify(id)}) was refused: ${describe(answer)}.`, answerOptions(id, answer));
}

/** A lock operation that failed on the way (a 5xx, or no answer): LockError, not a refusal. */
function lockFailure(operation: string, id: string, failed: HttpAnswer | TransportFailure): LockError {
  if (failed instanceof TransportFailure) {
    return new LockError(`${operation}(${JSON.stringify(id)}): ${failed.message}`, {
      code: failureCode(failed),
      id,
      cause: failed,
    });
  }
  return new LockError(`${operation}(${JSON.stringify(id)}) failed: ${describe(failed)}.`, answerOptions(id, failed));
}

// A 4xx is the client's mistake and a 3xx a wrong base URL (redirects are not followed):
// either way the request was not carried out.
function isRefusal(answer: HttpAnswer): boolean {
  return answer.status >= 300 && answer.status < 500;
}

export class HttpMachineMemory<T extends Record<string, any>> implements IMachineMemory<T> {
  readonly #base: URL;
  readonly #fetch: FetchLike;
  readonly #token: string | undefined;
  readonly #headers: HttpMachineMemoryOptions["headers"];
  readonly #logger: Logger | null;
  readonly #timeoutMs: number;
  readonly #readTimeoutMs: number;
  readonly #readRetries: number;
  readonly #readBackoffMs: number;
  readonly #lockTtl: number | undefined;
  readonly #lockWait: number;
  readonly #lockRetries: number;
  readonly #lockBackoffMs: number;
  readonly #unlockRetries: number;
  readonly #unlockBackoffMs: number;
  readonly #rememberIds: number;

  /** Lock tokens of the locks this client holds, by id. */
  readonly #locks = new Map<string, string>();
  /** States that lock() read along with the lock, for the next read() of the id (once). */
  readonly #prefetched = new Map<string, T | null>();
  /** The id and version each object that read() returned or write() stored stands for. */
  readonly #known = new WeakMap<object, Known>();
  /** Per id, the last version seen and a fingerprint of its content (oldest first). */
  readonly #seen = new Map<string, Seen>();

  constructor(options: HttpMachineMemoryOptions) {
    const base = new URL(options.baseUrl);
    if (!base.pathname.endsWith("/")) base.pathname += "/";
    base.search = "";
    base.hash = "";
    this.#base = base;
    const fetchFn = options.fetch ?? globalThis.fetch;
    if (typeof fetchFn !== "function") throw new TypeError("No fetch: pass options.fetch (Node 20 has a global one).");
    this.#fetch = fetchFn;
    this.#token = options.token;
    this.#headers = options.headers;
    this.#logger = options.logger === undefined ? console : options.logger;
    this.#timeoutMs = option(options.timeoutMs, 5000, "timeoutMs");
    this.#readTimeoutMs = option(options.readTimeoutMs, 1000, "readTimeoutMs");
    this.#readRetries = option(options.readRetries, 2, "readRetries", true);
    this.#readBackoffMs = option(options.readBackoffMs, 100, "readBackoffMs");
    this.#lockTtl = options.lockTtl === undefined ? undefined : option(options.lockTtl, 0, "lockTtl");
    this.#lockWait = option(options.lockWait, 0, "lockWait");
    this.#lockRetries = option(options.lockRetries, 3, "lockRetries", true);
    this.#lockBackoffMs = option(options.lockBackoffMs, 50, "lockBackoffMs");
    this.#unlockRetries = option(options.unlockRetries, 2, "unlockRetries", true);
    this.#unlockBackoffMs = option(options.unlockBackoffMs, 50, "unlockBackoffMs");
    this.#rememberIds = option(options.rememberIds, 10000, "rememberIds", true);
  }

  /**
   * The state of `id`, or null when it has none. Network errors, timeouts and 5xx answers
   * are retried (`readRetries`, backoff from `readBackoffMs`) within `readTimeoutMs` in all;
   * then ReadError. Right after lock(id) it returns the state that came with the lock,
   * without a request.
   */
  async read(id: string): Promise<T | null> {
    checkId(id);
    if (this.#prefetched.has(id)) {
      const state = this.#prefetched.get(id) ?? null;
      this.#prefetched.delete(id);
      return state;
    }
    const deadline = now() + this.#readTimeoutMs;
    let attempts = 0;
    let last: MachineMemoryError;
    for (;;) {
      attempts += 1;
      try {
        const answer = await this.#exchange("GET", "state/", id, {
          timeoutMs: Math.min(this.#timeoutMs, Math.max(1, deadline - now())),
        });
        if (answer.status === 200) {
          const state = this.#stateOf(answer);
          if (state !== undefined) {
            await this.#remember(id, state.data, state.version, canonicalJson(state.data));
            return state.data;
          }
          last = new MachineMemoryError(`The answer has no state: ${describe(answer)}.`, {
            ...answerOptions(id, answer),
            code: "unexpected_response",
          });
        } else if (answer.status === 404 && answer.code === "not_found") {
          return null;
        } else if (TRANSIENT.has(answer.status)) {
          last = new MachineMemoryError(`${describe(answer)}.`, answerOptions(id, answer));
        } else if (isRefusal(answer)) {
          // Includes a 404 without the API's error code: a wrong base URL must not look
          // like a machine without state.
          throw refusal("read", id, answer);
        } else {
          throw new ReadError(`read(${JSON.stringify(id)}) got an unexpected answer: ${describe(answer)}.`, {
            ...answerOptions(id, answer),
            code: "unexpected_response",
            attempts,
          });
        }
      } catch (error) {
        if (!(error instanceof TransportFailure)) throw error;
        last = new MachineMemoryError(error.message, { code: failureCode(error), id, cause: error });
      }
      const delay = this.#readBackoffMs * 2 ** (attempts - 1);
      if (attempts > this.#readRetries || now() + delay + MIN_ATTEMPT_MS > deadline) {
        // The last failure names the cause: its code, status and detail, and it as `cause`.
        throw new ReadError(
          `read(${JSON.stringify(id)}) failed after ${attempts} attempt${attempts === 1 ? "" : "s"}: ${last.message}`,
          { code: last.code, id, status: last.status, detail: last.detail, cause: last, attempts },
        );
      }
      await sleep(delay);
    }
  }

  /**
   * Stores `data` as the state of `id` if the stored state is still `prevData` (null: there
   * is none yet). No retries. `prevData` may be the object read() returned (even mutated
   * since), the `data` of an earlier write(), or a plain object equal to the stored state.
   * While this client holds the lock on `id`, the write is fenced (LockLostError once
   * another owner acquired it), and `prevData` null overwrites whatever is stored.
   */
  async write(id: string, data: T, prevData: T | null): Promise<void> {
    checkId(id);
    // Serialised at once: the caller may change `data` while the request is under way.
    const body = serialise(id, data);
    const content = canonicalJson(data);
    const lockToken = this.#locks.get(id);
    const known = prevData === null ? undefined : this.#known.get(prevData);
    const prevContent = prevData === null || known?.id === id ? undefined : canonicalJson(prevData);
    this.#prefetched.delete(id);

    const headers: Record<string, string> = { "Content-Type": "application/json" };
    if (lockToken !== undefined) headers["Lock-Token"] = lockToken;
    let expected: number | null = null;
    if (prevData === null) {
      // Without a lock: create only. With it: create or overwrite (Arvo's failure record),
      // fenced by the lock token.
      if (lockToken === undefined) headers["If-None-Match"] = "*";
    } else {
      expected = known?.id === id ? known.version : await this.#versionOf(id, prevContent ?? canonicalJson(prevData));
      headers["If-Match"] = `"${expected}"`;
    }

    let answer: HttpAnswer;
    try {
      answer = await this.#exchange("PUT", "state/", id, { headers, body, timeoutMs: this.#timeoutMs });
    } catch (error) {
      if (!(error instanceof TransportFailure)) throw error;
      if (!error.maybeSent) {
        throw new WriteError(`write(${JSON.stringify(id)}) could not reach the server; nothing was stored: ${error.message}`, {
          code: failureCode(error),
          id,
          cause: error,
        });
      }
      this.#forget(id);
      throw new WriteOutcomeUnknownError(
        `write(${JSON.stringify(id)}): ${error.message} The state may or may not have been stored: read it before retrying.`,
        { code: failureCode(error), id, cause: error, expectedVersion: expected },
      );
    }
    const { status } = answer;
    if (status === 200 || status === 201) {
      const version = versionField(isRecord(answer.body) ? answer.body["version"] : undefined) ?? etagVersion(answer.headers);
      if (version === undefined) this.#forget(id);
      else await this.#remember(id, data, version, content);
      return;
    }
    const options = { ...answerOptions(id, answer), expectedVersion: expected };
    const what = `write(${JSON.stringify(id)})`;
    if (status === 409 && answer.code === "lock_lost") {
      throw new LockLostError(`${what}: another owner acquired the lock since ours; nothing was stored.`, options);
    }
    if (status === 412 || status === 428) {
      const actual = etagVersion(answer.headers) ?? null;
      const stored = actual === null ? "it has no state" : `it is at version ${actual}`;
      const wanted = expected === null ? "no state" : `version ${expected}`;
      throw new WriteConflictError(`${what} expected ${wanted}, but ${stored}; nothing was stored.`, {
        ...options,
        actualVersion: actual,
      });
    }
    if (status === 503 && answer.code === "storage_unavailable") {
      throw new WriteError(`${what} failed: ${describe(answer)}; nothing was stored.`, options);
    }
    if (isRefusal(answer)) throw refusal("write", id, answer);
    // 503 write_outcome_unknown, and any other answer that does not say nothing happened
    // (a 500, or a proxy's 502 or 504, may come after the server got the request).
    this.#forget(id);
    throw new WriteOutcomeUnknownError(
      `${what} got ${describe(answer)}: the state may or may not have been stored; read it before retrying.`,
      options,
    );
  }

  /**
   * Acquires the lock on `id`: true, or false once it was refused `lockRetries` + 1 times
   * (backoff from `lockBackoffMs`, doubling, ±10 % jitter). A transient failure is retried
   * once, then LockError. The state comes along with the lock, for the next read(id).
   * Every attempt of one call sends the same random secret: when an answer is lost, the
   * retry finds the lock that request took instead of leaving it to expire.
   */
  async lock(id: string, options: LockOptions = {}): Promise<boolean> {
    checkId(id);
    const ttl = options.ttl ?? this.#lockTtl;
    const wait = options.wait ?? this.#lockWait;
    const body = JSON.stringify({
      read: true,
      secret: newSecret(),
      ...(ttl === undefined ? {} : { ttl }),
      ...(wait > 0 ? { wait } : {}),
    });
    const headers = { "Content-Type": "application/json" };
    const timeoutMs = this.#timeoutMs + wait * 1000;
    let denials = 0;
    let failures = 0;
    for (;;) {
      let failure: MachineMemoryError;
      try {
        const answer = await this.#exchange("POST", "lock/", id, { headers, body, timeoutMs });
        if (answer.status === 201 && isRecord(answer.body) && typeof answer.body["lock_token"] === "string") {
          await this.#acquired(id, answer.body["lock_token"], answer.body["state"]);
          return true;
        }
        if (answer.status === 409 && answer.code === "lock_held") {
          if (denials >= this.#lockRetries) return false;
          const delay = this.#lockBackoffMs * 2 ** denials * (0.9 + 0.2 * Math.random());
          denials += 1;
          await sleep(delay);
          continue;
        }
        if (isRefusal(answer)) throw refusal("lock", id, answer);
        failure = lockFailure("lock", id, answer);
        if (!TRANSIENT.has(answer.status)) throw failure;
      } catch (error) {
        if (!(error instanceof TransportFailure)) throw error;
        failure = lockFailure("lock", id, error);
      }
      failures += 1;
      if (failures > 1) throw failure;
      await sleep(this.#lockBackoffMs);
    }
  }

  /**
   * Releases this client's lock on `id`. True when released, when it had already expired,
   * or when this client holds none; false when another owner holds it now, or when the
   * release failed after `unlockRetries` retries (the lock then expires by its TTL). Never
   * throws for network or storage failures.
   */
  async unlock(id: string): Promise<boolean> {
    this.#prefetched.delete(id);
    const lockToken = this.#locks.get(id);
    if (lockToken === undefined) return true;
    // Forgotten whatever happens: a later write(id, x, null) must not act as the holder.
    this.#locks.delete(id);
    let last = "";
    for (let attempt = 0; attempt <= this.#unlockRetries; attempt += 1) {
      if (attempt > 0) await sleep(this.#unlockBackoffMs * 2 ** (attempt - 1));
      try {
        const answer = await this.#exchange("DELETE", "lock/", id, {
          headers: { "Lock-Token": lockToken },
          timeoutMs: this.#timeoutMs,
        });
        if (answer.status === 204) return true;
        if (answer.status === 409 && answer.code === "lock_not_held") return false;
        last = describe(answer);
        if (!TRANSIENT.has(answer.status)) break;
      } catch (error) {
        last = error instanceof Error ? error.message : String(error);
      }
    }
    this.#logger?.warn(`unlock(${JSON.stringify(id)}) failed; the lock expires by its TTL: ${last}`, { id });
    return false;
  }

  /**
   * Pushes the expiry of this client's lock on `id` to `ttl` seconds from now (default: the
   * `lockTtl` option, else the server's). False when this client holds no lock on `id`, or
   * it expired or was taken over. A transient failure is retried once, then LockError.
   */
  async extend(id: string, ttl?: number): Promise<boolean> {
    checkId(id);
    const lockToken = this.#locks.get(id);
    if (lockToken === undefined) return false;
    const seconds = ttl ?? this.#lockTtl;
    const body = JSON.stringify(seconds === undefined ? {} : { ttl: seconds });
    const headers = { "Content-Type": "application/json", "Lock-Token": lockToken };
    for (let attempt = 0; ; attempt += 1) {
      let failure: LockError;
      try {
        const answer = await this.#exchange("PATCH", "lock/", id, { headers, body, timeoutMs: this.#timeoutMs });
        if (answer.status === 204) return true;
        // Keep the token: writes stay fenced by it until unlock().
        if (answer.status === 409 && answer.code === "lock_not_held") return false;
        if (isRefusal(answer)) throw refusal("extend", id, answer);
        failure = lockFailure("extend", id, answer);
        if (!TRANSIENT.has(answer.status)) throw failure;
      } catch (error) {
        if (!(error instanceof TransportFailure)) throw error;
        failure = lockFailure("extend", id, error);
      }
      if (attempt >= 1) throw failure;
      await sleep(this.#lockBackoffMs);
    }
  }

  /** True while this client has a lock token for `id` (the lock itself may have expired). */
  holdsLock(id: string): boolean {
    return this.#locks.has(id);
  }

  /** Releases every lock this client still holds (as unlock() does) and forgets what it saw. */
  async close(): Promise<void> {
    await Promise.all([...this.#locks.keys()].map((id) => this.unlock(id)));
    this.#prefetched.clear();
    this.#seen.clear();
  }

  /** The version `prevContent` (canonical JSON) stands for on `id`: remembered, else one GET. */
  async #versionOf(id: string, prevContent: string): Promise<number> {
    const print = await fingerprint(prevContent);
    const seen = this.#seen.get(id);
    if (seen !== undefined && seen.print === print) return seen.version;
    const what = `write(${JSON.stringify(id)})`;
    let answer: HttpAnswer;
    try {
      answer = await this.#exchange("GET", "state/", id, { timeoutMs: this.#timeoutMs });
    } catch (error) {
      if (!(error instanceof TransportFailure)) throw error;
      throw new WriteError(`${what} could not read the stored state to compare prevData; nothing was stored: ${error.message}`, {
        code: failureCode(error),
        id,
        cause: error,
      });
    }
    if (answer.status === 404 && answer.code === "not_found") {
      throw new WriteConflictError(`${what}: prevData is not null, but there is no state; nothing was stored.`, {
        code: "stale_prev_data",
        id,
        actualVersion: null,
      });
    }
    const state = answer.status === 200 ? this.#stateOf(answer) : undefined;
    if (state === undefined) {
      if (isRefusal(answer)) throw refusal("write", id, answer);
      throw new WriteError(`${what} could not read the stored state to compare prevData: ${describe(answer)}; nothing was stored.`, {
        ...answerOptions(id, answer),
        ...(answer.status === 200 ? { code: "unexpected_response" } : {}),
      });
    }
    const stored = canonicalJson(state.data);
    await this.#remember(id, state.data, state.version, stored);
    if (stored !== prevContent) {
      throw new WriteConflictError(
        `${what}: prevData is not the stored state (version ${state.version}) nor one this client saw; nothing was stored.`,
        { code: "stale_prev_data", id, actualVersion: state.version },
      );
    }
    return state.version;
  }

  async #acquired(id: string, lockToken: string, state: unknown): Promise<void> {
    this.#locks.set(id, lockToken);
    this.#prefetched.delete(id);
    if (state === null) {
      this.#prefetched.set(id, null);
    } else if (isRecord(state) && isRecord(state["data"])) {
      const version = versionField(state["version"]);
      if (version !== undefined) {
        const data = state["data"] as T;
        await this.#remember(id, data, version, canonicalJson(data));
        this.#prefetched.set(id, data);
      }
    }
    // No "state" at all: a server without lock-and-read; read() will GET.
  }

  #stateOf(answer: HttpAnswer): { data: T; version: number } | undefined {
    if (!isRecord(answer.body) || !isRecord(answer.body["data"])) return undefined;
    const version = versionField(answer.body["version"]) ?? etagVersion(answer.headers);
    return version === undefined ? undefined : { data: answer.body["data"] as T, version };
  }

  async #remember(id: string, data: object, version: number, content: string): Promise<void> {
    this.#known.set(data, { id, version });
    const print = await fingerprint(content);
    const previous = this.#seen.get(id);
    if (previous !== undefined && previous.version > version) return; // a newer one landed meanwhile
    this.#seen.delete(id); // re-inserted last: the Map's order is the eviction order
    this.#seen.set(id, { version, print });
    if (this.#seen.size > this.#rememberIds) {
      const oldest = this.#seen.keys().next();
      if (oldest.done !== true) this.#seen.delete(oldest.value);
    }
  }

  #forget(id: string): void {
    this.#seen.delete(id);
  }

  async #exchange(
    method: Method,
    resource: Resource,
    id: string,
    request: { headers?: Record<string, string>; body?: string; timeoutMs: number },
  ): Promise<HttpAnswer> {
    const url = new URL(resource, this.#base);
    url.search = new URLSearchParams({ id }).toString();
    const extra = typeof this.#headers === "function" ? await this.#headers() : this.#headers;
    const headers: Record<string, string> = {
      Accept: "application/json",
      ...(this.#token === undefined ? {} : { Authorization: `Token ${this.#token}` }),
      ...extra,
      ...request.headers,
    };
    return exchange({ fetch: this.#fetch, url: url.href, method, headers, body: request.body, timeoutMs: request.timeoutMs });
  }
}

/** 256 random bits, base64url: the secret half of a lock token, made by this client. */
function newSecret(): string {
  const bytes = globalThis.crypto.getRandomValues(new Uint8Array(32));
  return btoa(String.fromCharCode(...bytes)).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

function checkId(id: unknown): asserts id is string {
  // Length, NUL and emptiness are the server's to judge (400 invalid_id); a lone surrogate
  // cannot be sent at all.
  if (typeof id !== "string" || LONE_SURROGATE.test(id)) {
    throw new RequestError(`Invalid machine id ${JSON.stringify(id)}: ids are strings of whole Unicode characters.`, {
      code: "invalid_id",
      id: typeof id === "string" ? id : undefined,
    });
  }
}

function serialise(id: string, data: unknown): string {
  let body: string | undefined;
  try {
    body = JSON.stringify({ data });
  } catch (error) {
    // A cycle or a BigInt: nothing the server could store.
    throw new RequestError(`write(${JSON.stringify(id)}): data is not JSON: ${String(error)}`, {
      code: "invalid_state",
      id,
      cause: error,
    });
  }
  if (!isRecord(data)) {
    throw new RequestError(`write(${JSON.stringify(id)}): data must be an object.`, { code: "invalid_state", id });
  }
  return body;
}

/**
 * One HTTP exchange with the API: a request with a timeout, its JSON answer, and a
 * transport failure classified by whether the request can have reached the server.
 */

/** The part of WHATWG fetch that the client uses; Node's global fetch fits, and so do wrappers. */
export type FetchLike = (url: string, init: RequestInit) => Promise<Response>;

export interface HttpAnswer {
  status: number;
  headers: Headers;
  /** The parsed JSON body; undefined when empty, not JSON, or lost with the connection. */
  body: unknown;
  /** The server's error code (`{"code": ...}`), when the body had one. */
  code: string | undefined;
  /** The server's error detail, when the body had one. */
  detail: string | undefined;
}

/**
 * The request got no answer. `maybeSent` is false only when the connection was never
 * established (refused, unresolvable), so the server cannot have seen the request.
 */
export class TransportFailure extends Error {
  readonly timedOut: boolean;
  readonly maybeSent: boolean;

  constructor(message: string, options: { timedOut: boolean; maybeSent: boolean; cause: unknown }) {
    super(message, { cause: options.cause });
    this.name = "TransportFailure";
    this.timedOut = options.timedOut;
    this.maybeSent = options.maybeSent;
  }
}

// Errors raised while connecting, before a byte of the request can have left: Node's
// system errors (https://nodejs.org/api/errors.html#common-system-errors) and undici's
// connect timeout.
const NOT_SENT = new Set([
  "ECONNREFUSED",
  "ENOTFOUND",
  "EAI_AGAIN",
  "EHOSTUNREACH",
  "ENETUNREACH",
  "EADDRNOTAVAIL",
  "UND_ERR_CONNECT_TIMEOUT",
]);

function errorCodes(error: unknown, seen = new Set<unknown>()): string[] {
  if (error === null || typeof error !== "object" || seen.has(error)) return [];
  seen.add(error);
  const codes: string[] = [];
  const { code, cause, errors } = error as { code?: unknown; cause?: unknown; errors?: unknown };
  if (typeof code === "string") codes.push(code);
  codes.push(...errorCodes(cause, seen));
  if (Array.isArray(errors)) for (const inner of errors) codes.push(...errorCodes(inner, seen));
  return codes;
}

/** The messages down an error's `cause` chain ("fetch failed: bad port"). */
function messages(error: unknown): string[] {
  const found: string[] = [];
  for (let current = error; current !== undefined && found.length < 5; ) {
    found.push(current instanceof Error ? current.message : String(current));
    current = current instanceof Error ? current.cause : undefined;
  }
  return found;
}

function isTimeout(error: unknown): boolean {
  return error instanceof Error && (error.name === "TimeoutError" || error.name === "AbortError");
}

export function classifyFailure(error: unknown, timeoutMs: number): TransportFailure {
  if (isTimeout(error)) {
    return new TransportFailure(`No answer within ${timeoutMs} ms.`, {
      timedOut: true,
      maybeSent: true,
      cause: error,
    });
  }
  const codes = errorCodes(error);
  const maybeSent = codes.length === 0 || !codes.every((code) => NOT_SENT.has(code));
  const reason = codes.length > 0 ? codes.join(", ") : messages(error).join(": ");
  return new TransportFailure(`The request failed without an answer (${reason}).`, {
    timedOut: false,
    maybeSent,
    cause: error,
  });
}

function errorField(body: unknown, name: "code" | "detail"): string | undefined {
  if (body === null || typeof body !== "object") return undefined;
  const value = (body as Record<string, unknown>)[name];
  return typeof value === "string" ? value : undefined;
}

export interface Exchange {
  fetch: FetchLike;
  url: string;
  method: string;
  headers: Record<string, string>;
  body?: string | undefined;
  timeoutMs: number;
}

/** Sends one request; resolves with any HTTP answer, rejects only with a TransportFailure. */
export async function exchange(request: Exchange): Promise<HttpAnswer> {
  const signal = AbortSignal.timeout(Math.max(1, Math.ceil(request.timeoutMs)));
  let response: Response;
  try {
    response = await request.fetch(request.url, {
      method: request.method,
      headers: request.headers,
      ...(request.body === undefined ? {} : { body: request.body }),
      signal,
      // A redirect means a wrong base URL (or an APPEND_SLASH rewrite): report it, never follow
      // it with a changed method or body.
      redirect: "manual",
    });
  } catch (error) {
    throw classifyFailure(error, request.timeoutMs);
  }
  let body: unknown;
  try {
    const text = await response.text();
    body = text === "" ? undefined : (JSON.parse(text) as unknown);
  } catch {
    // Not JSON (a proxy's error page), or the connection died after the status line: the
    // status and headers still say what happened.
    body = undefined;
  }
  return {
    status: response.status,
    headers: response.headers,
    body,
    code: errorField(body, "code"),
    detail: errorField(body, "detail"),
  };
}

/** The version in an `ETag: "<version>"` header; undefined when absent or not a version. */
export function etagVersion(headers: Headers): number | undefined {
  const match = /^"([1-9][0-9]{0,18})"$/.exec(headers.get("ETag")?.trim() ?? "");
  if (match === null) return undefined;
  const version = Number(match[1]);
  return Number.isSafeInteger(version) ? version : undefined;
}

/**
 * Errors of the client. Branch on the class (`instanceof`) for what happened and on `code`
 * for why; `status` is the HTTP status when the server answered.
 *
 *   MachineMemoryError
 *   ├── RequestError               the request itself was refused (bad id or state, auth): nothing happened
 *   ├── ReadError                  read() failed after its retries
 *   ├── WriteError                 nothing was stored
 *   │   └── WriteConflictError     compare-and-set lost (expectedVersion, actualVersion)
 *   │       └── LockLostError      another owner acquired our lock since (fencing)
 *   ├── WriteOutcomeUnknownError   the write may or may not have been stored: read before retrying
 *   └── LockError                  acquiring or extending the lock failed (not a denial)
 */

/** Codes the server answers with (`{"code": ..., "detail": ...}`). */
export type ServerErrorCode =
  | "invalid_id"
  | "invalid_state"
  | "invalid_request"
  | "invalid_precondition"
  | "invalid_lock_token"
  | "lock_token_required"
  | "parse_error"
  | "not_authenticated"
  | "authentication_failed"
  | "permission_denied"
  | "not_found"
  | "method_not_allowed"
  | "not_acceptable"
  | "unsupported_media_type"
  | "lock_held"
  | "lock_not_held"
  | "lock_lost"
  | "precondition_failed"
  | "precondition_required"
  | "throttled"
  | "not_supported"
  | "storage_unavailable"
  | "write_outcome_unknown";

/** Codes the client sets itself, when there is no answer from the server to name the cause. */
export type ClientErrorCode =
  /** No response: connection refused or reset, name resolution failed. */
  | "network_error"
  /** No response within `timeoutMs` (or within `readTimeoutMs` for a whole read). */
  | "timeout"
  /** A status or body that this client does not expect (a proxy's error page, a wrong base URL). */
  | "unexpected_response"
  /** write(): `prevData` is neither a state this client saw nor equal to the stored one. */
  | "stale_prev_data";

export type KnownErrorCode = ServerErrorCode | ClientErrorCode;
/** Any known code, or a code that a newer server introduced (kept as the server sent it). */
export type ErrorCode = KnownErrorCode | (string & {});

export interface MachineMemoryErrorOptions {
  code: ErrorCode;
  id?: string | undefined;
  status?: number | undefined;
  detail?: string | undefined;
  cause?: unknown;
}

export class MachineMemoryError extends Error {
  /** Why: the server's `code`, or one of {@link ClientErrorCode}. */
  readonly code: ErrorCode;
  /** The HTTP status, when the server answered. */
  readonly status: number | undefined;
  /** The machine id the operation was about. */
  readonly id: string | undefined;
  /** The server's `detail` text, when it sent one. */
  readonly detail: string | undefined;

  constructor(message: string, options: MachineMemoryErrorOptions) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = "MachineMemoryError";
    this.code = options.code;
    this.status = options.status;
    this.id = options.id;
    this.detail = options.detail;
  }
}

/** The server refused the request itself (400, 401, 403, ...): retrying it unchanged will not help. */
export class RequestError extends MachineMemoryError {
  constructor(message: string, options: MachineMemoryErrorOptions) {
    super(message, options);
    this.name = "RequestError";
  }
}

/** read() failed after its retries; `cause` is the last failure. */
export class ReadError extends MachineMemoryError {
  /** How many requests were made. */
  readonly attempts: number;

  constructor(message: string, options: MachineMemoryErrorOptions & { attempts: number }) {
    super(message, options);
    this.name = "ReadError";
    this.attempts = options.attempts;
  }
}

/** write() failed and nothing was stored. */
export class WriteError extends MachineMemoryError {
  constructor(message: string, options: MachineMemoryErrorOptions) {
    super(message, options);
    this.name = "WriteError";
  }
}

export interface WriteConflictErrorOptions extends MachineMemoryErrorOptions {
  expectedVersion?: number | null | undefined;
  actualVersion?: number | null | undefined;
}

/**
 * Compare-and-set lost: the stored state is not the one `prevData` stands for (or, for a
 * create, a state exists already). Nothing was stored.
 */
export class WriteConflictError extends WriteError {
  /** The version the write was based on; null for a create; undefined when not known. */
  readonly expectedVersion: number | null | undefined;
  /** The stored version; null when there is no state; undefined when the server did not say. */
  readonly actualVersion: number | null | undefined;

  constructor(message: string, options: WriteConflictErrorOptions) {
    super(message, options);
    this.name = "WriteConflictError";
    this.expectedVersion = options.expectedVersion;
    this.actualVersion = options.actualVersion;
  }
}

/** Another owner acquired the lock on the id since ours was taken (it expired): nothing stored. */
export class LockLostError extends WriteConflictError {
  constructor(message: string, options: WriteConflictErrorOptions) {
    super(message, options);
    this.name = "LockLostError";
  }
}

/**
 * The write may or may not have been stored: the connection failed or timed out after the
 * request was sent, or the server could not settle it (503 `write_outcome_unknown`). Not a
 * {@link WriteError}: read the state before retrying.
 */
export class WriteOutcomeUnknownError extends MachineMemoryError {
  /** The version the write was based on; null for a create or an unconditional overwrite. */
  readonly expectedVersion: number | null;

  constructor(message: string, options: MachineMemoryErrorOptions & { expectedVersion: number | null }) {
    super(message, options);
    this.name = "WriteOutcomeUnknownError";
    this.expectedVersion = options.expectedVersion;
  }
}

/** Acquiring or extending a lock failed (storage or network), as opposed to being denied. */
export class LockError extends MachineMemoryError {
  constructor(message: string, options: MachineMemoryErrorOptions) {
    super(message, options);
    this.name = "LockError";
  }
}

export function isMachineMemoryError(error: unknown): error is MachineMemoryError {
  return error instanceof MachineMemoryError;
}

/** True when `error` is one of this client's errors with the given code. */
export function hasErrorCode<C extends ErrorCode>(
  error: unknown,
  code: C,
): error is MachineMemoryError & { readonly code: C } {
  return error instanceof MachineMemoryError && error.code === code;
}

export { HttpMachineMemory } from "./client.js";
export type { HttpMachineMemoryOptions, LockOptions, Logger } from "./client.js";
export type { IMachineMemory } from "./interface.js";
export type { FetchLike } from "./http.js";
export { canonicalJson } from "./canonical.js";
export {
  MachineMemoryError,
  RequestError,
  ReadError,
  WriteError,
  WriteConflictError,
  LockLostError,
  WriteOutcomeUnknownError,
  LockError,
  isMachineMemoryError,
  hasErrorCode,
} from "./errors.js";
export type {
  ErrorCode,
  KnownErrorCode,
  ServerErrorCode,
  ClientErrorCode,
  MachineMemoryErrorOptions,
  WriteConflictErrorOptions,
} from "./errors.js";

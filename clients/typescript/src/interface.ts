/**
 * Arvo's machine memory contract (arvo-event-handler 3.x, `IMachineMemory`), declared here
 * with the same shape so that this package needs no Arvo dependency: TypeScript compares
 * interfaces structurally, so an `HttpMachineMemory` is accepted wherever Arvo asks for an
 * `IMachineMemory<T>`.
 */
export interface IMachineMemory<T extends Record<string, any>> {
  /** The state of a machine, or null when it has none yet. Retries transient failures briefly. */
  read(id: string): Promise<T | null>;
  /** Saves the state of a machine. Fails fast: no retries. */
  write(id: string, data: T, prevData: T | null): Promise<void>;
  /** Acquires the execution lock of a machine: false when another owner keeps holding it. */
  lock(id: string): Promise<boolean>;
  /** Releases the execution lock of a machine. Tolerant: never throws for transient failures. */
  unlock(id: string): Promise<boolean>;
}

"""Exceptions raised by the machine memory.

Every error raised by ``read``, ``write`` and ``lock`` means that nothing was changed in
storage (the Arvo orchestrator redelivers the event later), with one deliberate exception:
``WriteOutcomeUnknown``. See docs/contract.md#exceptions.
"""

from __future__ import annotations


class MachineMemoryError(Exception):
    """Base class of every error this app raises."""


class InvalidMachineId(MachineMemoryError, ValueError):
    """The machine id is not a non-empty ``str`` of at most 512 characters without NUL."""


class InvalidState(MachineMemoryError, ValueError):
    """The state (or its metadata) is not a strict JSON object this memory can store."""


class ReadError(MachineMemoryError):
    """``read`` failed after its retries; the cause is chained."""


class WriteError(MachineMemoryError):
    """``write`` stored nothing."""


class WriteConflict(WriteError):
    """The stored state is not the one ``prev_data`` was read from (compare-and-set lost)."""

    def __init__(
        self,
        machine_id: str,
        expected_version: int | None,
        actual_version: int | None,
        message: str | None = None,
    ) -> None:
        self.id = machine_id
        self.expected_version = expected_version
        self.actual_version = actual_version
        if message is None:
            message = (
                f"Machine {machine_id!r}: expected stored version {expected_version}, "
                f"found {actual_version}. Read the state again and retry the event."
            )
        super().__init__(message)


class LockLost(WriteConflict):
    """This instance's lock on the id was taken over by another owner since it was acquired."""


class WriteOutcomeUnknown(MachineMemoryError):
    """The connection died mid-write and the outcome could not be settled afterwards.

    Deliberately not a ``WriteError``: the write may have been stored. Read the state again
    before deciding what to do (docs/contract.md#write).
    """

    def __init__(self, machine_id: str, message: str) -> None:
        self.id = machine_id
        super().__init__(message)


class LockError(MachineMemoryError):
    """The lock storage failed (distinct from a denial, which is ``lock() -> False``)."""


class LockNotAcquired(MachineMemoryError):
    """Raised by ``locked()`` / ``alocked()`` when the lock is held by another owner."""

    def __init__(self, machine_id: str) -> None:
        self.id = machine_id
        super().__init__(
            f"Machine {machine_id!r} is locked by another owner; retry the event later."
        )

"""Django signals sent by ``MachineMemory`` (docs/telemetry.md#signals).

Every signal is sent with ``sender`` the ``MachineMemory`` subclass and these arguments
(besides ``signal`` and ``sender``): ``memory`` (the instance), ``machine_id``, and those
listed beside each signal. They are sent after the operation finished (inside the caller's
transaction, before it commits: use ``transaction.on_commit`` in a receiver that must only
see committed changes), with ``send_robust``: a receiver that raises is logged and cannot
turn a stored write into an error.
"""

from __future__ import annotations

from typing import Any

from django.dispatch import Signal

# Whether any of these signals has a receiver: asked before every operation, so kept up to
# date by connect and disconnect rather than looked up in eight receiver lists each time.
listened = False


class MemorySignal(Signal):
    """A signal that keeps ``listened`` true while it has receivers."""

    def connect(self, *args: Any, **kwargs: Any) -> None:
        super().connect(*args, **kwargs)
        _recount()

    def disconnect(self, *args: Any, **kwargs: Any) -> bool:
        disconnected = super().disconnect(*args, **kwargs)
        _recount()
        return disconnected


def _recount() -> None:
    global listened
    listened = any(signal.receivers for signal in ALL)


# lock(), lock_and_read(), session(): token, ttl (seconds), attempts.
lock_acquired = MemorySignal()
# Denied after the retries: attempts.
lock_denied = MemorySignal()
# unlock() that released this instance's lock, a session's write that released it, or an
# operator's force_unlock() (forced=True): token (None when unknown), forced.
lock_released = MemorySignal()
# This instance's lock was taken over: a fenced write or delete refused (LockLost), or an
# extend() that found the lock gone: token, operation.
lock_lost = MemorySignal()
# write(), overwrite(), a session's write: version (the new one), bytes (the stored
# document's size), token (None without a lock), operation.
state_written = MemorySignal()
# delete() and cleanup(): version (the deleted one, None when there was nothing to delete).
state_deleted = MemorySignal()
# A compare-and-set lost (WriteConflict, not LockLost): expected_version, actual_version,
# operation.
write_conflict = MemorySignal()
# A write or delete failed in storage: error (WriteError: nothing stored, or
# WriteOutcomeUnknown: read before retrying), operation.
write_failed = MemorySignal()

ALL: tuple[MemorySignal, ...] = (
    lock_acquired,
    lock_denied,
    lock_released,
    lock_lost,
    state_written,
    state_deleted,
    write_conflict,
    write_failed,
)

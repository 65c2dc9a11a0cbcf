"""The small interface every lock backend implements, and the lock concepts it hands out.

A backend makes one attempt per call and raises its storage's own errors (``errors``);
retries, backoff and the mapping to ``LockError`` live in ``MachineMemory``, so every
backend gets the same contract (docs/contract.md#lock, docs/design.md#lock-backends).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    import datetime

    from django.core.checks import CheckMessage


@dataclass(frozen=True, slots=True)
class LockInfo:
    """A live lock, as the lock storage sees it (times by the storage's clock)."""

    owner: str
    token: int
    acquired_at: datetime.datetime
    expires_at: datetime.datetime


@dataclass(frozen=True, slots=True)
class Fence:
    """What a state write by a lock holder must still find true, in its own statement.

    ``lock_token``: the lock row of the id, in the state's own storage, still carries this
    token (locks kept beside the states: ``LockBackend.fences_in_store``).
    ``fence_token``: no higher fencing token has written the state row; the row then
    records this token (locks kept elsewhere, such as Redis).
    """

    lock_token: int | None = None
    fence_token: int | None = None


NO_FENCE = Fence()


class LockBackend(ABC):
    # Errors of the lock storage; MachineMemory maps them to LockError / False.
    errors: ClassVar[tuple[type[BaseException], ...]] = ()
    # The subset worth a retry on a fresh connection (lost connection, timeout, deadlock).
    transient_errors: ClassVar[tuple[type[BaseException], ...]] = ()
    # Capabilities that the admin, the API and the commands ask for instead of the class:
    # whether every live lock can be listed (MachineLock rows), and force_release().
    supports_listing: ClassVar[bool] = False
    supports_force_release: ClassVar[bool] = False
    # Whether fence() returns Fence(lock_token=...), which the state store checks against
    # lock rows in its own storage: the store must then share that storage.
    fences_in_store: ClassVar[bool] = False

    def __init__(self, *, database: str | None) -> None:
        self.database = database

    @classmethod
    def check(cls, database: str) -> list[CheckMessage]:
        """System-check messages about this backend's configuration."""
        return []

    @abstractmethod
    def acquire(self, machine_id: str, owner: str, ttl: float) -> int | None:
        """Take the lock if no live lock exists; return the fencing token, or None."""

    @abstractmethod
    def release(self, machine_id: str, owner: str) -> bool:
        """Release ``owner``'s lock. True if released or no live lock; False if another owns it."""

    @abstractmethod
    def extend(self, machine_id: str, owner: str, token: int, ttl: float) -> bool:
        """Push the expiry of ``owner``'s live lock with ``token``; False if it is lost."""

    @abstractmethod
    def info(self, machine_id: str) -> LockInfo | None:
        """The live lock on ``machine_id``, or None."""

    @abstractmethod
    def fence(self, machine_id: str, owner: str, token: int) -> Fence:
        """The condition a state write by the holder of ``token`` must meet.

        May raise ``LockLost`` straight away when the backend can tell the lock is gone.
        """

    @abstractmethod
    def is_lost(self, machine_id: str, owner: str, token: int) -> bool:
        """After a rejected write: has the lock with ``token`` been taken over (or purged)?"""

    def force_release(self, machine_id: str) -> LockInfo | None:
        """Expire the live lock on ``machine_id`` whoever holds it; return it, or None.

        For operators (the admin, ``machine_memory_release``), never for workers. The
        returned ``LockInfo`` is the lock as it was, with ``expires_at`` the moment of the
        release. Not abstract, so that third-party backends keep working without it.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot force-release locks.")

    def recover(self) -> None:
        """Drop a connection that failed with a transient error, so the next call reconnects."""

    def end_lost_session(self) -> bool:
        """After a transient failure: make sure the failed call cannot still take effect.

        Reconnects, and where the storage may still be running the failed statement on a
        session of its own (a database server), ends that session and waits until it is
        gone. True when nothing can still change; False when that could not be confirmed.
        """
        self.recover()
        return True

    def close(self) -> None:
        """Release connections this backend opened for itself."""

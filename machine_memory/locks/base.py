"""The small interface every lock backend implements.

A backend makes one attempt per call and raises its storage's own errors (listed in
``errors``); retries, backoff and the mapping to ``LockError`` live in ``MachineMemory``,
so every backend gets the same contract.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    import datetime

    from django.core.checks import CheckMessage

    from machine_memory.sql.base import Fence


@dataclass(frozen=True, slots=True)
class LockInfo:
    """A live lock, as the lock storage sees it (times by the storage's clock)."""

    owner: str
    token: int
    acquired_at: datetime.datetime
    expires_at: datetime.datetime


class LockBackend(ABC):
    # Errors of the lock storage; MachineMemory maps them to LockError / False.
    errors: ClassVar[tuple[type[BaseException], ...]] = ()
    # The subset worth a retry on a fresh connection (lost connection, timeout, deadlock).
    transient_errors: ClassVar[tuple[type[BaseException], ...]] = ()

    def __init__(self, *, database: str) -> None:
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

    def close(self) -> None:
        """Release connections this backend opened for itself."""

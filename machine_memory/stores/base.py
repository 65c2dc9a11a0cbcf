"""The small interface a state store implements for ``MachineMemory``.

A store makes one attempt per call and raises its storage's own errors (``errors``);
validation, versions, retries and what an error means live in ``MachineMemory``
(docs/design.md#state-stores).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

if TYPE_CHECKING:
    from collections.abc import Callable
    from contextlib import AbstractContextManager

    from machine_memory.locks.base import Fence, LockBackend, LockInfo
    from machine_memory.validation import Metadata


class NothingSent(Exception):
    """A write failed before anything reached the storage (it could not even connect).

    Raised by ``insert``/``update``/``delete`` with the storage's error as ``__cause__``,
    so that ``MachineMemory`` can say "nothing was stored" without asking the storage.
    """


class Stored(NamedTuple):
    """A state as stored: the document (JSON text, or decoded by the driver), its version
    and its metadata columns."""

    document: Any
    version: int
    meta: Metadata


class Taken(NamedTuple):
    """A lock just acquired together with the state read under it."""

    token: int
    stored: Stored | None
    # The lock as LockInfo, converted from the driver's values only if asked for.
    lock_info: Callable[[], LockInfo]


class StateStore(ABC):
    # Errors of the storage (mapped to ReadError / WriteError), and the subset worth a
    # retry on a fresh connection (lost connection, timeout, deadlock).
    errors: ClassVar[tuple[type[BaseException], ...]] = ()
    transient_errors: ClassVar[tuple[type[BaseException], ...]] = ()
    # The database alias the states live in, for the ORM-based tools (admin, API,
    # commands); None for a store outside Django's databases.
    using: str | None = None
    # Whether a statement that raised is known to have changed nothing, with nothing of it
    # still running anywhere (an in-process database): no outcome to settle then.
    failures_are_final: bool = False
    # Whether acquire_and_load() and write_and_release() serve lock backends that keep
    # their lock rows in this store (LockBackend.fences_in_store).
    combines_lock_statements: bool = False

    @abstractmethod
    def load(self, machine_id: str) -> Stored | None: ...

    @abstractmethod
    def insert(self, machine_id: str, text: str, meta: Metadata, fence: Fence) -> bool:
        """Create the state unless one exists; False (nothing written) otherwise."""

    @abstractmethod
    def update(
        self, machine_id: str, text: str, expected_version: int, meta: Metadata | None, fence: Fence
    ) -> bool:
        """Compare-and-set against ``expected_version``; ``meta`` None leaves it as stored."""

    @abstractmethod
    def delete(self, machine_id: str, expected_version: int, fence: Fence) -> bool:
        """Delete the state if it still has ``expected_version``."""

    @abstractmethod
    def row_locked(self, machine_id: str) -> AbstractContextManager[int | None]:
        """A transaction holding the state row against other writers; yields its version.

        For read-then-change outside the hot path (overwrite, delete whatever version):
        ``update``/``delete`` inside the block cannot lose to another writer. None: no row.
        """

    def acquire_and_load(self, machine_id: str, owner: str, ttl: float) -> Taken | None:
        """Take the lock (as the lock backend's ``acquire``) and load the state, in one
        round trip and one commit; None when another owner's lock is live."""
        raise NotImplementedError

    def write_and_release(
        self,
        machine_id: str,
        text: str,
        expected_version: int | None,
        meta: Metadata | None,
        token: int,
    ) -> tuple[bool, bool]:
        """``insert`` (``expected_version`` None) or ``update``, fenced by lock ``token``,
        and the release of that lock only if the write landed, in one round trip and one
        commit: (written, released). Raises ``NothingSent`` like ``insert``."""
        raise NotImplementedError

    def in_transaction(self) -> bool:
        """True while the caller's own transaction is open: no reconnecting then."""
        return False

    def recover(self) -> None:
        """Drop a connection that failed with a transient error, so the next call reconnects."""

    def end_lost_session(self) -> bool:
        """After a write's connection failed: make sure that write cannot still take effect.

        Reconnects and, where a server may still be running the failed statement on the
        dead connection's session, ends that session and waits until it is gone. True
        when nothing can change any more; False when that could not be confirmed.
        Raises ``errors`` when the storage cannot be reached to find out.
        """
        self.recover()
        return True

    def shares_locks_with(self, locks: LockBackend) -> bool:
        """Whether ``locks`` keeps its lock rows in this store (for ``Fence.lock_token``)."""
        return False

    def close(self) -> None:
        """Release connections this store opened for itself."""

"""States in process memory, for tests: the store half of ``testing.SimpleMachineMemory``.

``SimpleStore`` is the shared "database" of a group of memories: its states, and the lock
rows that ``locks.memory.InMemoryLockBackend`` keeps beside them.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from machine_memory.stores.base import StateStore, Stored

if TYPE_CHECKING:
    import datetime
    from collections.abc import Iterator

    from machine_memory.locks.base import Fence, LockBackend
    from machine_memory.validation import Metadata


@dataclass
class LockRow:
    owner: str
    token: int
    acquired_at: datetime.datetime
    expires: float  # time.monotonic() deadline: the wall clock plays no part in decisions

    def live(self) -> bool:
        return self.expires > time.monotonic()


@dataclass
class SimpleStore:
    """The shared storage of a group of in-memory memories (like one database)."""

    states: dict[str, Stored] = field(default_factory=dict)
    locks: dict[str, LockRow] = field(default_factory=dict)
    last_token: int = 0
    # Reentrant: row_locked() holds it around update()/delete().
    mutex: threading.RLock = field(default_factory=threading.RLock)

    def fenced_out(self, machine_id: str, fence: Fence) -> bool:
        """Whether ``fence`` refuses a write now (the caller holds ``mutex``)."""
        if fence.lock_token is None:
            return False
        row = self.locks.get(machine_id)
        return row is None or row.token != fence.lock_token


class InMemoryStateStore(StateStore):
    def __init__(self, shared: SimpleStore | None = None) -> None:
        self.shared = SimpleStore() if shared is None else shared

    def load(self, machine_id: str) -> Stored | None:
        with self.shared.mutex:
            return self.shared.states.get(machine_id)

    def insert(self, machine_id: str, text: str, meta: Metadata, fence: Fence) -> bool:
        shared = self.shared
        with shared.mutex:
            if machine_id in shared.states or shared.fenced_out(machine_id, fence):
                return False
            shared.states[machine_id] = Stored(text, 1, meta)
            return True

    def update(
        self, machine_id: str, text: str, expected_version: int, meta: Metadata | None, fence: Fence
    ) -> bool:
        shared = self.shared
        with shared.mutex:
            row = shared.states.get(machine_id)
            if row is None or row.version != expected_version:
                return False
            if shared.fenced_out(machine_id, fence):
                return False
            shared.states[machine_id] = Stored(text, expected_version + 1, meta or row.meta)
            return True

    def delete(self, machine_id: str, expected_version: int, fence: Fence) -> bool:
        shared = self.shared
        with shared.mutex:
            row = shared.states.get(machine_id)
            if row is None or row.version != expected_version:
                return False
            if shared.fenced_out(machine_id, fence):
                return False
            del shared.states[machine_id]
            return True

    @contextmanager
    def row_locked(self, machine_id: str) -> Iterator[int | None]:
        with self.shared.mutex:
            row = self.shared.states.get(machine_id)
            yield None if row is None else row.version

    def shares_locks_with(self, locks: LockBackend) -> bool:
        from machine_memory.locks.memory import InMemoryLockBackend

        return isinstance(locks, InMemoryLockBackend) and locks.shared is self.shared

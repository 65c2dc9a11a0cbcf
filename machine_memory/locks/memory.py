"""Locks in process memory, beside the states of a ``stores.memory.SimpleStore``.

The lock half of ``testing.SimpleMachineMemory``. Expiry follows ``time.monotonic()``;
fencing is decided inside the state store's write, as with database locks.
"""

from __future__ import annotations

import datetime
import time
from typing import TYPE_CHECKING, ClassVar

from machine_memory.locks.base import Fence, LockBackend, LockInfo

if TYPE_CHECKING:
    from machine_memory.stores.memory import LockRow, SimpleStore


class InMemoryLockBackend(LockBackend):
    supports_force_release: ClassVar[bool] = True
    fences_in_store: ClassVar[bool] = True

    def __init__(self, *, database: str | None = None, shared: SimpleStore | None = None) -> None:
        from machine_memory.stores.memory import SimpleStore

        super().__init__(database=database)
        self.shared = SimpleStore() if shared is None else shared

    def _live(self, machine_id: str) -> LockRow | None:
        row = self.shared.locks.get(machine_id)
        return row if row is not None and row.live() else None

    def acquire(self, machine_id: str, owner: str, ttl: float) -> int | None:
        from machine_memory.stores.memory import LockRow

        shared = self.shared
        with shared.mutex:
            if self._live(machine_id) is not None:
                return None
            shared.last_token += 1
            shared.locks[machine_id] = LockRow(
                owner, shared.last_token, _now(), time.monotonic() + ttl
            )
            return shared.last_token

    def release(self, machine_id: str, owner: str) -> bool:
        with self.shared.mutex:
            row = self._live(machine_id)
            if row is None:
                return True
            if row.owner != owner:
                return False
            row.expires = time.monotonic()  # the row stays, as in the database
            return True

    def extend(self, machine_id: str, owner: str, token: int, ttl: float) -> bool:
        with self.shared.mutex:
            row = self._live(machine_id)
            if row is None or row.owner != owner or row.token != token:
                return False
            row.expires = time.monotonic() + ttl
            return True

    def info(self, machine_id: str) -> LockInfo | None:
        with self.shared.mutex:
            row = self._live(machine_id)
            if row is None:
                return None
            left = datetime.timedelta(seconds=row.expires - time.monotonic())
            return LockInfo(row.owner, row.token, row.acquired_at, _now() + left)

    def force_release(self, machine_id: str) -> LockInfo | None:
        with self.shared.mutex:
            row = self._live(machine_id)
            if row is None:
                return None
            row.expires = time.monotonic()
            return LockInfo(row.owner, row.token, row.acquired_at, _now())

    def fence(self, machine_id: str, owner: str, token: int) -> Fence:
        return Fence(lock_token=token)

    def is_lost(self, machine_id: str, owner: str, token: int) -> bool:
        with self.shared.mutex:
            row = self.shared.locks.get(machine_id)
            return row is None or row.token != token


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)

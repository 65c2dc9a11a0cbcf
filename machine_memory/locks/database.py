"""Locks in the ``machine_memory_lock`` table of the state's own database.

Expiry is judged by the database clock. Fencing is decided inside the state write itself:
the UPDATE only matches while the lock row still carries this holder's token.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, ClassVar

from django.db import DatabaseError, InterfaceError, OperationalError, connections

from machine_memory.connection import cursor_for, in_callers_transaction, own_connection
from machine_memory.exceptions import MachineMemoryError
from machine_memory.locks.base import Fence, LockBackend, LockInfo
from machine_memory.sql import dialect_for

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper


class DatabaseLockBackend(LockBackend):
    errors: ClassVar[tuple[type[BaseException], ...]] = (DatabaseError,)
    transient_errors: ClassVar[tuple[type[BaseException], ...]] = (
        OperationalError,
        InterfaceError,
    )
    supports_listing: ClassVar[bool] = True
    supports_force_release: ClassVar[bool] = True
    fences_in_store: ClassVar[bool] = True

    def __init__(self, *, database: str | None) -> None:
        if database is None:
            raise MachineMemoryError(
                "Database locks live beside the states in a database; this memory's states "
                "are not in one. Pass a lock backend of the same storage."
            )
        super().__init__(database=database)
        self.alias = database
        self.dialect = dialect_for(connections[database])
        # Per thread, like Django's own connections: a second connection used only while the
        # caller's connection is inside a transaction of the caller's (connection()).
        self._local = threading.local()

    def connection(self) -> BaseDatabaseWrapper:
        """The connection lock statements run on, so they commit at once.

        Outside a transaction that is the alias's own connection (autocommit). Inside a
        transaction of the caller's (an atomic() block, or autocommit turned off) a lock
        must not wait for, or vanish with, the caller's commit, so it gets a connection of
        its own.
        """
        connection = connections[self.alias]
        if not in_callers_transaction(connection):
            return connection
        if not self.dialect.side_connection_ok:
            raise MachineMemoryError(
                f"lock(), unlock() and extend() cannot run inside transaction.atomic() (or "
                f"with autocommit off) on {connection.vendor} database {self.alias!r}: the "
                "lock would commit with your transaction. Take the lock before entering "
                "atomic() and release it after the block."
            )
        side: BaseDatabaseWrapper | None = getattr(self._local, "connection", None)
        if side is None:
            side = own_connection(connection)
            self._local.connection = side
        return side

    def acquire(self, machine_id: str, owner: str, ttl: float) -> int | None:
        connection = self.connection()
        with self.dialect.errors(connection):
            return self.dialect.acquire(cursor_for(connection), machine_id, owner, ttl)

    def release(self, machine_id: str, owner: str) -> bool:
        connection = self.connection()
        with self.dialect.errors(connection):
            cursor = cursor_for(connection)
            if self.dialect.release(cursor, machine_id, owner):
                return True
            # Nothing of ours was live: fine unless someone else holds it now.
            return self.dialect.live_lock(cursor, machine_id) is None

    def force_release(self, machine_id: str) -> LockInfo | None:
        connection = self.connection()
        with self.dialect.errors(connection):
            row = self.dialect.force_release(cursor_for(connection), machine_id)
        return None if row is None else lock_info(connection, row)

    def extend(self, machine_id: str, owner: str, token: int, ttl: float) -> bool:
        connection = self.connection()
        with self.dialect.errors(connection):
            return self.dialect.extend(cursor_for(connection), machine_id, owner, token, ttl)

    def info(self, machine_id: str) -> LockInfo | None:
        # On the driver's cursor, like the hot path: an ORM query would cost ten times the
        # round trip, and the REST API reads the lock it has just acquired.
        connection = connections[self.alias]
        with self.dialect.errors(connection):
            row = self.dialect.live_lock(cursor_for(connection), machine_id)
        return None if row is None else lock_info(connection, row)

    def fence(self, machine_id: str, owner: str, token: int) -> Fence:
        return Fence(lock_token=token)

    def is_lost(self, machine_id: str, owner: str, token: int) -> bool:
        connection = connections[self.alias]
        with self.dialect.errors(connection):
            return self.dialect.lock_token(cursor_for(connection), machine_id) != token

    def recover(self) -> None:
        side = getattr(self._local, "connection", None)
        if side is not None:
            side.close()
            self._local.connection = None
        connection = connections[self.alias]
        if not in_callers_transaction(connection):
            connection.close()

    def end_lost_session(self) -> bool:
        from machine_memory.stores.database import end_lost_session

        # The connection the failed call ran on: see connection().
        connection = connections[self.alias]
        side = getattr(self._local, "connection", None)
        if in_callers_transaction(connection) and side is not None:
            connection = side
        return end_lost_session(connection)

    def close(self) -> None:
        side = getattr(self._local, "connection", None)
        if side is not None:
            side.close()
            self._local.connection = None


def lock_info(connection: BaseDatabaseWrapper, row: tuple[Any, ...]) -> LockInfo:
    """A LockInfo from (owner, token, acquired_at, expires_at) as the driver returned them."""
    from machine_memory.models import StorageNow

    owner, token, acquired_at, expires_at = row
    # Convert the datetimes as the ORM would (SQLite returns text, MariaDB naive UTC).
    clock = StorageNow()
    for converter in connection.ops.get_db_converters(clock):
        acquired_at = converter(acquired_at, clock, connection)
        expires_at = converter(expires_at, clock, connection)
    return LockInfo(str(owner), int(token), acquired_at, expires_at)

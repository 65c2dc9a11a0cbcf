"""States in ``MachineState`` rows of one Django database.

Each hot operation is one statement of the vendor module (``machine_memory.sql``) on the
driver's cursor; read-then-change operations take the row with ``select_for_update()``
(docs/design.md#concurrency).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, ClassVar

from django.db import DatabaseError, InterfaceError, OperationalError, connections, transaction

from machine_memory.connection import (
    cursor_for,
    in_callers_transaction,
    noted_session,
    own_connection,
)
from machine_memory.exceptions import MachineMemoryError
from machine_memory.locks.database import DatabaseLockBackend, lock_info
from machine_memory.sql import dialect_for
from machine_memory.stores.base import NothingSent, StateStore, Stored, Taken

if TYPE_CHECKING:
    from collections.abc import Iterator

    from django.db.backends.base.base import BaseDatabaseWrapper

    from machine_memory.locks.base import Fence, LockBackend
    from machine_memory.validation import Metadata

# How long end_lost_session() waits for the server to end the dead connection's session.
SESSION_END_TIMEOUT = 5.0


class DatabaseStateStore(StateStore):
    errors: ClassVar[tuple[type[BaseException], ...]] = (DatabaseError,)
    transient_errors: ClassVar[tuple[type[BaseException], ...]] = (
        OperationalError,
        InterfaceError,
    )
    combines_lock_statements = True

    def __init__(self, using: str) -> None:
        if using not in connections:
            raise MachineMemoryError(
                f"Database alias {using!r} is not in settings.DATABASES; "
                "set MACHINE_MEMORY['DATABASE'] or pass using=."
            )
        self.alias: str = using
        self.using = using
        # The vendor is known from ENGINE without connecting.
        self.dialect = dialect_for(connections[using])
        self.failures_are_final = self.dialect.in_process

    def __repr__(self) -> str:
        return f"<DatabaseStateStore using={self.using!r}>"

    @property
    def connection(self) -> BaseDatabaseWrapper:
        return connections[self.alias]

    def load(self, machine_id: str) -> Stored | None:
        connection = self.connection
        with self.dialect.errors(connection):
            row = self.dialect.read(cursor_for(connection), machine_id)
        return None if row is None else Stored(*row)

    def _connected(self) -> BaseDatabaseWrapper:
        """The connection, connected: a failure to connect is ``NothingSent``."""
        connection = self.connection
        if connection.connection is None:
            try:
                with self.dialect.errors(connection):
                    connection.ensure_connection()
            except self.errors as exc:
                raise NothingSent(str(exc)) from exc
        return connection

    def insert(self, machine_id: str, text: str, meta: Metadata, fence: Fence) -> bool:
        connection = self._connected()
        with self.dialect.errors(connection):
            return self.dialect.insert_state(cursor_for(connection), machine_id, text, meta, fence)

    def update(
        self, machine_id: str, text: str, expected_version: int, meta: Metadata | None, fence: Fence
    ) -> bool:
        connection = self._connected()
        with self.dialect.errors(connection):
            return self.dialect.update_state(
                cursor_for(connection), machine_id, text, expected_version, meta, fence
            )

    def delete(self, machine_id: str, expected_version: int, fence: Fence) -> bool:
        connection = self._connected()
        with self.dialect.errors(connection):
            return self.dialect.delete_state(
                cursor_for(connection), machine_id, expected_version, fence
            )

    def acquire_and_load(self, machine_id: str, owner: str, ttl: float) -> Taken | None:
        connection = self.connection
        with self.dialect.errors(connection):
            taken = self.dialect.acquire_and_read(cursor_for(connection), machine_id, owner, ttl)
        if taken is None:
            return None
        (token, acquired_at, expires_at), row = taken
        return Taken(
            token,
            None if row is None else Stored(*row),
            lambda: lock_info(connection, (owner, token, acquired_at, expires_at)),
        )

    def write_and_release(
        self,
        machine_id: str,
        text: str,
        expected_version: int | None,
        meta: Metadata | None,
        token: int,
    ) -> tuple[bool, bool]:
        connection = self._connected()
        with self.dialect.errors(connection):
            return self.dialect.write_and_release(
                cursor_for(connection), machine_id, text, expected_version, meta, token
            )

    @contextmanager
    def row_locked(self, machine_id: str) -> Iterator[int | None]:
        from machine_memory.models import MachineState

        with transaction.atomic(using=self.alias):
            connection = self.connection
            with self.dialect.errors(connection):
                # SQLite has no row locks: there the transaction takes the database's write
                # lock first, so nobody writes between the read and the change.
                self.dialect.reserve_writes(cursor_for(connection))
            yield (
                MachineState.objects.using(self.alias)
                .select_for_update()
                .filter(pk=machine_id)
                .values_list("version", flat=True)
                .first()
            )

    def in_transaction(self) -> bool:
        return in_callers_transaction(self.connection)

    def recover(self) -> None:
        connection = self.connection
        if not in_callers_transaction(connection):
            connection.close()

    def end_lost_session(self) -> bool:
        return end_lost_session(self.connection)

    def shares_locks_with(self, locks: LockBackend) -> bool:
        # Lock rows in this database: the database backend on this alias (or a subclass),
        # not any backend that was merely given the alias (the in-memory one keeps its own).
        return isinstance(locks, DatabaseLockBackend) and locks.database == self.alias


def end_lost_session(connection: BaseDatabaseWrapper) -> bool:
    """``StateStore.end_lost_session`` for a Django connection that just failed.

    PostgreSQL and MariaDB do not notice a vanished client while its statement waits for
    a row lock or commits: the statement may still land after a check on a new
    connection. So the old session is ended, and confirmed gone, before anything is
    decided (docs/contract.md#write).
    """
    session = noted_session(connection)
    inside = in_callers_transaction(connection)
    if not inside:
        connection.close()
    if connection.settings_dict.get("DISABLE_SERVER_SIDE_CURSORS", False):
        # Behind a pooler (Django's hint) the session id names the pooler's client slot,
        # not a server session: ending "it" could end somebody else's. Nothing is ended,
        # so a write that did not visibly land stays undecided (WriteOutcomeUnknown).
        return False
    if session is None:
        return True  # nothing of ours ran on a server session
    dialect = dialect_for(connection)
    if inside:
        # The caller's transaction keeps the broken connection until it ends: end the old
        # session from a connection of our own, so it does not hold its row locks until the
        # server notices the client is gone.
        connection = own_connection(connection)
        try:
            with dialect.errors(connection):
                return dialect.end_session(cursor_for(connection), session, SESSION_END_TIMEOUT)
        finally:
            connection.close()
    with dialect.errors(connection):
        return dialect.end_session(cursor_for(connection), session, SESSION_END_TIMEOUT)

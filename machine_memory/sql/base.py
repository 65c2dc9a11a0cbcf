"""The statements every vendor module provides, in the SQL that PostgreSQL and SQLite share.

Each hot-path race is decided inside one statement. Statements are written once in Django's
spelling, turned into the driver's paramstyle and cached; vendor modules never read the
app's settings (docs/design.md#vendor-sql-sql).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from machine_memory.locks.base import Fence

if TYPE_CHECKING:
    from collections.abc import Callable, Hashable
    from contextlib import AbstractContextManager

    from django.core.checks import CheckMessage
    from django.db.backends.base.base import BaseDatabaseWrapper
    from django.db.backends.base.schema import BaseDatabaseSchemaEditor

    from machine_memory.validation import Metadata

STATE_TABLE = "machine_memory_state"
LOCK_TABLE = "machine_memory_lock"

# A DB-API cursor of psycopg, mysqlclient or sqlite3.
Cursor = Any


STATE_COLUMNS = "state, version, execution_status, parent_id, initiator, source"

# What acquire_and_read returns: the lock taken as (token, acquired_at, expires_at), times
# as the driver returns them, and the state row as ``read`` returns it (None: no state).
TakenRows = tuple[tuple[int, Any, Any], "tuple[Any, int, Metadata] | None"]


def state_row(row: Any) -> tuple[Any, int, Metadata] | None:
    """A row of the STATE_COLUMNS as ``read`` returns it; None for a missing (NULL) state."""
    if row is None or row[1] is None:
        return None
    return (row[0], int(row[1]), tuple(row[2:6]))


def state_columns_of(alias: str) -> str:
    """The STATE_COLUMNS of table alias ``alias`` (``s.state, s.version, …``)."""
    return ", ".join(f"{alias}.{column.strip()}" for column in STATE_COLUMNS.split(","))


def taken_rows(row: Any) -> TakenRows | None:
    """``acquire_and_read``'s answer from one result row: the lock's token, acquired_at and
    expires_at, then the STATE_COLUMNS (NULL where there is no state); None: denied."""
    if row is None:
        return None
    return (int(row[0]), row[1], row[2]), state_row(row[3:])


class Dialect:
    vendor = "standard"
    # The database clock, as a SQL expression.
    now_sql = "CURRENT_TIMESTAMP"
    json_placeholder = "%s"
    # What a SELECT without a table needs to be allowed a WHERE clause.
    from_nothing = ""
    # Whether locks taken inside the caller's transaction.atomic() may use a second
    # connection of their own (SQLite allows one writer, so the two would deadlock).
    side_connection_ok = True
    # Whether the database runs inside this process (SQLite): a statement that raised was
    # rolled back there and then, and no server session can still be running it.
    in_process = False
    # Whether the next fencing token is derived from the highest one in the lock table (no
    # sequences), so the row holding it must never be deleted.
    token_high_water_row = False
    # Added to release()'s WHERE clause: how the vendor commits a release (PostgreSQL's
    # does not wait for the disk; see there).
    release_commit_sql = ""

    def __init__(self) -> None:
        self._statements: dict[Hashable, str] = {}

    def errors(self, connection: BaseDatabaseWrapper) -> AbstractContextManager[None]:
        """Where the driver's exceptions become Django's, around every hot statement.

        Django's cursor wrapper does that (``connection.wrap_database_errors``); the hot
        path runs on the driver's cursor, so a vendor whose driver misfiles errors (as
        Django's own wrapper corrects on MySQL) corrects them here.
        """
        return connection.wrap_database_errors

    def native(self, sql: str) -> str:
        """Django-spelled SQL in the driver's own paramstyle (psycopg and mysqlclient: same)."""
        return sql

    def new_cursor(self, connection: BaseDatabaseWrapper, *, prepare: bool) -> Cursor:
        """A DB-API cursor on Django's (connected) ``connection``, for the hot path.

        ``prepare``: whether statements may be prepared in the server session.
        """
        return connection.connection.cursor()

    def session_id(self, raw: Any) -> int | None:
        """The server's id of the session of driver connection ``raw``, without a query;
        None where there is no server session (SQLite)."""
        return None

    def end_session(self, cursor: Cursor, session: int, timeout: float) -> bool:
        """End server session ``session`` from ``cursor``'s (another) session, and wait up
        to ``timeout`` seconds until it is gone; True once it is."""
        return True

    def reserve_writes(self, cursor: Cursor) -> None:
        """At the start of a transaction: keep other writers out until it ends, where row
        locks (``select_for_update``) cannot (SQLite)."""

    def statement(self, key: Hashable, build: Callable[[], str]) -> str:
        """The native SQL for ``key``, built once."""
        try:
            return self._statements[key]
        except KeyError:
            sql = self._statements[key] = self.native(build())
            return sql

    def id_collation(self, connection: BaseDatabaseWrapper) -> str | None:
        return None

    def check_settings(self, alias: str, settings_dict: dict[str, Any]) -> list[CheckMessage]:
        """System-check messages about a database configuration this vendor cannot use well."""
        return []

    def id_db_type(self, max_length: int | None) -> str | None:
        """Column type of machine ids; None for Django's usual CharField type."""
        return None

    def state_db_type(self, connection: BaseDatabaseWrapper) -> str | None:
        """Column type of the state document; None for Django's usual JSONField type."""
        return None

    def expires_sql(self) -> str:
        """SQL for "now + one %s parameter", given ``ttl_param(seconds)``."""
        raise NotImplementedError

    def ttl_param(self, seconds: float) -> Any:
        raise NotImplementedError

    def install(self, schema_editor: BaseDatabaseSchemaEditor) -> None:
        """Create what the models cannot describe (a token sequence)."""

    def uninstall(self, schema_editor: BaseDatabaseSchemaEditor) -> None:
        """Drop what ``install`` created."""

    # -- state -------------------------------------------------------------------------

    def read_sql(self) -> str:
        return self.statement(
            "read", lambda: f"SELECT {STATE_COLUMNS} FROM {STATE_TABLE} WHERE machine_id = %s"
        )

    def read(self, cursor: Cursor, machine_id: str) -> tuple[Any, int, Metadata] | None:
        """The stored document, its version and its metadata columns."""
        cursor.execute(self.read_sql(), (machine_id,))
        return state_row(cursor.fetchone())

    def _lock_condition(self, fence: Fence) -> str:
        if fence.lock_token is None:
            return ""
        return (
            f" AND EXISTS (SELECT 1 FROM {LOCK_TABLE} l WHERE l.machine_id = %s AND l.token = %s)"
        )

    def insert_if_absent_sql(self, table: str, columns: str, select: str) -> str:
        """INSERT of a one-row ``select`` that quietly inserts nothing when the key exists.

        Quietly: a losing create must not raise, or it would poison the caller's atomic().
        """
        return f"INSERT INTO {table} ({columns}) {select} ON CONFLICT (machine_id) DO NOTHING"

    def state_write(
        self,
        machine_id: str,
        text: str,
        expected_version: int | None,
        meta: Metadata | None,
        fence: Fence,
    ) -> tuple[str, tuple[Any, ...]]:
        """The fenced create (``expected_version`` None) or compare-and-set, as (SQL, params).

        Shared by ``insert_state``/``update_state`` and the vendors' ``write_and_release``,
        so the cycle's write is the very statement ``write`` runs.
        """
        if expected_version is None:
            assert meta is not None
            return self._insert_sql(fence), self._insert_params(machine_id, text, meta, fence)
        return self._update_sql(meta is not None, fence), self._update_params(
            machine_id, text, expected_version, meta, fence
        )

    def _insert_sql(self, fence: Fence) -> str:
        # A new row has no fence to compare with; only the lock condition applies.
        def build() -> str:
            now = self.now_sql
            return self.insert_if_absent_sql(
                STATE_TABLE,
                "machine_id, state, version, fence, execution_status, parent_id, initiator,"
                " source, created_at, updated_at",
                f"SELECT %s, {self.json_placeholder}, 1, %s, %s, %s, %s, %s, {now}, {now}"
                f"{self.from_nothing} WHERE 1 = 1{self._lock_condition(fence)}",
            )

        return self.statement(("insert", fence.lock_token is not None), build)

    @staticmethod
    def _insert_params(machine_id: str, text: str, meta: Metadata, fence: Fence) -> tuple[Any, ...]:
        params: tuple[Any, ...] = (machine_id, text, fence.fence_token or 0, *meta)
        if fence.lock_token is not None:
            params += (machine_id, fence.lock_token)
        return params

    def _update_sql(self, with_meta: bool, fence: Fence) -> str:
        """Setting an indexed column to its own value still costs index work (SQLite
        rewrites every index whose column is in the SET list), so unchanged metadata is
        not set."""
        locked = fence.lock_token is not None
        fenced = fence.fence_token is not None

        def build() -> str:
            sets = (
                f"state = {self.json_placeholder}, version = version + 1,"
                f" updated_at = {self.now_sql}"
            )
            if with_meta:
                sets += ", execution_status = %s, parent_id = %s, initiator = %s, source = %s"
            if fenced:
                sets += ", fence = %s"
            where = "machine_id = %s AND version = %s" + self._lock_condition(fence)
            if fenced:
                where += " AND fence <= %s"
            return f"UPDATE {STATE_TABLE} SET {sets} WHERE {where}"

        return self.statement(("update", locked, fenced, with_meta), build)

    @staticmethod
    def _update_params(
        machine_id: str, text: str, expected_version: int, meta: Metadata | None, fence: Fence
    ) -> tuple[Any, ...]:
        params: tuple[Any, ...] = (text,)
        if meta is not None:
            params += meta
        if fence.fence_token is not None:
            params += (fence.fence_token,)
        params += (machine_id, expected_version)
        if fence.lock_token is not None:
            params += (machine_id, fence.lock_token)
        if fence.fence_token is not None:
            params += (fence.fence_token,)
        return params

    def insert_state(
        self, cursor: Cursor, machine_id: str, text: str, meta: Metadata, fence: Fence
    ) -> bool:
        """Create the state unless one exists (or the fence fails); True if created."""
        cursor.execute(self._insert_sql(fence), self._insert_params(machine_id, text, meta, fence))
        return int(cursor.rowcount) == 1

    def update_state(
        self,
        cursor: Cursor,
        machine_id: str,
        text: str,
        expected_version: int,
        meta: Metadata | None,
        fence: Fence,
    ) -> bool:
        """Compare-and-set; ``meta`` None leaves the metadata columns alone."""
        cursor.execute(
            self._update_sql(meta is not None, fence),
            self._update_params(machine_id, text, expected_version, meta, fence),
        )
        return int(cursor.rowcount) == 1

    def delete_state(
        self, cursor: Cursor, machine_id: str, expected_version: int, fence: Fence
    ) -> bool:
        locked = fence.lock_token is not None
        fenced = fence.fence_token is not None

        def build() -> str:
            where = "machine_id = %s AND version = %s" + self._lock_condition(fence)
            if fenced:
                where += " AND fence <= %s"
            return f"DELETE FROM {STATE_TABLE} WHERE {where}"

        params: tuple[Any, ...] = (machine_id, expected_version)
        if locked:
            params += (machine_id, fence.lock_token)
        if fenced:
            params += (fence.fence_token,)
        cursor.execute(self.statement(("delete", locked, fenced), build), params)
        return int(cursor.rowcount) == 1

    # -- the cycle in two round trips (MachineMemory.session) ---------------------------

    def acquire_and_read(
        self, cursor: Cursor, machine_id: str, owner: str, ttl: float
    ) -> TakenRows | None:
        """``acquire`` and ``read`` in one round trip and one commit; None when denied.

        The read must see every state committed before the lock was taken, including one
        that the previous holder committed while this call waited for the lock row.
        """
        raise NotImplementedError

    def write_and_release(
        self,
        cursor: Cursor,
        machine_id: str,
        text: str,
        expected_version: int | None,
        meta: Metadata | None,
        token: int,
    ) -> tuple[bool, bool]:
        """The write of ``state_write`` fenced by lock ``token`` and, only if it landed, the
        release of that lock, in one round trip and one commit: (written, released).

        A write that did not land leaves the lock held, as ``write`` does.
        """
        write, params = self.state_write(
            machine_id, text, expected_version, meta, Fence(lock_token=token)
        )
        return self.write_then_release(cursor, write, params, (machine_id, token))

    def write_then_release(
        self, cursor: Cursor, write: str, params: tuple[Any, ...], release: tuple[str, int]
    ) -> tuple[bool, bool]:
        """Run ``write`` and, if it matched a row, ``release_token_sql()`` with ``release``,
        as one round trip and one commit (the vendor's part of ``write_and_release``)."""
        raise NotImplementedError

    def release_token_sql(self) -> str:
        """Expire the live lock of one acquisition (machine id and token as parameters)."""
        return self.statement(
            "release_token",
            lambda: (
                f"UPDATE {LOCK_TABLE} SET expires_at = {self.now_sql}"
                f" WHERE machine_id = %s AND token = %s AND expires_at > {self.now_sql}"
            ),
        )

    # -- locks -------------------------------------------------------------------------

    def acquire(self, cursor: Cursor, machine_id: str, owner: str, ttl: float) -> int | None:
        """Take the lock if no live one exists; return the new fencing token, else None."""
        raise NotImplementedError

    def release(self, cursor: Cursor, machine_id: str, owner: str) -> bool:
        """Expire ``owner``'s live lock; True if there was one.

        The row stays, so the token history and "who had it last" survive the release.
        """
        sql = self.statement(
            "release",
            lambda: (
                f"UPDATE {LOCK_TABLE} SET expires_at = {self.now_sql}"
                f" WHERE machine_id = %s AND owner = %s AND expires_at > {self.now_sql}"
                f"{self.release_commit_sql}"
            ),
        )
        cursor.execute(sql, (machine_id, owner))
        return int(cursor.rowcount) == 1

    def force_release(self, cursor: Cursor, machine_id: str) -> tuple[Any, ...] | None:
        """Expire the live lock whoever holds it; return (owner, token, acquired_at, expires_at).

        For operators. ``expires_at`` is the moment of release; the times come as the driver
        returns them (``DatabaseLockBackend`` converts them as Django would). The row stays,
        like after ``release``, so the token history survives.
        """
        sql = self.statement(
            "force_release",
            lambda: (
                f"UPDATE {LOCK_TABLE} SET expires_at = {self.now_sql}"
                f" WHERE machine_id = %s AND expires_at > {self.now_sql}"
                " RETURNING owner, token, acquired_at, expires_at"
            ),
        )
        cursor.execute(sql, (machine_id,))
        # fetchall: on SQLite the statement completes (and commits) only once every
        # RETURNING row has been stepped through.
        rows = cursor.fetchall()
        return tuple(rows[0]) if rows else None

    def extend(self, cursor: Cursor, machine_id: str, owner: str, token: int, ttl: float) -> bool:
        sql = self.statement(
            "extend",
            lambda: (
                f"UPDATE {LOCK_TABLE} SET expires_at = {self.expires_sql()}"
                " WHERE machine_id = %s AND owner = %s AND token = %s"
                f" AND expires_at > {self.now_sql}"
            ),
        )
        cursor.execute(sql, (self.ttl_param(ttl), machine_id, owner, token))
        return int(cursor.rowcount) == 1

    def live_lock(self, cursor: Cursor, machine_id: str) -> tuple[Any, ...] | None:
        """The live lock as (owner, token, acquired_at, expires_at), times as the driver
        returns them; None when no lock is live."""
        sql = self.statement(
            "live_lock",
            lambda: (
                f"SELECT owner, token, acquired_at, expires_at FROM {LOCK_TABLE}"
                f" WHERE machine_id = %s AND expires_at > {self.now_sql}"
            ),
        )
        cursor.execute(sql, (machine_id,))
        row = cursor.fetchone()
        return None if row is None else tuple(row)

    def lock_token(self, cursor: Cursor, machine_id: str) -> int | None:
        sql = self.statement(
            "lock_token", lambda: f"SELECT token FROM {LOCK_TABLE} WHERE machine_id = %s"
        )
        cursor.execute(sql, (machine_id,))
        row = cursor.fetchone()
        return None if row is None else int(row[0])

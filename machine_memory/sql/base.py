"""The statements every vendor module provides, in the SQL that PostgreSQL and SQLite share.

Each hot-path operation is one statement, and each race is decided inside it: an upsert
that only takes an expired lock, an UPDATE whose WHERE carries the expected version and
the fencing condition. Statements are written for Django cursors (``%s`` placeholders,
``%%`` for a literal percent sign).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from django.core.checks import CheckMessage
    from django.db.backends.base.base import BaseDatabaseWrapper
    from django.db.backends.base.schema import BaseDatabaseSchemaEditor
    from django.db.backends.utils import CursorWrapper

STATE_TABLE = "machine_memory_state"
LOCK_TABLE = "machine_memory_lock"

Metadata = tuple[str | None, str | None, str | None, str | None]


@dataclass(frozen=True, slots=True)
class Fence:
    """What a write must still find true, in the same statement as its version check.

    ``lock_token``: the lock row of this id still carries this token (database locks).
    ``fence_token``: no higher fencing token has written the state row (Redis locks); the
    row then records this token.
    """

    lock_token: int | None = None
    fence_token: int | None = None


NO_FENCE = Fence()


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

    def read(self, cursor: CursorWrapper, machine_id: str) -> tuple[Any, int] | None:
        cursor.execute(
            f"SELECT state, version FROM {STATE_TABLE} WHERE machine_id = %s", [machine_id]
        )
        row = cursor.fetchone()
        return None if row is None else (row[0], row[1])

    def state_version(self, cursor: CursorWrapper, machine_id: str) -> int | None:
        cursor.execute(f"SELECT version FROM {STATE_TABLE} WHERE machine_id = %s", [machine_id])
        row = cursor.fetchone()
        return None if row is None else int(row[0])

    def _lock_condition(self, fence: Fence, machine_id: str) -> tuple[str, list[Any]]:
        if fence.lock_token is None:
            return "", []
        return (
            f" AND EXISTS (SELECT 1 FROM {LOCK_TABLE} l WHERE l.machine_id = %s AND l.token = %s)",
            [machine_id, fence.lock_token],
        )

    def _row_conditions(self, fence: Fence, machine_id: str) -> tuple[str, list[Any]]:
        sql, params = self._lock_condition(fence, machine_id)
        if fence.fence_token is not None:
            sql += " AND fence <= %s"
            params.append(fence.fence_token)
        return sql, params

    def insert_if_absent_sql(self, table: str, columns: str, select: str) -> str:
        """INSERT of a one-row ``select`` that quietly inserts nothing when the key exists.

        Quietly: a losing create must not raise, or it would poison the caller's atomic().
        """
        return f"INSERT INTO {table} ({columns}) {select} ON CONFLICT (machine_id) DO NOTHING"

    def insert_state(
        self,
        cursor: CursorWrapper,
        machine_id: str,
        text: str,
        meta: Metadata,
        fence: Fence,
    ) -> bool:
        # A new row has no fence to compare with; only the lock condition applies.
        where, where_params = self._lock_condition(fence, machine_id)
        now = self.now_sql
        cursor.execute(
            self.insert_if_absent_sql(
                STATE_TABLE,
                "machine_id, state, version, fence, execution_status, parent_id, initiator,"
                " source, created_at, updated_at",
                f"SELECT %s, {self.json_placeholder}, 1, %s, %s, %s, %s, %s, {now}, {now}"
                f"{self.from_nothing} WHERE 1 = 1{where}",
            ),
            [machine_id, text, fence.fence_token or 0, *meta, *where_params],
        )
        return int(cursor.rowcount) == 1

    def update_state(
        self,
        cursor: CursorWrapper,
        machine_id: str,
        text: str,
        expected_version: int,
        meta: Metadata,
        fence: Fence,
    ) -> bool:
        where, where_params = self._row_conditions(fence, machine_id)
        set_fence, fence_params = "", []
        if fence.fence_token is not None:
            set_fence, fence_params = ", fence = %s", [fence.fence_token]
        cursor.execute(
            f"UPDATE {STATE_TABLE} SET state = {self.json_placeholder},"
            f" version = version + 1, updated_at = {self.now_sql}, execution_status = %s,"
            f" parent_id = %s, initiator = %s, source = %s{set_fence}"
            f" WHERE machine_id = %s AND version = %s{where}",
            [text, *meta, *fence_params, machine_id, expected_version, *where_params],
        )
        return int(cursor.rowcount) == 1

    def delete_state(
        self, cursor: CursorWrapper, machine_id: str, expected_version: int, fence: Fence
    ) -> bool:
        where, where_params = self._row_conditions(fence, machine_id)
        cursor.execute(
            f"DELETE FROM {STATE_TABLE} WHERE machine_id = %s AND version = %s{where}",
            [machine_id, expected_version, *where_params],
        )
        return int(cursor.rowcount) == 1

    # -- locks -------------------------------------------------------------------------

    def acquire(self, cursor: CursorWrapper, machine_id: str, owner: str, ttl: float) -> int | None:
        """Take the lock if no live one exists; return the new fencing token, else None."""
        raise NotImplementedError

    def release(self, cursor: CursorWrapper, machine_id: str, owner: str) -> bool:
        """Expire ``owner``'s live lock; True if there was one.

        The row stays, so the token history and "who had it last" survive the release.
        """
        cursor.execute(
            f"UPDATE {LOCK_TABLE} SET expires_at = {self.now_sql}"
            f" WHERE machine_id = %s AND owner = %s AND expires_at > {self.now_sql}",
            [machine_id, owner],
        )
        return int(cursor.rowcount) == 1

    def extend(
        self, cursor: CursorWrapper, machine_id: str, owner: str, token: int, ttl: float
    ) -> bool:
        cursor.execute(
            f"UPDATE {LOCK_TABLE} SET expires_at = {self.expires_sql()}"
            " WHERE machine_id = %s AND owner = %s AND token = %s"
            f" AND expires_at > {self.now_sql}",
            [self.ttl_param(ttl), machine_id, owner, token],
        )
        return int(cursor.rowcount) == 1

    def is_live(self, cursor: CursorWrapper, machine_id: str) -> bool:
        cursor.execute(
            f"SELECT 1 FROM {LOCK_TABLE} WHERE machine_id = %s AND expires_at > {self.now_sql}",
            [machine_id],
        )
        return cursor.fetchone() is not None

    def lock_token(self, cursor: CursorWrapper, machine_id: str) -> int | None:
        cursor.execute(f"SELECT token FROM {LOCK_TABLE} WHERE machine_id = %s", [machine_id])
        row = cursor.fetchone()
        return None if row is None else int(row[0])

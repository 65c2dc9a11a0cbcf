"""SQLite (>= 3.35 for RETURNING) statements.

Datetimes are written by SQLite itself as UTC text with milliseconds, the format Django
reads back; the same spelling on both sides keeps text comparisons in time order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from machine_memory.sql.base import LOCK_TABLE, STATE_TABLE, Dialect, RawCycle

if TYPE_CHECKING:
    from machine_memory.sql.base import Cursor


NOW = "strftime('%Y-%m-%d %H:%M:%f', 'now')"


class SQLiteRawCycle(RawCycle):
    def __init__(self, settings_params: dict[str, Any]) -> None:
        import sqlite3

        super().__init__(settings_params)
        self.connection = sqlite3.connect(
            settings_params["database"],
            timeout=settings_params.get("timeout", 5),
            isolation_level=None,  # autocommit, as Django runs it
            check_same_thread=False,
        )
        # The settings a user of this app is told to use (journal_mode is kept in the file).
        self.connection.execute("PRAGMA synchronous=NORMAL")
        self.cursor = self.connection.cursor()

    def lock(self, machine_id: str, owner: str, ttl: float) -> bool:
        self.cursor.execute(
            f"INSERT INTO {LOCK_TABLE} AS l (machine_id, owner, token, acquired_at, expires_at)"
            f" VALUES (?, ?, 1, {NOW}, strftime('%Y-%m-%d %H:%M:%f', 'now', ?))"
            " ON CONFLICT (machine_id) DO UPDATE SET owner = excluded.owner,"
            " token = l.token + 1, acquired_at = excluded.acquired_at,"
            f" expires_at = excluded.expires_at WHERE l.expires_at <= {NOW} RETURNING token",
            (machine_id, owner, f"+{ttl:.3f} seconds"),
        )
        return bool(self.cursor.fetchall())

    def read(self, machine_id: str) -> tuple[str, int] | None:
        self.cursor.execute(
            f"SELECT state, version FROM {STATE_TABLE} WHERE machine_id = ?", (machine_id,)
        )
        return self.cursor.fetchone()  # type: ignore[no-any-return]

    def write(self, machine_id: str, text: str, version: int | None) -> bool:
        if version is None:
            self.cursor.execute(
                f"INSERT INTO {STATE_TABLE} (machine_id, state, version, fence, created_at,"
                f" updated_at) VALUES (?, ?, 1, 0, {NOW}, {NOW})"
                " ON CONFLICT (machine_id) DO NOTHING",
                (machine_id, text),
            )
        else:
            self.cursor.execute(
                f"UPDATE {STATE_TABLE} SET state = ?, version = version + 1,"
                f" updated_at = {NOW} WHERE machine_id = ? AND version = ?",
                (text, machine_id, version),
            )
        return int(self.cursor.rowcount) == 1

    def unlock(self, machine_id: str, owner: str) -> bool:
        self.cursor.execute(
            f"DELETE FROM {LOCK_TABLE} WHERE machine_id = ? AND owner = ?", (machine_id, owner)
        )
        return int(self.cursor.rowcount) == 1

    def close(self) -> None:
        self.connection.close()


class SQLiteDialect(Dialect):
    vendor = "sqlite"
    now_sql = "strftime('%%Y-%%m-%%d %%H:%%M:%%f', 'now')"
    side_connection_ok = False
    token_high_water_row = True

    def native(self, sql: str) -> str:
        # sqlite3 uses qmark placeholders, and a literal % needs no escaping.
        return sql.replace("%s", "?").replace("%%", "%")

    def expires_sql(self) -> str:
        return "strftime('%%Y-%%m-%%d %%H:%%M:%%f', 'now', %s)"

    def ttl_param(self, seconds: float) -> Any:
        # Signed: models.StorageTime uses negative offsets for "this long ago".
        return f"{float(seconds):+.3f} seconds"

    def raw_cycle(self, connection_params: dict[str, Any]) -> RawCycle:
        return SQLiteRawCycle(connection_params)

    def fill(self, cursor: Cursor, prefix: str, states: int, expired_locks: int) -> None:
        cursor.execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?)"
            f" INSERT INTO {STATE_TABLE} (machine_id, state, version, fence, execution_status,"
            f" created_at, updated_at) SELECT ? || i, json_object('n', i), 1, 0, 'done',"
            f" {NOW}, {NOW} FROM n",
            (states, prefix),
        )
        cursor.execute(
            f"SELECT COALESCE(MAX(token), 0) FROM {LOCK_TABLE}",
        )
        base = int(cursor.fetchone()[0])
        cursor.execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?)"
            f" INSERT INTO {LOCK_TABLE} (machine_id, owner, token, acquired_at, expires_at)"
            " SELECT ? || i, 'filler', ? + i, strftime('%Y-%m-%d %H:%M:%f', 'now', '-2 hours'),"
            " strftime('%Y-%m-%d %H:%M:%f', 'now', '-1 hours') FROM n",
            (expired_locks, prefix, base),
        )

    def acquire(self, cursor: Cursor, machine_id: str, owner: str, ttl: float) -> int | None:
        # SQLite has no sequences. Writers are serialised by the database lock, so "highest
        # token in the table + 1" is race-free here, and purging keeps the highest row
        # (MachineLockQuerySet.purgeable) so the high-water mark survives.
        sql = self.statement(
            "acquire",
            lambda: (
                f"INSERT INTO {LOCK_TABLE} AS l"
                " (machine_id, owner, token, acquired_at, expires_at)"
                f" VALUES (%s, %s, (SELECT COALESCE(MAX(token), 0) + 1 FROM {LOCK_TABLE}),"
                f" {self.now_sql}, {self.expires_sql()})"
                " ON CONFLICT (machine_id) DO UPDATE SET owner = excluded.owner,"
                " token = excluded.token, acquired_at = excluded.acquired_at,"
                " expires_at = excluded.expires_at"
                f" WHERE l.expires_at <= {self.now_sql}"
                " RETURNING token"
            ),
        )
        cursor.execute(sql, (machine_id, owner, self.ttl_param(ttl)))
        # fetchall: the statement (and with it the autocommit) completes only once every
        # RETURNING row has been stepped through.
        rows = cursor.fetchall()
        return int(rows[0][0]) if rows else None

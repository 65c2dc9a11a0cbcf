"""SQLite (>= 3.35 for RETURNING) statements.

Datetimes are written by SQLite itself as UTC text with milliseconds, the format Django
reads back; the same spelling on both sides keeps text comparisons in time order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from machine_memory.sql.base import LOCK_TABLE, STATE_TABLE, Dialect

if TYPE_CHECKING:
    from django.db.backends.base.schema import BaseDatabaseSchemaEditor

    from machine_memory.sql.base import Cursor, TakenRows


NOW = "strftime('%Y-%m-%d %H:%M:%f', 'now')"


class SQLiteDialect(Dialect):
    vendor = "sqlite"
    now_sql = "strftime('%%Y-%%m-%%d %%H:%%M:%%f', 'now')"
    side_connection_ok = False
    in_process = True
    token_high_water_row = True
    # The index on the token (an attribute: tests install it under another name).
    token_index = "machine_memory_lock_token_high_water"

    def native(self, sql: str) -> str:
        # sqlite3 uses qmark placeholders, and a literal % needs no escaping.
        return sql.replace("%s", "?").replace("%%", "%")

    def expires_sql(self) -> str:
        return "strftime('%%Y-%%m-%%d %%H:%%M:%%f', 'now', %s)"

    def ttl_param(self, seconds: float) -> Any:
        # Signed: models.StorageTime uses negative offsets for "this long ago".
        return f"{float(seconds):+.3f} seconds"

    def install(self, schema_editor: BaseDatabaseSchemaEditor) -> None:
        # MAX(token) on every acquire (_acquire_sql) needs an index on token. Created here,
        # not by the model, which serves databases with sequences too. A migration that
        # remakes the lock table drops it: run install() again after it (as 0002 does).
        schema_editor.execute(
            f"CREATE INDEX IF NOT EXISTS {self.token_index} ON {LOCK_TABLE} (token)"
        )

    def uninstall(self, schema_editor: BaseDatabaseSchemaEditor) -> None:
        schema_editor.execute(f"DROP INDEX IF EXISTS {self.token_index}")

    def reserve_writes(self, cursor: Cursor) -> None:
        # A write statement takes the database's write lock (waiting up to the busy
        # timeout) even when it matches nothing; a read first would let another writer
        # commit in between and fail this transaction's write with SQLITE_BUSY.
        # https://www.sqlite.org/lang_transaction.html
        cursor.execute(
            self.statement("reserve", lambda: f"UPDATE {STATE_TABLE} SET version = version WHERE 0")
        )

    def _acquire_sql(self, returning: str) -> str:
        # SQLite has no sequences. Writers are serialised by the database lock, so "highest
        # token in the table + 1" is race-free here, and purging keeps the highest row
        # (MachineLockQuerySet.purgeable) so the high-water mark survives.
        return self.statement(
            ("acquire", returning),
            lambda: (
                f"INSERT INTO {LOCK_TABLE} AS l"
                " (machine_id, owner, token, acquired_at, expires_at)"
                f" VALUES (%s, %s, (SELECT COALESCE(MAX(token), 0) + 1 FROM {LOCK_TABLE}),"
                f" {self.now_sql}, {self.expires_sql()})"
                " ON CONFLICT (machine_id) DO UPDATE SET owner = excluded.owner,"
                " token = excluded.token, acquired_at = excluded.acquired_at,"
                " expires_at = excluded.expires_at"
                f" WHERE l.expires_at <= {self.now_sql}"
                f" RETURNING {returning}"
            ),
        )

    def acquire(self, cursor: Cursor, machine_id: str, owner: str, ttl: float) -> int | None:
        cursor.execute(self._acquire_sql("token"), (machine_id, owner, self.ttl_param(ttl)))
        # fetchall: the statement (and with it the autocommit) completes only once every
        # RETURNING row has been stepped through.
        rows = cursor.fetchall()
        return int(rows[0][0]) if rows else None

    def acquire_and_read(
        self, cursor: Cursor, machine_id: str, owner: str, ttl: float
    ) -> TakenRows | None:
        # In-process, so there is no round trip to save: the plain read after the lock
        # costs less than reading the state through subqueries of the lock's RETURNING.
        # SQLite has one writer at a time, and the lock's commit comes after every earlier
        # holder's, so the read sees the state of all of them.
        cursor.execute(
            self._acquire_sql("token, acquired_at, expires_at"),
            (machine_id, owner, self.ttl_param(ttl)),
        )
        rows = cursor.fetchall()
        if not rows:
            return None
        token, acquired_at, expires_at = rows[0]
        return (int(token), acquired_at, expires_at), self.read(cursor, machine_id)

    def write_then_release(
        self, cursor: Cursor, write: str, params: tuple[Any, ...], release: tuple[str, int]
    ) -> tuple[bool, bool]:
        # In-process, so no round trips to save: one transaction makes it one commit, and
        # the write and the release land together. BEGIN IMMEDIATE takes the write lock
        # first (waiting up to the busy timeout), as the write would anyway.
        cursor.execute("BEGIN IMMEDIATE")
        try:
            cursor.execute(write, params)
            written = cursor.rowcount == 1
            released = False
            if written:
                cursor.execute(self.release_token_sql(), release)
                released = cursor.rowcount == 1
            cursor.execute("COMMIT")
        except BaseException:
            if cursor.connection.in_transaction:
                cursor.execute("ROLLBACK")
            raise
        return written, released

"""PostgreSQL statements (psycopg 3 through Django's connection)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from machine_memory.sql.base import LOCK_TABLE, Dialect

if TYPE_CHECKING:
    from django.db.backends.base.schema import BaseDatabaseSchemaEditor

    from machine_memory.sql.base import Cursor


TOKEN_SEQUENCE = "machine_memory_lock_token_seq"


class PostgreSQLDialect(Dialect):
    vendor = "postgresql"
    # now() is the start of the transaction, which inside a caller's atomic() can be long
    # past; statement_timestamp() is the start of this statement.
    now_sql = "statement_timestamp()"
    json_placeholder = "%s::jsonb"

    def id_db_type(self, max_length: int | None) -> str | None:
        # Spelled out so that Django does not add its varchar_pattern_ops "_like" twin to
        # every id index (it keys on the "varchar" prefix): ids are only ever compared for
        # equality, and the twin would double the index work of each insert.
        return f"character varying({max_length})"

    def expires_sql(self) -> str:
        return "statement_timestamp() + make_interval(secs => %s)"

    def ttl_param(self, seconds: float) -> Any:
        return float(seconds)

    def install(self, schema_editor: BaseDatabaseSchemaEditor) -> None:
        # A sequence is non-transactional and never goes back, so tokens strictly increase
        # per id even after the lock row is purged and created again.
        schema_editor.execute(f"CREATE SEQUENCE IF NOT EXISTS {TOKEN_SEQUENCE}")

    def uninstall(self, schema_editor: BaseDatabaseSchemaEditor) -> None:
        schema_editor.execute(f"DROP SEQUENCE IF EXISTS {TOKEN_SEQUENCE}")

    def acquire(self, cursor: Cursor, machine_id: str, owner: str, ttl: float) -> int | None:
        # One round trip: insert, or take over the row only if its lock has expired. The
        # WHERE of DO UPDATE is evaluated on the latest row version under its row lock, so
        # two racing takeovers cannot both win.
        sql = self.statement(
            "acquire",
            lambda: (
                f"INSERT INTO {LOCK_TABLE} AS l"
                " (machine_id, owner, token, acquired_at, expires_at)"
                f" VALUES (%s, %s, nextval('{TOKEN_SEQUENCE}'), statement_timestamp(),"
                f" {self.expires_sql()})"
                " ON CONFLICT (machine_id) DO UPDATE SET owner = EXCLUDED.owner,"
                " token = EXCLUDED.token, acquired_at = EXCLUDED.acquired_at,"
                " expires_at = EXCLUDED.expires_at"
                " WHERE l.expires_at <= statement_timestamp()"
                " RETURNING token"
            ),
        )
        cursor.execute(sql, (machine_id, owner, self.ttl_param(ttl)))
        row = cursor.fetchone()
        return None if row is None else int(row[0])

"""PostgreSQL statements (psycopg 3 through Django's connection)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import psycopg

from machine_memory.conf import conf
from machine_memory.sql.base import LOCK_TABLE, STATE_TABLE, Dialect, RawCycle

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper
    from django.db.backends.base.schema import BaseDatabaseSchemaEditor

    from machine_memory.sql.base import Cursor


TOKEN_SEQUENCE = "machine_memory_lock_token_seq"


class PreparingCursor(psycopg.Cursor[Any]):
    """A server-side binding cursor that prepares every statement it runs."""

    def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
        return super().execute(query, params, prepare=True)


def prepared_statements(connection: BaseDatabaseWrapper) -> bool:
    """Whether the hot statements may be prepared on this connection (see new_cursor)."""
    setting = conf.PREPARED_STATEMENTS
    if setting is not None:
        return bool(setting)
    return not connection.settings_dict.get("DISABLE_SERVER_SIDE_CURSORS", False)


class PostgreSQLRawCycle(RawCycle):
    def __init__(self, settings_params: dict[str, Any]) -> None:
        import psycopg

        super().__init__(settings_params)
        params = dict(settings_params)
        # Django's own choices (client-side binding, no preparing); the baseline uses
        # psycopg's defaults, which prepare a statement after its fifth execution.
        for key in ("cursor_factory", "context", "prepare_threshold"):
            params.pop(key, None)
        self.connection = psycopg.connect(**params, autocommit=True)
        self.cursor = self.connection.cursor()

    def lock(self, machine_id: str, owner: str, ttl: float) -> bool:
        self.cursor.execute(
            f"INSERT INTO {LOCK_TABLE} AS l (machine_id, owner, token, acquired_at, expires_at)"
            " VALUES (%s, %s, 1, now(), now() + make_interval(secs => %s))"
            " ON CONFLICT (machine_id) DO UPDATE SET owner = EXCLUDED.owner,"
            " token = l.token + 1, acquired_at = EXCLUDED.acquired_at,"
            " expires_at = EXCLUDED.expires_at WHERE l.expires_at <= now() RETURNING token",
            (machine_id, owner, ttl),
        )
        return self.cursor.fetchone() is not None

    def read(self, machine_id: str) -> tuple[str, int] | None:
        self.cursor.execute(
            f"SELECT state::text, version FROM {STATE_TABLE} WHERE machine_id = %s",
            (machine_id,),
        )
        return self.cursor.fetchone()

    def write(self, machine_id: str, text: str, version: int | None) -> bool:
        if version is None:
            self.cursor.execute(
                f"INSERT INTO {STATE_TABLE} (machine_id, state, version, fence, created_at,"
                " updated_at) VALUES (%s, %s::jsonb, 1, 0, now(), now())"
                " ON CONFLICT (machine_id) DO NOTHING",
                (machine_id, text),
            )
        else:
            self.cursor.execute(
                f"UPDATE {STATE_TABLE} SET state = %s::jsonb, version = version + 1,"
                " updated_at = now() WHERE machine_id = %s AND version = %s",
                (text, machine_id, version),
            )
        return int(self.cursor.rowcount) == 1

    def unlock(self, machine_id: str, owner: str) -> bool:
        self.cursor.execute(
            f"DELETE FROM {LOCK_TABLE} WHERE machine_id = %s AND owner = %s",
            (machine_id, owner),
        )
        return int(self.cursor.rowcount) == 1

    def close(self) -> None:
        self.connection.close()


class PostgreSQLDialect(Dialect):
    vendor = "postgresql"
    # now() is the start of the transaction, which inside a caller's atomic() can be long
    # past; statement_timestamp() is the start of this statement.
    now_sql = "statement_timestamp()"
    json_placeholder = "%s::jsonb"

    def new_cursor(self, connection: BaseDatabaseWrapper) -> Cursor:
        # Django's psycopg connection binds parameters client-side and never prepares, to
        # stay safe behind transaction-mode poolers. Preparing the few hot statements
        # saves their planning on every call (about as long as a round trip); it needs a
        # server-side binding cursor and a session that lasts, so it is off where the
        # alias says a pooler is in the way (DISABLE_SERVER_SIDE_CURSORS) or the
        # PREPARED_STATEMENTS setting says so.
        raw = connection.connection
        if not prepared_statements(connection):
            return raw.cursor()
        if raw.prepare_threshold is None:
            # Django connects with prepare_threshold=None, which makes psycopg refuse even
            # an explicit prepare=True. A threshold no statement reaches keeps everything
            # else on the connection unprepared, as Django wants, and lets ours prepare.
            raw.prepare_threshold = sys.maxsize
        return PreparingCursor(raw)

    def id_db_type(self, max_length: int | None) -> str | None:
        # Spelled out so that Django does not add its varchar_pattern_ops "_like" twin to
        # every id index (it keys on the "varchar" prefix): ids are only ever compared for
        # equality, and the twin would double the index work of each insert.
        return f"character varying({max_length})"

    def expires_sql(self) -> str:
        return "statement_timestamp() + make_interval(secs => %s)"

    def ttl_param(self, seconds: float) -> Any:
        return float(seconds)

    def raw_cycle(self, connection_params: dict[str, Any]) -> RawCycle:
        return PostgreSQLRawCycle(connection_params)

    def fill(self, cursor: Cursor, prefix: str, states: int, expired_locks: int) -> None:
        cursor.execute(
            f"INSERT INTO {STATE_TABLE} (machine_id, state, version, fence, execution_status,"
            " created_at, updated_at)"
            " SELECT %s || n, jsonb_build_object('n', n), 1, 0, 'done', now(), now()"
            " FROM generate_series(1, %s) AS n",
            (prefix, states),
        )
        cursor.execute(
            f"INSERT INTO {LOCK_TABLE} (machine_id, owner, token, acquired_at, expires_at)"
            f" SELECT %s || n, 'filler', nextval('{TOKEN_SEQUENCE}'),"
            " now() - interval '2 hours', now() - interval '1 hour'"
            " FROM generate_series(1, %s) AS n",
            (prefix, expired_locks),
        )

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

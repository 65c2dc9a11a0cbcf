"""PostgreSQL statements (psycopg 3 through Django's connection)."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any

import psycopg

from machine_memory.sql.base import LOCK_TABLE, STATE_TABLE, Dialect, state_columns_of, taken_rows

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper
    from django.db.backends.base.schema import BaseDatabaseSchemaEditor

    from machine_memory.sql.base import Cursor, TakenRows


TOKEN_SEQUENCE = "machine_memory_lock_token_seq"


class PreparingCursor(psycopg.Cursor[Any]):
    """A server-side binding cursor that prepares every statement it runs."""

    def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
        return super().execute(query, params, prepare=True)


class PostgreSQLDialect(Dialect):
    vendor = "postgresql"
    # now() is the start of the transaction, which inside a caller's atomic() can be long
    # past; statement_timestamp() is the start of this statement.
    now_sql = "statement_timestamp()"
    json_placeholder = "%s::jsonb"
    # The function installed for lock + read (an attribute: tests install it under another
    # name to try what this code would install).
    acquire_and_read_routine = "machine_memory_acquire_and_read"
    # A release commits without waiting for the WAL flush: LOCAL, so only for its own
    # transaction (releases run in autocommit). A crash that undoes it leaves the lock to
    # its TTL; why that is safe and lock/write/extend are not: docs/design.md#postgresql.
    release_commit_sql = " AND set_config('synchronous_commit', 'off', true) = 'off'"

    def new_cursor(self, connection: BaseDatabaseWrapper, *, prepare: bool) -> Cursor:
        # Django's psycopg connection binds parameters client-side and never prepares, to
        # stay safe behind transaction-mode poolers. Preparing the few hot statements
        # saves their planning on every call (about as long as a round trip); it needs a
        # server-side binding cursor and a session that lasts.
        raw = connection.connection
        if not prepare:
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

    def install(self, schema_editor: BaseDatabaseSchemaEditor) -> None:
        # A sequence is non-transactional and never goes back, so tokens strictly increase
        # per id even after the lock row is purged and created again.
        schema_editor.execute(f"CREATE SEQUENCE IF NOT EXISTS {TOKEN_SEQUENCE}")
        schema_editor.execute(self._acquire_and_read_function())

    def uninstall(self, schema_editor: BaseDatabaseSchemaEditor) -> None:
        schema_editor.execute(f"DROP FUNCTION IF EXISTS {self.acquire_and_read_routine}")
        schema_editor.execute(f"DROP SEQUENCE IF EXISTS {TOKEN_SEQUENCE}")

    def _acquire_and_read_function(self) -> str:
        """The function behind ``acquire_and_read``: the acquire, then the read.

        PL/pgSQL, because each of its statements takes a snapshot of its own (at READ
        COMMITTED): the read sees a state that the previous holder committed while the
        acquire waited for its lock row. One statement with a data-modifying CTE would read
        the snapshot taken before that wait. Its two plans are prepared in the server
        session on first use, as our prepared statements are, and survive a pooler.
        https://www.postgresql.org/docs/current/plpgsql-implementation.html
        """
        # The statement of acquire(), its parameters the function's.
        acquire = self._acquire_sql("l.token, l.acquired_at, l.expires_at")
        acquire %= ("p_id", "p_owner", "p_ttl")
        return (
            f"CREATE OR REPLACE FUNCTION {self.acquire_and_read_routine}"
            "(p_id varchar, p_owner varchar, p_ttl double precision)"
            " RETURNS TABLE (token bigint, acquired_at timestamptz, expires_at timestamptz,"
            " state jsonb, version bigint, execution_status varchar, parent_id varchar,"
            " initiator varchar, source varchar)"
            " LANGUAGE plpgsql VOLATILE AS $body$"
            # The result columns are variables too; in the statements a name is a column.
            " #variable_conflict use_column"
            " DECLARE t bigint; a timestamptz; e timestamptz;"
            f" BEGIN {acquire} INTO t, a, e;"
            " IF NOT FOUND THEN RETURN; END IF;"
            f" RETURN QUERY SELECT t, a, e, {state_columns_of('s')}"
            f" FROM (SELECT 1) AS one LEFT JOIN {STATE_TABLE} AS s ON s.machine_id = p_id;"
            " END $body$"
        )

    def _acquire_sql(self, returning: str) -> str:
        # One round trip: insert, or take over the row only if its lock has expired. The
        # WHERE of DO UPDATE is evaluated on the latest row version under its row lock, so
        # two racing takeovers cannot both win.
        return self.statement(
            ("acquire", returning),
            lambda: (
                f"INSERT INTO {LOCK_TABLE} AS l"
                " (machine_id, owner, token, acquired_at, expires_at)"
                f" VALUES (%s, %s, nextval('{TOKEN_SEQUENCE}'), statement_timestamp(),"
                f" {self.expires_sql()})"
                " ON CONFLICT (machine_id) DO UPDATE SET owner = EXCLUDED.owner,"
                " token = EXCLUDED.token, acquired_at = EXCLUDED.acquired_at,"
                " expires_at = EXCLUDED.expires_at"
                " WHERE l.expires_at <= statement_timestamp()"
                f" RETURNING {returning}"
            ),
        )

    def acquire(self, cursor: Cursor, machine_id: str, owner: str, ttl: float) -> int | None:
        cursor.execute(self._acquire_sql("token"), (machine_id, owner, self.ttl_param(ttl)))
        row = cursor.fetchone()
        return None if row is None else int(row[0])

    def acquire_and_read(
        self, cursor: Cursor, machine_id: str, owner: str, ttl: float
    ) -> TakenRows | None:
        # One statement, one round trip, one commit: the installed function (see
        # _acquire_and_read_function for why not a CTE, and not a pipeline of two
        # statements, which costs the client about twice the work of one statement).
        sql = self.statement(
            "acquire_and_read",
            lambda: f"SELECT * FROM {self.acquire_and_read_routine}(%s, %s, %s)",
        )
        cursor.execute(sql, (machine_id, owner, self.ttl_param(ttl)))
        return taken_rows(cursor.fetchone())

    def write_then_release(
        self, cursor: Cursor, write: str, params: tuple[Any, ...], release: tuple[str, int]
    ) -> tuple[bool, bool]:
        # One statement: the write, and the release only if the write returned its row.
        sql = self.statement(
            ("write_and_release", write),
            lambda: (
                f"WITH w AS ({write} RETURNING 1),"
                f" r AS ({self.release_token_sql()} AND EXISTS (SELECT 1 FROM w) RETURNING 1)"
                " SELECT (SELECT count(*) FROM w), (SELECT count(*) FROM r)"
            ),
        )
        cursor.execute(sql, (*params, *release))
        written, released = cursor.fetchone()
        return written == 1, released == 1

    def session_id(self, raw: Any) -> int | None:
        # From the connection's BackendKeyData: no round trip.
        pid = raw.info.backend_pid
        return int(pid) if pid else None

    def end_session(self, cursor: Cursor, session: int, timeout: float) -> bool:
        # pg_terminate_backend only signals; the backend is gone once pg_stat_activity no
        # longer lists it. A same-role backend may be ended without superuser rights.
        # https://www.postgresql.org/docs/current/functions-admin.html#FUNCTIONS-ADMIN-SIGNAL
        if session == cursor.connection.info.backend_pid:
            return True  # the pid was reused by this very connection: the old one is gone
        cursor.execute("SELECT pg_terminate_backend(%s)", (session,))
        cursor.fetchall()
        deadline = time.monotonic() + timeout
        while True:
            cursor.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (session,))
            if cursor.fetchone() is None:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)

"""MariaDB (>= 10.6) statements through mysqlclient.

Django's MySQL connection sets CLIENT.FOUND_ROWS, so ``rowcount`` is the number of rows a
WHERE matched: every race here is decided by a conditional UPDATE or an INSERT IGNORE whose
count means exactly "won" or "lost".
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Any, cast

from django.core.checks import Warning
from django.db import IntegrityError, OperationalError

from machine_memory.exceptions import MachineMemoryError
from machine_memory.locks.base import Fence
from machine_memory.sql.base import LOCK_TABLE, STATE_TABLE, Dialect, state_columns_of, taken_rows

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from django.core.checks import CheckMessage
    from django.db.backends.base.base import BaseDatabaseWrapper
    from django.db.backends.base.schema import BaseDatabaseSchemaEditor

    from machine_memory.sql.base import Cursor, TakenRows
    from machine_memory.validation import Metadata

TOKEN_SEQUENCE = "machine_memory_lock_token_seq"
# The server's error for KILL of a thread that no longer exists.
ER_NO_SUCH_THREAD = 1094


# A trigger's SIGNAL: the server refusing the statement, reported as OperationalError.
ER_SIGNAL_EXCEPTION = 1644


class _FiledAsDjangoDoes:
    """``connection.wrap_database_errors``, then the server's refusals as ``IntegrityError``.

    mysqlclient reports a statement the schema refuses as OperationalError, the class of a
    lost connection, which the memory would handle as one. Django's MySQL cursor wrapper
    refiles the codes of ``CursorWrapper.codes_for_integrityerror`` (NOT NULL, out of range,
    CHECK); the hot path runs on the driver's cursor, so it is done here, with a trigger's
    SIGNAL besides.
    """

    __slots__ = ("_refusals", "_wrapper")

    def __init__(self, wrapper: AbstractContextManager[None], refusals: frozenset[int]) -> None:
        self._wrapper = wrapper
        self._refusals = refusals

    def __enter__(self) -> None:
        self._wrapper.__enter__()

    def __exit__(self, kind: Any, value: Any, traceback: Any) -> None:
        try:
            self._wrapper.__exit__(kind, value, traceback)
        except OperationalError as exc:
            if exc.args and exc.args[0] in self._refusals:
                raise IntegrityError(*exc.args) from value
            raise


class MySQLDialect(Dialect):
    vendor = "mysql"
    # Django stores naive UTC datetimes on MySQL; CURRENT_TIMESTAMP would follow the
    # session time zone.
    now_sql = "UTC_TIMESTAMP(6)"
    from_nothing = " FROM DUAL"
    # The procedures installed for session() (attributes: tests install them under other
    # names to try what this code would install).
    acquire_and_read_routine = "machine_memory_acquire_and_read"
    write_and_release_routine = "machine_memory_write_and_release"

    def __init__(self) -> None:
        super().__init__()
        # Imported here: this module is imported only for MySQL connections, whose driver
        # Django's MySQL backend needs.
        from django.db.backends.mysql.base import CursorWrapper

        self._refusals = frozenset((*CursorWrapper.codes_for_integrityerror, ER_SIGNAL_EXCEPTION))

    def errors(self, connection: BaseDatabaseWrapper) -> AbstractContextManager[None]:
        return _FiledAsDjangoDoes(connection.wrap_database_errors, self._refusals)

    def check_settings(self, alias: str, settings_dict: dict[str, Any]) -> list[CheckMessage]:
        # Under REPEATABLE READ, InnoDB takes shared locks on the lock row that a fenced
        # write reads in its EXISTS, held until the caller's transaction ends: a lock() or
        # unlock() from another connection then waits for innodb_lock_wait_timeout. Django
        # defaults to READ COMMITTED, where those reads are plain consistent reads.
        level = settings_dict.get("OPTIONS", {}).get("isolation_level", "read committed")
        if str(level).lower() == "read committed":
            return []
        return [
            Warning(
                f"Database {alias!r} uses isolation level {level!r}; fenced writes inside "
                "transaction.atomic() then block other workers' lock() and unlock() until "
                "the transaction ends.",
                hint="Remove OPTIONS['isolation_level'] (Django's default is 'read committed') "
                "or set it to 'read committed'.",
                id="machine_memory.W002",
            )
        ]

    def id_db_type(self, max_length: int | None) -> str | None:
        # Django's mysql.W003 warns about unique varchar columns longer than 255 because
        # old row formats capped index keys at 767 bytes. InnoDB's DYNAMIC row format (the
        # default since MariaDB 10.2 and MySQL 5.7) allows 3072, and 512 utf8mb4
        # characters take 2048. The warning keys on a lower-case "varchar" prefix.
        return f"VARCHAR({max_length})"

    def id_collation(self, connection: BaseDatabaseWrapper) -> str | None:
        # Binary and NO PAD: ids differing only in case, accents or trailing spaces stay
        # distinct. https://mariadb.com/kb/en/supported-character-sets-and-collations/
        if getattr(connection, "mysql_is_mariadb", True):
            return "utf8mb4_nopad_bin"
        return "utf8mb4_0900_bin"

    def state_db_type(self, connection: BaseDatabaseWrapper) -> str | None:
        # MariaDB's JSON type is LONGTEXT plus CHECK (JSON_VALID(...)), and before 12.2
        # JSON_VALID() refuses documents nested deeper than 32 levels, while a state may
        # be nested at any depth (encode_state() has validated every document already).
        # https://mariadb.com/docs/server/reference/sql-functions/special-functions/json-functions/json_depth
        if getattr(connection, "mysql_is_mariadb", False):
            return "longtext"
        return None

    def expires_sql(self) -> str:
        return "UTC_TIMESTAMP(6) + INTERVAL %s MICROSECOND"

    def ttl_param(self, seconds: float) -> Any:
        return round(float(seconds) * 1_000_000)

    def install(self, schema_editor: BaseDatabaseSchemaEditor) -> None:
        # MySQL has no sequences, and so no database locks (_require_sequences).
        if getattr(schema_editor.connection, "mysql_is_mariadb", False):
            schema_editor.execute(f"CREATE SEQUENCE IF NOT EXISTS {TOKEN_SEQUENCE}")
            for procedure in self._procedures():
                schema_editor.execute(procedure)

    def uninstall(self, schema_editor: BaseDatabaseSchemaEditor) -> None:
        if getattr(schema_editor.connection, "mysql_is_mariadb", False):
            for name in (self.acquire_and_read_routine, self.write_and_release_routine):
                schema_editor.execute(f"DROP PROCEDURE IF EXISTS {name}")
            schema_editor.execute(f"DROP SEQUENCE IF EXISTS {TOKEN_SEQUENCE}")

    def insert_if_absent_sql(self, table: str, columns: str, select: str) -> str:
        # INSERT IGNORE reports 0 rows for a duplicate key without raising. (It also turns
        # some data errors into warnings; every value here is validated beforehand.)
        return f"INSERT IGNORE INTO {table} ({columns}) {select}"

    def _takeover_sql(self) -> str:
        """Take over an expired lock row; parameters: owner, TTL, machine id.

        LAST_INSERT_ID(expr) hands the new token back through the protocol's insert id
        (``cursor.lastrowid``), which saves the SELECT that MariaDB's lack of UPDATE ...
        RETURNING would otherwise cost.
        """
        return self.statement(
            "acquire",
            lambda: (
                f"UPDATE {LOCK_TABLE} SET owner = %s,"
                f" token = LAST_INSERT_ID(NEXTVAL({TOKEN_SEQUENCE})),"
                f" acquired_at = UTC_TIMESTAMP(6), expires_at = {self.expires_sql()}"
                " WHERE machine_id = %s AND expires_at <= UTC_TIMESTAMP(6)"
            ),
        )

    def _first_use_sql(self) -> str:
        """Insert the lock row of an id never locked (or purged); parameters: machine id,
        owner, TTL. INSERT IGNORE: a live lock's row makes it insert nothing, quietly."""
        return self.statement(
            "acquire-insert",
            lambda: (
                f"INSERT IGNORE INTO {LOCK_TABLE} (machine_id, owner, token, acquired_at,"
                f" expires_at) VALUES (%s, %s, LAST_INSERT_ID(NEXTVAL({TOKEN_SEQUENCE})),"
                f" UTC_TIMESTAMP(6), {self.expires_sql()})"
            ),
        )

    def acquire(self, cursor: Cursor, machine_id: str, owner: str, ttl: float) -> int | None:
        self._require_sequences(cursor)
        ttl_param = self.ttl_param(ttl)
        cursor.execute(self._takeover_sql(), (owner, ttl_param, machine_id))
        if cursor.rowcount == 1:
            return int(cursor.lastrowid)
        # No expired row to take over: either a live lock exists or this is the first use
        # of the id. INSERT IGNORE settles which without raising.
        cursor.execute(self._first_use_sql(), (machine_id, owner, ttl_param))
        if cursor.rowcount == 1:
            return int(cursor.lastrowid)
        return None

    # -- the cycle in two round trips: stored procedures ---------------------------------
    #
    # A CALL is one round trip, as a multi-statement batch is, but the server parses the
    # procedure once per connection instead of every statement of the batch each time, and
    # the client reads one result instead of one per statement: about 80 µs less for lock +
    # read and 45 µs less for write + release here than the batches they replaced. Their
    # statements are the very statements of acquire() and write(), with the procedure's
    # parameters in place of the placeholders.

    def _procedures(self) -> list[str]:
        # Ids compare as the id columns do: binary, NO PAD (see id_collation).
        id_type = "VARCHAR(512) CHARACTER SET utf8mb4 COLLATE utf8mb4_nopad_bin"
        read_lock_and_state = (
            f"SELECT l.token, l.acquired_at, l.expires_at, {state_columns_of('s')}"
            f" FROM {LOCK_TABLE} l LEFT JOIN {STATE_TABLE} s ON s.machine_id = l.machine_id"
            " WHERE l.machine_id = p_id AND l.token = t"
        )
        # In autocommit each statement commits on its own, so the read comes after the
        # lock committed and sees every state committed before it.
        acquire_and_read = (
            f"CREATE OR REPLACE PROCEDURE {self.acquire_and_read_routine}"
            f"(p_id {id_type}, p_owner VARCHAR(255), p_ttl BIGINT)"
            " BEGIN DECLARE t BIGINT DEFAULT 0;"
            f" {self._takeover_sql() % ('p_owner', 'p_ttl', 'p_id')};"
            " IF ROW_COUNT() = 1 THEN SET t = LAST_INSERT_ID(); ELSE"
            f" {self._first_use_sql() % ('p_id', 'p_owner', 'p_ttl')};"
            " IF ROW_COUNT() = 1 THEN SET t = LAST_INSERT_ID(); END IF; END IF;"
            f" IF t > 0 THEN {read_lock_and_state}; END IF; END"
        )
        # The session's write: a create, or an update with or without the metadata columns,
        # fenced by the lock's token; then the release only if it landed; one transaction.
        fence = Fence(lock_token=cast("int", "p_token"))
        meta = ("p_status", "p_parent", "p_initiator", "p_source")
        create, create_params = self.state_write("p_id", "p_state", None, meta, fence)
        update_meta, update_meta_params = self.state_write(
            "p_id", "p_state", cast("int", "p_expected"), meta, fence
        )
        update, update_params = self.state_write(
            "p_id", "p_state", cast("int", "p_expected"), None, fence
        )
        release = self.release_token_sql() % ("p_id", "p_token")
        write_and_release = (
            f"CREATE OR REPLACE PROCEDURE {self.write_and_release_routine}"
            f"(p_id {id_type}, p_state LONGTEXT, p_expected BIGINT, p_meta BOOLEAN,"
            f" p_status VARCHAR(64), p_parent {id_type}, p_initiator VARCHAR(255),"
            " p_source VARCHAR(255), p_token BIGINT)"
            " BEGIN DECLARE w INT DEFAULT 0; DECLARE r INT DEFAULT 0;"
            # An error (a refusal of the schema, say) ends the transaction before it is
            # raised, with its own code.
            " DECLARE EXIT HANDLER FOR SQLEXCEPTION BEGIN ROLLBACK; RESIGNAL; END;"
            " START TRANSACTION;"
            f" IF p_expected IS NULL THEN {create % create_params};"
            f" ELSEIF p_meta THEN {update_meta % update_meta_params};"
            f" ELSE {update % update_params}; END IF;"
            " SET w = ROW_COUNT();"
            f" IF w = 1 THEN {release}; SET r = ROW_COUNT(); END IF;"
            " COMMIT; SELECT w, r; END"
        )
        return [acquire_and_read, write_and_release]

    def acquire_and_read(
        self, cursor: Cursor, machine_id: str, owner: str, ttl: float
    ) -> TakenRows | None:
        self._require_sequences(cursor)
        sql = self.statement(
            "acquire_and_read", lambda: f"CALL {self.acquire_and_read_routine}(%s, %s, %s)"
        )
        # No row when no lock row carries a token of this call: denied.
        return taken_rows(_call(cursor, sql, (machine_id, owner, self.ttl_param(ttl))))

    def write_and_release(
        self,
        cursor: Cursor,
        machine_id: str,
        text: str,
        expected_version: int | None,
        meta: Metadata | None,
        token: int,
    ) -> tuple[bool, bool]:
        sql = self.statement(
            "write_and_release",
            lambda: f"CALL {self.write_and_release_routine}(%s, %s, %s, %s, %s, %s, %s, %s, %s)",
        )
        columns = meta if meta is not None else (None, None, None, None)
        params = (machine_id, text, expected_version, meta is not None, *columns, token)
        try:
            counts = _call(cursor, sql, params)
        except BaseException:
            # The procedure rolls back on an error; a connection lost meanwhile may not
            # have: end whatever transaction is left.
            _rollback_quietly(cursor)
            raise
        assert counts is not None
        return counts[0] == 1, counts[1] == 1

    def force_release(self, cursor: Cursor, machine_id: str) -> tuple[Any, ...] | None:
        # No UPDATE ... RETURNING here: read the live lock under a row lock, then expire it,
        # in one transaction, so the lock reported is the one released.
        read = self.statement(
            "force_release-read",
            lambda: (
                f"SELECT owner, token, acquired_at, UTC_TIMESTAMP(6) FROM {LOCK_TABLE}"
                " WHERE machine_id = %s AND expires_at > UTC_TIMESTAMP(6) FOR UPDATE"
            ),
        )
        expire = self.statement(
            "force_release",
            lambda: f"UPDATE {LOCK_TABLE} SET expires_at = %s WHERE machine_id = %s",
        )
        # The lock backend's connections are in autocommit (DatabaseLockBackend.connection),
        # so START TRANSACTION commits nothing of the caller's.
        connection = cursor.connection
        cursor.execute("START TRANSACTION")
        try:
            row = self._expire_live(cursor, read, expire, machine_id)
        except BaseException:
            connection.rollback()
            raise
        connection.commit()
        return row

    @staticmethod
    def _expire_live(
        cursor: Cursor, read: str, expire: str, machine_id: str
    ) -> tuple[Any, ...] | None:
        cursor.execute(read, (machine_id,))
        row = cursor.fetchone()
        if row is None:
            return None
        owner, token, acquired_at, now = row
        cursor.execute(expire, (now, machine_id))
        released: tuple[Any, ...] = (owner, token, acquired_at, now)
        return released

    def session_id(self, raw: Any) -> int | None:
        # From the handshake: no round trip.
        return int(raw.thread_id())

    def end_session(self, cursor: Cursor, session: int, timeout: float) -> bool:
        # KILL ends the connection (and rolls back its statement) once the server gets to
        # it; the thread stays in the process list until then.
        # https://mariadb.com/kb/en/kill/
        import MySQLdb

        if session == cursor.connection.thread_id():
            return True
        try:
            cursor.execute("KILL %s", (session,))
        except MySQLdb.OperationalError as exc:
            if exc.args[0] != ER_NO_SUCH_THREAD:
                raise
        deadline = time.monotonic() + timeout
        while True:
            cursor.execute("SELECT 1 FROM information_schema.PROCESSLIST WHERE ID = %s", (session,))
            if cursor.fetchone() is None:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)

    @staticmethod
    def _require_sequences(cursor: Cursor) -> None:
        # The server version string arrives with the handshake: no round trip.
        if "mariadb" not in cursor.connection.get_server_info().lower():
            raise MachineMemoryError(
                "Database locks on MySQL need sequences, which only MariaDB has; "
                "use MariaDB or a Redis lock backend."
            )


def _call(cursor: Cursor, sql: str, params: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """CALL a procedure; the first row of its result (None when it selected nothing).

    Every result is read, the CALL's own status included, so that an error anywhere raises
    here and the connection is ready for the next statement."""
    cursor.execute(sql, params)
    row = cursor.fetchone() if cursor.description else None
    while cursor.nextset():
        pass
    return row


def _rollback_quietly(cursor: Cursor) -> None:
    # If the connection is gone, so is its transaction.
    with contextlib.suppress(Exception):
        cursor.connection.rollback()

"""The baseline of the benchmark: the Arvo cycle hand-written on the bare driver.

What a user would write without this app, with the driver's defaults: two minimal tables
of their own, (id, data, version) and (id, owner, expires_at), with primary keys only,
and the cheapest correct statement for each of lock (upsert only if expired), read, write
(insert, or update only if the version is unchanged) and unlock (delete our own lock). No
validation, no fencing tokens, no metadata, no timestamps. The tables are made for a run
and dropped after it. Also the filler rows of the scale runs (in the app's tables).

``--raw-session`` adds the same cycle in two round trips on the same tables, lock + read
and write + unlock (``RawCycle.take`` and ``RawCycle.give``): the least a cycle shaped like
``session()`` can cost on this machine, with none of its guarantees. It is a yardstick for
the session's ratio, not a way anyone should write the cycle (docs/performance.md).

Benchmark code only: the app's own statements live in ``machine_memory.sql``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from machine_memory.sql.base import LOCK_TABLE, STATE_TABLE

if TYPE_CHECKING:
    from collections.abc import Callable

    from django.db.backends.base.base import BaseDatabaseWrapper

    from machine_memory.sql.base import Cursor

TOKEN_SEQUENCE = "machine_memory_lock_token_seq"
# SQLite's clock, as the app's statements write it.
NOW = "strftime('%Y-%m-%d %H:%M:%f', 'now')"


@dataclass(frozen=True)
class Tables:
    """The names of one run's baseline tables (and routines, where a vendor needs them)."""

    base: str

    @classmethod
    def for_run(cls, run: str) -> Tables:
        """Tables named after ``run`` (letters and digits): runs side by side never meet."""
        assert run.isalnum(), run
        return cls(f"mm_bench_{run}")

    @property
    def state(self) -> str:
        return f"{self.base}_state"

    @property
    def lock(self) -> str:
        return f"{self.base}_lock"

    @property
    def names(self) -> dict[str, str]:
        """For ``str.format`` of the schema: {state}, {lock}, {take}, {give}."""
        return {
            "state": self.state,
            "lock": self.lock,
            "take": f"{self.base}_take",
            "give": f"{self.base}_give",
        }


class RawCycle:
    """The four operations on a driver connection of its own."""

    # CREATE TABLE statements, with {state} and {lock} for the table names.
    schema: tuple[str, str] = ("", "")
    # CREATE PROCEDURE statements of the two-trip cycle, named {take} and {give}.
    routines: tuple[str, ...] = ()

    def __init__(self, settings_params: dict[str, Any], tables: Tables) -> None:
        self.params = settings_params
        self.state, self.lock_table = tables.state, tables.lock
        self.names = tables.names

    def lock(self, machine_id: str, owner: str, ttl: float) -> bool:
        raise NotImplementedError

    def read(self, machine_id: str) -> tuple[str, int] | None:
        raise NotImplementedError

    def write(self, machine_id: str, text: str, version: int | None) -> bool:
        raise NotImplementedError

    def unlock(self, machine_id: str, owner: str) -> bool:
        raise NotImplementedError

    # The two-trip cycle (--raw-session): each method one round trip and at most one commit.

    def take(self, machine_id: str, owner: str, ttl: float) -> tuple[bool, tuple[str, int] | None]:
        """Lock, and read the state if the lock was taken: (locked, row or None)."""
        raise NotImplementedError

    def give(self, machine_id: str, owner: str, text: str, version: int | None) -> bool:
        """Write as ``write`` does and, if that landed, unlock, in one transaction."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class PostgreSQLRawCycle(RawCycle):
    schema = (
        "CREATE TABLE {state} (machine_id text PRIMARY KEY, data jsonb NOT NULL,"
        " version bigint NOT NULL)",
        "CREATE TABLE {lock} (machine_id text PRIMARY KEY, owner text NOT NULL,"
        " expires_at timestamptz NOT NULL)",
    )

    def __init__(self, settings_params: dict[str, Any], tables: Tables) -> None:
        import psycopg

        super().__init__(settings_params, tables)
        params = dict(settings_params)
        # Django's own choices (client-side binding, no preparing); the baseline uses
        # psycopg's defaults, which prepare a statement after its fifth execution.
        for key in ("cursor_factory", "context", "prepare_threshold"):
            params.pop(key, None)
        self.connection = psycopg.connect(**params, autocommit=True)
        self.cursor = self.connection.cursor()

    def lock(self, machine_id: str, owner: str, ttl: float) -> bool:
        self.cursor.execute(
            f"INSERT INTO {self.lock_table} AS l (machine_id, owner, expires_at)"
            " VALUES (%s, %s, now() + make_interval(secs => %s))"
            " ON CONFLICT (machine_id) DO UPDATE SET owner = EXCLUDED.owner,"
            " expires_at = EXCLUDED.expires_at WHERE l.expires_at <= now() RETURNING 1",
            (machine_id, owner, ttl),
        )
        return self.cursor.fetchone() is not None

    def read(self, machine_id: str) -> tuple[str, int] | None:
        self.cursor.execute(
            f"SELECT data::text, version FROM {self.state} WHERE machine_id = %s",
            (machine_id,),
        )
        return self.cursor.fetchone()

    def write(self, machine_id: str, text: str, version: int | None) -> bool:
        if version is None:
            self.cursor.execute(
                f"INSERT INTO {self.state} (machine_id, data, version)"
                " VALUES (%s, %s::jsonb, 1) ON CONFLICT (machine_id) DO NOTHING",
                (machine_id, text),
            )
        else:
            self.cursor.execute(
                f"UPDATE {self.state} SET data = %s::jsonb, version = version + 1"
                " WHERE machine_id = %s AND version = %s",
                (text, machine_id, version),
            )
        return int(self.cursor.rowcount) == 1

    def unlock(self, machine_id: str, owner: str) -> bool:
        self.cursor.execute(
            f"DELETE FROM {self.lock_table} WHERE machine_id = %s AND owner = %s",
            (machine_id, owner),
        )
        return int(self.cursor.rowcount) == 1

    def take(self, machine_id: str, owner: str, ttl: float) -> tuple[bool, tuple[str, int] | None]:
        # The CTE's read uses the statement's snapshot, taken before any wait for the lock
        # row: it can miss a state committed meanwhile. Uncontended here; wrong in real use.
        self.cursor.execute(
            f"WITH l AS (INSERT INTO {self.lock_table} AS l (machine_id, owner, expires_at)"
            " VALUES (%s, %s, now() + make_interval(secs => %s))"
            " ON CONFLICT (machine_id) DO UPDATE SET owner = EXCLUDED.owner,"
            " expires_at = EXCLUDED.expires_at WHERE l.expires_at <= now() RETURNING 1)"
            " SELECT EXISTS (SELECT 1 FROM l), s.data::text, s.version FROM (SELECT 1) AS one"
            f" LEFT JOIN {self.state} AS s ON s.machine_id = %s",
            (machine_id, owner, ttl, machine_id),
        )
        row = self.cursor.fetchone()
        assert row is not None  # the LEFT JOIN always gives one row
        locked, data, version = row
        return bool(locked), None if data is None or not locked else (data, version)

    def give(self, machine_id: str, owner: str, text: str, version: int | None) -> bool:
        if version is None:
            write = (
                f"INSERT INTO {self.state} (machine_id, data, version)"
                " VALUES (%s, %s::jsonb, 1) ON CONFLICT (machine_id) DO NOTHING RETURNING 1"
            )
            params: tuple[Any, ...] = (machine_id, text)
        else:
            write = (
                f"UPDATE {self.state} SET data = %s::jsonb, version = version + 1"
                " WHERE machine_id = %s AND version = %s RETURNING 1"
            )
            params = (text, machine_id, version)
        self.cursor.execute(
            f"WITH w AS ({write}), u AS (DELETE FROM {self.lock_table}"
            " WHERE machine_id = %s AND owner = %s AND EXISTS (SELECT 1 FROM w))"
            " SELECT EXISTS (SELECT 1 FROM w)",
            (*params, machine_id, owner),
        )
        row = self.cursor.fetchone()
        assert row is not None
        return bool(row[0])

    def close(self) -> None:
        self.connection.close()


class MySQLRawCycle(RawCycle):
    # The server's defaults for everything else (utf8mb4 and its default collation).
    schema = (
        "CREATE TABLE {state} (machine_id VARCHAR(512) PRIMARY KEY, data JSON NOT NULL,"
        " version BIGINT NOT NULL)",
        "CREATE TABLE {lock} (machine_id VARCHAR(512) PRIMARY KEY,"
        " owner VARCHAR(255) NOT NULL, expires_at DATETIME(6) NOT NULL)",
    )
    # A CALL is one round trip; the statements are lock(), read(), write() and unlock()'s.
    routines = (
        "CREATE PROCEDURE {take}(p_id VARCHAR(512), p_owner VARCHAR(255), p_ttl BIGINT)"
        " BEGIN DECLARE locked INT DEFAULT 0;"
        " UPDATE {lock} SET owner = p_owner,"
        " expires_at = UTC_TIMESTAMP(6) + INTERVAL p_ttl MICROSECOND"
        " WHERE machine_id = p_id AND expires_at <= UTC_TIMESTAMP(6);"
        " SET locked = ROW_COUNT();"
        " IF locked = 0 THEN INSERT IGNORE INTO {lock} (machine_id, owner, expires_at)"
        " VALUES (p_id, p_owner, UTC_TIMESTAMP(6) + INTERVAL p_ttl MICROSECOND);"
        " SET locked = ROW_COUNT(); END IF;"
        " IF locked = 1 THEN SELECT 1, s.data, s.version FROM (SELECT 1) AS one"
        " LEFT JOIN {state} AS s ON s.machine_id = p_id;"
        " ELSE SELECT 0, NULL, NULL; END IF; END",
        "CREATE PROCEDURE {give}(p_id VARCHAR(512), p_owner VARCHAR(255), p_data LONGTEXT,"
        " p_version BIGINT)"
        " BEGIN DECLARE written INT DEFAULT 0;"
        " DECLARE EXIT HANDLER FOR SQLEXCEPTION BEGIN ROLLBACK; RESIGNAL; END;"
        " START TRANSACTION;"
        " IF p_version IS NULL THEN"
        " INSERT IGNORE INTO {state} (machine_id, data, version) VALUES (p_id, p_data, 1);"
        " ELSE UPDATE {state} SET data = p_data, version = version + 1"
        " WHERE machine_id = p_id AND version = p_version; END IF;"
        " SET written = ROW_COUNT();"
        " IF written = 1 THEN DELETE FROM {lock} WHERE machine_id = p_id AND owner = p_owner;"
        " END IF; COMMIT; SELECT written; END",
    )

    def __init__(self, settings_params: dict[str, Any], tables: Tables) -> None:
        import MySQLdb

        super().__init__(settings_params, tables)
        params = dict(settings_params)
        # Django's conversions and FOUND_ROWS flag; the baseline uses the driver's defaults
        # (rowcount = rows changed, which these statements can use just as well).
        params.pop("conv", None)
        params.pop("client_flag", None)
        self.connection = MySQLdb.connect(**params, autocommit=True)
        self.cursor = self.connection.cursor()

    def lock(self, machine_id: str, owner: str, ttl: float) -> bool:
        micros = round(ttl * 1_000_000)
        self.cursor.execute(
            f"UPDATE {self.lock_table} SET owner = %s,"
            " expires_at = UTC_TIMESTAMP(6) + INTERVAL %s MICROSECOND"
            " WHERE machine_id = %s AND expires_at <= UTC_TIMESTAMP(6)",
            (owner, micros, machine_id),
        )
        if self.cursor.rowcount == 1:
            return True
        self.cursor.execute(
            f"INSERT IGNORE INTO {self.lock_table} (machine_id, owner, expires_at)"
            " VALUES (%s, %s, UTC_TIMESTAMP(6) + INTERVAL %s MICROSECOND)",
            (machine_id, owner, micros),
        )
        return int(self.cursor.rowcount) == 1

    def read(self, machine_id: str) -> tuple[str, int] | None:
        self.cursor.execute(
            f"SELECT data, version FROM {self.state} WHERE machine_id = %s", (machine_id,)
        )
        return self.cursor.fetchone()  # type: ignore[no-any-return]

    def write(self, machine_id: str, text: str, version: int | None) -> bool:
        if version is None:
            self.cursor.execute(
                f"INSERT IGNORE INTO {self.state} (machine_id, data, version) VALUES (%s, %s, 1)",
                (machine_id, text),
            )
        else:
            self.cursor.execute(
                f"UPDATE {self.state} SET data = %s, version = version + 1"
                " WHERE machine_id = %s AND version = %s",
                (text, machine_id, version),
            )
        return int(self.cursor.rowcount) == 1

    def unlock(self, machine_id: str, owner: str) -> bool:
        self.cursor.execute(
            f"DELETE FROM {self.lock_table} WHERE machine_id = %s AND owner = %s",
            (machine_id, owner),
        )
        return int(self.cursor.rowcount) == 1

    def _call(self, routine: str, params: tuple[Any, ...]) -> tuple[Any, ...]:
        # Every result of the CALL is read, its own status included, before the next one.
        placeholders = ", ".join(["%s"] * len(params))
        self.cursor.execute(f"CALL {self.names[routine]}({placeholders})", params)
        row = self.cursor.fetchone()
        while self.cursor.nextset():
            pass
        return row  # type: ignore[no-any-return]

    def take(self, machine_id: str, owner: str, ttl: float) -> tuple[bool, tuple[str, int] | None]:
        locked, data, version = self._call("take", (machine_id, owner, round(ttl * 1_000_000)))
        return locked == 1, None if data is None else (data, version)

    def give(self, machine_id: str, owner: str, text: str, version: int | None) -> bool:
        (written,) = self._call("give", (machine_id, owner, text, version))
        return int(written) == 1

    def close(self) -> None:
        self.connection.close()


class SQLiteRawCycle(RawCycle):
    schema = (
        "CREATE TABLE {state} (machine_id TEXT PRIMARY KEY, data TEXT NOT NULL,"
        " version INTEGER NOT NULL)",
        "CREATE TABLE {lock} (machine_id TEXT PRIMARY KEY, owner TEXT NOT NULL,"
        " expires_at TEXT NOT NULL)",
    )

    def __init__(self, settings_params: dict[str, Any], tables: Tables) -> None:
        import sqlite3

        super().__init__(settings_params, tables)
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
            f"INSERT INTO {self.lock_table} AS l (machine_id, owner, expires_at)"
            " VALUES (?, ?, strftime('%Y-%m-%d %H:%M:%f', 'now', ?))"
            " ON CONFLICT (machine_id) DO UPDATE SET owner = excluded.owner,"
            f" expires_at = excluded.expires_at WHERE l.expires_at <= {NOW} RETURNING 1",
            (machine_id, owner, f"+{ttl:.3f} seconds"),
        )
        return bool(self.cursor.fetchall())

    def read(self, machine_id: str) -> tuple[str, int] | None:
        self.cursor.execute(
            f"SELECT data, version FROM {self.state} WHERE machine_id = ?", (machine_id,)
        )
        return self.cursor.fetchone()  # type: ignore[no-any-return]

    def write(self, machine_id: str, text: str, version: int | None) -> bool:
        if version is None:
            self.cursor.execute(
                f"INSERT INTO {self.state} (machine_id, data, version) VALUES (?, ?, 1)"
                " ON CONFLICT (machine_id) DO NOTHING",
                (machine_id, text),
            )
        else:
            self.cursor.execute(
                f"UPDATE {self.state} SET data = ?, version = version + 1"
                " WHERE machine_id = ? AND version = ?",
                (text, machine_id, version),
            )
        return int(self.cursor.rowcount) == 1

    def unlock(self, machine_id: str, owner: str) -> bool:
        self.cursor.execute(
            f"DELETE FROM {self.lock_table} WHERE machine_id = ? AND owner = ?",
            (machine_id, owner),
        )
        return int(self.cursor.rowcount) == 1

    def take(self, machine_id: str, owner: str, ttl: float) -> tuple[bool, tuple[str, int] | None]:
        # In-process: no round trips to save, and each statement commits on its own.
        if not self.lock(machine_id, owner, ttl):
            return False, None
        return True, self.read(machine_id)

    def give(self, machine_id: str, owner: str, text: str, version: int | None) -> bool:
        # One transaction, one commit; BEGIN IMMEDIATE takes the write lock first.
        self.cursor.execute("BEGIN IMMEDIATE")
        try:
            written = self.write(machine_id, text, version)
            if written:
                self.unlock(machine_id, owner)
        except BaseException:
            self.cursor.execute("ROLLBACK")
            raise
        self.cursor.execute("COMMIT")
        return written

    def close(self) -> None:
        self.connection.close()


def fill_postgresql(cursor: Cursor, prefix: str, states: int, expired_locks: int) -> None:
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


def fill_mysql(cursor: Cursor, prefix: str, states: int, expired_locks: int) -> None:
    # seq_1_to_N is a table of MariaDB's Sequence engine, made up on the fly.
    cursor.execute(
        f"INSERT INTO {STATE_TABLE} (machine_id, state, version, fence, execution_status,"
        " created_at, updated_at) SELECT CONCAT(%s, seq), JSON_OBJECT('n', seq), 1, 0,"
        f" 'done', UTC_TIMESTAMP(6), UTC_TIMESTAMP(6) FROM seq_1_to_{int(states)}",
        (prefix,),
    )
    cursor.execute(
        f"INSERT INTO {LOCK_TABLE} (machine_id, owner, token, acquired_at, expires_at)"
        f" SELECT CONCAT(%s, seq), 'filler', NEXTVAL({TOKEN_SEQUENCE}),"
        " UTC_TIMESTAMP(6) - INTERVAL 2 HOUR, UTC_TIMESTAMP(6) - INTERVAL 1 HOUR"
        f" FROM seq_1_to_{int(expired_locks)}",
        (prefix,),
    )


def fill_sqlite(cursor: Cursor, prefix: str, states: int, expired_locks: int) -> None:
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


CYCLES: dict[str, type[RawCycle]] = {
    "postgresql": PostgreSQLRawCycle,
    "mysql": MySQLRawCycle,
    "sqlite": SQLiteRawCycle,
}
FILLS: dict[str, Callable[[Cursor, str, int, int], None]] = {
    "postgresql": fill_postgresql,
    "mysql": fill_mysql,
    "sqlite": fill_sqlite,
}


def raw_cycle(connection: BaseDatabaseWrapper, tables: Tables) -> RawCycle:
    """A RawCycle on a new driver connection with the parameters of Django's ``connection``."""
    return CYCLES[connection.vendor](connection.get_connection_params(), tables)


def _run_on_driver(connection: BaseDatabaseWrapper, statements: list[str]) -> None:
    # The driver's own cursor, in autocommit: the statements are the baseline's, not Django's.
    connection.ensure_connection()
    with connection.wrap_database_errors:
        cursor = connection.connection.cursor()
        try:
            for sql in statements:
                cursor.execute(sql)
        finally:
            cursor.close()


def create_tables(connection: BaseDatabaseWrapper, tables: Tables) -> None:
    """Create a run's baseline tables (and routines), as a user of the bare driver would."""
    cycle = CYCLES[connection.vendor]
    statements = cycle.schema + cycle.routines
    _run_on_driver(connection, [sql.format(**tables.names) for sql in statements])


def drop_tables(connection: BaseDatabaseWrapper, tables: Tables) -> None:
    names = tables.names
    routines = [names["take"], names["give"]] if CYCLES[connection.vendor].routines else []
    _run_on_driver(
        connection,
        [f"DROP PROCEDURE IF EXISTS {routine}" for routine in routines]
        + [f"DROP TABLE IF EXISTS {table}" for table in (tables.state, tables.lock)],
    )


def fill(connection: BaseDatabaseWrapper, prefix: str, states: int, expired_locks: int) -> None:
    """Insert filler rows (ids under ``prefix``) for the benchmark's scale runs."""
    # The driver's own cursor: the statements are written in its paramstyle.
    connection.ensure_connection()
    with connection.wrap_database_errors:
        cursor = connection.connection.cursor()
        try:
            FILLS[connection.vendor](cursor, prefix, states, expired_locks)
        finally:
            cursor.close()

"""The driver's own cursor on a Django connection, and the server session it belongs to.

The memory's few fixed statements run on the DB-API cursor rather than Django's cursor
wrapper, which costs more per statement than a small statement takes on SQLite
(docs/design.md#the-drivers-cursor). Everything else stays Django's: settings,
transactions, reconnects, and the ``django.db`` exception classes, because callers run
statements inside ``Dialect.errors()`` (Django's ``wrap_database_errors``). Whenever
Django would show a statement to someone (``DEBUG`` query logging,
``connection.execute_wrapper()``), the cursor is wrapped so that ours are shown too
(``ObservedCursor``).
"""

from __future__ import annotations

import functools
import logging
import time
from typing import TYPE_CHECKING, Any

from machine_memory.conf import conf
from machine_memory.sql import dialect_for

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper

    from machine_memory.sql.base import Cursor

# Django's logger of SQL statements (under DEBUG), which the debug toolbar and log
# configurations already listen to.
sql_logger = logging.getLogger("django.db.backends")

# Where the reusable cursor is kept on Django's connection object: the driver connection
# it belongs to (a reconnect makes a new one), the cursor, and the server's id of that
# session, noted while the connection is healthy (a broken psycopg connection reports 0).
_ATTRIBUTE = "_machine_memory_cursor"


def prepared_statements(connection: BaseDatabaseWrapper) -> bool:
    """Whether hot statements may be prepared on the server (PostgreSQL).

    Prepared statements live in the server session, which a transaction-mode pooler does
    not keep: off where the alias says a pooler is in the way (Django's
    DISABLE_SERVER_SIDE_CURSORS hint) unless PREPARED_STATEMENTS says otherwise.
    """
    setting = conf.PREPARED_STATEMENTS
    if setting is not None:
        return setting
    return not connection.settings_dict.get("DISABLE_SERVER_SIDE_CURSORS", False)


def in_callers_transaction(connection: BaseDatabaseWrapper) -> bool:
    """Whether ``connection`` is inside a transaction of the caller's: an ``atomic()``
    block, or autocommit turned off (``transaction.set_autocommit(False)``).

    Statements there commit, or roll back, with the caller; a lock must then use a
    connection of its own, and a failed connection must not be replaced under the caller.
    """
    if connection.in_atomic_block:
        return True
    if connection.connection is None:
        # Before Django connects, ``autocommit`` is False whatever the settings say; once
        # connected it follows DATABASES' AUTOCOMMIT (True unless the project turned
        # Django's transaction management off).
        return not connection.settings_dict.get("AUTOCOMMIT", True)
    return not connection.autocommit


def own_connection(connection: BaseDatabaseWrapper) -> BaseDatabaseWrapper:
    """A new connection to ``connection``'s database, in autocommit whatever its settings say.

    For statements that must commit at once while ``connection`` is in a transaction of the
    caller's. ``connections.create_connection()`` would take the alias's ``AUTOCOMMIT``,
    and with ``AUTOCOMMIT: False`` in DATABASES a lock taken there would never commit.
    Closing it is the caller's business.
    """
    settings_dict = {**connection.settings_dict, "AUTOCOMMIT": True}
    return type(connection)(settings_dict, connection.alias)


def cursor_for(connection: BaseDatabaseWrapper) -> Cursor:
    """A DB-API cursor of ``connection``, connecting first if needed.

    Call it inside ``dialect.errors(connection)`` (``Dialect.errors``).
    """
    # What Django's cursor() does first: with CONN_HEALTH_CHECKS, a persistent connection
    # is checked once per request (a flag afterwards) and replaced if the server dropped
    # it, so the first statement of a request does not fail on a dead connection.
    connection.close_if_health_check_failed()
    raw = connection.connection
    if raw is None:
        # ensure_connection() refuses to run in an event loop thread, as cursor() does.
        connection.ensure_connection()
        raw = connection.connection
    elif connection.in_atomic_block:
        # What Django's cursor() checks too: no statements in a transaction already doomed.
        connection.validate_no_broken_transaction()
    cached = getattr(connection, _ATTRIBUTE, None)
    if cached is not None and cached[0] is raw:
        cursor = cached[1]
    else:
        dialect = dialect_for(connection)
        cursor = dialect.new_cursor(connection, prepare=prepared_statements(connection))
        setattr(connection, _ATTRIBUTE, (raw, cursor, dialect.session_id(raw)))
    if connection.execute_wrappers or connection.queries_logged:
        return ObservedCursor(connection, cursor)
    return cursor


class ObservedCursor:
    """A driver cursor whose statements Django's tools see, as through Django's own cursor.

    ``execute`` goes through the connection's execute wrappers (APM database spans,
    ``connection.execute_wrapper()``) and, when Django logs queries (``DEBUG``, or
    ``force_debug_cursor`` as in ``CaptureQueriesContext``), into ``connection.queries``
    and the ``django.db.backends`` logger. Everything else is the driver cursor's.
    The statements are the driver's own SQL (``?`` placeholders on SQLite, ``%s`` elsewhere).
    """

    def __init__(self, db: BaseDatabaseWrapper, raw: Cursor) -> None:
        self.db = db
        self.raw = raw

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)

    def execute(self, sql: str, params: Any = None) -> Any:
        executor = self._run
        for wrapper in reversed(self.db.execute_wrappers):
            executor = functools.partial(wrapper, executor)
        context = {"connection": self.db, "cursor": self}
        if not self.db.queries_logged:
            return executor(sql, params, False, context)
        start = time.monotonic()
        try:
            return executor(sql, params, False, context)
        finally:
            duration = time.monotonic() - start
            self.db.queries_log.append({"sql": _shown(sql, params), "time": f"{duration:.3f}"})
            sql_logger.debug(
                "(%.3f) %s; args=%s; alias=%s",
                duration,
                sql,
                params,
                self.db.alias,
                extra={"duration": duration, "sql": sql, "params": params, "alias": self.db.alias},
            )

    def _run(self, sql: str, params: Any, many: bool, context: dict[str, Any]) -> Any:
        # sqlite3 refuses None for "no parameters".
        return self.raw.execute(sql) if params is None else self.raw.execute(sql, params)


def _shown(sql: str, params: Any) -> str:
    # Django's last_executed_query() expects its own %s spelling; ours is the driver's.
    return sql if not params else f"{sql} -- params {tuple(params)!r}"


def noted_session(connection: BaseDatabaseWrapper) -> int | None:
    """The server session id of the last driver connection that ran our statements.

    Still known after that connection broke; None when it never ran one.
    """
    cached = getattr(connection, _ATTRIBUTE, None)
    return None if cached is None else cached[2]

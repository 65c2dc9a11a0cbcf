"""The driver's own cursor on a Django connection.

Django's cursor wrapper (query logging, execute wrappers, ``%s`` rewriting on SQLite) costs
10-15 µs per statement, which is more than a small indexed statement takes on SQLite. The
memory's few fixed statements run on the DB-API cursor instead; everything else about the
connection stays Django's: its settings, its transactions (``atomic()`` joins as usual),
reconnects, and — because callers run statements inside ``connection.wrap_database_errors``
— the ``django.db`` exception classes. DEBUG query logging and
``connection.execute_wrapper()`` do not see these statements.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper

    from machine_memory.sql.base import Cursor

# Where the reusable cursor is kept on Django's connection object, with the driver
# connection it belongs to (a reconnect makes a new one).
_ATTRIBUTE = "_machine_memory_cursor"


def cursor_for(connection: BaseDatabaseWrapper) -> Cursor:
    """A DB-API cursor of ``connection``, connecting first if needed.

    Call it inside ``connection.wrap_database_errors``.
    """
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
        return cached[1]
    from machine_memory.sql import dialect_for

    cursor = dialect_for(connection).new_cursor(connection)
    setattr(connection, _ATTRIBUTE, (raw, cursor))
    return cursor

"""Vendor SQL: one module per database vendor behind ``base.Dialect``.

The rest of the app never branches on ``connection.vendor``; it asks ``dialect_for()``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from machine_memory.exceptions import MachineMemoryError

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper

    from machine_memory.sql.base import Dialect

_dialects: dict[str, Dialect] = {}


def dialect_for(connection: BaseDatabaseWrapper) -> Dialect:
    vendor = connection.vendor
    try:
        return _dialects[vendor]
    except KeyError:
        pass
    if vendor == "postgresql":
        from machine_memory.sql.postgresql import PostgreSQLDialect as cls
    elif vendor == "mysql":
        from machine_memory.sql.mysql import MySQLDialect as cls  # type: ignore[assignment]
    elif vendor == "sqlite":
        from machine_memory.sql.sqlite import SQLiteDialect as cls  # type: ignore[assignment]
    else:
        raise MachineMemoryError(
            f"Database vendor {vendor!r} is not supported; use PostgreSQL, MariaDB or SQLite."
        )
    _dialects[vendor] = dialect = cls()
    return dialect

"""Lock backends: where execution locks live. One module per backend behind ``base.LockBackend``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from django.utils.module_loading import import_string

if TYPE_CHECKING:
    from machine_memory.locks.base import LockBackend

# Short names accepted by MACHINE_MEMORY["LOCK_BACKEND"]; anything else is a dotted path.
ALIASES = {
    "database": "machine_memory.locks.database.DatabaseLockBackend",
    "redis": "machine_memory.locks.redis.RedisLockBackend",
}


def backend_class(name: str) -> type[LockBackend]:
    from machine_memory.locks.base import LockBackend

    cls = import_string(ALIASES.get(name, name))
    if not (isinstance(cls, type) and issubclass(cls, LockBackend)):
        raise TypeError(f"{name!r} is not a machine_memory.locks.base.LockBackend subclass.")
    return cls

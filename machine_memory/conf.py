"""``settings.MACHINE_MEMORY``, read on every access so ``override_settings`` works.

Values are returned as configured; ``checks.py`` reports wrong types and ranges at
start-up (``manage.py check``), so this module stays a plain, fast lookup.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings

DEFAULTS: dict[str, Any] = {
    "DATABASE": "default",
    "LOCK_BACKEND": "database",
    "REDIS_CACHE": "default",
    "LOCK_TTL": 120.0,
    "LOCK_RETRIES": 3,
    "LOCK_BACKOFF": 0.05,
    "READ_RETRIES": 2,
    "READ_BACKOFF": 0.1,
    "MAX_STATE_BYTES": 1_048_576,
    "CLEANUP": "keep",
    # PostgreSQL: prepare the hot statements. None: yes, unless the alias sets
    # DISABLE_SERVER_SIDE_CURSORS (Django's hint that a transaction-mode pooler is in use).
    "PREPARED_STATEMENTS": None,
    # The REST API's permission classes, as dotted paths. None: staff users only.
    "API_PERMISSION_CLASSES": None,
    # The admin shows states and locks but has no add or change form for them.
    "ADMIN_READONLY": True,
}


class Settings:
    """Typed view of ``settings.MACHINE_MEMORY`` with the defaults above."""

    @property
    def raw(self) -> dict[str, Any]:
        value = getattr(settings, "MACHINE_MEMORY", {})
        return value if isinstance(value, dict) else {}

    def get(self, key: str) -> Any:
        return self.raw.get(key, DEFAULTS[key])

    @property
    def DATABASE(self) -> str:
        return str(self.get("DATABASE"))

    @property
    def LOCK_BACKEND(self) -> str:
        return str(self.get("LOCK_BACKEND"))

    @property
    def REDIS_CACHE(self) -> str:
        return str(self.get("REDIS_CACHE"))

    @property
    def LOCK_TTL(self) -> Any:
        return self.get("LOCK_TTL")

    @property
    def LOCK_RETRIES(self) -> int:
        return int(self.get("LOCK_RETRIES"))

    @property
    def LOCK_BACKOFF(self) -> float:
        return float(self.get("LOCK_BACKOFF"))

    @property
    def READ_RETRIES(self) -> int:
        return int(self.get("READ_RETRIES"))

    @property
    def READ_BACKOFF(self) -> float:
        return float(self.get("READ_BACKOFF"))

    @property
    def MAX_STATE_BYTES(self) -> int:
        return int(self.get("MAX_STATE_BYTES"))

    @property
    def CLEANUP(self) -> str:
        return str(self.get("CLEANUP"))

    @property
    def PREPARED_STATEMENTS(self) -> bool | None:
        value = self.get("PREPARED_STATEMENTS")
        return None if value is None else bool(value)

    @property
    def API_PERMISSION_CLASSES(self) -> list[str] | None:
        value = self.get("API_PERMISSION_CLASSES")
        return None if value is None else [str(path) for path in value]

    @property
    def ADMIN_READONLY(self) -> bool:
        return bool(self.get("ADMIN_READONLY"))


conf = Settings()

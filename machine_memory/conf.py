"""``settings.MACHINE_MEMORY``: one table of rules, read on every access.

Each key has one ``Rule`` (default, what a valid value is, its system check id). The same
rule checks the setting at start-up (``checks.py``), validates it when read here (an
invalid value raises ``ImproperlyConfigured`` instead of being coerced), and validates
the matching ``MachineMemory(...)`` argument, so the three always agree
(docs/contract.md#settings).
"""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

if TYPE_CHECKING:
    from collections.abc import Callable

# Lock TTLs outside this range are refused: shorter than a millisecond is shorter than
# the storage clocks' resolution, and a lock is a short-lived thing (a crashed holder
# blocks its id for the whole TTL).
MIN_LOCK_TTL = 0.001
MAX_LOCK_TTL = 30 * 24 * 3600.0
# Pauses between retries beyond a minute are not a "quick retry".
MAX_BACKOFF = 60.0


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    # An int is always finite (and math.isfinite() would overflow on a huge one).
    return _is_int(value) or (isinstance(value, float) and math.isfinite(value))


def _seconds(value: Any) -> float:
    return value.total_seconds() if isinstance(value, datetime.timedelta) else float(value)


def _valid_ttl(value: Any) -> bool:
    if isinstance(value, datetime.timedelta):
        value = value.total_seconds()
    # Compared before any float(): an int of hundreds of digits would overflow it.
    return _is_number(value) and MIN_LOCK_TTL <= value <= MAX_LOCK_TTL


def _valid_backoff(value: Any) -> bool:
    return _is_number(value) and 0 <= value <= MAX_BACKOFF


def _valid_count(value: Any) -> bool:
    return _is_int(value) and value >= 0


def _valid_permission_classes(value: Any) -> bool:
    # The entries themselves are imported and checked by checks.py (E015).
    return value is None or (
        isinstance(value, list | tuple)
        and bool(value)
        and all(isinstance(path, str) and path for path in value)
    )


@dataclass(frozen=True)
class Rule:
    key: str
    default: Any
    check_id: str
    # What a valid value is, for messages: "Set it to <expected>".
    expected: str
    valid: Callable[[Any], bool]
    # The value as the app uses it (a TTL as float seconds, say).
    convert: Callable[[Any], Any] = lambda value: value

    def clean(self, value: Any, name: str) -> Any:
        """``value`` as the app uses it; ValueError naming ``name`` when it is invalid."""
        if not self.valid(value):
            raise ValueError(f"{name} is {value!r}; it must be {self.expected}.")
        return self.convert(value)


RULES: dict[str, Rule] = {
    rule.key: rule
    for rule in (
        Rule(
            "DATABASE",
            "default",
            "E003",
            "an alias from settings.DATABASES",
            lambda v: isinstance(v, str) and v in settings.DATABASES,
        ),
        Rule(
            "LOCK_BACKEND",
            "database",
            "E004",
            '"database", "redis" or the dotted path of a LockBackend subclass',
            lambda v: isinstance(v, str) and bool(v),
        ),
        Rule(
            "REDIS_CACHE",
            "default",
            "E012",
            "a CACHES alias",
            lambda v: isinstance(v, str) and bool(v),
        ),
        Rule(
            "LOCK_TTL",
            120.0,
            "E005",
            f"a number of seconds (or a timedelta) from {MIN_LOCK_TTL} to {MAX_LOCK_TTL:.0f}",
            _valid_ttl,
            _seconds,
        ),
        Rule("LOCK_RETRIES", 3, "E006", "a non-negative int", _valid_count),
        Rule(
            "LOCK_BACKOFF",
            0.05,
            "E007",
            f"a number of seconds from 0 to {MAX_BACKOFF:.0f}",
            _valid_backoff,
            float,
        ),
        Rule("READ_RETRIES", 2, "E008", "a non-negative int", _valid_count),
        Rule(
            "READ_BACKOFF",
            0.1,
            "E009",
            f"a number of seconds from 0 to {MAX_BACKOFF:.0f}",
            _valid_backoff,
            float,
        ),
        Rule(
            "MAX_STATE_BYTES",
            1_048_576,
            "E010",
            "a positive int",
            lambda v: _is_int(v) and v > 0,
        ),
        Rule("CLEANUP", "keep", "E011", '"keep" or "delete"', lambda v: v in ("keep", "delete")),
        # PostgreSQL: prepare the hot statements. None: yes, unless the alias sets
        # DISABLE_SERVER_SIDE_CURSORS (Django's hint that a transaction-mode pooler is in use).
        Rule(
            "PREPARED_STATEMENTS",
            None,
            "E014",
            "True, False or None",
            lambda v: v is None or isinstance(v, bool),
        ),
        # The REST API's permission classes, as dotted paths. None: staff users only.
        Rule(
            "API_PERMISSION_CLASSES",
            None,
            "E015",
            "None or a non-empty list of dotted paths of REST framework permission classes",
            _valid_permission_classes,
        ),
        # The admin shows states and locks but has no add or change form for them.
        Rule("ADMIN_READONLY", True, "E016", "True or False", lambda v: isinstance(v, bool)),
    )
}
DEFAULTS: dict[str, Any] = {key: rule.default for key, rule in RULES.items()}


class Settings:
    """Typed, validated view of ``settings.MACHINE_MEMORY`` with the defaults of ``RULES``."""

    @property
    def raw(self) -> dict[str, Any]:
        value = getattr(settings, "MACHINE_MEMORY", {})
        return value if isinstance(value, dict) else {}

    def get(self, key: str) -> Any:
        """The setting as the app uses it; ImproperlyConfigured when it is invalid."""
        rule = RULES[key]
        raw = self.raw
        if key not in raw:
            return rule.convert(rule.default) if rule.default is not None else None
        try:
            return rule.clean(raw[key], f"MACHINE_MEMORY[{key!r}]")
        except ValueError as exc:
            raise ImproperlyConfigured(
                f"{exc} (machine_memory.{rule.check_id}; run manage.py check)"
            ) from None

    def option(self, key: str, value: Any, name: str) -> Any:
        """A constructor argument ``name`` validated by the rule of ``key``; None: the setting."""
        return self.get(key) if value is None else RULES[key].clean(value, name)

    @property
    def DATABASE(self) -> str:
        value: str = self.get("DATABASE")
        return value

    @property
    def LOCK_BACKEND(self) -> str:
        value: str = self.get("LOCK_BACKEND")
        return value

    @property
    def REDIS_CACHE(self) -> str:
        value: str = self.get("REDIS_CACHE")
        return value

    @property
    def LOCK_TTL(self) -> float:
        value: float = self.get("LOCK_TTL")
        return value

    @property
    def LOCK_RETRIES(self) -> int:
        value: int = self.get("LOCK_RETRIES")
        return value

    @property
    def LOCK_BACKOFF(self) -> float:
        value: float = self.get("LOCK_BACKOFF")
        return value

    @property
    def READ_RETRIES(self) -> int:
        value: int = self.get("READ_RETRIES")
        return value

    @property
    def READ_BACKOFF(self) -> float:
        value: float = self.get("READ_BACKOFF")
        return value

    @property
    def MAX_STATE_BYTES(self) -> int:
        value: int = self.get("MAX_STATE_BYTES")
        return value

    @property
    def CLEANUP(self) -> str:
        value: str = self.get("CLEANUP")
        return value

    @property
    def PREPARED_STATEMENTS(self) -> bool | None:
        value: bool | None = self.get("PREPARED_STATEMENTS")
        return value

    @property
    def API_PERMISSION_CLASSES(self) -> list[str] | None:
        value = self.get("API_PERMISSION_CLASSES")
        return None if value is None else list(value)

    @property
    def ADMIN_READONLY(self) -> bool:
        value: bool = self.get("ADMIN_READONLY")
        return value


conf = Settings()

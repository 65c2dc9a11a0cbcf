"""System checks for ``settings.MACHINE_MEMORY``: one check id per rule.

Ids are stable and documented in docs/settings.md (machine_memory.E001 ...). Lock backends
add their own messages through ``LockBackend.check()``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, Tags, Warning, register
from django.utils.module_loading import import_string

from machine_memory.conf import DEFAULTS, RULES, conf

if TYPE_CHECKING:
    from collections.abc import Sequence

SUPPORTED_VENDORS = ("postgresql", "mysql", "sqlite")


@register(Tags.compatibility)
def check_settings(app_configs: Sequence[Any] | None = None, **kwargs: Any) -> list[CheckMessage]:
    raw = getattr(settings, "MACHINE_MEMORY", {})
    if not isinstance(raw, dict):
        return [
            Error(
                "settings.MACHINE_MEMORY must be a dict.",
                hint="Set MACHINE_MEMORY = {...} with the keys of docs/settings.md, or remove it.",
                id="machine_memory.E001",
            )
        ]
    messages: list[CheckMessage] = []
    for key in sorted(set(raw) - set(DEFAULTS)):
        messages.append(
            Error(
                f"Unknown MACHINE_MEMORY key {key!r}.",
                hint=f"Valid keys: {', '.join(DEFAULTS)}.",
                id="machine_memory.E002",
            )
        )
    for key, rule in RULES.items():
        if key in raw and not rule.valid(raw[key]):
            messages.append(
                Error(
                    f"MACHINE_MEMORY[{key!r}] is {raw[key]!r}.",
                    hint=f"Set it to {rule.expected}, or remove it for the default "
                    f"{rule.default!r}.",
                    id=f"machine_memory.{rule.check_id}",
                )
            )
    if not any(message.id == "machine_memory.E015" for message in messages):
        messages += _check_api_permission_classes(raw)
    if any(message.id == "machine_memory.E003" for message in messages):
        return messages
    messages += _check_database(conf.DATABASE)
    messages += _check_lock_backend(raw)
    messages += _check_lock_window(raw)
    return messages


def _check_database(alias: str) -> list[CheckMessage]:
    from django.db import connections

    if alias not in settings.DATABASES:
        return [
            Error(
                f"MACHINE_MEMORY['DATABASE'] is {alias!r}, which is not in settings.DATABASES.",
                hint="Add the alias to DATABASES or point MACHINE_MEMORY['DATABASE'] at one.",
                id="machine_memory.E003",
            )
        ]
    vendor = connections[alias].vendor  # known from ENGINE; does not connect
    if vendor not in SUPPORTED_VENDORS:
        return [
            Error(
                f"Database {alias!r} is {vendor}, which machine_memory does not support.",
                hint="Use PostgreSQL, MariaDB/MySQL or SQLite for the machine memory.",
                id="machine_memory.E013",
            )
        ]
    from machine_memory.sql import dialect_for

    return dialect_for(connections[alias]).check_settings(alias, settings.DATABASES[alias])


def _check_lock_backend(raw: dict[str, Any]) -> list[CheckMessage]:
    from machine_memory.locks import backend_class

    name = raw.get("LOCK_BACKEND", DEFAULTS["LOCK_BACKEND"])
    if not RULES["LOCK_BACKEND"].valid(name):
        return []  # reported with the other values
    try:
        cls = backend_class(name)
    except (ImportError, TypeError, ValueError) as exc:
        return [
            Error(
                f"MACHINE_MEMORY['LOCK_BACKEND'] {name!r} cannot be used: {exc}",
                hint='Use "database", "redis" or the dotted path of a LockBackend subclass.',
                id="machine_memory.E004",
            )
        ]
    return cls.check(conf.DATABASE)


def _api_permission_problem(path: Any) -> str | None:
    """What is wrong with one entry of API_PERMISSION_CLASSES, or None."""
    if not isinstance(path, str) or not path:
        return f"has {path!r}, which is not a dotted path"
    try:
        from rest_framework.permissions import BasePermission, OperationHolderMixin
    except ImportError:
        return 'needs Django REST framework: pip install "django-machine-memory[drf]"'
    try:
        permission = import_string(path)
    except ImportError as exc:
        return f"has {path!r}, which cannot be imported: {exc}"
    # A class, or a composition such as IsAuthenticated & IsAdminUser assigned to a name.
    if isinstance(permission, OperationHolderMixin) or (
        isinstance(permission, type) and issubclass(permission, BasePermission)
    ):
        return None
    return f"has {path!r}, which is not a REST framework permission class"


def _check_api_permission_classes(raw: dict[str, Any]) -> list[CheckMessage]:
    value = raw.get("API_PERMISSION_CLASSES")
    if value is None:
        return []
    if not isinstance(value, list | tuple) or not value:
        problems = [f"is {value!r}, not a non-empty list of dotted paths"]
    else:
        problems = [problem for path in value if (problem := _api_permission_problem(path))]
    return [
        Error(
            f"MACHINE_MEMORY['API_PERMISSION_CLASSES'] {problem}.",
            hint="Set it to dotted paths of REST framework permission classes, such as "
            '["rest_framework.permissions.IsAuthenticated"] (AllowAny to open the API on '
            "purpose), or remove it: None means staff users only.",
            id="machine_memory.E015",
        )
        for problem in dict.fromkeys(problems)
    ]


def _check_lock_window(raw: dict[str, Any]) -> list[CheckMessage]:
    retries = raw.get("LOCK_RETRIES", DEFAULTS["LOCK_RETRIES"])
    backoff = raw.get("LOCK_BACKOFF", DEFAULTS["LOCK_BACKOFF"])
    if not (RULES["LOCK_RETRIES"].valid(retries) and RULES["LOCK_BACKOFF"].valid(backoff)):
        return []  # already reported above
    window = sum(backoff * 2**attempt for attempt in range(retries)) * 1.1
    if window < 1.0:
        return []
    return [
        Warning(
            f"A denied lock() waits about {window:.2f} s before returning False.",
            hint="lock() should fail fast (the event is redelivered); lower LOCK_RETRIES or "
            "LOCK_BACKOFF so the window stays well under 1 s.",
            id="machine_memory.W001",
        )
    ]

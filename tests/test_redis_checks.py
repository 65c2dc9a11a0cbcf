"""System checks of the Redis lock backend: one test per id (E020-E022), plus the command."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import pytest
from django.conf import settings
from django.core.checks import CheckMessage, Error, run_checks
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.test import override_settings
from django_redis.cache import RedisCache

from machine_memory import MachineMemory
from machine_memory.checks import check_settings
from machine_memory.exceptions import MachineMemoryError

if TYPE_CHECKING:
    from collections.abc import Iterator

REDIS = {"LOCK_BACKEND": "redis", "REDIS_CACHE": "redis"}


class ProjectRedisCache(RedisCache):  # type: ignore[misc]  # django-redis ships no stubs
    """A project's own subclass of the django-redis cache: accepted."""


def caches_with(**entries: dict[str, Any]) -> dict[str, dict[str, Any]]:
    configured: dict[str, dict[str, Any]] = settings.CACHES
    return {**configured, **entries}


def messages_for(machine_memory: dict[str, Any], framework: bool = True) -> list[CheckMessage]:
    with override_settings(MACHINE_MEMORY=machine_memory):
        direct = check_settings()
        if not framework:  # Django's own cache checks would stop at an unimportable BACKEND
            return direct
        # The same through the framework (databases=[]: no per-database model checks).
        registered = [
            m for m in run_checks(databases=[]) if (m.id or "").startswith("machine_memory.")
        ]
    assert [m.id for m in registered] == [m.id for m in direct]
    return direct


def only(messages: list[CheckMessage], check_id: str) -> CheckMessage:
    assert [m.id for m in messages] == [f"machine_memory.{check_id}"]
    message = messages[0]
    assert isinstance(message, Error)
    assert message.msg and message.hint
    return message


@pytest.fixture
def without_django_redis(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # A None entry in sys.modules makes the import raise ImportError, as if not installed.
    for module in [name for name in sys.modules if name.startswith("django_redis")]:
        monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.setitem(sys.modules, "django_redis", None)
    # Without django-redis, CACHES cannot name it either (Django's own check would fail).
    with override_settings(CACHES={"default": settings.CACHES["default"]}):
        yield


@pytest.mark.parametrize(
    "machine_memory",
    [
        REDIS,
        {**REDIS, "LOCK_BACKEND": "machine_memory.locks.redis.RedisLockBackend"},
        # Only the redis backend looks at REDIS_CACHE beyond its type.
        {"LOCK_BACKEND": "database", "REDIS_CACHE": "nowhere"},
    ],
)
def test_a_usable_configuration_passes(machine_memory: dict[str, Any]) -> None:
    assert messages_for(machine_memory) == []


def test_a_subclass_of_the_django_redis_cache_passes() -> None:
    backend = f"{__name__}.ProjectRedisCache"
    caches = caches_with(project={**settings.CACHES["redis"], "BACKEND": backend})
    with override_settings(CACHES=caches):
        assert messages_for({**REDIS, "REDIS_CACHE": "project"}) == []


@pytest.mark.usefixtures("without_django_redis")
def test_e020_django_redis_not_installed() -> None:
    message = only(messages_for(REDIS), "E020")
    assert message.msg == (
        'MACHINE_MEMORY["LOCK_BACKEND"] is "redis", but django-redis is not installed.'
    )
    assert message.hint == (
        'pip install "django-machine-memory[redis]", or use the "database" lock backend.'
    )
    # At run time, the same thing is a clear error rather than an ImportError.
    with (
        override_settings(MACHINE_MEMORY=REDIS),
        pytest.raises(MachineMemoryError) as raised,
    ):
        MachineMemory(using="default")
    assert str(raised.value) == (
        'The "redis" lock backend needs django-redis: pip install '
        '"django-machine-memory[redis]", or set MACHINE_MEMORY["LOCK_BACKEND"] = "database".'
    )


def test_e020_not_reported_for_the_database_backend(without_django_redis: None) -> None:
    assert messages_for({"LOCK_BACKEND": "database"}) == []


@pytest.mark.parametrize("alias", ["nowhere", "Redis"])
def test_e021_redis_cache_not_in_caches(alias: str) -> None:
    message = only(messages_for({**REDIS, "REDIS_CACHE": alias}), "E021")
    assert message.msg == (
        f"MACHINE_MEMORY['REDIS_CACHE'] is {alias!r}, which is not in settings.CACHES."
    )
    assert message.hint == (
        f"Add a CACHES[{alias!r}] entry with BACKEND 'django_redis.cache.RedisCache', or point "
        "REDIS_CACHE at one."
    )


def test_e021_not_repeated_for_a_redis_cache_of_the_wrong_type() -> None:
    # E012 already says it; E021 would only repeat it.
    messages = messages_for({**REDIS, "REDIS_CACHE": 13})
    assert [m.id for m in messages] == ["machine_memory.E012"]


@pytest.mark.parametrize(
    ("backend", "alias"),
    [
        ("django.core.cache.backends.locmem.LocMemCache", "default"),
        # Django's own Redis cache has no raw client for the lock scripts.
        ("django.core.cache.backends.redis.RedisCache", "django_redis_lookalike"),
        ("no_such_package.RedisCache", "unimportable"),
        ("", "no_backend"),
    ],
)
def test_e022_not_a_django_redis_cache(backend: str, alias: str) -> None:
    entry = {"BACKEND": backend, "LOCATION": "redis://127.0.0.1:6379/13"}
    importable = not alias.startswith(("unimportable", "no_backend"))
    with override_settings(CACHES=caches_with(**{alias: entry})):
        message = only(messages_for({**REDIS, "REDIS_CACHE": alias}, importable), "E022")
    assert message.msg == f"CACHES[{alias!r}] uses {backend!r}, which is not a django-redis cache."
    assert message.hint == (
        "The Redis lock backend needs BACKEND 'django_redis.cache.RedisCache' (Django's own "
        "django.core.cache.backends.redis.RedisCache does not give access to its client); or "
        "point MACHINE_MEMORY['REDIS_CACHE'] at another alias."
    )


def test_e022_for_a_cache_entry_without_a_backend() -> None:
    entry = {"LOCATION": "redis://127.0.0.1:6379/13"}
    with override_settings(CACHES=caches_with(bare=entry)):
        message = only(messages_for({**REDIS, "REDIS_CACHE": "bare"}, False), "E022")
    assert message.msg == "CACHES['bare'] uses '', which is not a django-redis cache."


def test_e022_for_the_default_redis_cache_alias() -> None:
    # REDIS_CACHE defaults to "default", a LocMemCache in the test settings.
    only(messages_for({"LOCK_BACKEND": "redis"}), "E022")


def test_check_command() -> None:
    with override_settings(MACHINE_MEMORY=REDIS):
        call_command("check", fail_level="WARNING", verbosity=0, databases=[])
    with (
        override_settings(MACHINE_MEMORY={**REDIS, "REDIS_CACHE": "nowhere"}),
        pytest.raises(SystemCheckError, match=r"machine_memory\.E021"),
    ):
        call_command("check", verbosity=0, databases=[])

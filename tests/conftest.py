from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest
from django.conf import settings
from django.db import connections
from django.test import override_settings
from django.test.utils import setup_databases, teardown_databases

from machine_memory import MachineMemory
from tests.faultproxy import FaultProxy
from tests.support import VENDOR_IDS, enable_sqlite_pragmas, in_ci, new_id

if TYPE_CHECKING:
    from collections.abc import Iterator

enable_sqlite_pragmas()

# alias -> why it cannot be used in this run (unreachable server)
UNAVAILABLE: dict[str, str] = {}


def _reachable(alias: str) -> str | None:
    try:
        connections[alias].ensure_connection()
    except Exception as exc:
        return f"{alias} ({settings.DATABASES[alias]['ENGINE']}) unreachable: {exc}"
    finally:
        connections[alias].close()
    return None


@pytest.fixture(scope="session")
def django_db_setup(django_db_blocker: Any) -> Iterator[None]:
    with django_db_blocker.unblock():
        aliases = []
        for alias in set(VENDOR_IDS) - set(settings.REAL_DATABASES):
            UNAVAILABLE[alias] = f"{alias} not selected by MM_TEST_DATABASES"
        for alias in settings.REAL_DATABASES:
            reason = _reachable(alias)
            if reason is None:
                aliases.append(alias)
            elif in_ci():
                pytest.exit(f"CI is set and a database is down: {reason}", returncode=3)
            else:
                UNAVAILABLE[alias] = reason
        old = setup_databases(
            verbosity=0, interactive=False, aliases=dict.fromkeys(aliases), serialized_aliases=set()
        )
    yield
    with django_db_blocker.unblock():
        for connection in connections.all():
            connection.close()
        _end_stray_sessions(aliases)
        teardown_databases(old, verbosity=0)


def _end_stray_sessions(aliases: list[str]) -> None:
    # Connections opened by other threads (asgiref's executor, worker threads that died
    # with a failed assertion) would keep PostgreSQL from dropping the test database.
    if "postgres" not in aliases:
        return
    connection = connections["postgres"]
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    connection.close()


@pytest.fixture
def db_access(django_db_setup: None, django_db_blocker: Any) -> Iterator[None]:
    """Real autocommit connections (no wrapping test transaction): ids are unique per test."""
    with django_db_blocker.unblock():
        yield
        for connection in connections.all():
            connection.close()


@pytest.fixture(params=list(VENDOR_IDS), ids=list(VENDOR_IDS.values()))
def alias(request: pytest.FixtureRequest, db_access: None) -> str:
    name: str = request.param
    if name in UNAVAILABLE:
        pytest.skip(UNAVAILABLE[name])
    return name


@pytest.fixture
def memory(alias: str) -> Iterator[MachineMemory]:
    mem = MachineMemory(using=alias)
    yield mem
    mem.close()


@pytest.fixture
def mid() -> str:
    return new_id()


@pytest.fixture(scope="session")
def redis_cache() -> str:
    """The "redis" cache alias for the Redis lock backend, its database flushed once per run.

    Skipped with the reason when Redis does not answer; with CI set, that ends the run.
    """
    from django_redis import get_redis_connection
    from redis.exceptions import RedisError

    client = get_redis_connection("redis")
    try:
        client.flushdb()
    except RedisError as exc:
        reason = f"redis ({settings.CACHES['redis']['LOCATION']}) unreachable: {exc}"
        if in_ci():
            pytest.exit(f"CI is set and Redis is down: {reason}", returncode=3)
        pytest.skip(reason)
    return "redis"


# -- fault injection through a loopback proxy (tests/faultproxy.py) ------------------------------

# real alias -> the alias that reaches the same server and test database through a proxy
PROXY_ALIASES = {"postgres": "postgres_proxy", "mariadb": "mariadb_proxy"}


@dataclass
class ProxiedDatabase:
    """A real database alias, and an alias of the same test database behind a FaultProxy."""

    real: str
    alias: str
    proxy: FaultProxy


@contextlib.contextmanager
def proxied_database(real: str) -> Iterator[ProxiedDatabase]:
    """Point ``PROXY_ALIASES[real]`` at a new proxy in front of ``real``'s server.

    Django keeps one settings dict per alias, shared by settings.DATABASES and every
    connection object of the alias (in any thread), so PORT and NAME are set in place.
    """
    if real in UNAVAILABLE:
        pytest.skip(UNAVAILABLE[real])
    target = connections[real].settings_dict
    proxy = FaultProxy(target["HOST"] or "127.0.0.1", int(target["PORT"]), name=real)
    alias = PROXY_ALIASES[real]
    entry = settings.DATABASES[alias]
    saved = (entry["PORT"], entry["NAME"])
    connections[alias].close()
    try:
        for settings_dict in (entry, connections[alias].settings_dict):
            settings_dict["PORT"] = str(proxy.port)
            settings_dict["NAME"] = target["NAME"]  # the real alias's test database
        # PostgreSQL: nothing prepared, so the SQL text of every statement is on the wire.
        with override_settings(MACHINE_MEMORY={"PREPARED_STATEMENTS": False}):
            yield ProxiedDatabase(real=real, alias=alias, proxy=proxy)
    finally:
        connections[alias].close()
        try:
            proxy.close()
        finally:
            for settings_dict in (entry, connections[alias].settings_dict):
                settings_dict["PORT"], settings_dict["NAME"] = saved


@pytest.fixture(params=list(PROXY_ALIASES))
def proxied(request: pytest.FixtureRequest, db_access: None) -> Iterator[ProxiedDatabase]:
    """PostgreSQL and MariaDB, each also reached through a FaultProxy of its own."""
    with proxied_database(request.param) as database:
        yield database


def _forget_cache(alias: str) -> None:
    from django.core.cache import caches

    # Django keeps one cache object per alias and thread; the next use builds a new one
    # from the current settings.
    with contextlib.suppress(AttributeError):
        del caches[alias]


@pytest.fixture(scope="session")
def redis_faults() -> str:
    """The "redis_faults" cache alias (a Redis database not flushed by other runs).

    Skipped with the reason when Redis does not answer; with CI set, that ends the run.
    """
    from django_redis import get_redis_connection
    from redis.exceptions import RedisError

    try:
        get_redis_connection("redis_faults").ping()
    except RedisError as exc:
        reason = f"redis ({settings.CACHES['redis_faults']['LOCATION']}) unreachable: {exc}"
        if in_ci():
            pytest.exit(f"CI is set and Redis is down: {reason}", returncode=3)
        pytest.skip(reason)
    return "redis_faults"


@pytest.fixture
def redis_proxy(redis_faults: str) -> Iterator[FaultProxy]:
    """The "redis_faults" Redis database behind a FaultProxy, as the "redis_proxy" cache alias.

    Build the lock backend after this fixture: ``RedisLockBackend(database=alias,
    cache="redis_proxy")``. django-redis keeps one connection pool per LOCATION for the
    process, so a new proxy (a new port) always gets a new pool.
    """
    from urllib.parse import urlsplit

    from django.core.cache import caches
    from django_redis import get_redis_connection

    url = urlsplit(settings.CACHES[redis_faults]["LOCATION"])
    proxy = FaultProxy(url.hostname or "127.0.0.1", url.port or 6379, name="redis")
    entries = [settings.CACHES["redis_proxy"], caches.settings["redis_proxy"]]
    saved = entries[0]["LOCATION"]
    for entry in entries:
        entry["LOCATION"] = f"redis://127.0.0.1:{proxy.port}{url.path}"
    _forget_cache("redis_proxy")
    try:
        yield proxy
    finally:
        try:
            get_redis_connection("redis_proxy", write=True).connection_pool.disconnect()
            _forget_cache("redis_proxy")
            proxy.close()
        finally:
            for entry in entries:
                entry["LOCATION"] = saved


@pytest.fixture
def sqlite_short(db_access: None) -> Iterator[str]:
    """The "sqlite_short" alias: the "default" test database with a 0.2 s busy timeout."""
    if "default" in UNAVAILABLE:
        pytest.skip(UNAVAILABLE["default"])
    entry = settings.DATABASES["sqlite_short"]
    saved = entry["NAME"]
    connections["sqlite_short"].close()
    for settings_dict in (entry, connections["sqlite_short"].settings_dict):
        settings_dict["NAME"] = connections["default"].settings_dict["NAME"]
    try:
        yield "sqlite_short"
    finally:
        connections["sqlite_short"].close()
        for settings_dict in (entry, connections["sqlite_short"].settings_dict):
            settings_dict["NAME"] = saved

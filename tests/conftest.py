from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
from django.conf import settings
from django.db import connections
from django.test.utils import setup_databases, teardown_databases

from machine_memory import MachineMemory
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

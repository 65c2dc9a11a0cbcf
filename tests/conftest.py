from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import pytest
from django.conf import settings
from django.db import DatabaseError, connections
from django.test import override_settings
from django.test.utils import setup_databases, teardown_databases

from machine_memory import MachineMemory
from machine_memory.locks.redis import _parse as parse_lock_value
from machine_memory.models import MachineLock, StorageNow
from tests.faultproxy import FaultProxy
from tests.support import VENDOR_IDS, enable_sqlite_pragmas, in_ci, new_id

if TYPE_CHECKING:
    from collections.abc import Iterator

    from redis import Redis

enable_sqlite_pragmas()


def pytest_configure(config: pytest.Config) -> None:
    # A misspelt alias would otherwise be dropped silently, and the run would test nothing on
    # the database it was meant for.
    unknown = [a for a in settings.SELECTED_DATABASES if a not in settings.MEMORY_DATABASES]
    if unknown or not settings.SELECTED_DATABASES:
        raise pytest.UsageError(
            f"MM_TEST_DATABASES={os.environ.get('MM_TEST_DATABASES', '')!r} "
            + (f"names no such alias: {', '.join(unknown)}" if unknown else "names no alias")
            + f". Give a comma-separated list of {', '.join(settings.MEMORY_DATABASES)}."
        )


# Whether a test's own run (the "call" phase) failed: its teardown then spares it the report
# of the locks it left, which its failure explains.
CALL_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call":
        item.stash[CALL_FAILED] = report.failed
    return report


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # Every SQLite file of this run (tests/settings.py names them after RUN_ID): Django
    # removes the test database's main file but not its -wal and -shm, and the reachability
    # check's connection creates the non-test "default" database. trylast: after pytest's
    # own hook, which tears the session fixtures down when a run stops early (-x, Ctrl-C),
    # so django_db_setup has closed and destroyed its databases by then.
    for path in settings.TMP.glob(f"*machine_memory_{settings.RUN_ID}.sqlite3*"):
        path.unlink(missing_ok=True)


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
        for alias in set(VENDOR_IDS) - set(settings.SELECTED_DATABASES):
            UNAVAILABLE[alias] = f"{alias} not selected by MM_TEST_DATABASES"
        for alias in settings.REAL_DATABASES:
            reason = _reachable(alias)
            if reason is None:
                aliases.append(alias)
            elif in_ci():
                pytest.exit(f"CI is set and a database is down: {reason}", returncode=3)
            else:
                UNAVAILABLE.setdefault(alias, reason)
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
def db_access(
    request: pytest.FixtureRequest, django_db_setup: None, django_db_blocker: Any
) -> Iterator[None]:
    """Real autocommit connections (no wrapping test transaction): ids are unique per test.

    A test must release the locks it takes: one still live when it ends fails it (see
    ``_fail_on_live_locks``), since the tables and Redis databases are shared by the whole run.
    """
    with django_db_blocker.unblock():
        try:
            yield
            _fail_on_live_locks(request)
        finally:
            for connection in connections.all():
                connection.close()


# -- live locks left behind --------------------------------------------------------------------


def _databases_used(request: pytest.FixtureRequest) -> set[str]:
    """The real aliases a test used: its parameter, and those connected in this thread.

    Not every alias every time: connecting to each server after every test would cost more
    than the check is worth.
    """
    values = request.node.funcargs
    used = {values["alias"]} if isinstance(values.get("alias"), str) else set()
    if isinstance(values.get("proxied"), ProxiedDatabase):
        used.add(values["proxied"].real)
    if "sqlite_short" in values:
        used.add("default")
    for alias in settings.REAL_DATABASES:
        if alias not in UNAVAILABLE and connections[alias].connection is not None:
            used.add(alias)
    return {alias for alias in used if alias in settings.REAL_DATABASES}


def _live_database_locks(alias: str) -> list[str]:
    """Expire and name the live lock rows of ``alias``."""

    def live() -> list[str]:
        rows = MachineLock.objects.using(alias).live()
        found = list(rows.values_list("pk", "owner"))
        if found:
            # Expired at once, so that the tests that follow do not see them.
            rows.filter(pk__in=[pk for pk, _ in found]).update(expires_at=StorageNow())
        return [f"{alias}: {pk} held by {owner}" for pk, owner in found]

    try:
        return live()
    except DatabaseError:
        # A test may end with its connection broken (the fault tests kill them).
        connections[alias].close()
        return live()


def _redis_client(cache: str) -> Redis | None:
    from django_redis import get_redis_connection
    from redis.exceptions import RedisError

    client: Redis = get_redis_connection(cache, write=True)
    try:
        client.ping()
    except RedisError:
        return None
    return client


def _redis_locks(cache: str, owner_prefix: str = "") -> list[bytes]:
    """The live lock keys (machine_memory.locks.redis: the key exists while the lock lives),
    of owners whose name starts with ``owner_prefix``."""
    client = _redis_client(cache)
    if client is None:
        return []
    keys = sorted(client.scan_iter(match=b"*machine_memory:lock:*", count=1000))
    if not keys or not owner_prefix:
        return keys
    values = cast("list[bytes | None]", client.mget(keys))  # no decode_responses here
    return [
        key
        for key, value in zip(keys, values, strict=True)
        if value is not None and parse_lock_value(value)[3].startswith(owner_prefix)
    ]


def _fail_on_live_locks(request: pytest.FixtureRequest) -> None:
    left = [
        lock for alias in sorted(_databases_used(request)) for lock in _live_database_locks(alias)
    ]
    # The "redis" cache's database is this run's own (flushed when it starts): every live lock
    # there is a leak. The "redis_faults" database is shared with other runs: only the locks
    # of this process's owners (MachineMemory's default owner, "<host>:<pid>:<random>").
    leaked: dict[str, list[bytes]] = {}
    if "redis_cache" in request.fixturenames:
        leaked["redis"] = _redis_locks("redis")
    if {"redis_faults", "redis_proxy"} & set(request.fixturenames):
        ours = f"{socket.gethostname()}:{os.getpid()}:"
        leaked["redis_faults"] = _redis_locks("redis_faults", ours)
    for cache, keys in leaked.items():
        if keys:
            client = _redis_client(cache)
            assert client is not None
            client.delete(*keys)
            left += [f"{cache}: {key.decode(errors='replace')}" for key in keys]
    if left and not request.node.stash.get(CALL_FAILED, False):
        pytest.fail(
            "The test left live locks behind (now expired): " + "; ".join(left), pytrace=False
        )


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

"""The Redis lock backend: locks in Redis (database 13 of 127.0.0.1:6379), state in every database.

The conformance suite and the core lock tests (clock skew, concurrency) run here with
``LOCK_BACKEND="redis"``; the rest is what only Redis has: keys, scripts, tokens that
outlive the counter, fencing across the two stores, a Redis that does not answer.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import pytest
from django.db import transaction
from django.test import override_settings
from redis.exceptions import ConnectionError as RedisConnectionError

from machine_memory import MachineMemory
from machine_memory.exceptions import (
    InvalidMachineId,
    LockError,
    LockLost,
    MachineMemoryError,
    WriteConflict,
    WriteError,
)
from machine_memory.locks import backend_class
from machine_memory.locks.redis import RedisLockBackend, _ms
from machine_memory.models import MachineState
from machine_memory.testing import MachineMemoryConformance
from machine_memory.validation import MAX_ID_LENGTH
from tests import test_clock
from tests.support import new_id
from tests.test_concurrency import IDS, PROCESSES, ROUNDS, THREADS, assert_exact_and_exclusive
from tests.test_models import assert_stale_holders_stay_fenced
from tests.workers import (
    CycleReport,
    in_thread,
    increment_cycles,
    run_increment_processes,
    run_threads,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from redis import Redis


class RedisLocksOnTestCache(RedisLockBackend):
    """The backend on the tests' Redis cache, by dotted path: for spawned worker processes,
    which do not see ``override_settings``."""

    def __init__(self, *, database: str, cache: str | None = None) -> None:
        super().__init__(database=database, cache="redis" if cache is None else cache)


WORKER_BACKEND = f"{__name__}.RedisLocksOnTestCache"
SHORT_TTL = 0.3


@pytest.fixture
def redis_settings(redis_cache: str) -> Iterator[None]:
    """MACHINE_MEMORY with locks in Redis: ``MachineMemory(using=alias)`` then uses them."""
    with override_settings(MACHINE_MEMORY={"LOCK_BACKEND": "redis", "REDIS_CACHE": redis_cache}):
        yield


@pytest.fixture
def client(redis_cache: str) -> Redis:
    from django_redis import get_redis_connection

    connection: Redis = get_redis_connection(redis_cache)
    return connection


def redis_memory(alias: str, **options: Any) -> MachineMemory:
    return MachineMemory(using=alias, lock_backend="redis", **options)


def locks_of(memory: MachineMemory) -> RedisLockBackend:
    assert isinstance(memory.locks, RedisLockBackend)
    return memory.locks


# -- the contract ------------------------------------------------------------------------------


class TestRedisLockedMachineMemory(MachineMemoryConformance):
    @pytest.fixture(autouse=True)
    def _alias(self, alias: str, redis_settings: None) -> None:
        self.alias = alias

    def make_memory(self, **options: Any) -> MachineMemory:
        return redis_memory(self.alias, **options)


def test_alias_and_dotted_path_name_the_backend(alias: str, redis_settings: None) -> None:
    assert backend_class("redis") is RedisLockBackend
    for name in ("redis", "machine_memory.locks.redis.RedisLockBackend", None):
        memory = MachineMemory(using=alias, lock_backend=name)
        assert type(memory.locks) is RedisLockBackend
        assert memory.locks.cache == "redis"


@pytest.mark.parametrize(
    ("cache", "message"),
    [
        (
            "nowhere",
            "CACHES has no alias 'nowhere' for the Redis lock backend; add a "
            "django_redis.cache.RedisCache entry or set MACHINE_MEMORY['REDIS_CACHE'].",
        ),
        (
            "default",
            "CACHES['default'] is not a django-redis cache; the Redis lock backend needs "
            "BACKEND = 'django_redis.cache.RedisCache'.",
        ),
    ],
)
def test_unusable_cache_alias_raises_a_clear_error(
    alias: str, redis_cache: str, cache: str, message: str
) -> None:
    with pytest.raises(MachineMemoryError) as raised:
        RedisLockBackend(database=alias, cache=cache)
    assert str(raised.value) == message


# -- keys --------------------------------------------------------------------------------------

ODD_IDS = [
    (new_id("odd") + "/+= é漢🙂 ~ " * 60)[:MAX_ID_LENGTH],
    "{braces}" + new_id(),
    "}" + new_id() + "{",
    "line\nbreak " + new_id(),
    "colons:" + new_id() + ":*?[]",
    "trailing space " + new_id() + " ",
]


def test_keys_are_namespaced_and_exact_for_odd_ids(
    alias: str, redis_settings: None, client: Redis
) -> None:
    memory, other = redis_memory(alias), redis_memory(alias, lock_retries=0)
    for machine_id in ODD_IDS:
        assert memory.lock(machine_id)
        raw = machine_id.encode()
        lock_key = b"machine_memory:lock:{" + raw + b"}"
        value = client.get(lock_key)
        assert isinstance(value, bytes) and value.endswith(b":" + memory.owner.encode())
        assert (
            client.get(b"machine_memory:token:{" + raw + b"}")
            == str(memory.held_token(machine_id)).encode()
        )
        assert other.lock(machine_id) is False
        info = other.lock_info(machine_id)
        assert info is not None and info.owner == memory.owner
        # Exact comparison: a neighbouring id is another lock.
        assert other.lock(machine_id[:-1] + "X")
        assert other.unlock(machine_id[:-1] + "X")
    assert memory.lock(ODD_IDS[0][:-1])  # a prefix of a locked id
    for machine_id in [*ODD_IDS, ODD_IDS[0][:-1]]:
        assert memory.unlock(machine_id)
        assert client.get(b"machine_memory:lock:{" + machine_id.encode() + b"}") is None


def test_owner_with_separators_round_trips(alias: str, redis_settings: None) -> None:
    memory, mid = redis_memory(alias, owner="host:1:a\nb{}:é"), new_id()
    assert memory.lock(mid)
    info = memory.lock_info(mid)
    assert info is not None and info.owner == "host:1:a\nb{}:é"
    assert memory.extend(mid)
    assert memory.unlock(mid)


def test_cache_key_prefix_applies_to_lock_keys(alias: str, redis_cache: str, client: Redis) -> None:
    from django.conf import settings

    configured: dict[str, dict[str, Any]] = settings.CACHES
    prefixed = {**configured[redis_cache], "KEY_PREFIX": "project-a"}
    with override_settings(CACHES={**configured, "prefixed": prefixed}):
        memory = MachineMemory(using=alias, lock_backend=RedisLocksOnTestCache(database=alias))
        mine = MachineMemory(
            using=alias, lock_backend=RedisLockBackend(database=alias, cache="prefixed")
        )
        mid = new_id()
        # Two projects sharing one Redis database keep apart by their KEY_PREFIX.
        assert mine.lock(mid) and memory.lock(mid)
        assert client.exists(b"project-a:machine_memory:lock:{" + mid.encode() + b"}")
        assert client.exists(b"machine_memory:lock:{" + mid.encode() + b"}")
        assert mine.unlock(mid) and memory.unlock(mid)


# -- tokens ------------------------------------------------------------------------------------


def test_tokens_increase_across_unlock_and_expiry(
    alias: str, redis_settings: None, client: Redis
) -> None:
    first, second, mid = redis_memory(alias), redis_memory(alias, lock_retries=0), new_id()
    tokens = []
    assert first.lock(mid)
    tokens.append(first.held_token(mid))
    assert first.unlock(mid)
    assert second.lock(mid, ttl=SHORT_TTL)
    tokens.append(second.held_token(mid))
    token_key = locks_of(first).token_key(mid)
    lock_key = locks_of(first).lock_key(mid)
    # The lock expires with its TTL, the counter an hour (TOKEN_KEEP) after it.
    assert 0 < client.pttl(lock_key) <= SHORT_TTL * 1000
    keep = locks_of(second).token_keep * 1000
    assert keep < client.pttl(token_key) <= SHORT_TTL * 1000 + keep
    time.sleep(SHORT_TTL + 0.1)
    assert client.get(lock_key) is None  # expired by Redis, never released
    assert first.lock(mid)
    tokens.append(first.held_token(mid))
    assert first.unlock(mid)
    numbers = [token for token in tokens if isinstance(token, int)]
    assert numbers == sorted(set(numbers)) and len(numbers) == 3


def test_token_counters_expire_after_their_lock_and_tokens_still_increase(
    alias: str, redis_settings: None, client: Redis
) -> None:
    """One counter per id ever locked would pile up for good: each expires TOKEN_KEEP after
    its lock (moved on by extend), and the clock-seeded tokens go on increasing without it."""
    memory, mid = redis_memory(alias), new_id()
    locks = locks_of(memory)
    locks.token_keep = 0.2
    assert memory.lock(mid, ttl=SHORT_TTL)
    first = memory.held_token(mid)
    assert first is not None
    assert 0 < client.pttl(locks.token_key(mid)) <= (SHORT_TTL + 0.2) * 1000
    assert memory.extend(mid, ttl=2.0)
    assert 2000 < client.pttl(locks.token_key(mid)) <= 2200  # moved on with the lock
    assert memory.unlock(mid)
    time.sleep(2.3)
    assert client.exists(locks.token_key(mid)) == 0
    assert memory.lock(mid)
    second = memory.held_token(mid)
    assert second is not None and second > first
    assert memory.unlock(mid)


def test_tokens_keep_increasing_when_redis_loses_the_counter(
    alias: str, redis_settings: None, client: Redis
) -> None:
    """After a FLUSHDB (a ``cache.clear()``), a restart without persistence or a failover."""
    memory, mid = redis_memory(alias), new_id()
    assert memory.lock(mid)
    before = memory.held_token(mid)
    assert before is not None
    assert memory.unlock(mid)
    client.delete(locks_of(memory).token_key(mid))
    assert memory.lock(mid)
    after = memory.held_token(mid)
    assert after is not None and after > before
    assert memory.unlock(mid)


def test_tokens_are_redis_time_or_later(alias: str, redis_settings: None, client: Redis) -> None:
    memory, mid = redis_memory(alias), new_id()
    seconds, micros = client.time()
    assert memory.lock(mid)
    token = memory.held_token(mid)
    info = memory.lock_info(mid)
    assert token is not None and info is not None and info.token == token
    assert token >= seconds * 1_000_000 + micros
    # Tokens stay exact as JSON numbers (JavaScript's safe integers): Arvo is TypeScript.
    assert token < 2**53
    assert memory.unlock(mid)


def test_a_resent_acquire_returns_the_token_it_took(alias: str, redis_settings: None) -> None:
    """A client set to retry may send the script again when the reply was lost."""
    locks, mid = RedisLocksOnTestCache(database=alias), new_id()
    keys = [locks.lock_key(mid), locks.token_key(mid)]
    token = locks._acquire(keys=keys, args=[b"owner", 60_000, "00aa", 1000])
    assert isinstance(token, int)
    assert locks._acquire(keys=keys, args=[b"owner", 60_000, "00aa", 1000]) == token
    assert locks._acquire(keys=keys, args=[b"owner", 60_000, "00bb", 1000]) is None
    assert locks.acquire(mid, "owner", 60) is None  # lock() stays non-reentrant
    assert locks.release(mid, "owner")


@pytest.mark.parametrize("via", ["lock", "lock_and_read"])
def test_a_lock_taken_again_after_its_counter_expired_never_reuses_a_token(
    alias: str, mid: str, redis_settings: None, client: Redis, via: str
) -> None:
    """The Redis twin of the purge of expired lock rows: the token counter expires shortly
    (``token_keep``) after the locks of the second and third holders, and the next token
    then comes from Redis's clock. (The first holder's counter outlives its lock, so that
    the second one's takeover finds it.)"""
    memories = (redis_memory(alias), redis_memory(alias), redis_memory(alias))
    for memory in memories[1:]:
        locks_of(memory).token_keep = 0.05

    def counter_expired() -> None:
        key = locks_of(memories[0]).token_key(mid)
        deadline = time.monotonic() + 5
        while client.exists(key) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert client.exists(key) == 0

    assert_stale_holders_stay_fenced(memories, mid, (counter_expired, counter_expired), via)


# -- scripts -----------------------------------------------------------------------------------


def test_scripts_are_loaded_once_and_again_after_script_flush(
    alias: str, redis_settings: None, client: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    memory, mid = redis_memory(alias), new_id()
    locks = locks_of(memory)
    loads: list[Any] = []
    evalshas: list[Any] = []
    real_load: Callable[..., Any] = locks.client.script_load
    real_evalsha: Callable[..., Any] = locks.client.evalsha

    def load(*args: Any) -> Any:
        loads.append(args)
        return real_load(*args)

    def evalsha(*args: Any) -> Any:
        evalshas.append(args)
        return real_evalsha(*args)

    monkeypatch.setattr(locks.client, "script_load", load)
    monkeypatch.setattr(locks.client, "evalsha", evalsha)
    scripts = [locks._acquire, locks._release, locks._extend]

    def cycles(count: int) -> None:
        for _ in range(count):
            assert memory.lock(mid)
            assert memory.extend(mid)
            assert memory.unlock(mid)

    client.script_flush()  # server-wide; other clients reload on their next NOSCRIPT
    cycles(5)
    assert len(loads) == 3  # each script once, on its first NOSCRIPT
    assert len(evalshas) == 15 + 3  # every call by SHA; the first of each twice
    assert client.script_exists(*(script.sha for script in scripts)) == [True] * 3
    loads.clear()
    evalshas.clear()
    cycles(5)
    assert (len(loads), len(evalshas)) == (0, 15)
    client.script_flush()
    cycles(2)
    assert (len(loads), len(evalshas)) == (3, 15 + 6 + 3)


# -- fencing -----------------------------------------------------------------------------------


def stored_fence(alias: str, mid: str) -> int:
    return MachineState.objects.using(alias).values_list("fence", flat=True).get(machine_id=mid)


def test_takeover_is_caught_in_redis_before_the_database(
    alias: str, redis_settings: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second, mid = redis_memory(alias), redis_memory(alias), new_id()
    first.write(mid, {"by": "nobody"}, None)
    assert first.lock(mid, ttl=SHORT_TTL)
    state = first.read(mid)
    time.sleep(SHORT_TTL + 0.1)
    assert second.lock(mid)
    statements: list[Any] = []
    dialect = first.store.dialect  # type: ignore[attr-defined]
    real_update = dialect.update_state

    def update_state(*args: Any) -> bool:
        statements.append(args)
        return bool(real_update(*args))

    monkeypatch.setattr(dialect, "update_state", update_state)
    with pytest.raises(LockLost, match="another owner acquired it since") as raised:
        first.write(mid, {"by": "first"}, first.read(mid))
    assert raised.value.id == mid
    mine, theirs = first.held_token(mid), second.held_token(mid)
    assert str(raised.value) == (
        f"Machine {mid!r}: this worker's Redis lock (token {mine}) is lost: another owner "
        f"acquired it since (token {theirs}). Nothing was written; drop the event, it will be "
        "redelivered."
    )
    assert statements == []  # refused by the Redis check: no statement was sent
    with pytest.raises(LockLost):
        first.write(mid, {"by": "first"}, state)
    assert second.read(mid) == {"by": "nobody"}
    assert second.unlock(mid)


@pytest.mark.parametrize(
    ("seconds", "ms"), [(0.001, 1), (0.0014, 1), (0.0016, 2), (1.005, 1005), (2592000, 2592000000)]
)
def test_ttls_reach_redis_as_whole_milliseconds_rounded(seconds: float, ms: int) -> None:
    # PX takes whole milliseconds: the shortest TTL there is (1 ms) stays 1 ms, and 1.005 s
    # is 1005 ms, not the 1004 that truncating would make of 1.005 * 1000 = 1004.999….
    assert _ms(seconds) == ms


def test_recover_leaves_the_commands_of_other_threads_alone(
    alias: str, redis_cache: str, client: Redis
) -> None:
    """After a failure recover() drops the pool's idle connections; a connection another
    thread is using at that moment (here, a blocking pop) goes on with its command."""
    backend = RedisLockBackend(database=alias, cache=redis_cache)
    key = f"machine_memory:test:{new_id()}"
    popped: list[Any] = []
    # Within the test cache's socket timeout (2 s).
    popper = threading.Thread(target=lambda: popped.append(backend.client.blpop([key], 1.5)))
    popper.start()
    deadline = time.monotonic() + 1
    while time.monotonic() < deadline and not any(
        c["cmd"] == "blpop" for c in client.client_list()
    ):
        time.sleep(0.01)
    backend.recover()
    client.rpush(key, b"x")
    popper.join(10)
    assert popped == [(key.encode(), b"x")]


def test_locks_live_on_the_primary_of_a_cache_with_replicas(alias: str, redis_cache: str) -> None:
    """A django-redis cache may list replicas after its primary; reads of the cache then go
    to a replica. Locks must not: a replica may lag behind the lock it is asked about. (The
    "replica" here is another database number of the same server: what matters is which
    one the backend's client talks to.)"""
    from django.conf import settings

    primary = settings.CACHES[redis_cache]["LOCATION"]
    base, _, number = primary.rpartition("/")
    replica = f"{base}/{(int(number) + 1) % 16}"
    entry = {**settings.CACHES[redis_cache], "LOCATION": [primary, replica]}
    with override_settings(CACHES={**settings.CACHES, "redis_replicated": entry}):
        backend = RedisLockBackend(database=alias, cache="redis_replicated")
        assert backend.client.connection_pool.connection_kwargs["db"] == int(number)


def test_a_client_that_decodes_responses_to_str(alias: str, redis_cache: str, mid: str) -> None:
    """A project's cache may set decode_responses=True: lock values then arrive as str. The
    backend reads them the same (an owner with non-ASCII text included)."""
    from django.conf import settings

    # In the URL, not CONNECTION_POOL_KWARGS: django-redis keeps one pool per URL, and the
    # test cache's pool (bytes) already exists.
    location = settings.CACHES[redis_cache]["LOCATION"]
    decoding = {**settings.CACHES[redis_cache], "LOCATION": f"{location}?decode_responses=True"}
    with override_settings(CACHES={**settings.CACHES, "redis_decoding": decoding}):
        memory = MachineMemory(
            using=alias,
            lock_backend=RedisLockBackend(database=alias, cache="redis_decoding"),
            owner="wörker:1",
        )
        assert memory.lock(mid)
        backend = locks_of(memory)
        assert isinstance(backend.client.get(backend.lock_key(mid)), str)  # decoded
        info = memory.lock_info(mid)
        assert info is not None
        assert (info.owner, info.token) == ("wörker:1", memory.held_token(mid))
        assert info.expires_at > info.acquired_at
        memory.write(mid, {"n": 1}, None)  # fenced through the same values
        assert memory.unlock(mid)
        assert memory.lock_info(mid) is None


def test_fence_column_refuses_a_lower_token_that_redis_let_through(
    alias: str, redis_settings: None, client: Redis
) -> None:
    """Redis forgot a takeover (a failover to a replica that had not received it).

    First's lock expires, second takes it over and writes; then Redis goes back to the
    state before second's acquisition, so first's Redis check passes. The state row still
    remembers second's token and refuses first's write in the same statement as the
    version check, although first read the latest version.
    """
    first, second, mid = redis_memory(alias), redis_memory(alias), new_id()
    first.write(mid, {"by": "nobody"}, None)
    assert stored_fence(alias, mid) == 0  # unfenced writes leave the fence alone
    assert first.lock(mid, ttl=SHORT_TTL)
    first_token = first.held_token(mid)
    assert first_token is not None
    first.write(mid, {"by": "first"}, first.read(mid))
    assert stored_fence(alias, mid) == first_token
    token_key = locks_of(first).token_key(mid)
    time.sleep(SHORT_TTL + 0.1)
    assert second.lock(mid)
    second_token = second.held_token(mid)
    assert second_token is not None and second_token > first_token
    second.write(mid, {"by": "second"}, second.read(mid))
    assert stored_fence(alias, mid) == second_token
    # The failover: the lock and the counter as they were before second acquired.
    client.delete(locks_of(first).lock_key(mid))
    client.set(token_key, first_token)
    assert locks_of(first).fence(mid, first.owner, first_token).fence_token == first_token
    latest = first.read(mid)
    assert latest == {"by": "second"}
    with pytest.raises(LockLost) as raised:
        first.write(mid, {"by": "first again"}, latest)
    assert raised.value.expected_version == raised.value.actual_version == 3
    # A delete, by prev_data or by version, is held to the same column.
    with pytest.raises(LockLost):
        first.delete(mid, latest)
    with pytest.raises(LockLost):
        first.delete(mid, version=3)
    assert second.read(mid) == {"by": "second"}
    assert stored_fence(alias, mid) == second_token
    # Releasing the lock ends the fencing: a plain versioned write goes through, and leaves
    # the fence where the highest token put it.
    assert first.unlock(mid)
    first.write(mid, {"by": "first, unlocked"}, first.read(mid))
    assert stored_fence(alias, mid) == second_token


def test_a_token_redis_does_not_know_cannot_write(
    alias: str, redis_settings: None, client: Redis
) -> None:
    memory, mid = redis_memory(alias), new_id()
    memory.write(mid, {"n": 0}, None)
    assert memory.lock(mid)
    token = memory.held_token(mid)
    assert token is not None
    stranger = redis_memory(alias, owner=memory.owner)
    stranger.adopt(mid, token + 1)  # never issued
    with pytest.raises(LockLost) as never_issued:
        stranger.write(mid, {"n": 1}, stranger.read(mid))
    assert str(never_issued.value) == (
        f"Machine {mid!r}: this worker's Redis lock (token {token + 1}) is lost: Redis no longer "
        "has its token (flushed, restarted without persistence, or failed over) or never "
        "issued it. Nothing was written; drop the event, it will be redelivered."
    )
    # The same token as the holder's but another owner (a copied Lock-Token, say).
    impostor = redis_memory(alias, owner="someone-else")
    impostor.adopt(mid, token)
    with pytest.raises(LockLost) as not_the_holder:
        impostor.write(mid, {"n": 1}, impostor.read(mid))
    assert str(not_the_holder.value) == (
        f"Machine {mid!r}: this worker's Redis lock (token {token}) is lost: Redis holds it "
        "for another owner. Nothing was written; drop the event, it will be redelivered."
    )
    client.delete(locks_of(memory).token_key(mid))  # Redis lost the history
    with pytest.raises(LockLost, match="no longer has its token"):
        memory.write(mid, {"n": 1}, memory.read(mid))
    assert memory.read(mid) == {"n": 0}
    assert memory.unlock(mid)


def test_write_of_a_non_holder_never_asks_redis(
    alias: str, redis_settings: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    holder, other, mid = redis_memory(alias), redis_memory(alias), new_id()
    assert holder.lock(mid)

    def no_redis(*args: Any) -> Any:
        raise AssertionError("a write without a lock must not ask Redis")

    monkeypatch.setattr(locks_of(other), "fence", no_redis)
    other.write(mid, {"a": 1}, None)
    assert stored_fence(alias, mid) == 0
    assert holder.unlock(mid)


def test_lock_inside_a_transaction_commits_at_once(alias: str, redis_settings: None) -> None:
    """Redis locks do not take part in the database transaction (also on SQLite)."""
    memory, other, mid = redis_memory(alias), redis_memory(alias, lock_retries=0), new_id()
    with transaction.atomic(using=alias):
        assert memory.lock(mid)
        memory.write(mid, {"a": 1}, None)
        assert in_thread(lambda: other.lock(mid)) is False
        transaction.set_rollback(True, using=alias)
    assert memory.read(mid) is None  # the state rolled back ...
    assert memory.holds(mid) and other.lock(mid) is False  # ... the lock did not
    assert memory.unlock(mid)


# -- the clock ---------------------------------------------------------------------------------


@test_clock.SKEWS
def test_clock_live_lock_is_still_denied(
    alias: str, mid: str, skew: float, redis_settings: None
) -> None:
    test_clock.test_live_lock_is_still_denied(alias, mid, skew)


@test_clock.SKEWS
def test_clock_lock_taken_under_a_moved_clock(
    alias: str, mid: str, skew: float, redis_settings: None
) -> None:
    test_clock.test_lock_taken_under_a_moved_clock_is_judged_by_the_storage(alias, mid, skew)


@test_clock.SKEWS
def test_clock_short_lock_expires_on_time(
    alias: str, mid: str, skew: float, redis_settings: None
) -> None:
    test_clock.test_short_lock_expires_on_time_and_is_taken_over(alias, mid, skew)


@test_clock.SKEWS
def test_lock_times_are_redis_times(
    alias: str, mid: str, skew: float, redis_settings: None, client: Redis
) -> None:
    from datetime import UTC, datetime

    memory = redis_memory(alias)
    with test_clock.app_clock_moved(skew):
        seconds, micros = client.time()
        redis_now = datetime.fromtimestamp(seconds, tz=UTC) + timedelta(microseconds=micros)
        assert memory.lock(mid, ttl=60)
        info = memory.lock_info(mid)
    assert info is not None
    assert timedelta(0) <= info.acquired_at - redis_now < timedelta(seconds=1)
    assert info.expires_at - info.acquired_at == timedelta(seconds=60)
    assert memory.unlock(mid)


# -- concurrency -------------------------------------------------------------------------------


def test_threads_increment_exactly_under_redis_locks(alias: str, redis_settings: None) -> None:
    ids = [new_id("threads") for _ in range(IDS)]
    barrier = threading.Barrier(THREADS)

    def worker(index: int) -> CycleReport:
        barrier.wait(timeout=30)
        return increment_cycles(alias, ids, ROUNDS, first=index, lock_backend="redis")

    reports = run_threads(worker, THREADS)
    assert_exact_and_exclusive(alias, ids, reports)


@pytest.mark.slow
def test_processes_increment_exactly_under_redis_locks(alias: str, redis_cache: str) -> None:
    ids = [new_id("processes") for _ in range(IDS)]
    reports = run_increment_processes(alias, ids, ROUNDS, PROCESSES, WORKER_BACKEND)
    assert_exact_and_exclusive(alias, ids, reports)


# -- faults ------------------------------------------------------------------------------------


@pytest.fixture
def down(alias: str) -> MachineMemory:
    """State in a working database, locks in a Redis that does not answer (no Redis needed)."""
    return MachineMemory(
        using=alias, lock_backend=RedisLockBackend(database=alias, cache="redis_down")
    )


def test_down_lock_raises_lock_error_fast(down: MachineMemory, mid: str) -> None:
    started = time.monotonic()
    with pytest.raises(LockError) as raised:
        down.lock(mid)
    assert time.monotonic() - started < 1.0
    assert isinstance(raised.value.__cause__, RedisConnectionError)
    assert not down.holds(mid)


def test_down_unlock_returns_false_and_warns(
    down: MachineMemory, mid: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="machine_memory"):
        assert down.unlock(mid) is False
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings and mid in warnings[-1].getMessage()


def test_down_extend_and_lock_info_raise_lock_error(down: MachineMemory, mid: str) -> None:
    assert down.extend(mid) is False  # nothing held: Redis is not asked
    down.adopt(mid, 1)
    with pytest.raises(LockError):
        down.extend(mid)
    with pytest.raises(LockError):
        down.lock_info(mid)


def test_down_write_of_a_holder_raises_write_error_and_stores_nothing(
    down: MachineMemory, mid: str
) -> None:
    """The fence cannot be checked: write() raises before the database statement.

    WriteError (not LockError, not WriteConflict): it is write() that failed, and a raised
    write error means nothing was stored (docs/contract.md#write); the event is redelivered.
    """
    down.write(mid, {"n": 0}, None)  # no lock held: only version-checked, Redis not asked
    state = down.read(mid)
    down.adopt(mid, 1)
    for prev in (state, None):
        with pytest.raises(WriteError) as raised:
            down.write(mid, {"n": 1}, prev)
        assert not isinstance(raised.value, WriteConflict)
        cause = raised.value.__cause__
        assert isinstance(cause, RedisConnectionError)
        assert str(raised.value) == (
            f"Writing machine {mid!r} failed: the lock on it could not be checked: {cause}. "
            "Nothing was stored."
        )
    assert down.read(mid) == {"n": 0}


def test_down_cleanup_delete_keeps_the_state(alias: str, mid: str) -> None:
    down = MachineMemory(
        using=alias,
        lock_backend=RedisLockBackend(database=alias, cache="redis_down"),
        cleanup="delete",
    )
    down.write(mid, {"n": 0}, None)
    state = down.read(mid)
    down.adopt(mid, 1)
    with pytest.raises(WriteError):
        down.cleanup(mid, state, None)
    assert down.read(mid) == {"n": 0}


def test_bad_input_raises_before_redis(down: MachineMemory) -> None:
    for bad in ["", "nul\x00", "x" * (MAX_ID_LENGTH + 1), None, b"bytes"]:
        for call in (down.lock, down.unlock, down.extend, down.lock_info):
            with pytest.raises(InvalidMachineId):
                call(bad)  # type: ignore[arg-type]
    for ttl in (0, -1, "5", timedelta(0)):
        with pytest.raises(ValueError):
            down.lock(new_id(), ttl=ttl)  # type: ignore[arg-type]


def test_killed_connection_is_replaced(alias: str, redis_settings: None) -> None:
    """The server ends the session (CLIENT KILL, as an operator or a failover would)."""
    from django.conf import settings
    from redis import Redis

    memory, mid = redis_memory(alias), new_id()
    locks = locks_of(memory)
    assert memory.lock(mid)
    before = locks.client.client_id()  # the pooled connection the next call will take
    with Redis.from_url(settings.REDIS_URL) as operator:
        assert operator.client_kill_filter(_id=before) == 1
    assert memory.extend(mid)
    assert memory.lock_info(mid) is not None
    memory.write(mid, {"n": 1}, None)
    assert memory.unlock(mid)
    assert locks.client.client_id() != before


def test_lock_whose_reply_was_lost_is_adopted(alias: str, redis_settings: None) -> None:
    memory, mid = redis_memory(alias, lock_retries=0), new_id()
    locks = locks_of(memory)
    real_acquire = locks.acquire
    calls: list[str] = []

    def lost_reply(machine_id: str, owner: str, ttl: float) -> int | None:
        calls.append(machine_id)
        token = real_acquire(machine_id, owner, ttl)
        if len(calls) == 1:
            raise RedisConnectionError("Connection closed by server.")
        return token

    locks.acquire = lost_reply  # type: ignore[method-assign]
    assert memory.lock(mid) is True
    info = memory.lock_info(mid)
    assert info is not None and info.owner == memory.owner
    assert info.token == memory.held_token(mid)
    assert len(calls) == 1
    assert memory.unlock(mid) is True


def test_a_failed_lock_releases_what_it_may_have_taken(
    alias: str, redis_settings: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """lock() raised LockError, so nobody will unlock: it must not leave the id blocked."""
    memory, other, mid = redis_memory(alias), redis_memory(alias, lock_retries=0), new_id()
    locks = locks_of(memory)
    real_acquire = locks.acquire

    def broken(machine_id: str, owner: str, ttl: float) -> int | None:
        real_acquire(machine_id, owner, ttl)
        raise RedisConnectionError("Connection closed by server.")

    def unreachable(machine_id: str) -> None:
        raise RedisConnectionError("Connection refused.")

    monkeypatch.setattr(locks, "acquire", broken)
    monkeypatch.setattr(locks, "info", unreachable)  # the look on a fresh connection fails too
    with pytest.raises(LockError):
        memory.lock(mid)
    assert not memory.holds(mid)
    assert other.lock(mid)
    assert other.unlock(mid)


def test_a_memory_made_in_one_thread_locks_in_another(alias: str, redis_settings: None) -> None:
    # redis-py clients are thread-safe (a pool of connections behind each).
    memory, mid = redis_memory(alias), new_id()
    assert in_thread(lambda: memory.lock(mid))
    assert memory.unlock(mid)

"""A lock holder killed with SIGKILL: nobody releases its lock, so it must expire by its TTL.

A spawned worker process takes the lock with a short TTL, writes under it, reports its
owner and fencing token, and is killed (SIGKILL: no ``finally``, no unlock, no goodbye to
the server). Until the TTL has passed, another owner is denied and ``lock_info`` names the
dead owner; afterwards the lock is taken over with a higher token, and the new holder's
fenced write goes through. On SQLite, PostgreSQL and MariaDB with database locks, and with
Redis locks.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import threading
import time
import traceback
from typing import Any

import pytest

from machine_memory import MachineMemory

TTL = 1.5
# How long a dead holder's lock may outlive its TTL before someone must get it (polling).
GRACE = 5.0


def make_memory(alias: str, locks: str, **options: Any) -> MachineMemory:
    if locks == "redis":
        from machine_memory.locks.redis import RedisLockBackend

        backend = RedisLockBackend(database=alias, cache="redis_faults")
        return MachineMemory(using=alias, lock_backend=backend, **options)
    return MachineMemory(using=alias, **options)


def holder(alias: str, locks: str, mid: str, ttl: float, reports: Any) -> None:
    """Entry point of the spawned worker: lock, write, report, then wait to be killed."""
    try:
        from tests.support import use_test_databases

        use_test_databases()
        memory = make_memory(alias, locks)
        assert memory.lock(mid, ttl=ttl)
        memory.write(mid, {"by": "holder", "n": 1}, None)
        reports.put(("locked", memory.owner, memory.held_token(mid)))
    except BaseException:
        reports.put(("error", traceback.format_exc(), None))
        return
    threading.Event().wait()  # until SIGKILL


@pytest.mark.slow
@pytest.mark.parametrize(
    ("alias", "locks"),
    [
        ("default", "database"),
        ("postgres", "database"),
        ("mariadb", "database"),
        ("default", "redis"),
    ],
    ids=["sqlite", "postgres", "mariadb", "redis"],
    indirect=["alias"],
)
def test_lock_of_a_killed_holder_expires_then_passes_on(
    alias: str, locks: str, mid: str, request: pytest.FixtureRequest
) -> None:
    if locks == "redis":
        request.getfixturevalue("redis_faults")
    context = multiprocessing.get_context("spawn")
    reports: Any = context.Queue()
    process = context.Process(target=holder, args=(alias, locks, mid, TTL, reports), daemon=True)
    process.start()
    try:
        try:
            status, owner, token = reports.get(timeout=60)
        except queue.Empty:
            raise AssertionError(
                f"the holder never reported (exit code {process.exitcode})"
            ) from None
        assert status == "locked", owner
        assert process.pid is not None
        os.kill(process.pid, signal.SIGKILL)
        process.join(10)
        assert process.exitcode == -signal.SIGKILL

        heir = make_memory(alias, locks, lock_retries=0)
        dead = heir.lock_info(mid)
        assert dead is not None and (dead.owner, dead.token) == (owner, token)
        # Before the TTL has passed the dead holder's lock still counts.
        assert heir.lock(mid) is False
        still = heir.lock_info(mid)
        assert still is not None and (still.owner, still.token) == (owner, token)

        started = time.monotonic()
        while not heir.lock(mid):
            assert time.monotonic() - started < TTL + GRACE, "the dead holder's lock never expired"
            time.sleep(0.02)  # pacing between lock attempts
        taken = heir.lock_info(mid)
        assert taken is not None and taken.owner == heir.owner
        assert taken.token == heir.held_token(mid)
        assert taken.token > token
        # Taken over only once the dead lock had expired, by the storage's clock.
        assert taken.acquired_at >= dead.expires_at

        state = heir.read(mid)
        assert state == {"by": "holder", "n": 1}
        heir.write(mid, {"by": "heir", "n": 2}, state)  # fenced by the new token
        assert make_memory(alias, locks).read(mid) == {"by": "heir", "n": 2}
        assert heir.unlock(mid) is True
        heir.close()
    finally:
        if process.is_alive():
            process.kill()
            process.join(10)
        reports.close()
        reports.join_thread()

"""``machine_memory.contrib.celery``: a real Celery worker, and every outcome of a cycle.

The worker test starts ``celery worker`` (prefork, three processes) against Redis as the
broker and the test database, sends events for a few shared ids, and checks that every
event was counted exactly once although workers were denied and redelivered events. The
outcomes of ``run_cycle`` are driven on the real databases, the unknown write through the
fault proxy.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from django.db import connections

from machine_memory import MachineMemory
from machine_memory.contrib.celery import (
    DROPPED,
    UNCHANGED,
    WRITTEN,
    Redeliver,
    countdown,
    run_cycle,
)
from machine_memory.exceptions import (
    LockNotAcquired,
    WriteConflict,
    WriteOutcomeUnknown,
)
from tests.test_session import WRITE_AND_RELEASE
from tests.workers import ThreadRun

if TYPE_CHECKING:
    from tests.conftest import ProxiedDatabase

ROOT = Path(__file__).resolve().parent.parent
BROKER_URL = os.environ.get("MM_CELERY_BROKER_URL", "redis://127.0.0.1:6379/11")


def count(state: dict[str, Any] | None, event: dict[str, Any]) -> dict[str, Any]:
    state = state or {"count": 0, "events": []}
    return {"count": state["count"] + 1, "events": [*state["events"], event["n"]]}


# -- a real worker ----------------------------------------------------------------------------


@pytest.fixture
def broker() -> str:
    """Redis database 11 as the broker, emptied before the test; skipped (or, with CI,
    failed) when Redis does not answer, as every Redis test is."""
    import redis

    client = redis.Redis.from_url(BROKER_URL)
    try:
        client.flushdb()
    except redis.RedisError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set and the broker ({BROKER_URL}) is down: {exc}")
        pytest.skip(f"the broker ({BROKER_URL}) is down: {exc}")
    finally:
        client.close()
    return BROKER_URL


def start_worker(alias: str, queue: str, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "MM_CELERY_BROKER_URL": BROKER_URL,
        "MM_CELERY_DATABASE": alias,
        "MM_CELERY_DATABASE_NAME": str(connections[alias].settings_dict["NAME"]),
        "MM_CELERY_QUEUE": queue,
        # Celery runs Django's system checks when the worker starts; on Django 6 the model
        # checks connect to every MySQL alias, and the test settings have aliases whose
        # server never answers (the fault tests').
        "CELERY_SKIP_CHECKS": "1",
    }
    command = [
        sys.executable,
        "-m",
        "celery",
        "--app",
        "tests.celery_app",
        "worker",
        "--pool",
        "prefork",
        "--concurrency",
        "3",
        "--queues",
        queue,
        "--hostname",
        f"{queue}@%h",
        "--loglevel",
        "INFO",
        "--without-mingle",
        "--without-gossip",
        "--without-heartbeat",
    ]
    with log.open("wb") as out:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def stop(worker: subprocess.Popen[bytes]) -> None:
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)  # a warm shutdown: running tasks finish first
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def test_a_real_worker_handles_every_event_exactly_once(
    alias: str, broker: str, mid: str, tmp_path: Path
) -> None:
    from tests.celery_app import count_event

    queue = f"mm-tests-{uuid.uuid4().hex[:12]}"
    log = tmp_path / "worker.log"
    worker = start_worker(alias, queue, log)
    ids = [f"{mid}/{k}" for k in range(3)]
    events = 60
    memory = MachineMemory(using=alias)
    try:
        # Runs of six events per id, handlers holding the lock 20 ms: the three processes
        # take consecutive events of one id at once, and collide.
        for n in range(events):
            event = {"machine": ids[n // 6 % len(ids)], "n": n, "work": 0.02}
            count_event.apply_async((event,), queue=queue)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            states = [memory.read(i) for i in ids]
            if sum((s or {}).get("count", 0) for s in states) >= events:
                break
            assert worker.poll() is None, log.read_text()
            time.sleep(0.2)
        time.sleep(0.5)  # anything counted twice would show by now
    finally:
        stop(worker)
        memory.close()
    output = log.read_text()
    for k, machine_id in enumerate(ids):
        state = MachineMemory(using=alias).read(machine_id)
        expected = [n for n in range(events) if n // 6 % len(ids) == k]
        assert state is not None, output
        assert sorted(state["events"]) == expected, output  # none lost, none twice
        assert state["count"] == len(expected)
        assert MachineMemory(using=alias).lock_info(machine_id) is None
    # Denied workers really did hand their events back to the broker.
    assert output.count("retry: Retry in") > 0, output
    assert "Dropped an event" not in output


# -- each outcome of a cycle ---------------------------------------------------------------


def test_a_cycle_writes_what_the_handler_returns(alias: str, mid: str) -> None:
    memory = MachineMemory(using=alias)
    assert run_cycle(memory, mid, {"n": 1}, count) == WRITTEN
    assert run_cycle(memory, mid, {"n": 2}, count) == WRITTEN
    assert memory.read(mid) == {"count": 2, "events": [1, 2]}
    assert run_cycle(memory, mid, {"n": 3}, lambda state, event: None) == UNCHANGED
    assert memory.read(mid) == {"count": 2, "events": [1, 2]}
    assert memory.lock_info(mid) is None


def test_a_held_lock_redelivers(alias: str, mid: str) -> None:
    holder = MachineMemory(using=alias)
    assert holder.lock(mid)
    try:
        with pytest.raises(Redeliver) as raised:
            run_cycle(MachineMemory(using=alias, lock_retries=0), mid, {"n": 1}, count)
        assert isinstance(raised.value.__cause__, LockNotAcquired)
    finally:
        holder.unlock(mid)
    assert holder.read(mid) is None


def test_a_lost_lock_drops_the_event(
    alias: str, mid: str, caplog: pytest.LogCaptureFixture
) -> None:
    memory, other = MachineMemory(using=alias), MachineMemory(using=alias)
    memory.write(mid, {"count": 0, "events": []}, None)

    def slow(state: dict[str, Any] | None, event: dict[str, Any]) -> dict[str, Any]:
        time.sleep(0.4)  # past the TTL: another worker takes the lock meanwhile
        assert other.lock(mid)
        return count(state, event)

    with caplog.at_level(logging.WARNING, logger="machine_memory.celery"):
        assert run_cycle(memory, mid, {"n": 1}, slow, ttl=0.3) == DROPPED
    assert "Dropped an event" in caplog.text
    assert memory.read(mid) == {"count": 0, "events": []}
    assert other.unlock(mid)


def test_a_write_conflict_redelivers(alias: str, mid: str) -> None:
    memory, other = MachineMemory(using=alias), MachineMemory(using=alias)
    memory.write(mid, {"count": 0, "events": []}, None)

    def raced(state: dict[str, Any] | None, event: dict[str, Any]) -> dict[str, Any]:
        other.write(mid, {"count": 5, "events": []}, other.read(mid))  # ignores the lock
        return count(state, event)

    with pytest.raises(Redeliver) as raised:
        run_cycle(memory, mid, {"n": 1}, raced)
    assert isinstance(raised.value.__cause__, WriteConflict)
    assert memory.read(mid) == {"count": 5, "events": []}
    assert memory.lock_info(mid) is None


@pytest.mark.parametrize("same", [True, False], ids=["found-stored", "moved-on"])
def test_an_unknown_write_is_settled_by_reading_the_state(
    proxied: ProxiedDatabase, mid: str, same: bool
) -> None:
    """The write and release landed, the reply was lost, and before the check another
    worker wrote on top: the memory cannot tell (WriteOutcomeUnknown). Finding what the
    handler returned, the event is done; finding something else, it is handed back."""
    memory = MachineMemory(using=proxied.alias)
    memory.write(mid, {"count": 0, "events": []}, None)
    connected = proxied.proxy.accepted
    proxied.proxy.cut_after_reply(WRITE_AND_RELEASE[proxied.real], keep_upstream=True, then="stall")
    on_top = {"count": 1, "events": [7]} if same else {"count": 9, "events": []}

    def write_on_top() -> None:
        deadline = time.monotonic() + 10
        while proxied.proxy.accepted == connected:  # the memory reconnects to check
            assert time.monotonic() < deadline
            time.sleep(0.01)
        other = MachineMemory(using=proxied.real)
        other.write(mid, on_top, other.read(mid))
        proxied.proxy.resume()

    helper = ThreadRun(write_on_top)
    try:
        outcome: str | BaseException = run_cycle(memory, mid, {"n": 7}, count)
    except Redeliver as exc:
        outcome = exc
    helper.result(timeout=20)
    if same:
        assert outcome == WRITTEN
    else:
        assert isinstance(outcome, Redeliver)
        assert isinstance(outcome.__cause__, WriteOutcomeUnknown)
    assert MachineMemory(using=proxied.real).read(mid) == on_top


def test_countdowns_grow_with_jitter_up_to_a_cap() -> None:
    first = [countdown(0) for _ in range(200)]
    assert min(first) >= 0.025 and max(first) < 0.075
    assert len({round(value, 6) for value in first}) > 100  # jittered, not one value
    assert all(2.5 <= countdown(20) < 7.5 for _ in range(50))  # capped at 5 s ± 50 %


def test_events_without_a_usable_key_fail_and_are_not_retried(alias: str) -> None:
    from tests.celery_app import app, count_event

    app.conf.task_always_eager = True
    try:
        for event in ({}, {"machine": 5}, "not a mapping"):
            with pytest.raises(ValueError, match="machine"):
                count_event.apply((event,), throw=True)
    finally:
        app.conf.task_always_eager = False

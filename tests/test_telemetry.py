"""Spans and signals: what each operation reports, on every database (docs/telemetry.md).

Spans are collected by the OpenTelemetry SDK's in-memory exporter, signals by real
receivers connected for the test. The one global tracer provider a process may set is
set in a subprocess (``test_spans_reach_the_globally_configured_provider``); the other
tests hand the memory's module a tracer of their own provider.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from django.db import transaction
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from machine_memory import MachineMemory, signals, telemetry
from machine_memory.exceptions import (
    LockLost,
    LockNotAcquired,
    ReadError,
    WriteConflict,
    WriteError,
)
from machine_memory.locks.redis import RedisLockBackend
from tests.settings import DOWN_DATABASES
from tests.test_faults import SERVERS, kill_this_threads_connection

if TYPE_CHECKING:
    from collections.abc import Iterator

    from django.dispatch import Signal
    from opentelemetry.sdk.trace import ReadableSpan

# Appears in the states written below; no span attribute may ever contain it.
SECRET = "card-4111-1111-1111-1111"


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(telemetry, "_tracer", provider.get_tracer("machine_memory"))
    yield exporter
    provider.shutdown()


class Received:
    """Real receivers on every signal of machine_memory.signals, in the order sent."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self._connected: list[tuple[Signal, Any]] = []
        for name in dir(signals):
            signal = getattr(signals, name)
            if isinstance(signal, signals.MemorySignal):
                self._connect(name, signal)

    def _connect(self, name: str, signal: Signal) -> None:
        def receiver(sender: Any, **kwargs: Any) -> None:
            kwargs.pop("signal")
            self.calls.append((name, {"sender": sender, **kwargs}))

        signal.connect(receiver, weak=False)
        self._connected.append((signal, receiver))

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    def one(self, name: str) -> dict[str, Any]:
        found = [kwargs for called, kwargs in self.calls if called == name]
        assert len(found) == 1, (name, self.calls)
        return found[0]

    def disconnect(self) -> None:
        for signal, receiver in self._connected:
            signal.disconnect(receiver)


@pytest.fixture
def received() -> Iterator[Received]:
    receivers = Received()
    yield receivers
    receivers.disconnect()


def by_name(exported: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [span for span in exported if span.name == name]


def attributes(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def test_the_cycle_reports_each_operation(
    memory: MachineMemory, mid: str, spans: InMemorySpanExporter, received: Received
) -> None:
    state = {"step": 1, "card": SECRET}
    assert memory.lock(mid)
    token = memory.held_token(mid)
    assert memory.read(mid) is None
    memory.write(mid, state, None)
    stored = memory.read(mid)
    assert stored == state
    assert memory.unlock(mid)

    exported = spans.get_finished_spans()
    assert [span.name for span in exported] == [
        "machine_memory.lock",
        "machine_memory.read",
        "machine_memory.write",
        "machine_memory.read",
        "machine_memory.unlock",
    ]
    size = len(json.dumps(state, separators=(",", ":")).encode())
    lock, missing, write, found, unlock = (attributes(span) for span in exported)
    assert lock["machine_memory.outcome"] == "acquired"
    assert lock["machine_memory.fencing_token"] == token
    assert lock["machine_memory.attempts"] == 1
    assert lock["machine_memory.machine_id"] == mid
    assert lock["machine_memory.database"] == memory.using
    assert lock["machine_memory.lock_backend"] == type(memory.locks).__name__
    assert missing["machine_memory.outcome"] == "missing"
    assert write["machine_memory.outcome"] == "written"
    assert write["machine_memory.version"] == 1
    assert write["machine_memory.state_bytes"] == size
    assert write["machine_memory.fencing_token"] == token
    assert found["machine_memory.outcome"] == "found"
    assert found["machine_memory.version"] == 1
    # A read reports the document as the database returned it: PostgreSQL's jsonb puts a
    # space after each separator.
    spaced = len(json.dumps(state).encode())
    assert size <= found["machine_memory.state_bytes"] <= spaced
    assert unlock["machine_memory.outcome"] == "released"
    for span in exported:
        assert span.status.status_code is StatusCode.UNSET
        assert all(SECRET not in str(value) for value in attributes(span).values())

    assert received.names() == ["lock_acquired", "state_written", "lock_released"]
    acquired = received.one("lock_acquired")
    assert acquired["sender"] is MachineMemory
    assert acquired["memory"] is memory
    assert acquired["machine_id"] == mid
    assert acquired["token"] == token
    assert acquired["ttl"] == memory.lock_ttl
    written = received.one("state_written")
    assert (written["version"], written["bytes"], written["token"]) == (1, size, token)
    assert written["operation"] == "write"
    assert received.one("lock_released")["token"] == token


def test_a_session_reports_its_lock_write_and_release(
    memory: MachineMemory, mid: str, spans: InMemorySpanExporter, received: Received
) -> None:
    memory.write(mid, {"n": 1}, None)
    received.calls.clear()
    spans.clear()
    with memory.session(mid) as s:
        s.write({"n": 2, "card": SECRET})
    names = [span.name for span in spans.get_finished_spans()]
    # Where lock + read is not one statement, its read shows as a span of its own.
    assert names in (
        ["machine_memory.lock_and_read", "machine_memory.session.write"],
        [
            "machine_memory.read",
            "machine_memory.lock_and_read",
            "machine_memory.session.write",
        ],
    )
    (taken,) = by_name(spans.get_finished_spans(), "machine_memory.lock_and_read")
    assert attributes(taken)["machine_memory.outcome"] == "acquired"
    assert attributes(taken)["machine_memory.version"] == 1
    assert attributes(taken)["machine_memory.fencing_token"] == s.token
    if len(names) == 2:  # the state was read by lock_and_read itself (jsonb adds spaces)
        assert 7 <= attributes(taken)["machine_memory.state_bytes"] <= 8
    (wrote,) = by_name(spans.get_finished_spans(), "machine_memory.session.write")
    assert attributes(wrote)["machine_memory.outcome"] == "written"
    assert attributes(wrote)["machine_memory.version"] == 2
    assert attributes(wrote)["machine_memory.released"] is True
    assert received.names() == ["lock_acquired", "state_written", "lock_released"]
    assert received.one("state_written")["operation"] == "session.write"
    assert received.one("lock_released")["token"] == s.token
    assert memory.lock_info(mid) is None


def test_a_denial_reports_its_attempts(
    memory: MachineMemory, mid: str, spans: InMemorySpanExporter, received: Received
) -> None:
    holder = MachineMemory(using=memory.using)
    try:
        assert holder.lock(mid)
        received.calls.clear()
        spans.clear()
        worker = MachineMemory(using=memory.using, lock_retries=2, lock_backoff=0.001)
        assert not worker.lock(mid)
        with pytest.raises(LockNotAcquired), worker.session(mid):
            pass
        lock, taking = spans.get_finished_spans()
        denials = received.names()
    finally:
        holder.unlock(mid)
    for span in (lock, taking):
        assert attributes(span)["machine_memory.outcome"] == "denied"
        assert attributes(span)["machine_memory.attempts"] == 3
        assert span.status.status_code is StatusCode.UNSET
    assert denials == ["lock_denied", "lock_denied"]
    assert all(kwargs["attempts"] == 3 for _, kwargs in received.calls[:2])


def test_a_lost_compare_and_set_reports_a_conflict(
    memory: MachineMemory, mid: str, spans: InMemorySpanExporter, received: Received
) -> None:
    memory.write(mid, {"n": 1}, None)
    stale = memory.read(mid)
    assert stale is not None
    memory.write(mid, {"n": 2}, stale)
    received.calls.clear()
    spans.clear()
    # A stale document: which version it was read at is no longer known, only that it is
    # not the stored one.
    with pytest.raises(WriteConflict):
        memory.write(mid, {"n": 3}, stale)
    # A stale version: both are known.
    with pytest.raises(WriteConflict):
        memory.overwrite(mid, {"n": 3}, version=1)
    stale_document, stale_version = spans.get_finished_spans()
    assert attributes(stale_document)["machine_memory.outcome"] == "conflict"
    assert attributes(stale_document)["machine_memory.actual_version"] == 2
    assert "machine_memory.expected_version" not in attributes(stale_document)
    assert attributes(stale_version)["machine_memory.expected_version"] == 1
    assert attributes(stale_version)["machine_memory.actual_version"] == 2
    assert stale_version.status.status_code is StatusCode.UNSET
    assert [
        (name, kwargs["operation"], kwargs["expected_version"], kwargs["actual_version"])
        for name, kwargs in received.calls
    ] == [("write_conflict", "write", None, 2), ("write_conflict", "overwrite", 1, 2)]


def test_changes_report_the_version_and_token_they_were_checked_against(
    memory: MachineMemory, mid: str, spans: InMemorySpanExporter
) -> None:
    memory.write(mid, {"n": 1}, None)
    memory.write(mid, {"n": 2}, memory.read(mid))  # no lock: version-checked only
    assert memory.lock(mid)
    token = memory.held_token(mid)
    memory.overwrite(mid, {"n": 3})  # the version read under the row's lock
    memory.delete(mid)
    assert memory.unlock(mid)
    finished = spans.get_finished_spans()
    update = attributes(by_name(finished, "machine_memory.write")[1])
    (overwrite,) = (attributes(span) for span in by_name(finished, "machine_memory.overwrite"))
    (delete,) = (attributes(span) for span in by_name(finished, "machine_memory.delete"))
    assert (update["machine_memory.expected_version"], update["machine_memory.version"]) == (1, 2)
    assert "machine_memory.fencing_token" not in update
    assert overwrite["machine_memory.expected_version"] == 2
    assert overwrite["machine_memory.fencing_token"] == token
    assert delete["machine_memory.expected_version"] == 3
    assert delete["machine_memory.fencing_token"] == token


def test_a_takeover_reports_the_lost_lock(
    memory: MachineMemory, mid: str, spans: InMemorySpanExporter, received: Received
) -> None:
    memory.write(mid, {"n": 1}, None)
    state = memory.read(mid)
    assert memory.lock(mid, ttl=0.2)
    token = memory.held_token(mid)
    time.sleep(0.3)
    other = MachineMemory(using=memory.using)
    try:
        assert other.lock(mid)
        received.calls.clear()
        spans.clear()
        assert not memory.extend(mid)
        with pytest.raises(LockLost):
            memory.write(mid, {"n": 2}, state)
        assert memory.unlock(mid) is False
    finally:
        other.unlock(mid)
        memory.unlock(mid)
    extend, write, unlock = (attributes(span) for span in spans.get_finished_spans()[:3])
    assert extend["machine_memory.outcome"] == "lock_lost"
    assert (write["machine_memory.outcome"], write["machine_memory.fencing_token"]) == (
        "lock_lost",
        token,
    )
    # The release is refused, and reports the token this instance held.
    assert (unlock["machine_memory.outcome"], unlock["machine_memory.fencing_token"]) == (
        "refused",
        token,
    )
    lost = [kwargs for name, kwargs in received.calls if name == "lock_lost"]
    assert [(k["operation"], k["token"]) for k in lost] == [("extend", token), ("write", token)]


def test_an_operator_release_is_reported_as_forced(
    memory: MachineMemory, mid: str, spans: InMemorySpanExporter, received: Received
) -> None:
    worker = MachineMemory(using=memory.using)
    assert worker.lock(mid)
    received.calls.clear()
    info = memory.force_unlock(mid)
    assert info is not None
    released = received.one("lock_released")
    assert (released["token"], released["forced"]) == (info.token, True)
    assert attributes(spans.get_finished_spans()[-1])["machine_memory.forced"] is True
    assert memory.force_unlock(mid) is None
    assert received.names() == ["lock_acquired", "lock_released"][1:]
    worker.unlock(mid)


def test_deletes_are_reported(
    memory: MachineMemory, mid: str, spans: InMemorySpanExporter, received: Received
) -> None:
    memory.write(mid, {"n": 1}, None)
    state = memory.read(mid)
    received.calls.clear()
    memory.delete(mid, state)
    memory.delete(mid)
    deleted, missing = by_name(spans.get_finished_spans(), "machine_memory.delete")
    assert attributes(deleted)["machine_memory.outcome"] == "deleted"
    assert attributes(missing)["machine_memory.outcome"] == "missing"
    assert received.names() == ["state_deleted"]
    assert received.one("state_deleted")["version"] == 1


def test_a_storage_failure_marks_the_span_and_reports_the_failed_write(
    alias: str, mid: str, spans: InMemorySpanExporter, received: Received
) -> None:
    down = MachineMemory(using=DOWN_DATABASES[alias], read_retries=0)
    try:
        with pytest.raises(WriteError) as raised:
            down.write(mid, {"n": 1}, None)
    finally:
        down.close()
    (span,) = spans.get_finished_spans()
    assert attributes(span)["machine_memory.outcome"] == "error"
    assert span.status.status_code is StatusCode.ERROR
    assert [event.name for event in span.events] == ["exception"]
    failed = received.one("write_failed")
    assert failed["error"] is raised.value
    assert failed["operation"] == "write"


@SERVERS
def test_a_read_inside_the_callers_transaction_is_not_retried(
    alias: str, mid: str, spans: InMemorySpanExporter
) -> None:
    """The transaction died with its connection: a retry could only fail again."""
    memory = MachineMemory(using=alias)
    memory.write(mid, {"n": 1}, None)
    assert memory.read_retries > 0
    spans.clear()

    def read_in_a_transaction() -> None:
        with transaction.atomic(using=alias):
            kill_this_threads_connection(alias)
            memory.read(mid)

    with pytest.raises(ReadError):
        read_in_a_transaction()
    (read,) = spans.get_finished_spans()
    assert attributes(read)["machine_memory.outcome"] == "error"
    assert attributes(read)["machine_memory.attempts"] == 1
    assert memory.read(mid) == {"n": 1}  # outside it, on a fresh connection


def test_operations_nest_under_the_callers_span(
    memory: MachineMemory, mid: str, spans: InMemorySpanExporter
) -> None:
    tracer = telemetry._tracer
    with tracer.start_as_current_span("handle event") as parent:
        memory.write(mid, {"n": 1}, None)
    write, handler = spans.get_finished_spans()
    assert handler.name == "handle event"
    assert write.parent is not None
    assert write.parent.span_id == parent.get_span_context().span_id


def test_async_operations_are_reported(
    memory: MachineMemory, mid: str, spans: InMemorySpanExporter, received: Received
) -> None:
    async def cycle() -> None:
        async with memory.asession(mid) as s:
            await s.write({"n": 1})
        assert await memory.aread(mid) == {"n": 1}
        assert await memory.alock(mid)
        assert await memory.aunlock(mid)

    asyncio.run(cycle())
    names = [span.name for span in spans.get_finished_spans()]
    assert names[-4:] == [
        "machine_memory.session.write",
        "machine_memory.read",
        "machine_memory.lock",
        "machine_memory.unlock",
    ]
    assert received.names() == [
        "lock_acquired",
        "state_written",
        "lock_released",
        "lock_acquired",
        "lock_released",
    ]


def test_redis_locks_report_the_same(
    alias: str, redis_cache: str, mid: str, spans: InMemorySpanExporter, received: Received
) -> None:
    memory = MachineMemory(
        using=alias, lock_backend=RedisLockBackend(database=alias, cache=redis_cache)
    )
    try:
        with memory.session(mid) as s:
            s.write({"n": 1})
    finally:
        memory.close()
    assert received.names() == ["lock_acquired", "state_written", "lock_released"]
    (taken,) = by_name(spans.get_finished_spans(), "machine_memory.lock_and_read")
    assert attributes(taken)["machine_memory.lock_backend"] == "RedisLockBackend"
    assert attributes(taken)["machine_memory.fencing_token"] == s.token


def test_a_failing_receiver_cannot_turn_a_stored_write_into_an_error(
    memory: MachineMemory, mid: str, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(sender: Any, **kwargs: Any) -> None:
        raise RuntimeError("receiver bug")

    signals.state_written.connect(broken)
    try:
        with caplog.at_level(logging.ERROR, logger="machine_memory"):
            memory.write(mid, {"n": 1}, None)
    finally:
        signals.state_written.disconnect(broken)
    assert memory.read(mid) == {"n": 1}
    assert "A receiver of machine_memory's signal failed" in caplog.text
    assert "receiver bug" in caplog.text


def test_spans_reach_the_globally_configured_provider(alias: str) -> None:
    """The way an application configures OpenTelemetry: its provider set once, globally,
    after this app was imported; the app's tracer follows it."""
    script = f"""
import django
django.setup()
from machine_memory import MachineMemory
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from tests.support import use_test_databases
exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)
use_test_databases()
memory = MachineMemory(using={alias!r})
memory.read("otel-global")
print([span.name for span in exporter.get_finished_spans()])
"""
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings"}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['machine_memory.read']"


def test_nothing_is_observed_until_someone_listens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(telemetry, "_tracer", None)
    monkeypatch.setattr(telemetry, "_next_look", 0.0)
    # No tracer provider configured in this process: no spans, and no receivers.
    assert telemetry._quiet()

    def receiver(sender: Any, **kwargs: Any) -> None:
        pass

    signals.write_failed.connect(receiver)
    assert not telemetry._quiet()
    signals.write_failed.disconnect(receiver)
    assert telemetry._quiet()


def test_the_docs_receiver_runs_as_written(memory: MachineMemory, mid: str) -> None:
    text = (Path(__file__).resolve().parent.parent / "docs" / "telemetry.md").read_text()
    (snippet,) = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    namespace: dict[str, Any] = {}
    exec(compile(snippet, "docs/telemetry.md", "exec"), namespace)
    holder = MachineMemory(using=memory.using)
    try:
        assert holder.lock(mid)
        assert not MachineMemory(using=memory.using, lock_retries=0).lock(mid)
    finally:
        holder.unlock(mid)
        signals.lock_denied.disconnect(namespace["count_denials"])
    assert namespace["denials"] == {mid: 1}


def test_every_outcome_of_unlock_and_delete_is_reported(
    memory: MachineMemory, alias: str, mid: str, spans: InMemorySpanExporter
) -> None:
    """docs/telemetry.md's outcomes, each from the case it names, with the token and the
    version the operation worked with."""
    other = MachineMemory(using=alias)
    down = MachineMemory(using=DOWN_DATABASES[alias])

    def last(operation: str) -> dict[str, Any]:
        return attributes(by_name(spans.get_finished_spans(), f"machine_memory.{operation}")[-1])

    try:
        assert memory.unlock(mid)
        assert last("unlock")["machine_memory.outcome"] == "not_held"
        assert other.lock(mid)
        token = other.held_token(mid)
        assert memory.unlock(mid) is False
        assert last("unlock")["machine_memory.outcome"] == "refused"
        assert "machine_memory.fencing_token" not in last("unlock")  # it held none
        assert other.unlock(mid)
        assert (
            last("unlock")["machine_memory.outcome"],
            last("unlock")["machine_memory.fencing_token"],
        ) == ("released", token)
        assert down.unlock(mid) is False
        assert last("unlock")["machine_memory.outcome"] == "failed"

        memory.write(mid, {"n": 1}, None)
        memory.delete(mid)  # whatever version is stored
        assert (
            last("delete")["machine_memory.outcome"],
            last("delete")["machine_memory.expected_version"],
        ) == ("deleted", 1)
        memory.write(mid, {"n": 1}, None)
        state = memory.read(mid)
        other.delete(mid)
        assert memory.lock(mid)
        token = memory.held_token(mid)
        memory.delete(mid, state)  # gone already: nothing to do
        assert last("delete")["machine_memory.outcome"] == "missing"
        assert last("delete")["machine_memory.expected_version"] == 1
        assert last("delete")["machine_memory.fencing_token"] == token
        assert memory.unlock(mid)
    finally:
        other.close()
        down.close()

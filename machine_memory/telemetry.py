"""What each ``MachineMemory`` operation reports: an OpenTelemetry span and Django signals.

One place decides both (docs/telemetry.md): ``observed`` wraps a public operation, the
operation ``note()``s what it learnt (fencing token, versions, sizes, attempts), and when
it ends its outcome is derived once, from its result or its exception, and reported to
the span and to ``machine_memory.signals``. Document contents are never reported.

Spans exist once the application has configured an OpenTelemetry tracer provider (the API
is the ``otel`` extra). With no provider and no receiver, an operation costs one check
(``_quiet``) and nothing else.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import logging
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar, cast

from machine_memory import signals
from machine_memory.exceptions import (
    InvalidMachineId,
    InvalidState,
    LockLost,
    LockNotAcquired,
    WriteConflict,
    WriteOutcomeUnknown,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from django.dispatch import Signal

    from machine_memory.memory import MachineMemory

logger = logging.getLogger("machine_memory")

F = TypeVar("F", bound="Callable[..., Any]")

try:
    from opentelemetry import context as otel_context
    from opentelemetry import trace
    from opentelemetry.trace import (
        NoOpTracerProvider,
        ProxyTracerProvider,
        SpanKind,
        Status,
        StatusCode,
    )
except ImportError:  # pragma: no cover - the otel extra is installed in the tests
    trace = None  # type: ignore[assignment]

# The tracer of the application's tracer provider, once one is configured. Until then
# (and without the OpenTelemetry API) there are no spans at all: the API's no-op spans
# would still cost about 10 µs per operation, as much as a SQLite statement.
_tracer: Any = None
# Asking the API for the provider costs nearly 1 µs, so until one is configured it is
# asked at most once a second (monotonic time of the next look).
LOOK_EVERY = 1.0
_next_look = 0.0

# Operations that change states: their storage failures are reported by write_failed.
_WRITES = frozenset({"write", "overwrite", "session.write", "delete", "cleanup"})

# The operation being run in this context (the innermost, when one calls another).
_current: contextvars.ContextVar[Operation | None] = contextvars.ContextVar(
    "machine_memory_operation", default=None
)


def _active_tracer() -> Any:
    global _tracer, _next_look
    if _tracer is not None or trace is None:
        return _tracer
    now = time.monotonic()
    if now < _next_look:
        return None
    _next_look = now + LOOK_EVERY
    provider = trace.get_tracer_provider()
    # The global provider can be set once per process, so a real one is kept for good.
    if not isinstance(provider, ProxyTracerProvider | NoOpTracerProvider):
        _tracer = provider.get_tracer("machine_memory")
    return _tracer


@contextmanager
def tracing_with(tracer: Any) -> Iterator[None]:
    """Report spans to ``tracer`` for a while, whatever the global provider: for
    ``machine_memory_bench --telemetry spans``, which must not configure the process for good."""
    global _tracer
    kept = _tracer
    _tracer = tracer
    try:
        yield
    finally:
        _tracer = kept


def _quiet() -> bool:
    return not signals.listened and _active_tracer() is None


def outcome_of(exc: BaseException) -> str:
    """The outcome an exception stands for (the span's ``machine_memory.outcome``)."""
    # Subclasses first: LockLost is a WriteConflict, which is a WriteError.
    if isinstance(exc, LockLost):
        return "lock_lost"
    if isinstance(exc, WriteConflict):
        return "conflict"
    if isinstance(exc, LockNotAcquired):
        return "denied"
    if isinstance(exc, WriteOutcomeUnknown):
        return "unknown"
    if isinstance(exc, InvalidMachineId | InvalidState | ValueError | TypeError):
        return "invalid"
    return "error"


class Operation:
    """One call being observed: what it noted, and its span when tracing."""

    __slots__ = (
        "_reset",
        "_restore",
        "facts",
        "machine_id",
        "memory",
        "name",
        "outcome",
        "parent",
        "pending",
        "span",
    )

    def __init__(
        self, memory: MachineMemory, name: str, machine_id: object, parent: Operation | None
    ) -> None:
        self.memory = memory
        self.name = name
        self.parent = parent
        # Signals of the operations this one called, sent after its own: a session's write
        # is reported as written before the unlock it called is reported as a release.
        self.pending: list[tuple[Signal, dict[str, Any]]] = []
        # Only what validate_id would accept reaches the span (no NULs, no megabytes).
        self.machine_id = (
            machine_id if isinstance(machine_id, str) and len(machine_id) <= 512 else None
        )
        self.facts: dict[str, Any] = {}
        self.outcome: str | None = None
        self.span: Any = None

    def __enter__(self) -> None:
        self._start_span()
        self._reset = _current.set(self)

    def __exit__(self, kind: Any, exc: BaseException | None, traceback: Any) -> None:
        _current.reset(self._reset)
        self._end(exc)

    def _start_span(self) -> None:
        """Start the span, if tracing, and make it the current one."""
        tracer = _active_tracer()
        if tracer is None:
            return
        attributes = {
            "machine_memory.operation": self.name,
            "machine_memory.lock_backend": type(self.memory.locks).__name__,
        }
        if self.machine_id is not None:
            attributes["machine_memory.machine_id"] = self.machine_id
        if self.memory.store.using is not None:
            attributes["machine_memory.database"] = self.memory.store.using
        self.span = tracer.start_span(
            f"machine_memory.{self.name}", kind=SpanKind.CLIENT, attributes=attributes
        )
        self._restore = otel_context.attach(trace.set_span_in_context(self.span))

    def _end(self, exc: BaseException | None) -> None:
        outcome = outcome_of(exc) if exc is not None else self.outcome or "ok"
        # The document's text was noted, never reported: only its size in UTF-8.
        text = self.facts.pop("text", None)
        if text is not None:
            self.facts["state_bytes"] = len(text) if text.isascii() else len(text.encode())
        if isinstance(exc, WriteConflict):
            self.facts["expected_version"] = exc.expected_version
            self.facts["actual_version"] = exc.actual_version
        if self.span is not None:
            self._end_span(outcome, exc)
        if self.machine_id is None:
            return
        sent = [*self._signals(outcome, exc), *self.pending]
        if self.parent is not None:
            self.parent.pending.extend(sent)
            return
        for signal, arguments in sent:
            self._send(signal, arguments)

    def _end_span(self, outcome: str, exc: BaseException | None) -> None:
        span = self.span
        span.set_attribute("machine_memory.outcome", outcome)
        for key, value in self.facts.items():
            if value is not None:
                span.set_attribute(f"machine_memory.{key}", value)
        # Denials and conflicts are answers, not failures: only storage errors (and a
        # misuse) mark the span as failed.
        if exc is not None and outcome in ("error", "unknown", "invalid"):
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}"))
        span.end()
        otel_context.detach(self._restore)

    def _signals(
        self, outcome: str, exc: BaseException | None
    ) -> list[tuple[Signal, dict[str, Any]]]:
        """The signals this operation's own outcome stands for, with their arguments."""
        facts = self.facts
        sent: list[tuple[Signal, dict[str, Any]]] = []
        if outcome == "acquired":
            sent.append(
                (
                    signals.lock_acquired,
                    {
                        "token": facts.get("fencing_token"),
                        "ttl": facts.get("ttl"),
                        "attempts": facts.get("attempts", 1),
                    },
                )
            )
        elif outcome == "denied":
            sent.append((signals.lock_denied, {"attempts": facts.get("attempts", 1)}))
        elif outcome == "lock_lost":
            sent.append(
                (
                    signals.lock_lost,
                    {"token": facts.get("fencing_token"), "operation": self.name},
                )
            )
        elif outcome == "written":
            sent.append(
                (
                    signals.state_written,
                    {
                        "version": facts.get("version"),
                        "bytes": facts.get("state_bytes"),
                        "token": facts.get("fencing_token"),
                        "operation": self.name,
                    },
                )
            )
        elif outcome == "deleted":
            sent.append((signals.state_deleted, {"version": facts.get("expected_version")}))
        elif outcome == "conflict":
            assert isinstance(exc, WriteConflict)
            sent.append(
                (
                    signals.write_conflict,
                    {
                        "expected_version": exc.expected_version,
                        "actual_version": exc.actual_version,
                        "operation": self.name,
                    },
                )
            )
        elif outcome in ("error", "unknown") and self.name in _WRITES:
            sent.append((signals.write_failed, {"error": exc, "operation": self.name}))
        if facts.get("released"):
            sent.append(
                (
                    signals.lock_released,
                    {"token": facts.get("fencing_token"), "forced": facts.get("forced", False)},
                )
            )
        return sent

    def _send(self, signal: Signal, arguments: dict[str, Any]) -> None:
        if not signal.receivers:
            return
        # send_robust: the operation has happened; a failing receiver must not make it
        # look as if it had not (a stored write reported as an error would be redone).
        for receiver, response in signal.send_robust(
            type(self.memory), memory=self.memory, machine_id=self.machine_id, **arguments
        ):
            if isinstance(response, Exception):
                logger.error(
                    "A receiver of machine_memory's signal failed: %r",
                    receiver,
                    exc_info=response,
                )


def note(outcome: str | None = None, **facts: Any) -> None:
    """Tell the operation being observed what it learnt (and, optionally, its outcome)."""
    operation = _current.get()
    if operation is None:
        return
    if outcome is not None:
        operation.outcome = outcome
    operation.facts.update(facts)


def observed(name: str) -> Callable[[F], F]:
    """Observe a ``MachineMemory`` method whose first argument is the machine id."""

    def decorate(method: F) -> F:
        if inspect.iscoroutinefunction(method):

            @functools.wraps(method)
            async def observe_async(self: MachineMemory, machine_id: Any, *a: Any, **k: Any) -> Any:
                if _quiet():
                    return await method(self, machine_id, *a, **k)
                with Operation(self, name, machine_id, _current.get()):
                    return await method(self, machine_id, *a, **k)

            return cast("F", observe_async)

        @functools.wraps(method)
        def observe(self: MachineMemory, machine_id: Any, *a: Any, **k: Any) -> Any:
            if _quiet():
                return method(self, machine_id, *a, **k)
            with Operation(self, name, machine_id, _current.get()):
                return method(self, machine_id, *a, **k)

        return cast("F", observe)

    return decorate

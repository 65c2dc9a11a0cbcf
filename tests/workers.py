"""Workers for the concurrency and fault tests: threads and spawned processes.

Each worker uses its own ``MachineMemory`` and its own database connection (Django's
connections are per thread), and closes its connections when it ends. The process entry
point is a module-level function so that the "spawn" start method can import it.
"""

from __future__ import annotations

import multiprocessing
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable

T = TypeVar("T")

# A denied lock() returns at once (no retries inside lock()), so that every denial shows in
# the report; the worker then tries its next id, and naps briefly after a pass with no luck.
IDLE_NAP = 0.002
# The "work" of an event, done while holding the lock: long enough that workers really do
# collide (without it a fast database can serialise them by luck and nothing is proven).
WORK = 0.003


@dataclass
class CycleReport:
    """What one worker did: increments per id, lock hold intervals, surprises."""

    owner: str = ""
    done: dict[str, int] = field(default_factory=dict)
    # (machine id, monotonic time right after lock() returned True, right before unlock())
    intervals: list[tuple[str, float, float]] = field(default_factory=list)
    denials: int = 0
    conflicts: int = 0
    failed_unlocks: int = 0


def increment_cycles(
    alias: str, ids: list[str], rounds: int, first: int = 0, lock_backend: str | None = None
) -> CycleReport:
    """The Arvo cycle: lock -> read -> +1 -> write(new, prev) -> unlock, ``rounds`` times per id.

    A denied lock moves on to the next id; a ``WriteConflict`` retries the increment.
    ``lock_backend`` None: the configured one (the database backend in the test settings).
    """
    from machine_memory import MachineMemory
    from machine_memory.exceptions import WriteConflict

    memory = MachineMemory(using=alias, lock_backend=lock_backend, lock_retries=0)
    report = CycleReport(owner=memory.owner, done=dict.fromkeys(ids, 0))
    # Start on a different id in each worker, so that some of the races are for fresh ids.
    order = ids[first % len(ids) :] + ids[: first % len(ids)]
    try:
        while any(report.done[mid] < rounds for mid in ids):
            progress = False
            for mid in order:
                if report.done[mid] >= rounds:
                    continue
                if not memory.lock(mid):
                    report.denials += 1
                    continue
                progress = True
                acquired = time.monotonic()
                try:
                    state = memory.read(mid)
                    count = 0 if state is None else state["count"]
                    time.sleep(WORK)
                    memory.write(mid, {"count": count + 1, "by": memory.owner}, state)
                except WriteConflict:
                    report.conflicts += 1
                else:
                    report.done[mid] += 1
                finally:
                    report.intervals.append((mid, acquired, time.monotonic()))
                    if not memory.unlock(mid):
                        report.failed_unlocks += 1
            if not progress:
                time.sleep(IDLE_NAP)
    finally:
        memory.close()
    return report


def increment_process(
    alias: str,
    ids: list[str],
    rounds: int,
    index: int,
    start: Any,
    results: Any,
    lock_backend: str | None = None,
) -> None:
    """Entry point of a spawned worker process: wait for the others, then run the cycles."""
    try:
        from tests.support import use_test_databases

        use_test_databases()
        from django.db import connections

        # Connect before the barrier, so that the race is not decided by connection set-up.
        connections[alias].ensure_connection()
        start.wait(timeout=60)
        try:
            report = increment_cycles(alias, ids, rounds, first=index, lock_backend=lock_backend)
            results.put(("ok", index, report))
        finally:
            connections.close_all()
    except BaseException:
        results.put(("error", index, traceback.format_exc()))


def run_increment_processes(
    alias: str, ids: list[str], rounds: int, count: int, lock_backend: str | None = None
) -> list[CycleReport]:
    """Run ``increment_process`` in ``count`` spawned processes started together.

    Fails the test if a worker reports an error, dies without a report, or exits non-zero.
    """
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(count)
    results: Any = context.Queue()
    processes = [
        context.Process(
            target=increment_process,
            args=(alias, ids, rounds, index, start, results, lock_backend),
            daemon=True,
        )
        for index in range(count)
    ]
    for process in processes:
        process.start()
    reports: dict[int, CycleReport] = {}
    errors: list[str] = []
    try:
        while len(reports) + len(errors) < count:
            try:
                status, index, payload = results.get(timeout=1)
            except queue.Empty:
                dead = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
                assert not dead, f"a worker process died without a report: {dead}"
                continue
            if status == "ok":
                reports[index] = payload
            else:
                errors.append(payload)
                start.abort()
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    assert not errors, "\n".join(errors)
    assert [p.exitcode for p in processes] == [0] * count
    return list(reports.values())


class ThreadRun(Generic[T]):
    """A function running in a thread of its own, with its own database connections."""

    def __init__(self, fn: Callable[..., T], *args: Any) -> None:
        self._fn = fn
        self._args = args
        self._outcome: queue.Queue[tuple[bool, Any]] = queue.Queue(maxsize=1)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        from django.db import connections

        try:
            self._outcome.put((True, self._fn(*self._args)))
        except BaseException as exc:
            self._outcome.put((False, exc))
        finally:
            connections.close_all()

    def result(self, timeout: float = 60) -> T:
        """The function's return value; its exception is re-raised here."""
        ok, value = self._outcome.get(timeout=timeout)
        self.thread.join(timeout)
        if not ok:
            raise value
        return value  # type: ignore[no-any-return]


def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn`` on another thread (so on other database connections) and return its result."""
    return ThreadRun(fn, *args).result()


def run_threads(fn: Callable[[int], T], count: int, timeout: float = 120) -> list[T]:
    """Run ``fn(0)`` … ``fn(count - 1)`` at once, each on its own thread; their results."""
    runs = [ThreadRun(fn, index) for index in range(count)]
    return [run.result(timeout) for run in runs]

"""The benchmark behind ``manage.py machine_memory_bench``.

It runs the Arvo cycle (lock -> read -> write(new, prev) -> unlock) through
``MachineMemory``'s four calls and through ``session()`` (lock + read, write + release),
then the same four operations as hand-written statements on the bare driver
(``bench.baseline``) against the same database, and reports them side by side.
Every id it touches starts with a prefix made for the run, and only rows under that prefix
are ever deleted.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

    from machine_memory.bench.baseline import RawCycle
    from machine_memory.memory import MachineMemory

OPERATIONS = ("lock", "read", "write", "unlock")


class BenchError(Exception):
    """The run itself went wrong (a denied lock without contention, a lost update)."""


def new_prefix() -> str:
    return f"machine-memory-bench/{uuid.uuid4().hex}/"


def document(machine_id: str, counter: int) -> dict[str, Any]:
    """A small Arvo-like state document (about 200 bytes as JSON)."""
    return {
        "subject": machine_id,
        "executionStatus": "active",
        "counter": counter,
        "value": {"orderId": machine_id[-12:], "items": [1, 2, 3], "total": 12.5},
        "events": ["com.order.created", "com.order.paid"],
    }


@dataclass
class Timings:
    """Nanoseconds per operation, over one run of cycles."""

    samples: dict[str, list[int]] = field(default_factory=lambda: {op: [] for op in OPERATIONS})
    cycles: int = 0
    elapsed: float = 0.0
    denials: int = 0
    conflicts: int = 0
    # Contention runs: successful increments per machine id.
    increments: Counter[str] = field(default_factory=Counter)

    @property
    def per_second(self) -> float:
        return self.cycles / self.elapsed if self.elapsed else 0.0

    def merge(self, other: Timings) -> None:
        for op in OPERATIONS:
            self.samples[op] += other.samples[op]
        self.cycles += other.cycles
        self.denials += other.denials
        self.conflicts += other.conflicts
        self.increments.update(other.increments)

    def percentiles(self) -> dict[str, dict[str, float]]:
        """p50/p99 per operation, in microseconds."""
        result = {}
        for op, values in self.samples.items():
            if not values:
                continue
            ordered = sorted(values)
            result[op] = {
                "p50": ordered[len(ordered) // 2] / 1000,
                "p99": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] / 1000,
            }
        return result


# The loops of the four kinds of cycle (memory, session, raw, raw session) are written out
# in full: each puts its own calls between its clock readings. What they share (turning
# over the ids, progress, the elapsed time) is a few lines; a helper taking each cycle's
# body as a callback would hide the timed lines without making them any shorter.


def memory_cycles(
    memory: MachineMemory,
    ids: list[str],
    cycles: int,
    progress: Callable[[int], None] | None = None,
    start: int = 0,
) -> Timings:
    """The Arvo cycle through MachineMemory, each id in turn; every lock must succeed."""
    timings = Timings()
    lock, read, write, unlock = (timings.samples[op] for op in OPERATIONS)
    clock = time.perf_counter_ns
    started = time.perf_counter()
    for number in range(cycles):
        machine_id = ids[(start + number) % len(ids)]
        t0 = clock()
        if not memory.lock(machine_id):
            raise BenchError(f"lock({machine_id!r}) was denied although no one else uses it")
        t1 = clock()
        state = memory.read(machine_id)
        t2 = clock()
        new = document(machine_id, 1 if state is None else state["counter"] + 1)
        memory.write(machine_id, new, state)
        t3 = clock()
        memory.unlock(machine_id)
        t4 = clock()
        lock.append(t1 - t0)
        read.append(t2 - t1)
        write.append(t3 - t2)
        unlock.append(t4 - t3)
        if progress is not None and number % 256 == 0:
            progress(number)
    timings.elapsed = time.perf_counter() - started
    timings.cycles = cycles
    return timings


def session_cycles(
    memory: MachineMemory,
    ids: list[str],
    cycles: int,
    progress: Callable[[int], None] | None = None,
    start: int = 0,
) -> Timings:
    """The same cycle through ``session()``: "lock" times lock + read, "write" times
    write + release."""
    from machine_memory.exceptions import LockNotAcquired

    timings = Timings()
    lock, write = timings.samples["lock"], timings.samples["write"]
    clock = time.perf_counter_ns
    started = time.perf_counter()
    for number in range(cycles):
        machine_id = ids[(start + number) % len(ids)]
        t0 = clock()
        try:
            with memory.session(machine_id) as s:
                t1 = clock()
                state = s.state
                s.write(document(machine_id, 1 if state is None else state["counter"] + 1))
                t2 = clock()
        except LockNotAcquired as exc:
            raise BenchError(f"{exc} although no one else uses it") from exc
        lock.append(t1 - t0)
        write.append(t2 - t1)
        if progress is not None and number % 256 == 0:
            progress(number)
    timings.elapsed = time.perf_counter() - started
    timings.cycles = cycles
    return timings


def raw_cycles(
    raw: RawCycle,
    ids: list[str],
    cycles: int,
    progress: Callable[[int], None] | None = None,
    start: int = 0,
) -> Timings:
    """The same cycle on the bare driver; JSON encoding and decoding included."""
    timings = Timings()
    lock, read, write, unlock = (timings.samples[op] for op in OPERATIONS)
    clock = time.perf_counter_ns
    owner = f"raw:{os.getpid()}"
    dumps, loads = json.dumps, json.loads
    started = time.perf_counter()
    for number in range(cycles):
        machine_id = ids[(start + number) % len(ids)]
        t0 = clock()
        if not raw.lock(machine_id, owner, 120.0):
            raise BenchError(f"raw lock of {machine_id!r} was denied")
        t1 = clock()
        row = raw.read(machine_id)
        state = None if row is None else loads(row[0])
        t2 = clock()
        new = document(machine_id, 1 if state is None else state["counter"] + 1)
        if not raw.write(machine_id, dumps(new), None if row is None else row[1]):
            raise BenchError(f"raw write of {machine_id!r} lost its compare-and-set")
        t3 = clock()
        raw.unlock(machine_id, owner)
        t4 = clock()
        lock.append(t1 - t0)
        read.append(t2 - t1)
        write.append(t3 - t2)
        unlock.append(t4 - t3)
        if progress is not None and number % 256 == 0:
            progress(number)
    timings.elapsed = time.perf_counter() - started
    timings.cycles = cycles
    return timings


def raw_session_cycles(
    raw: RawCycle,
    ids: list[str],
    cycles: int,
    progress: Callable[[int], None] | None = None,
    start: int = 0,
) -> Timings:
    """The cycle on the bare driver in two round trips (``RawCycle.take`` and ``give``),
    timed as ``session_cycles`` times ``session()``; JSON encoding and decoding included."""
    timings = Timings()
    lock, write = timings.samples["lock"], timings.samples["write"]
    clock = time.perf_counter_ns
    owner = f"raw:{os.getpid()}"
    dumps, loads = json.dumps, json.loads
    started = time.perf_counter()
    for number in range(cycles):
        machine_id = ids[(start + number) % len(ids)]
        t0 = clock()
        locked, row = raw.take(machine_id, owner, 120.0)
        if not locked:
            raise BenchError(f"raw lock of {machine_id!r} was denied")
        state = None if row is None else loads(row[0])
        t1 = clock()
        new = document(machine_id, 1 if state is None else state["counter"] + 1)
        if not raw.give(machine_id, owner, dumps(new), None if row is None else row[1]):
            raise BenchError(f"raw write of {machine_id!r} lost its compare-and-set")
        t2 = clock()
        lock.append(t1 - t0)
        write.append(t2 - t1)
        if progress is not None and number % 256 == 0:
            progress(number)
    timings.elapsed = time.perf_counter() - started
    timings.cycles = cycles
    return timings


# Microseconds of client-side work before each probed statement (``gap_probe``).
GAPS_US = (0, 20, 100)


def gap_probe(raw: RawCycle, ids: list[str], cycles: int) -> dict[str, float]:
    """p50 µs of the baseline's lock statement after 0, 20 and 100 µs of client work.

    On some machines (virtual ones especially) a statement sent while the server has just
    answered costs far less than the same statement sent a few microseconds later: the
    idle CPUs have gone to sleep. The raw loop sends its next statement almost at once;
    any library that does work between statements pays the difference. This measures it.
    """
    owner = f"raw:{os.getpid()}"
    clock = time.perf_counter_ns
    result = {}
    for gap in GAPS_US:
        samples = []
        for number in range(cycles):
            machine_id = ids[number % len(ids)]
            until = clock() + gap * 1000
            while clock() < until:  # busy, like Python work, not a sleep
                pass
            t0 = clock()
            raw.lock(machine_id, owner, 120.0)
            samples.append(clock() - t0)
            raw.unlock(machine_id, owner)
        samples.sort()
        result[str(gap)] = round(samples[len(samples) // 2] / 1000, 1)
    return result


# Cycles per turn when the kinds of cycle take turns (``interleaved``).
TURN = 250


def interleaved(
    kinds: dict[str, Callable[[int, int], Timings]],
    cycles: int,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Timings]:
    """Run each kind of cycle ``cycles`` times, taking turns of ``TURN`` cycles.

    ``kinds[name](start, count)`` runs cycles ``start`` to ``start + count``. Taking turns
    gives every kind the same share of what the machine does meanwhile (the disk's
    flushes, autovacuum, checkpoints), which on a small server moves a block of cycles by
    more than the difference being measured.
    """
    merged = {name: Timings() for name in kinds}
    for start in range(0, cycles, TURN):
        count = min(TURN, cycles - start)
        for name, run in kinds.items():
            timings = run(start, count)
            merged[name].merge(timings)
            merged[name].elapsed += timings.elapsed
        if progress is not None:
            progress(start + count)
    return merged


def contended_cycles(memory: MachineMemory, ids: list[str], cycles: int) -> Timings:
    """Increment counters on shared ids until ``cycles`` increments succeeded."""
    from machine_memory.exceptions import WriteConflict

    timings = Timings()
    clock = time.perf_counter_ns
    started = time.perf_counter()
    number = 0
    while timings.cycles < cycles:
        machine_id = ids[number % len(ids)]
        number += 1
        t0 = clock()
        if not memory.lock(machine_id):
            timings.denials += 1
            continue
        t1 = clock()
        try:
            state = memory.read(machine_id)
            t2 = clock()
            counter = 1 if state is None else state["counter"] + 1
            memory.write(machine_id, document(machine_id, counter), state)
            t3 = clock()
        except WriteConflict:
            timings.conflicts += 1
            continue
        finally:
            unlock_started = clock()
            memory.unlock(machine_id)
            t4 = clock()
        timings.samples["lock"].append(t1 - t0)
        timings.samples["read"].append(t2 - t1)
        timings.samples["write"].append(t3 - t2)
        timings.samples["unlock"].append(t4 - unlock_started)
        timings.increments[machine_id] += 1
        timings.cycles += 1
    timings.elapsed = time.perf_counter() - started
    return timings


def worker(job: dict[str, Any]) -> Timings:
    """Entry point of a worker process (spawned): set Django up, run one kind of cycle."""
    import django

    django.setup()
    from django.db import connections

    from machine_memory.bench.baseline import Tables, raw_cycle
    from machine_memory.memory import MachineMemory

    alias = job["database"]
    # Connect to the database the parent uses, which need not be the one settings name: a
    # test run's test database, or a name the settings compute differently per process.
    connections[alias].settings_dict["NAME"] = job["name"]
    start = job["start"]
    try:
        if job["kind"] in ("raw", "raw_session"):
            connection = connections[alias]
            raw = raw_cycle(connection, Tables(**job["tables"]))
            run = raw_cycles if job["kind"] == "raw" else raw_session_cycles
            try:
                start.wait()
                return run(raw, job["ids"], job["cycles"])
            finally:
                raw.close()
        memory = MachineMemory(using=alias, lock_backend=job["lock_backend"])
        connections[alias].ensure_connection()
        start.wait()
        if job["kind"] == "contention":
            return contended_cycles(memory, job["ids"], job["cycles"])
        if job["kind"] == "session":
            return session_cycles(memory, job["ids"], job["cycles"])
        return memory_cycles(memory, job["ids"], job["cycles"])
    finally:
        connections.close_all()


def run_in_processes(
    jobs: list[dict[str, Any]], target: Callable[[dict[str, Any]], Timings] = worker
) -> Timings:
    """Run ``target(job)`` for each job in a spawned process of its own, all started
    together (``job["start"]``, a barrier); merge their timings."""
    from django.db import connections

    context = multiprocessing.get_context("spawn")
    manager = context.Manager()
    try:
        start = manager.Barrier(len(jobs) + 1)
        for job in jobs:
            job["start"] = start
            if "database" in job:
                job["name"] = connections[job["database"]].settings_dict["NAME"]
        with context.Pool(len(jobs)) as pool:
            pending = pool.map_async(target, jobs)
            start.wait(timeout=120)
            results = pending.get(timeout=3600)
    finally:
        manager.shutdown()
    merged = Timings()
    for result in results:
        merged.merge(result)
    # The run lasts as long as its slowest worker, each timed in its own process from the
    # barrier on. Not by this process's clock: it may get past the barrier after the
    # workers, late enough for a short run (20 SQLite cycles) to be over already.
    merged.elapsed = max(result.elapsed for result in results)
    return merged


def median_run(runs: list[Timings]) -> Timings:
    """The run with the median throughput (so its percentiles belong to it)."""
    ranked = sorted(runs, key=lambda run: run.per_second)
    return ranked[len(ranked) // 2]


def summary(runs: list[Timings]) -> dict[str, Any]:
    chosen = median_run(runs)
    return {
        "cycles_per_second": round(chosen.per_second, 1),
        "runs_cycles_per_second": [round(run.per_second, 1) for run in runs],
        "median_of": len(runs),
        "cycles": chosen.cycles,
        "latency_us": {
            op: {k: round(v, 1) for k, v in values.items()}
            for op, values in chosen.percentiles().items()
        },
        "denials": chosen.denials,
        "conflicts": chosen.conflicts,
    }

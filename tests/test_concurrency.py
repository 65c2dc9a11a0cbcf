"""Races on real connections: threads and spawned processes, with barriers, then counting."""

from __future__ import annotations

import itertools
import threading
from collections import defaultdict
from typing import Any

import pytest

from machine_memory import MachineMemory
from machine_memory.exceptions import LockLost, WriteConflict
from tests.support import new_id
from tests.workers import CycleReport, increment_cycles, run_increment_processes, run_threads

THREADS = 4
PROCESSES = 4
IDS = 3
ROUNDS = 8  # increments per worker per id


def assert_exact_and_exclusive(alias: str, ids: list[str], reports: list[CycleReport]) -> None:
    workers = len(reports)
    # Every increment landed exactly once: nothing lost, nothing doubled.
    memory = MachineMemory(using=alias)
    states: dict[str, Any] = {mid: memory.read(mid) for mid in ids}
    for mid in ids:
        assert states[mid] is not None and states[mid]["count"] == workers * ROUNDS
        assert sum(report.done[mid] for report in reports) == workers * ROUNDS
    # Under an exclusive lock the version read is always the latest one.
    assert [report.conflicts for report in reports] == [0] * workers
    assert [report.failed_unlocks for report in reports] == [0] * workers
    # No two holders of one id overlapped (the recorded interval of a holder lies inside
    # the time it really held the lock).
    by_id: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
    for report in reports:
        for mid, start, end in report.intervals:
            by_id[mid].append((start, end, report.owner))
    assert sorted(by_id) == sorted(ids)
    for mid, intervals in by_id.items():
        intervals.sort()
        assert len(intervals) == workers * ROUNDS
        for (_, end, owner), (start, _, next_owner) in itertools.pairwise(intervals):
            assert end <= start, f"{next_owner} took {mid} while {owner} still held it"
        # ... and the last holder wrote the last state.
        assert states[mid]["by"] == intervals[-1][2]
    assert len({report.owner for report in reports}) == workers
    # The workers really raced: some lock() calls found the id held by another worker.
    assert sum(report.denials for report in reports) > 0


def test_threads_increment_exactly_under_the_lock(alias: str) -> None:
    ids = [new_id("threads") for _ in range(IDS)]
    barrier = threading.Barrier(THREADS)

    def worker(index: int) -> CycleReport:
        barrier.wait(timeout=30)
        return increment_cycles(alias, ids, ROUNDS, first=index)

    reports = run_threads(worker, THREADS)
    assert_exact_and_exclusive(alias, ids, reports)


@pytest.mark.slow
def test_processes_increment_exactly_under_the_lock(alias: str) -> None:
    ids = [new_id("processes") for _ in range(IDS)]
    reports = run_increment_processes(alias, ids, ROUNDS, PROCESSES)
    assert_exact_and_exclusive(alias, ids, reports)


CONTENDERS = 3
RACES = 5


@pytest.mark.parametrize("prev_kind", ["read", "equal_dict"])
def test_concurrent_updates_from_one_version_have_one_winner(alias: str, prev_kind: str) -> None:
    for _ in range(RACES):
        mid = new_id("cas")
        MachineMemory(using=alias).write(mid, {"count": 0}, None)
        barrier = threading.Barrier(CONTENDERS)

        def contender(index: int, mid: str = mid, barrier: threading.Barrier = barrier) -> Any:
            memory = MachineMemory(using=alias)
            # Every contender holds version 1: the object read() returned, or an equal dict
            # that read() never handed out (the content-compare path).
            prev = memory.read(mid) if prev_kind == "read" else {"count": 0}
            assert prev == {"count": 0}
            barrier.wait(timeout=30)
            try:
                memory.write(mid, {"count": 1, "winner": index}, prev)
            except WriteConflict as exc:
                return exc
            return index

        outcomes = run_threads(contender, CONTENDERS)
        winners = [outcome for outcome in outcomes if isinstance(outcome, int)]
        losers = [outcome for outcome in outcomes if isinstance(outcome, WriteConflict)]
        assert len(winners) == 1 and len(losers) == CONTENDERS - 1
        for loser in losers:
            assert not isinstance(loser, LockLost)
            assert loser.id == mid
            if prev_kind == "read":
                assert (loser.expected_version, loser.actual_version) == (1, 2)
            else:
                # Lost either at the compare (saw version 2) or at the compare-and-set.
                assert loser.actual_version == 2
        assert MachineMemory(using=alias).read(mid) == {"count": 1, "winner": winners[0]}


def test_concurrent_creates_have_one_winner(alias: str) -> None:
    for _ in range(RACES):
        mid = new_id("create")
        barrier = threading.Barrier(CONTENDERS)

        def contender(index: int, mid: str = mid, barrier: threading.Barrier = barrier) -> Any:
            memory = MachineMemory(using=alias)
            assert memory.read(mid) is None
            barrier.wait(timeout=30)
            try:
                memory.write(mid, {"creator": index}, None)
            except WriteConflict as exc:
                return exc
            return index

        outcomes = run_threads(contender, CONTENDERS)
        winners = [outcome for outcome in outcomes if isinstance(outcome, int)]
        losers = [outcome for outcome in outcomes if isinstance(outcome, WriteConflict)]
        assert len(winners) == 1 and len(losers) == CONTENDERS - 1
        for loser in losers:
            assert (loser.id, loser.expected_version, loser.actual_version) == (mid, None, 1)
        assert MachineMemory(using=alias).read(mid) == {"creator": winners[0]}

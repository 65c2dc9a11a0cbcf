"""``Backoff()``: the pauses every retry loop waits (docs/contract.md#read, #lock, #unlock)."""

from __future__ import annotations

import pytest

from machine_memory.retry import Backoff


def test_pauses_double_from_the_first_then_give_up() -> None:
    assert list(Backoff(4, 0.05)) == [0.05, 0.1, 0.2, 0.4, None]


def test_no_retries_gives_up_at_once() -> None:
    assert list(Backoff(0, 0.05)) == [None]


def test_jitter_scales_each_pause_within_its_bounds() -> None:
    firsts: list[float] = []
    for _ in range(200):
        got = list(Backoff(3, 0.1, jitter=0.5))
        assert got[-1] is None and len(got) == 4
        for attempt, pause in enumerate(got[:-1]):
            assert pause is not None
            assert 0.05 * 2**attempt <= pause <= 0.15 * 2**attempt
        assert got[0] is not None
        firsts.append(got[0])
    # Random within the bounds: 200 draws on one side of the middle is 2**-199.
    assert min(firsts) < 0.1 < max(firsts)


def test_a_deadline_stops_the_retries_whose_pause_would_reach_it() -> None:
    # Not slept here: 0.1 and then 0.2 still end before 0.35 s, 0.4 would not.
    assert list(Backoff(10, 0.1, deadline=0.35)) == [0.1, 0.2, None]


def test_a_deadline_shorter_than_the_first_pause_retries_never() -> None:
    assert list(Backoff(10, 0.1, deadline=0.05)) == [None]


@pytest.mark.parametrize("stop_after", [0, 1, 3])
def test_stop_is_asked_before_each_retry(stop_after: int) -> None:
    asked = []

    def stop() -> bool:
        asked.append(True)
        return len(asked) > stop_after

    got = list(Backoff(10, 0.01, stop=stop))
    assert got == [0.01 * 2**n for n in range(stop_after)] + [None]
    assert len(asked) == stop_after + 1


def test_stop_that_never_says_stop_leaves_the_retries_alone() -> None:
    assert list(Backoff(2, 0.01, stop=lambda: False)) == [0.01, 0.02, None]


def test_a_denied_lock_waits_jittered_pauses(monkeypatch: pytest.MonkeyPatch) -> None:
    """lock()'s retries are jittered (±LOCK_JITTER), so workers denied together do not all
    come back at the same instant."""
    from machine_memory import memory as memory_module
    from machine_memory.testing import SimpleMachineMemory

    holder = SimpleMachineMemory()
    waiter = holder.peer(lock_retries=3, lock_backoff=0.01)
    assert holder.lock("m")
    slept: list[float] = []
    monkeypatch.setattr("machine_memory.memory.time.sleep", slept.append)
    for _ in range(20):
        assert waiter.lock("m") is False
    jitter = memory_module.LOCK_JITTER
    assert len(slept) == 60
    for n, pause in enumerate(slept):
        exact = 0.01 * 2 ** (n % 3)
        assert exact * (1 - jitter) <= pause <= exact * (1 + jitter)
    assert len(set(slept)) > 3  # not the exact doubling every time

"""Lock decisions follow the storage's clock, never the application server's
(docs/contract.md#clocks).

The application's clock is moved an hour either way (``time.time`` and Django's
``timezone.now``); a memory that judged expiry by it would hand out a live lock (clock ahead)
or never let a dead one go (clock behind).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import TYPE_CHECKING
from unittest import mock

import pytest
from django.utils import timezone

from machine_memory import LockInfo, MachineMemory
from machine_memory.exceptions import LockLost

if TYPE_CHECKING:
    from collections.abc import Iterator

SKEWS = pytest.mark.parametrize("skew", [3600.0, -3600.0], ids=["ahead", "behind"])
SHORT_TTL = 0.5


@contextmanager
def app_clock_moved(seconds: float) -> Iterator[None]:
    real_time = time.time
    real_now = timezone.now

    def moved_time() -> float:
        return real_time() + seconds

    def moved_now() -> datetime:
        return real_now() + timedelta(seconds=seconds)

    with mock.patch("time.time", moved_time), mock.patch("django.utils.timezone.now", moved_now):
        assert abs(timezone.now() - real_now() - timedelta(seconds=seconds)) < timedelta(minutes=1)
        yield


def assert_storage_times(info: LockInfo | None, owner: str, ttl: float, real: datetime) -> None:
    """The lock's times come from the storage's clock: near the real time, ``ttl`` apart."""
    assert info is not None and info.owner == owner
    # Generous bounds: wrong by the skew (an hour) is what they catch.
    assert abs(info.acquired_at - real) < timedelta(minutes=10)
    assert abs((info.expires_at - info.acquired_at).total_seconds() - ttl) < 60


@SKEWS
def test_live_lock_is_still_denied(alias: str, mid: str, skew: float) -> None:
    holder = MachineMemory(using=alias)
    other = MachineMemory(using=alias, lock_retries=0)
    real = timezone.now()
    assert holder.lock(mid, ttl=60)
    before = holder.lock_info(mid)
    with app_clock_moved(skew):
        assert other.lock(mid) is False
        info = other.lock_info(mid)
        assert info == before
        assert_storage_times(info, holder.owner, 60, real)
        # Extending works and is measured from the storage's now as well.
        assert holder.extend(mid, ttl=300)
        extended = other.lock_info(mid)
        assert_storage_times(extended, holder.owner, 300, real)
        assert extended is not None and info is not None and extended.token == info.token
        assert other.lock(mid) is False
        assert holder.unlock(mid)
        assert other.lock_info(mid) is None
        assert other.lock(mid)
        assert other.unlock(mid)


@SKEWS
def test_lock_taken_under_a_moved_clock_is_judged_by_the_storage(
    alias: str, mid: str, skew: float
) -> None:
    holder = MachineMemory(using=alias)
    other = MachineMemory(using=alias, lock_retries=0)
    real = timezone.now()
    with app_clock_moved(skew):
        assert holder.lock(mid, ttl=60)
    # Back on the right clock, the lock is exactly as live as its TTL says.
    assert other.lock(mid) is False
    assert_storage_times(other.lock_info(mid), holder.owner, 60, real)
    assert holder.unlock(mid)


@SKEWS
def test_short_lock_expires_on_time_and_is_taken_over(alias: str, mid: str, skew: float) -> None:
    first = MachineMemory(using=alias)
    second = MachineMemory(using=alias, lock_retries=0)
    with app_clock_moved(skew):
        first.write(mid, {"n": 0}, None)
        state = first.read(mid)
        assert first.lock(mid, ttl=SHORT_TTL)
        acquired = time.monotonic()
        assert second.lock(mid) is False  # not expired early (clock ahead)
        info = second.lock_info(mid)
        assert info is not None and info.owner == first.owner
        time.sleep(max(0.0, acquired + SHORT_TTL + 0.1 - time.monotonic()))
        assert second.lock_info(mid) is None  # not kept alive (clock behind)
        assert second.lock(mid)
        taken = second.lock_info(mid)
        assert taken is not None and taken.owner == second.owner and taken.token > info.token
        # The first holder's write is fenced off; its extend fails.
        with pytest.raises(LockLost):
            first.write(mid, {"n": 1}, state)
        assert first.extend(mid) is False
        assert second.unlock(mid)
    assert first.read(mid) == {"n": 0}


@pytest.mark.parametrize("ttl", [60.0, 0.25, 1.5, 86400.0])
def test_a_lock_lives_exactly_its_ttl(alias: str, mid: str, ttl: float) -> None:
    """The storage computes expiry from the same instant it notes as acquired_at, so the
    two are exactly the TTL apart (to the storage's precision: milliseconds on SQLite), on
    acquiring and on extending."""
    memory = MachineMemory(using=alias)
    assert memory.lock(mid, ttl=ttl)
    try:
        info = memory.lock_info(mid)
        assert info is not None
        assert info.expires_at - info.acquired_at == timedelta(seconds=ttl)
        assert memory.extend(mid, ttl=2 * ttl)
        extended = memory.lock_info(mid)
        assert extended is not None and extended.acquired_at == info.acquired_at
        assert extended.expires_at - info.acquired_at >= timedelta(seconds=2 * ttl)
    finally:
        memory.unlock(mid)

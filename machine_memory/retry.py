"""The pauses between attempts: one iterator for every retry loop, sync and async.

``read`` backs off from READ_BACKOFF within a one-second deadline, ``lock`` from
LOCK_BACKOFF with a little jitter, ``unlock`` a couple of quick times
(docs/contract.md#read, #lock, #unlock).

A loop asks for the next pause only after an attempt failed: nothing is computed for a
call whose first attempt succeeds, which is nearly every call, on a hot path where a
microsecond shows (SQLite's statements take a few).
"""

from __future__ import annotations

import random
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable


class Backoff:
    """The pause before each retry (doubling from ``first``), then None: give up.

    ``jitter``: each pause is scaled by a random factor within ±jitter. ``deadline``:
    seconds from the creation of the iterator after which no retry starts. ``stop``: asked
    before each retry; True gives up at once (a retry inside the caller's transaction
    would be pointless, say). An iterator: ``next()`` after each failed attempt.
    """

    __slots__ = ("_end", "_first", "_jitter", "_retries", "_stop", "_tried")

    def __init__(
        self,
        retries: int,
        first: float,
        *,
        jitter: float = 0.0,
        deadline: float | None = None,
        stop: Callable[[], bool] | None = None,
    ) -> None:
        self._retries = retries
        self._first = first
        self._jitter = jitter
        self._end = None if deadline is None else time.monotonic() + deadline
        self._stop = stop
        # Retries handed out so far; -1 once None (give up) has been.
        self._tried = 0

    def __iter__(self) -> Backoff:
        return self

    def __next__(self) -> float | None:
        attempt = self._tried
        if attempt < 0:
            raise StopIteration
        if attempt < self._retries:
            pause: float = self._first * 2**attempt
            if self._jitter:
                pause *= random.uniform(1 - self._jitter, 1 + self._jitter)
            stop, end = self._stop, self._end
            if not (
                (stop is not None and stop())
                or (end is not None and time.monotonic() + pause >= end)
            ):
                self._tried = attempt + 1
                return pause
        self._tried = -1
        return None

"""The pauses between attempts: one iterator for every retry loop, sync and async.

``read`` backs off from READ_BACKOFF within a one-second deadline, ``lock`` from
LOCK_BACKOFF with a little jitter, ``unlock`` a couple of quick times
(docs/contract.md#read, #lock, #unlock).
"""

from __future__ import annotations

import random
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator


def pauses(
    retries: int,
    first: float,
    *,
    jitter: float = 0.0,
    deadline: float | None = None,
    stop: Callable[[], bool] | None = None,
) -> Iterator[float | None]:
    """The pause before each retry (doubling from ``first``), then None: give up.

    ``jitter``: each pause is scaled by a random factor within ±jitter. ``deadline``:
    seconds from the first call after which no retry starts. ``stop``: asked before each
    retry; True gives up at once (a retry inside the caller's transaction would be
    pointless, say).
    """
    end = None if deadline is None else time.monotonic() + deadline
    for attempt in range(retries):
        pause = first * (2**attempt)
        if jitter:
            pause *= random.uniform(1 - jitter, 1 + jitter)
        if (stop is not None and stop()) or (end is not None and time.monotonic() + pause >= end):
            break
        yield pause
    yield None

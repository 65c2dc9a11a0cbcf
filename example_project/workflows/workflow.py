"""The example workflow: an order machine whose state records every event it consumed.

Plain Python, no Django: worker processes import this module (to unpickle their target
and the events) before they call ``django.setup()``.

Each machine receives its events in order (1..N). Workers may pick them up in any order
(a denied or conflicting event goes back to the end of the queue), and every event is
applied exactly once to whatever state is current, as an Arvo handler would. The state
keeps the event numbers in the order they were applied, a counter, and Arvo's metadata
keys, which the memory copies into its indexed columns for the admin.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import Any

INITIATOR = "demo.command"
SOURCE = "demo.order.handler"


@dataclass(frozen=True, slots=True)
class Event:
    machine_id: str
    parent_id: str
    number: int  # 1..total, the order of delivery
    total: int  # events this machine receives in the run


def deliveries(parent_id: str, machines: int, per_machine: int) -> list[Event]:
    """Every machine's events, in order per machine, randomly interleaved across machines.

    As a broker delivers them: workers mostly handle different machines at once, and
    sometimes two of them get the same machine, which is what the locks and the
    compare-and-set are there for. (One machine's events back to back would not show that
    better: the worker that just released the lock would re-acquire it at once while the
    others sleep in their backoff, and the run would be serial.)
    """
    pending = {
        f"{parent_id}/order-{index:03d}": list(range(per_machine, 0, -1))
        for index in range(1, machines + 1)
    }
    events = []
    while pending:
        machine_id = random.choice(list(pending))
        events.append(Event(machine_id, parent_id, pending[machine_id].pop(), per_machine))
        if not pending[machine_id]:
            del pending[machine_id]
    return events


def next_state(prev: dict[str, Any] | None, event: Event, worker: str) -> dict[str, Any]:
    """The state after ``event``; ``prev`` is left as it is."""
    if prev is None:
        prev = {
            "subject": event.machine_id,
            "parentSubject": event.parent_id,
            "initiator": INITIATOR,
            "source": SOURCE,
            "executionStatus": "active",
            "expectedEvents": event.total,
            "counter": 0,
            "events": [],
        }
    counter = prev["counter"] + 1
    return {
        **prev,
        "counter": counter,
        "events": [*prev["events"], event.number],
        "lastWorker": worker,
        # "done" after the last event, whichever event number that was.
        "executionStatus": "done" if counter >= prev["expectedEvents"] else "active",
    }


@dataclass(frozen=True, slots=True)
class Verdict:
    """What re-reading one machine found, against the events delivered to it."""

    lost: int  # delivered events missing from the state: lost updates
    problems: tuple[str, ...]  # any other inconsistency (applied twice, bad counter, ...)


def verify(machine_id: str, state: dict[str, Any] | None, delivered: int) -> Verdict:
    if state is None:
        return Verdict(delivered, (f"{machine_id}: no state stored",))
    events = state.get("events", [])
    applied = Counter(events)
    lost = sum(1 for number in range(1, delivered + 1) if number not in applied)
    problems = [f"{machine_id}: event {n} applied {c} times" for n, c in applied.items() if c > 1]
    if set(applied) - set(range(1, delivered + 1)):
        problems.append(f"{machine_id}: unknown events in {events}")
    if state.get("counter") != len(events):
        problems.append(f"{machine_id}: counter {state.get('counter')} != {len(events)} events")
    status = "done" if len(events) >= delivered else "active"
    if state.get("executionStatus") != status:
        problems.append(f"{machine_id}: executionStatus {state.get('executionStatus')!r}")
    return Verdict(lost, tuple(problems))

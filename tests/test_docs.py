"""The README's quickstart runs as written: its two Python snippets, executed as they stand
with the three functions a user supplies (``advance``, ``redeliver_later``, ``drop``), on
every database."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from django.test import override_settings

from machine_memory import MachineMemory

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)


def quickstart() -> str:
    (block,) = [b for b in python_blocks() if "def handle(event)" in b]
    return block


def four_calls() -> str:
    (block,) = [b for b in python_blocks() if b.startswith("if memory.lock(event.subject)")]
    return block


@dataclass
class Event:
    subject: str
    amount: int


class User:
    """What the snippets leave to the user: the handler's logic and the event queue."""

    def __init__(self) -> None:
        self.redelivered: list[Event] = []
        self.dropped: list[Event] = []

    def advance(self, state: dict[str, Any] | None, event: Event) -> dict[str, Any]:
        total = 0 if state is None else state["total"]
        return {"total": total + event.amount}

    def namespace(self) -> dict[str, Any]:
        return {
            "advance": self.advance,
            "redeliver_later": self.redelivered.append,
            "drop": self.dropped.append,
        }


@pytest.fixture
def configured(alias: str) -> Any:
    # MachineMemory() as the README writes it: the database comes from the settings.
    with override_settings(MACHINE_MEMORY={"DATABASE": alias, "LOCK_RETRIES": 1}):
        yield alias


def test_the_quickstart_handles_events_and_redelivers_on_denial(configured: str, mid: str) -> None:
    user = User()
    namespace = user.namespace()
    exec(compile(quickstart(), "README.md", "exec"), namespace)
    handle = namespace["handle"]
    handle(Event(mid, 2))
    handle(Event(mid, 3))
    assert MachineMemory().read(mid) == {"total": 5}

    other = MachineMemory()
    assert other.lock(mid)
    try:
        refused = Event(mid, 7)
        handle(refused)
    finally:
        other.unlock(mid)
    assert user.redelivered == [refused]
    assert MachineMemory().read(mid) == {"total": 5}
    namespace["memory"].close()


def test_the_quickstart_drops_an_event_whose_lock_was_taken_over(configured: str, mid: str) -> None:
    user = User()
    namespace = user.namespace()
    exec(compile(quickstart(), "README.md", "exec"), namespace)
    taker = MachineMemory()
    late = Event(mid, 1)

    def advance_slowly(state: dict[str, Any] | None, event: Event) -> dict[str, Any]:
        # The handler outlives its lock: another worker takes the machine over meanwhile.
        taker.force_unlock(mid)
        assert taker.lock(mid)
        taker.write(mid, {"total": 100}, None)
        return user.advance(state, event)

    namespace["advance"] = advance_slowly
    try:
        namespace["handle"](late)
    finally:
        taker.unlock(mid)
    assert user.dropped == [late]
    assert MachineMemory().read(mid) == {"total": 100}
    namespace["memory"].close()


def test_the_four_call_cycle_runs_as_written(configured: str, mid: str) -> None:
    user = User()
    namespace = {**user.namespace(), "memory": MachineMemory(), "event": Event(mid, 4)}
    for _ in range(2):
        exec(compile(four_calls(), "README.md", "exec"), namespace)
    assert MachineMemory().read(mid) == {"total": 8}
    assert MachineMemory().lock_info(mid) is None

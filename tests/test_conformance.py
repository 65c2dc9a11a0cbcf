from __future__ import annotations

from typing import Any

import pytest

from machine_memory import MachineMemory
from machine_memory.locks.memory import InMemoryLockBackend
from machine_memory.testing import MachineMemoryConformance, SimpleMachineMemory, SimpleStore


class TestSimpleMachineMemory(MachineMemoryConformance):
    @pytest.fixture(autouse=True)
    def _store(self) -> None:
        self.store = SimpleStore()

    def make_memory(self, **options: Any) -> SimpleMachineMemory:
        return SimpleMachineMemory(store=self.store, **options)


class TestDatabaseMachineMemory(MachineMemoryConformance):
    @pytest.fixture(autouse=True)
    def _alias(self, alias: str) -> None:
        self.alias = alias

    def make_memory(self, **options: Any) -> MachineMemory:
        return MachineMemory(using=self.alias, **options)


def test_the_in_memory_lock_backend_works_on_its_own() -> None:
    # Without a shared store it keeps its locks in one of its own.
    locks = InMemoryLockBackend()
    assert locks.acquire("m", "owner-1", 30) == 1
    assert locks.acquire("m", "owner-2", 30) is None
    assert locks.release("m", "owner-1")
    assert locks.acquire("m", "owner-2", 30) == 2

from __future__ import annotations

from typing import Any

import pytest

from machine_memory import MachineMemory
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

"""Durable machine memory for event-driven workers (the Arvo ``IMachineMemory`` contract).

Importing this package does not import models: ``MachineMemory`` and friends are loaded on
first attribute access, so ``import machine_memory`` is safe before ``django.setup()``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from machine_memory.locks.base import LockInfo
    from machine_memory.memory import MachineMemory

__all__ = ["LockInfo", "MachineMemory"]


def __getattr__(name: str) -> Any:
    if name == "MachineMemory":
        from machine_memory.memory import MachineMemory

        return MachineMemory
    if name == "LockInfo":
        from machine_memory.locks.base import LockInfo

        return LockInfo
    raise AttributeError(f"module 'machine_memory' has no attribute {name!r}")

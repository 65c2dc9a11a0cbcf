from __future__ import annotations

import pytest

from machine_memory import MachineMemory
from machine_memory.exceptions import LockLost, WriteConflict


def test_cycle(memory: MachineMemory, mid: str) -> None:
    assert memory.read(mid) is None
    assert memory.lock(mid)
    assert not memory.lock(mid)
    memory.write(mid, {"n": 1, "é": "ü"}, None)
    state = memory.read(mid)
    assert state == {"n": 1, "é": "ü"}
    state["n"] = 2
    memory.write(mid, {"n": 2}, state)
    with pytest.raises(WriteConflict):
        memory.write(mid, {"n": 3}, {"n": 1, "é": "ü"})
    memory.write(mid, {"n": 3}, {"n": 2})
    info = memory.lock_info(mid)
    assert info is not None and info.owner == memory.owner
    assert memory.unlock(mid)
    assert memory.lock_info(mid) is None
    other = MachineMemory(using=memory.using)
    assert memory.lock(mid, ttl=0.05)
    import time

    time.sleep(0.1)
    assert other.lock(mid)
    with pytest.raises(LockLost):
        memory.write(mid, {"n": 4}, memory.read(mid))
    assert not memory.unlock(mid)
    assert other.unlock(mid)

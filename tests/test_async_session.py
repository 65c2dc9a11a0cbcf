"""``asession()``: the async session writes once, with its metadata, like ``session()``."""

from __future__ import annotations

import asyncio

import pytest

from machine_memory import MachineMemory
from machine_memory.exceptions import MachineMemoryError
from machine_memory.models import MachineState


def test_an_async_session_sets_the_metadata_columns(alias: str, mid: str) -> None:
    memory = MachineMemory(using=alias)

    async def scenario() -> None:
        async with memory.asession(mid) as s:
            await s.write({"executionStatus": "done"}, metadata={"source": "a", "initiator": "me"})

    try:
        asyncio.run(scenario())
    finally:
        memory.close()
    row = MachineState.objects.using(alias).get(pk=mid)
    assert (row.execution_status, row.source, row.initiator, row.version) == ("done", "a", "me", 1)


def test_an_async_session_writes_once(alias: str, mid: str) -> None:
    memory = MachineMemory(using=alias)

    async def scenario() -> None:
        async with memory.asession(mid) as s:
            await s.write({"n": 1})
            # Its lock is released by the write: a second one would not be fenced.
            with pytest.raises(MachineMemoryError, match="has written already"):
                await s.write({"n": 2})

    try:
        asyncio.run(scenario())
    finally:
        memory.close()
    assert memory.read(mid) == {"n": 1}


def test_awrite_sets_the_metadata_columns(alias: str, mid: str) -> None:
    """awrite() passes the caller's metadata on, as write() does."""
    memory = MachineMemory(using=alias)

    async def scenario() -> None:
        await memory.awrite(mid, {"n": 1}, None, metadata={"source": "a", "initiator": "me"})
        row = await MachineState.objects.using(alias).aget(pk=mid)
        assert (row.source, row.initiator, row.version) == ("a", "me", 1)
        state = await memory.aread(mid)
        await memory.awrite(mid, {"n": 2}, state, metadata={"source": "b"})
        row = await MachineState.objects.using(alias).aget(pk=mid)
        assert (row.source, row.initiator, row.version) == ("b", None, 2)

    try:
        asyncio.run(scenario())
    finally:
        memory.close()

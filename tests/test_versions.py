"""Which version each object handed out by ``read()`` stands for (machine_memory.versions),
and what ``version_of()`` answers for the objects a write replaced."""

from __future__ import annotations

from typing import TYPE_CHECKING

from machine_memory.versions import VersionMemo

if TYPE_CHECKING:
    from machine_memory import MachineMemory
    from machine_memory.validation import Metadata

# (execution_status, parent_id, initiator, source)
META: Metadata = ("ok", None, None, None)
OTHER: Metadata = ("failed", None, None, "s")


def test_an_object_is_known_by_identity_not_by_content() -> None:
    memo = VersionMemo()
    obj = {"n": 1}
    memo.remember("a", obj, 3, META)
    assert memo.lookup("a", obj) == (3, META)
    assert memo.lookup("a", {"n": 1}) is None
    assert memo.lookup("b", obj) is None


def test_remembering_again_replaces_the_version() -> None:
    memo = VersionMemo()
    obj = {"n": 1}
    memo.remember("a", obj, 1, META)
    memo.remember("a", obj, 2, OTHER)
    assert memo.lookup("a", obj) == (2, OTHER)


def test_the_oldest_are_forgotten_beyond_the_limit() -> None:
    memo = VersionMemo(limit=2)
    objs = [{"n": n} for n in range(3)]
    memo.remember("a", objs[0], 1, META)
    memo.remember("a", objs[1], 2, META)
    # Exactly the limit: both kept.
    assert memo.lookup("a", objs[0]) == (1, META)
    assert memo.lookup("a", objs[1]) == (2, META)
    memo.remember("a", objs[2], 3, META)
    assert memo.lookup("a", objs[0]) is None
    assert memo.lookup("a", objs[1]) == (2, META)
    assert memo.lookup("a", objs[2]) == (3, META)


def test_forget_drops_that_object_only() -> None:
    memo = VersionMemo()
    kept, dropped = {"n": 1}, {"n": 2}
    memo.remember("a", kept, 1, META)
    memo.remember("a", dropped, 2, META)
    memo.remember("b", dropped, 5, META)
    memo.forget("a", dropped)
    assert memo.lookup("a", dropped) is None
    assert memo.lookup("a", kept) == (1, META)
    assert memo.lookup("b", dropped) == (5, META)
    # Another object, or one never remembered: nothing happens.
    memo.forget("a", {"n": 1})
    memo.forget("c", kept)
    assert memo.lookup("a", kept) == (1, META)


def test_version_of_follows_each_write_and_forgets_the_object_it_replaced(
    memory: MachineMemory, mid: str
) -> None:
    memory.write(mid, {"n": 0}, None)
    first = memory.read(mid)
    assert first is not None
    assert memory.version_of(mid, first) == 1
    second = {"n": 1}
    memory.write(mid, second, first)
    assert memory.version_of(mid, second) == 2
    # The object written from stands for no stored version any more.
    assert memory.version_of(mid, first) is None
    memory.delete(mid, second)
    assert memory.version_of(mid, second) is None

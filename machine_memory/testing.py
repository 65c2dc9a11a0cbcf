"""Test helpers for users of machine_memory (and for the app's own backends).

``SimpleMachineMemory`` is ``MachineMemory`` over an in-memory store and in-memory locks:
the same contract code. Instances made with the same ``SimpleStore`` (or ``peer()``)
behave like workers sharing one database.

``MachineMemoryConformance`` is the contract as tests. Subclass it in a pytest module and
implement ``make_memory()``; every ``test_*`` method then runs against your memory::

    class TestMyMemory(MachineMemoryConformance):
        def make_memory(self, **options):
            return MachineMemory(using="default", **options)
"""

from __future__ import annotations

import asyncio
import datetime
import time
import uuid
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from machine_memory.exceptions import (
    InvalidMachineId,
    InvalidState,
    LockLost,
    LockNotAcquired,
    MachineMemoryError,
    WriteConflict,
)
from machine_memory.locks.memory import InMemoryLockBackend
from machine_memory.memory import MachineMemory
from machine_memory.stores.memory import InMemoryStateStore, SimpleStore
from machine_memory.validation import MAX_ID_LENGTH, MAX_OWNER_LENGTH, MAX_STATE_DEPTH

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

__all__ = ["MachineMemoryConformance", "SimpleMachineMemory", "SimpleStore"]


class SimpleMachineMemory(MachineMemory):
    """``MachineMemory`` over an in-memory store and in-memory locks; thread-safe."""

    def __init__(self, store: SimpleStore | None = None, **options: Any) -> None:
        shared = SimpleStore() if store is None else store
        super().__init__(
            store=InMemoryStateStore(shared),
            lock_backend=InMemoryLockBackend(shared=shared),
            **options,
        )
        self.shared = shared

    def peer(self, **options: Any) -> SimpleMachineMemory:
        """Another worker (another owner) on the same store."""
        return SimpleMachineMemory(store=self.shared, **options)


@contextmanager
def _raises(*kinds: type[BaseException]) -> Iterator[list[BaseException]]:
    caught: list[BaseException] = []
    try:
        yield caught
    except kinds as exc:
        caught.append(exc)
    else:
        raise AssertionError(f"expected {', '.join(k.__name__ for k in kinds)}")


class MachineMemoryConformance:
    """The contract (docs/contract.md) as tests; subclass and implement ``make_memory``.

    ``make_memory`` must return a new instance (a new owner) on every call, all sharing
    one storage, so that two calls behave like two workers.
    """

    # A TTL short enough to wait out in a test, long enough for a round trip.
    short_ttl = 0.3

    def make_memory(self, **options: Any) -> MachineMemory:
        raise NotImplementedError

    def new_id(self) -> str:
        return f"conformance/{uuid.uuid4().hex}+=="

    # -- Arvo's own cases --------------------------------------------------------------

    def test_read_unknown_id_is_none(self) -> None:
        assert self.make_memory().read(self.new_id()) is None

    def test_empty_id_raises_on_every_method(self) -> None:
        memory = self.make_memory()
        calls: list[Callable[[], object]] = [
            lambda: memory.read(""),
            lambda: memory.write("", {"a": 1}, None),
            lambda: memory.lock(""),
            lambda: memory.unlock(""),
            lambda: memory.extend(""),
            lambda: memory.lock_info(""),
            lambda: memory.cleanup("", {"a": 1}, None),
        ]
        for call in calls:
            with _raises(InvalidMachineId):
                call()

    def test_none_data_raises(self) -> None:
        memory, machine_id = self.make_memory(), self.new_id()
        with _raises(InvalidState):
            memory.write(machine_id, None, None)  # type: ignore[arg-type]
        assert memory.read(machine_id) is None

    def test_write_copies_its_input(self) -> None:
        memory, machine_id = self.make_memory(), self.new_id()
        data: dict[str, Any] = {"items": [1, 2], "nested": {"k": "v"}}
        memory.write(machine_id, data, None)
        data["items"].append(3)
        data["nested"]["k"] = "changed"
        assert memory.read(machine_id) == {"items": [1, 2], "nested": {"k": "v"}}

    def test_read_returns_a_fresh_object_each_call(self) -> None:
        memory, machine_id = self.make_memory(), self.new_id()
        memory.write(machine_id, {"a": {"b": 1}}, None)
        first = memory.read(machine_id)
        assert first is not None
        first["a"]["b"] = 2
        assert memory.read(machine_id) == {"a": {"b": 1}}

    def test_lock_twice_is_denied(self) -> None:
        memory, machine_id = self.make_memory(lock_retries=0), self.new_id()
        assert memory.lock(machine_id) is True
        assert memory.lock(machine_id) is False
        assert memory.unlock(machine_id) is True

    def test_unlock_when_unlocked_is_true(self) -> None:
        assert self.make_memory().unlock(self.new_id()) is True

    def test_lock_after_unlock(self) -> None:
        memory, machine_id = self.make_memory(), self.new_id()
        assert memory.lock(machine_id)
        assert memory.unlock(machine_id)
        assert memory.lock(machine_id)
        assert memory.unlock(machine_id)

    def test_full_cycle(self) -> None:
        memory, machine_id = self.make_memory(lock_retries=0), self.new_id()
        memory.write(machine_id, {"step": 1}, None)
        state = memory.read(machine_id)
        assert state == {"step": 1}
        assert memory.lock(machine_id) is True
        assert memory.lock(machine_id) is False
        assert memory.unlock(machine_id) is True
        assert memory.lock(machine_id) is True
        memory.write(machine_id, {"step": 2}, state)
        assert memory.read(machine_id) == {"step": 2}
        assert memory.unlock(machine_id) is True

    # -- compare-and-set ---------------------------------------------------------------

    def test_create_over_existing_state_conflicts(self) -> None:
        memory, machine_id = self.make_memory(), self.new_id()
        memory.write(machine_id, {"v": 1}, None)
        with _raises(WriteConflict) as caught:
            memory.write(machine_id, {"v": 2}, None)
        error = caught[0]
        assert isinstance(error, WriteConflict)
        assert (error.id, error.expected_version, error.actual_version) == (machine_id, None, 1)
        assert memory.read(machine_id) == {"v": 1}

    def test_stale_prev_data_conflicts(self) -> None:
        first, second, machine_id = self.make_memory(), self.make_memory(), self.new_id()
        first.write(machine_id, {"v": 0}, None)
        old = first.read(machine_id)
        seen_by_second = second.read(machine_id)
        second.write(machine_id, {"v": 1}, seen_by_second)
        with _raises(WriteConflict) as caught:
            first.write(machine_id, {"v": 2}, old)
        error = caught[0]
        assert isinstance(error, WriteConflict) and not isinstance(error, LockLost)
        assert (error.expected_version, error.actual_version) == (1, 2)
        assert first.read(machine_id) == {"v": 1}

    def test_mutated_prev_data_is_accepted(self) -> None:
        memory, machine_id = self.make_memory(), self.new_id()
        memory.write(machine_id, {"count": 1, "log": []}, None)
        state = memory.read(machine_id)
        assert state is not None
        state["count"] += 1  # Arvo's resumable handlers mutate what they read
        state["log"].append("x")
        memory.write(machine_id, {"count": state["count"], "log": state["log"]}, state)
        assert memory.read(machine_id) == {"count": 2, "log": ["x"]}

    def test_equal_plain_dict_is_accepted(self) -> None:
        writer, other, machine_id = self.make_memory(), self.make_memory(), self.new_id()
        writer.write(machine_id, {"a": [1, 2.5, True, None], "b": {"c": "d"}}, None)
        # As if it came from another process through JSON: equal, but not the same object.
        other.write(machine_id, {"a": 2}, {"b": {"c": "d"}, "a": [1, 2.5, True, None]})
        assert writer.read(machine_id) == {"a": 2}

    def test_unequal_plain_dict_conflicts(self) -> None:
        memory, machine_id = self.make_memory(), self.new_id()
        memory.write(machine_id, {"a": 1}, None)
        with _raises(WriteConflict):
            memory.write(machine_id, {"a": 3}, {"a": 2})
        with _raises(WriteConflict):
            memory.write(machine_id, {"a": 3}, {"a": True})  # JSON true is not 1
        assert memory.read(machine_id) == {"a": 1}

    def test_prev_data_for_a_missing_state_conflicts(self) -> None:
        memory, machine_id = self.make_memory(), self.new_id()
        with _raises(WriteConflict) as caught:
            memory.write(machine_id, {"a": 2}, {"a": 1})
        error = caught[0]
        assert isinstance(error, WriteConflict) and error.actual_version is None
        assert memory.read(machine_id) is None

    def test_chained_writes_follow_the_written_object(self) -> None:
        memory, machine_id = self.make_memory(), self.new_id()
        first: dict[str, Any] = {"n": 1}
        memory.write(machine_id, first, None)
        second = {"n": 2}
        memory.write(machine_id, second, first)
        with _raises(WriteConflict):
            memory.write(machine_id, {"n": 3}, first)  # first is no longer current
        assert memory.read(machine_id) == {"n": 2}

    # -- locks ---------------------------------------------------------------------------

    def test_denied_lock_retries_then_returns_false(self) -> None:
        holder, waiter, machine_id = self.make_memory(), self.make_memory(), self.new_id()
        assert holder.lock(machine_id)
        attempts = 0
        acquire = waiter.locks.acquire

        def counting(*args: Any) -> int | None:
            nonlocal attempts
            attempts += 1
            return acquire(*args)

        waiter.locks.acquire = counting  # type: ignore[method-assign,assignment]
        started = time.monotonic()
        assert waiter.lock(machine_id) is False
        elapsed = time.monotonic() - started
        assert attempts == waiter.lock_retries + 1
        window = sum(waiter.lock_backoff * 2**n for n in range(waiter.lock_retries))
        assert window * 0.9 <= elapsed < 1.0
        assert holder.unlock(machine_id)

    def test_non_owner_unlock_is_false_and_the_lock_stays(self) -> None:
        holder, other, machine_id = self.make_memory(), self.make_memory(), self.new_id()
        assert holder.lock(machine_id)
        assert other.unlock(machine_id) is False
        info = other.lock_info(machine_id)
        assert info is not None and info.owner == holder.owner
        assert holder.unlock(machine_id) is True
        assert other.lock_info(machine_id) is None

    def test_expired_lock_is_taken_over(self) -> None:
        first, machine_id = self.make_memory(), self.new_id()
        # No retries: a denial comes back at once, well inside the first lock's TTL.
        second = self.make_memory(lock_retries=0)
        assert first.lock(machine_id, ttl=self.short_ttl)
        assert second.lock(machine_id, ttl=self.short_ttl) is False
        time.sleep(self.short_ttl + 0.1)
        assert second.lock(machine_id)
        info = second.lock_info(machine_id)
        assert info is not None and info.owner == second.owner
        assert first.unlock(machine_id) is False  # not first's any more
        assert second.unlock(machine_id)

    def test_extend_keeps_the_lock_alive(self) -> None:
        holder, other, machine_id = self.make_memory(), self.make_memory(), self.new_id()
        assert holder.lock(machine_id, ttl=self.short_ttl)
        before = holder.lock_info(machine_id)
        assert holder.extend(machine_id, ttl=self.short_ttl * 4)
        after = holder.lock_info(machine_id)
        assert before is not None and after is not None
        assert after.expires_at > before.expires_at and after.token == before.token
        time.sleep(self.short_ttl + 0.1)
        assert other.lock(machine_id) is False
        assert holder.unlock(machine_id)

    def test_extend_of_a_lost_or_foreign_lock_is_false(self) -> None:
        first, second, machine_id = self.make_memory(), self.make_memory(), self.new_id()
        assert second.extend(machine_id) is False  # never held
        assert first.lock(machine_id, ttl=self.short_ttl)
        assert second.extend(machine_id) is False  # held by another
        time.sleep(self.short_ttl + 0.1)
        assert first.extend(machine_id) is False  # expired
        assert second.lock(machine_id)
        assert first.extend(machine_id) is False
        assert second.unlock(machine_id)

    def test_fencing_rejects_a_write_after_takeover(self) -> None:
        first, second, machine_id = self.make_memory(), self.make_memory(), self.new_id()
        first.write(machine_id, {"owner": "nobody"}, None)
        assert first.lock(machine_id, ttl=self.short_ttl)
        state = first.read(machine_id)
        time.sleep(self.short_ttl + 0.1)
        assert second.lock(machine_id)
        assert second.unlock(machine_id)  # taken over and released again: still lost
        with _raises(LockLost) as caught:
            first.write(machine_id, {"owner": "first"}, state)
        assert isinstance(caught[0], WriteConflict)
        assert first.extend(machine_id) is False
        with _raises(LockLost):  # still fenced: a fresh read does not make the write safe
            first.write(machine_id, {"owner": "first"}, first.read(machine_id))
        assert second.read(machine_id) == {"owner": "nobody"}
        assert first.unlock(machine_id)  # gives the lock up; writes are only versioned again
        first.write(machine_id, {"owner": "first"}, first.read(machine_id))

    def _taken_over_and_written(
        self,
    ) -> tuple[MachineMemory, MachineMemory, str, dict[str, Any] | None]:
        """``first`` read ``{"n": 0}`` under a lock that expired; ``second`` took the lock
        over and wrote ``{"n": 1}``, and still holds it. With what ``first`` read."""
        first, second, machine_id = self.make_memory(), self.make_memory(), self.new_id()
        first.write(machine_id, {"n": 0}, None)
        assert first.lock(machine_id, ttl=self.short_ttl)
        state = first.read(machine_id)
        time.sleep(self.short_ttl + 0.1)
        assert second.lock(machine_id)
        second.write(machine_id, {"n": 1}, second.read(machine_id))
        return first, second, machine_id, state

    def test_a_write_after_a_takeover_and_a_newer_write_is_lock_lost(self) -> None:
        # Not a plain WriteConflict: the version moved on because the lock was lost, and
        # the holder must drop the event, not read again and retry.
        first, second, machine_id, state = self._taken_over_and_written()
        assert second.unlock(machine_id)
        with _raises(LockLost):
            first.write(machine_id, {"n": 2}, state)
        assert second.read(machine_id) == {"n": 1}
        assert first.unlock(machine_id)

    def test_a_delete_after_a_takeover_is_lock_lost(self) -> None:
        first, second, machine_id, state = self._taken_over_and_written()
        with _raises(LockLost):
            first.delete(machine_id, state)
        with _raises(LockLost):
            first.overwrite(machine_id, {"n": 2})
        assert second.read(machine_id) == {"n": 1}
        assert second.unlock(machine_id)
        assert first.unlock(machine_id) is True  # not held any more: nothing to release

    def test_a_lock_is_extended_only_with_its_own_token(self) -> None:
        first, machine_id = self.make_memory(), self.new_id()
        assert first.lock(machine_id)
        token = first.held_token(machine_id)
        assert token is not None
        twin = self.make_memory(owner=first.owner)  # the owner, but not that lock's token
        twin.adopt(machine_id, token + 1)
        assert twin.extend(machine_id) is False
        twin.adopt(machine_id, token)
        assert twin.extend(machine_id) is True
        assert first.unlock(machine_id)

    def test_expired_lock_without_takeover_still_writes(self) -> None:
        memory, machine_id = self.make_memory(), self.new_id()
        assert memory.lock(machine_id, ttl=self.short_ttl)
        time.sleep(self.short_ttl + 0.1)
        memory.write(machine_id, {"late": True}, None)
        assert memory.read(machine_id) == {"late": True}
        assert memory.unlock(machine_id)

    def test_write_without_a_lock_is_only_version_checked(self) -> None:
        holder, other, machine_id = self.make_memory(), self.make_memory(), self.new_id()
        assert holder.lock(machine_id)
        other.write(machine_id, {"a": 1}, None)
        assert holder.read(machine_id) == {"a": 1}
        assert holder.unlock(machine_id)

    def test_adopted_lock_behaves_like_the_original(self) -> None:
        first, machine_id = self.make_memory(), self.new_id()
        assert first.lock(machine_id, ttl=self.short_ttl)
        token = first.held_token(machine_id)
        assert token is not None
        # Same owner, another "request": adopts the lock and its fencing token.
        second = self.make_memory(owner=first.owner)
        second.adopt(machine_id, token)
        assert second.extend(machine_id, ttl=self.short_ttl)
        second.write(machine_id, {"by": "second"}, None)
        time.sleep(self.short_ttl + 0.1)
        thief = self.make_memory()
        assert thief.lock(machine_id)
        with _raises(LockLost):
            second.write(machine_id, {"by": "second again"}, second.read(machine_id))
        assert second.unlock(machine_id) is False  # the thief holds it now
        assert thief.unlock(machine_id)
        with _raises(ValueError):
            second.adopt(machine_id, 0)

    def test_force_unlock_releases_whoever_holds_the_lock(self) -> None:
        holder, operator, machine_id = self.make_memory(), self.make_memory(), self.new_id()
        assert operator.force_unlock(machine_id) is None  # nothing to release
        holder.write(machine_id, {"by": "nobody"}, None)
        assert holder.lock(machine_id, ttl=60)
        state = holder.read(machine_id)
        held = holder.lock_info(machine_id)
        released = operator.force_unlock(machine_id)
        assert released is not None and held is not None
        assert (released.owner, released.token) == (holder.owner, held.token)
        assert released.acquired_at == held.acquired_at
        assert released.expires_at < held.expires_at  # the moment of release, not the TTL
        assert operator.lock_info(machine_id) is None
        assert operator.force_unlock(machine_id) is None  # already released
        assert holder.extend(machine_id) is False  # the holder has lost it
        taker = self.make_memory()
        assert taker.lock(machine_id)
        with _raises(LockLost):  # and is fenced out once another owner holds it
            holder.write(machine_id, {"by": "holder"}, state)
        assert holder.unlock(machine_id) is False
        assert taker.unlock(machine_id)
        with _raises(InvalidMachineId):
            operator.force_unlock("")

    def test_fencing_tokens_increase_across_unlocks(self) -> None:
        first, second, machine_id = self.make_memory(), self.make_memory(), self.new_id()
        tokens = []
        for memory in (first, second, first, second):
            assert memory.lock(machine_id)
            info = memory.lock_info(machine_id)
            assert info is not None and info.owner == memory.owner
            tokens.append(info.token)
            assert memory.unlock(machine_id)
        assert tokens == sorted(set(tokens))

    def test_lock_info(self) -> None:
        memory, machine_id = self.make_memory(), self.new_id()
        assert memory.lock_info(machine_id) is None
        assert memory.lock(machine_id, ttl=60)
        info = memory.lock_info(machine_id)
        assert info is not None
        assert info.owner == memory.owner
        assert 59 <= (info.expires_at - info.acquired_at).total_seconds() <= 61
        # Aware datetimes in UTC, comparable with the caller's timezone.now().
        for moment in (info.acquired_at, info.expires_at):
            assert moment.utcoffset() == datetime.timedelta(0)
        assert memory.unlock(machine_id)
        assert memory.lock_info(machine_id) is None

    def test_locked_context_manager(self) -> None:
        memory, other, machine_id = self.make_memory(), self.make_memory(), self.new_id()
        with memory.locked(machine_id):
            assert memory.holds(machine_id)
            with _raises(LockNotAcquired), other.locked(machine_id):
                raise AssertionError("must not run")
        assert not memory.holds(machine_id)
        assert other.lock(machine_id)
        assert other.unlock(machine_id)

    # -- the cycle in one call: session() ------------------------------------------------

    def test_session_cycle(self) -> None:
        memory, other, machine_id = self.make_memory(), self.make_memory(), self.new_id()
        with memory.session(machine_id) as s:
            assert (s.machine_id, s.state, s.version) == (machine_id, None, None)
            assert memory.holds(machine_id) and s.token == memory.held_token(machine_id)
            assert other.lock_and_read(machine_id) is None  # held: denied
            s.write({"step": 1})
            # write() released the lock at once, before the block ends.
            assert not memory.holds(machine_id)
            locked = other.lock_and_read(machine_id)
            assert locked is not None and locked.state == {"step": 1} and locked.version == 1
            assert locked.token > s.token
            # What lock_and_read() returned is what read() would have: its version is known,
            # and a write from it is a compare-and-set against that version.
            assert other.version_of(machine_id, locked.state) == 1
            other.write(machine_id, {"step": 1}, locked.state)
            assert other.unlock(machine_id)
        with memory.session(machine_id) as s:
            assert s.state == {"step": 1} and s.version == 2
            s.state["step"] = 2  # Arvo's handlers mutate what they read: that is fine
            s.write(s.state)
        assert memory.read(machine_id) == {"step": 2}
        assert other.lock(machine_id)
        assert other.unlock(machine_id)

    def test_session_without_write_releases(self) -> None:
        memory, other, machine_id = self.make_memory(), self.make_memory(), self.new_id()
        memory.write(machine_id, {"kept": True}, None)
        with memory.session(machine_id) as s:
            assert s.state == {"kept": True}
        assert not memory.holds(machine_id)
        with _raises(ValueError), memory.session(machine_id):
            raise ValueError("the handler failed")
        assert not memory.holds(machine_id)
        assert other.lock(machine_id)
        assert other.unlock(machine_id)
        assert memory.read(machine_id) == {"kept": True}

    def test_session_denied_after_lock_retries(self) -> None:
        holder, waiter, machine_id = self.make_memory(), self.make_memory(), self.new_id()
        assert holder.lock(machine_id)
        started = time.monotonic()
        with _raises(LockNotAcquired) as caught, waiter.session(machine_id):
            raise AssertionError("must not run")
        elapsed = time.monotonic() - started
        assert repr(machine_id) in str(caught[0])
        window = sum(waiter.lock_backoff * 2**n for n in range(waiter.lock_retries))
        assert window * 0.9 <= elapsed < 1.0
        assert not waiter.holds(machine_id)
        assert holder.unlock(machine_id)

    def test_session_write_is_fenced(self) -> None:
        memory, other, machine_id = self.make_memory(), self.make_memory(), self.new_id()
        memory.write(machine_id, {"by": "nobody"}, None)
        with memory.session(machine_id, ttl=self.short_ttl) as s:
            time.sleep(self.short_ttl + 0.1)
            assert other.lock(machine_id)
            with _raises(LockLost):
                s.write({"by": "late holder"})
            assert not s.written
            assert other.read(machine_id) == {"by": "nobody"}
        # Leaving did not release the other owner's lock.
        info = other.lock_info(machine_id)
        assert info is not None and info.owner == other.owner
        assert other.unlock(machine_id)

    def test_session_write_is_version_checked_and_keeps_the_lock(self) -> None:
        memory, other, machine_id = self.make_memory(), self.make_memory(), self.new_id()
        memory.write(machine_id, {"n": 1}, None)
        with memory.session(machine_id) as s:
            # A writer that ignores the lock (none taken) moves the state on.
            other.write(machine_id, {"n": 100}, other.read(machine_id))
            with _raises(WriteConflict) as caught:
                s.write({"n": 2})
            assert not isinstance(caught[0], LockLost)
            assert memory.holds(machine_id)  # still held until the block ends
            assert other.lock(machine_id) is False or other.unlock(machine_id)
        assert memory.read(machine_id) == {"n": 100}
        assert not memory.holds(machine_id)

    def test_session_creates_only_when_nothing_is_stored(self) -> None:
        memory, other, machine_id = self.make_memory(), self.make_memory(), self.new_id()
        with memory.session(machine_id) as s:
            other.write(machine_id, {"first": "other"}, None)
            with _raises(WriteConflict):
                s.write({"first": "session"})
        assert memory.read(machine_id) == {"first": "other"}

    def test_session_writes_once(self) -> None:
        memory, machine_id = self.make_memory(), self.new_id()
        with memory.session(machine_id) as s:
            s.write({"n": 1})
            with _raises(MachineMemoryError):
                s.write({"n": 2})
        assert memory.read(machine_id) == {"n": 1}

    def test_session_bad_input_writes_nothing(self) -> None:
        memory, other, machine_id = self.make_memory(), self.make_memory(), self.new_id()
        with _raises(InvalidMachineId), memory.session(""):
            raise AssertionError("must not run")
        with memory.session(machine_id) as s:
            with _raises(InvalidState):
                s.write({"bad": float("nan")})
            with _raises(InvalidState):
                s.write(None)
            assert memory.holds(machine_id)
        assert memory.read(machine_id) is None
        assert other.lock(machine_id)
        assert other.unlock(machine_id)

    def test_session_metadata(self) -> None:
        memory, machine_id = self.make_memory(), self.new_id()
        # New metadata, the same again (left as stored), then changed.
        for version, (status, source) in enumerate(
            [("running", "a"), ("running", "a"), ("done", "b")], start=1
        ):
            with memory.session(machine_id) as s:
                s.write({"executionStatus": status, "n": version}, metadata={"source": source})
            with memory.session(machine_id) as s:
                assert s.state == {"executionStatus": status, "n": version}
                assert s.version == version

    def test_async_session(self) -> None:
        memory, other, machine_id = self.make_memory(), self.make_memory(), self.new_id()

        async def scenario() -> None:
            async with memory.asession(machine_id) as s:
                assert s.state is None
                assert await other.alock_and_read(machine_id) is None
                await s.write({"a": 1})
            async with other.asession(machine_id) as s:
                assert s.state == {"a": 1} and s.version == 1
            assert await memory.alock(machine_id)
            try:
                with _raises(LockNotAcquired):
                    async with other.asession(machine_id):
                        raise AssertionError("must not run")
            finally:
                assert await memory.aunlock(machine_id)

        asyncio.run(scenario())

    # -- cleanup -------------------------------------------------------------------------

    def test_cleanup_keep_releases_only(self) -> None:
        memory, machine_id = self.make_memory(cleanup="keep"), self.new_id()
        assert memory.lock(machine_id)
        final = {"executionStatus": "done"}
        memory.write(machine_id, final, None)
        memory.cleanup(machine_id, final, None)
        assert memory.read(machine_id) == final
        assert memory.lock_info(machine_id) is None

    def test_cleanup_delete_removes_state_and_releases(self) -> None:
        memory, machine_id = self.make_memory(cleanup="delete"), self.new_id()
        assert memory.lock(machine_id)
        memory.write(machine_id, {"s": 1}, None)
        state = memory.read(machine_id)
        final = {"s": 2, "executionStatus": "done"}
        memory.write(machine_id, final, state)
        memory.cleanup(machine_id, final, state)
        assert memory.read(machine_id) is None
        assert memory.lock_info(machine_id) is None

    def test_cleanup_delete_keeps_a_state_written_since(self) -> None:
        memory, other, machine_id = (
            self.make_memory(cleanup="delete"),
            self.make_memory(),
            self.new_id(),
        )
        final: dict[str, Any] = {"s": 1}
        memory.write(machine_id, final, None)
        other.write(machine_id, {"s": 2}, other.read(machine_id))
        assert memory.lock(machine_id)
        with _raises(WriteConflict):
            memory.cleanup(machine_id, final, None)
        assert memory.read(machine_id) == {"s": 2}
        assert memory.lock_info(machine_id) is None  # released all the same

    def test_async_cleanup(self) -> None:
        memory, other, machine_id = (
            self.make_memory(cleanup="delete"),
            self.make_memory(),
            self.new_id(),
        )

        async def scenario() -> None:
            final: dict[str, Any] = {"s": 1}
            await memory.awrite(machine_id, final, None)
            assert await memory.alock(machine_id)
            # Its metadata is checked like write()'s: nothing deleted, the lock kept.
            with _raises(InvalidState):
                await memory.acleanup(machine_id, final, None, {"unknown": "key"})
            assert memory.holds(machine_id)
            await other.awrite(machine_id, {"s": 2}, await other.aread(machine_id))
            with _raises(WriteConflict):
                await memory.acleanup(machine_id, final, None)  # written since: kept
            assert await memory.aread(machine_id) == {"s": 2}
            assert not memory.holds(machine_id)
            assert await memory.alock(machine_id)
            state = await memory.aread(machine_id)
            assert state is not None
            await memory.acleanup(machine_id, state, None)
            assert await memory.aread(machine_id) is None
            assert await memory.alock_info(machine_id) is None

        asyncio.run(scenario())

    # -- bad input -----------------------------------------------------------------------

    def test_bad_ids_raise_before_storage(self) -> None:
        memory = self.make_memory()
        for bad in [None, 42, b"bytes", "x" * (MAX_ID_LENGTH + 1), "nul\x00inside"]:
            for call in (memory.read, memory.lock, memory.unlock):
                with _raises(InvalidMachineId) as caught:
                    call(bad)  # type: ignore[arg-type]
                assert isinstance(caught[0], ValueError)
            with _raises(InvalidMachineId):
                memory.write(bad, {"a": 1}, None)  # type: ignore[arg-type]

    def test_bad_states_raise_and_write_nothing(self) -> None:
        memory, machine_id = self.make_memory(max_state_bytes=1000), self.new_id()
        bad_states: list[Any] = [
            [1, 2],
            "text",
            {1: "int key"},
            {"deep": [{"ok": {2: "int key below"}}]},
            {"a set": {1, 2}},
            {"nan": float("nan")},
            {"inf": [float("inf")]},
            {"nul": "a\x00b"},
            {"big": "x" * 1000},
        ]
        for bad in bad_states:
            with _raises(InvalidState) as caught:
                memory.write(machine_id, bad, None)
            assert isinstance(caught[0], ValueError)
        assert memory.read(machine_id) is None
        memory.write(machine_id, {"big": "x" * 900}, None)  # within the limit
        assert memory.read(machine_id) == {"big": "x" * 900}

    def test_bad_arguments_raise_before_storage_is_touched(self) -> None:
        """Owners, TTLs, metadata values, ids and nesting: the same refusal on every backend."""
        memory, machine_id = self.make_memory(), self.new_id()
        for owner in ["", "o" * (MAX_OWNER_LENGTH + 1), "nul\x00owner", "half \ud800", 7]:
            with _raises(ValueError):
                self.make_memory(owner=owner)
        ttls: list[Any] = [0, -1, 0.0001, float("nan"), float("inf"), 10**400, "5", True]
        ttls += [datetime.timedelta(days=31), datetime.timedelta(0)]
        for ttl in ttls:
            with _raises(ValueError):
                memory.lock(machine_id, ttl=ttl)
            with _raises(ValueError):
                self.make_memory(lock_ttl=ttl)
        assert not memory.holds(machine_id) and memory.lock_info(machine_id) is None
        assert memory.lock(machine_id)
        for ttl in ttls:
            with _raises(ValueError):
                memory.extend(machine_id, ttl=ttl)
        bad_metadata: list[Any] = [
            {"source": "nul\x00source"},
            {"initiator": "half \udc00"},
            {"parent_subject": 42},
            {"source": "s" * 256},
            {"colour": "red"},
            {"subject": "another id"},
            ["not", "a", "mapping"],
        ]
        for metadata in bad_metadata:
            with _raises(InvalidState):
                memory.write(machine_id, {"a": 1}, None, metadata=metadata)
        nested: dict[str, Any] = {"leaf": 1}
        for _ in range(MAX_STATE_DEPTH):
            nested = {"d": nested}
        with _raises(InvalidState):
            memory.write(machine_id, nested, None)
        for bad_id in ["half \ud800", "nul\x00"]:
            with _raises(InvalidMachineId):
                memory.write(bad_id, {"a": 1}, None)
        assert memory.read(machine_id) is None
        assert memory.unlock(machine_id)

    def test_bad_versions_and_prev_data_raise_before_storage_is_touched(self) -> None:
        """``version=`` is a stored version (1 to 2**63 - 1) and ``prev_data`` a dict or None;
        anything else raises and changes nothing. The largest version is accepted as an
        argument, and conflicts like any other that is not stored."""
        memory, machine_id = self.make_memory(), self.new_id()
        memory.write(machine_id, {"n": 1}, None)
        versions: list[Any] = [0, -1, 2**63, True, False, 1.0, "1"]
        for version in versions:
            with _raises(ValueError):
                memory.overwrite(machine_id, {"n": 2}, version=version)
            with _raises(ValueError):
                memory.delete(machine_id, version=version)
        not_dicts: list[Any] = [[], "x", 1, ({"n": 1},)]
        for prev_data in not_dicts:
            with _raises(InvalidState):
                memory.write(machine_id, {"n": 2}, prev_data)
            with _raises(InvalidState):
                memory.delete(machine_id, prev_data)
        assert memory.read(machine_id) == {"n": 1}
        with _raises(WriteConflict):
            memory.overwrite(machine_id, {"n": 2}, version=2**63 - 1)
        with _raises(WriteConflict):
            memory.delete(machine_id, version=2**63 - 1)
        assert memory.overwrite(machine_id, {"n": 2}, version=1) == 2
        memory.delete(machine_id, version=2)
        assert memory.read(machine_id) is None

    def test_long_unusual_ids_round_trip(self) -> None:
        memory = self.make_memory()
        tail = "/+= é漢🙂 ~ "
        unique = uuid.uuid4().hex
        machine_id = (unique + tail * 60)[:MAX_ID_LENGTH]
        assert len(machine_id) == MAX_ID_LENGTH
        memory.write(machine_id, {"id": machine_id}, None)
        assert memory.read(machine_id) == {"id": machine_id}
        assert memory.lock(machine_id)
        info = memory.lock_info(machine_id)
        assert info is not None and info.owner == memory.owner
        assert memory.unlock(machine_id)

    def test_ids_compare_exactly(self) -> None:
        memory = self.make_memory()
        base = f"Case-{uuid.uuid4().hex}-e"
        variants = [base, base.upper(), base + " ", base[:-1] + "é", base[:-1] + "É"]
        for number, machine_id in enumerate(variants):
            memory.write(machine_id, {"n": number}, None)
        for number, machine_id in enumerate(variants):
            assert memory.read(machine_id) == {"n": number}
            assert memory.lock(machine_id)
        for machine_id in variants:
            assert memory.unlock(machine_id)

    # -- async twins ---------------------------------------------------------------------

    def test_async_twins(self) -> None:
        memory, other, machine_id = self.make_memory(), self.make_memory(), self.new_id()

        async def scenario() -> None:
            assert await memory.aread(machine_id) is None
            assert await memory.alock(machine_id)
            assert await other.alock(machine_id) is False
            await memory.awrite(machine_id, {"a": 1}, None)
            state = await memory.aread(machine_id)
            assert state == {"a": 1}
            assert await memory.aextend(machine_id)
            assert await memory.aextend(machine_id, ttl=3600)
            extended = await memory.alock_info(machine_id)
            assert extended is not None
            assert (extended.expires_at - extended.acquired_at).total_seconds() >= 3599
            await memory.awrite(machine_id, {"a": 2}, state)
            assert await memory.aunlock(machine_id)
            async with other.alocked(machine_id):
                assert (await other.alock_info(machine_id)) is not None
            assert await memory.alock_info(machine_id) is None

        asyncio.run(scenario())

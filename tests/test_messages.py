"""What ``MachineMemory`` says when it refuses, on every database.

The type of an error tells a program what happened; its message tells the person reading
the log what to do (docs/contract.md#exceptions). Each message here is pinned whole, so a
changed or dropped part of one fails a test instead of slipping through. The validation
messages are pinned in test_validation.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import time
from typing import TYPE_CHECKING, Any

import pytest

from machine_memory import MachineMemory
from machine_memory.exceptions import (
    InvalidState,
    LockLost,
    LockNotAcquired,
    MachineMemoryError,
    WriteConflict,
)
from machine_memory.locks.database import DatabaseLockBackend
from machine_memory.locks.memory import InMemoryLockBackend
from machine_memory.stores.memory import InMemoryStateStore
from machine_memory.testing import SimpleMachineMemory
from tests.support import churning_store
from tests.test_commands import ExternalLocks

if TYPE_CHECKING:
    from collections.abc import Iterator


@pytest.fixture
def other(alias: str) -> Iterator[MachineMemory]:
    """A second worker on the same database."""
    memory = MachineMemory(using=alias)
    yield memory
    memory.close()


def message(exc_info: pytest.ExceptionInfo[BaseException]) -> str:
    """The text of the error; for the errors about one machine, also checks that it names
    that machine in ``id`` (the attribute programs read), as in the text."""
    error = exc_info.value
    if isinstance(error, WriteConflict | LockNotAcquired):
        assert error.id in str(error), (error.id, str(error))
    return str(error)


def test_creating_a_state_that_exists(memory: MachineMemory, mid: str) -> None:
    memory.write(mid, {"n": 1}, None)
    with pytest.raises(WriteConflict) as raised:
        memory.write(mid, {"n": 2}, None)
    assert message(raised) == (
        f"Machine {mid!r} already has a state (version 1); read it and pass it as prev_data."
    )


def test_a_stale_prev_data(memory: MachineMemory, other: MachineMemory, mid: str) -> None:
    memory.write(mid, {"n": 1}, None)
    mine, theirs = memory.read(mid), other.read(mid)
    other.write(mid, {"n": 2}, theirs)
    with pytest.raises(WriteConflict) as raised:
        memory.write(mid, {"n": 3}, mine)
    assert message(raised) == (
        f"Machine {mid!r}: expected stored version 1, found 2. "
        "Read the state again and retry the event."
    )


def test_a_stale_prev_data_for_a_delete(
    memory: MachineMemory, other: MachineMemory, mid: str
) -> None:
    memory.write(mid, {"n": 1}, None)
    mine, theirs = memory.read(mid), other.read(mid)
    other.write(mid, {"n": 2}, theirs)
    with pytest.raises(WriteConflict) as raised:
        memory.delete(mid, mine)
    assert message(raised) == (
        f"Machine {mid!r}: expected stored version 1, found 2. "
        "Read the state again and retry the event."
    )
    assert other.read(mid) == {"n": 2}


def test_prev_data_that_was_never_read(memory: MachineMemory, mid: str) -> None:
    memory.write(mid, {"n": 1}, None)
    with pytest.raises(WriteConflict) as raised:
        memory.write(mid, {"n": 3}, {"n": 0})
    assert message(raised) == (
        f"Machine {mid!r}: prev_data is neither the object read() returned nor equal to the "
        "stored state (version 1). Read again and retry."
    )


def test_prev_data_without_a_state(memory: MachineMemory, mid: str) -> None:
    with pytest.raises(WriteConflict) as raised:
        memory.write(mid, {"n": 1}, {"n": 0})
    assert message(raised) == (
        f"Machine {mid!r} has no stored state, but prev_data was given; "
        "pass prev_data=None to create it."
    )


def test_a_write_after_a_takeover(memory: MachineMemory, other: MachineMemory, mid: str) -> None:
    memory.write(mid, {"n": 1}, None)
    state = memory.read(mid)
    assert memory.lock(mid, ttl=0.2)
    token = memory.held_token(mid)
    time.sleep(0.3)
    assert other.lock(mid)
    try:
        with pytest.raises(LockLost) as raised:
            memory.write(mid, {"n": 2}, state)
    finally:
        other.unlock(mid)
        memory.unlock(mid)
    assert message(raised) == (
        f"Machine {mid!r}: this worker's lock (token {token}) was taken over by another "
        "owner; nothing was written. Drop the event; it will be redelivered."
    )


def test_no_state_to_overwrite(memory: MachineMemory, mid: str) -> None:
    with pytest.raises(WriteConflict) as raised:
        memory.overwrite(mid, {"n": 1})
    assert message(raised) == (
        f"Machine {mid!r} has no state to overwrite; create it with write(id, data, None)."
    )


def test_no_state_to_delete(memory: MachineMemory, mid: str) -> None:
    with pytest.raises(WriteConflict) as raised:
        memory.delete(mid, version=1)
    assert message(raised) == f"Machine {mid!r} has no state to delete."
    assert (raised.value.expected_version, raised.value.actual_version) == (1, None)


def test_another_version_than_the_one_pinned(memory: MachineMemory, mid: str) -> None:
    memory.write(mid, {"n": 1}, None)
    with pytest.raises(WriteConflict) as raised:
        memory.delete(mid, version=2)
    assert message(raised) == (
        f"Machine {mid!r}: expected stored version 2, found 1. "
        "Read the state again and retry the event."
    )


def test_a_denied_session(memory: MachineMemory, other: MachineMemory, mid: str) -> None:
    assert other.lock(mid)
    try:
        with pytest.raises(LockNotAcquired) as raised, memory.session(mid):
            pass
    finally:
        other.unlock(mid)
    assert message(raised) == f"Machine {mid!r} is locked by another owner; retry the event later."


def test_a_session_that_wrote_already(memory: MachineMemory, mid: str) -> None:
    with memory.session(mid) as session:
        session.write({"n": 1})
        with pytest.raises(MachineMemoryError) as raised:
            session.write({"n": 2})
    assert message(raised) == (
        f"This session on {mid!r} has written already and its lock is released; open a new "
        "session for the next event."
    )


def test_a_read_under_a_lock_that_is_not_held(memory: MachineMemory, mid: str) -> None:
    with pytest.raises(MachineMemoryError) as raised:
        memory.read_holding(mid)
    assert message(raised) == (
        f"This instance holds no lock on {mid!r}: take it with lock() or lock_and_read() (or "
        "adopt() a token) first."
    )


@pytest.mark.parametrize("call", ["lock", "alock", "lock_and_read", "alock_and_read"])
def test_a_denied_lock_is_logged_with_each_pause(
    memory: MachineMemory,
    other: MachineMemory,
    mid: str,
    call: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """At DEBUG: each busy attempt with its pause (only lock() says that), then the denial."""
    assert other.lock(mid)
    memory.lock_retries, memory.lock_backoff = 2, 0.001
    try:
        with caplog.at_level(logging.DEBUG, logger="machine_memory"):
            outcome = getattr(memory, call)(mid)
            if call.startswith("a"):
                outcome = asyncio.run(outcome)
    finally:
        other.unlock(mid)
    assert not outcome
    said = [r.getMessage() for r in caplog.records if r.name.startswith("machine_memory")]
    busy = rf"Lock on {re.escape(repr(mid))} busy; retrying in \d\.\d{{3}} s\."
    assert said[-1] == f"Lock on {mid!r} denied: held by another owner."
    if call in ("lock", "alock"):
        assert len(said) == 3
        assert all(re.fullmatch(busy, line) for line in said[:2]), said
    else:
        assert said == [f"Lock on {mid!r} denied: held by another owner."]


# -- arguments: refused before storage is touched, so no database is needed ------------------


@pytest.fixture
def local() -> MachineMemory:
    return SimpleMachineMemory()


@pytest.mark.parametrize("version", [0, True, 2**63, "1"], ids=repr)
def test_a_version_that_cannot_be_stored(local: MachineMemory, version: object) -> None:
    with pytest.raises(ValueError, match=r"^version ") as raised:
        local.delete("m", version=version)  # type: ignore[arg-type]
    assert message(raised) == (
        f"version must be a positive int (a stored version); got {version!r}."
    )


def test_prev_data_of_the_wrong_type(local: MachineMemory) -> None:
    with pytest.raises(InvalidState) as raised:
        local.write("m", {"n": 1}, ["n"])  # type: ignore[arg-type]
    assert message(raised) == (
        "prev_data must be the dict read() returned (or an equal dict), or None to create "
        "the state; got list."
    )
    with pytest.raises(InvalidState) as raised:
        local.delete("m", "n")  # type: ignore[arg-type]
    assert message(raised) == (
        "prev_data must be the dict read() returned (or an equal dict), or None; got str."
    )


def test_arguments_that_contradict_each_other(local: MachineMemory) -> None:
    with pytest.raises(ValueError, match=r"^create=True ") as raised:
        local.overwrite("m", {"n": 1}, version=1, create=True)
    assert message(raised) == "create=True stores over whatever version exists; pass no version."
    with pytest.raises(ValueError, match=r"^Pass ") as raised:
        local.delete("m", {"n": 1}, version=1)
    assert message(raised) == "Pass prev_data or version, not both."
    with pytest.raises(ValueError, match=r"^Pass ") as raised:
        MachineMemory(using="default", store=InMemoryStateStore())
    assert message(raised) == "Pass using= (a database alias) or store=, not both."


@pytest.mark.parametrize(
    ("name", "good", "bad", "expected"),
    [
        ("lock_ttl", 7.5, 0, "a number of seconds (or a timedelta) from 0.001 to 2592000"),
        ("lock_retries", 5, -1, "a non-negative int"),
        ("lock_backoff", 0.25, 61, "a number of seconds from 0 to 60"),
        ("read_retries", 4, 1.5, "a non-negative int"),
        ("read_backoff", 0.5, -0.1, "a number of seconds from 0 to 60"),
        ("max_state_bytes", 4096, 0, "a positive int"),
        ("cleanup", "delete", "purge", '"keep" or "delete"'),
    ],
)
def test_each_option_is_kept_or_refused_by_its_name(
    name: str, good: Any, bad: Any, expected: str
) -> None:
    attribute = "cleanup_mode" if name == "cleanup" else name
    assert getattr(SimpleMachineMemory(**{name: good}), attribute) == good
    with pytest.raises(ValueError, match=f"^{name} ") as raised:
        SimpleMachineMemory(**{name: bad})
    assert message(raised) == f"{name} is {bad!r}; it must be {expected}."


def test_the_default_owner_names_the_host_and_the_process() -> None:
    # docs/contract.md: each instance is one owner, "<host>:<pid>:<random>".
    owners = {SimpleMachineMemory().owner for _ in range(20)}
    assert len(owners) == 20
    for owner in owners:
        host, pid, nonce = owner.rsplit(":", 2)
        assert (host, pid) == (socket.gethostname(), str(os.getpid()))
        assert re.fullmatch("[0-9a-f]{8}", nonce), owner


def test_lock_backends_that_do_not_fit(alias: str) -> None:
    with pytest.raises(TypeError) as not_one:
        MachineMemory(using=alias, lock_backend="machine_memory.memory.MachineMemory")
    assert message(not_one) == (
        "'machine_memory.memory.MachineMemory' is not a machine_memory.locks.base.LockBackend "
        "subclass."
    )
    # Database locks beside states that are not in a database: by name, then as an instance
    # made for another database's states.
    with pytest.raises(MachineMemoryError) as raised:
        MachineMemory(store=InMemoryStateStore(), lock_backend="database")
    assert message(raised) == (
        "Database locks live beside the states in a database; this memory's states are not "
        "in one. Pass a lock backend of the same storage."
    )
    store = InMemoryStateStore()
    with pytest.raises(MachineMemoryError) as raised:
        MachineMemory(store=store, lock_backend=DatabaseLockBackend(database=alias))
    assert message(raised) == (
        f"DatabaseLockBackend fences writes through lock rows beside the states, but they are "
        f"not in {store!r}; use a lock backend of the same storage."
    )


@pytest.mark.parametrize("ttl", [0, -1, "5", 2592001], ids=repr)
def test_a_ttl_out_of_range(local: MachineMemory, ttl: Any) -> None:
    with pytest.raises(ValueError, match=r"^ttl ") as raised:
        local.lock("m", ttl=ttl)
    assert message(raised) == (
        f"ttl is {ttl!r}; it must be a number of seconds (or a timedelta) from 0.001 to 2592000."
    )
    assert not local.holds("m")


@pytest.mark.parametrize("token", [0, -1, True, 2**63, 1.0, "1"], ids=repr)
def test_a_token_that_lock_never_issued(local: MachineMemory, token: Any) -> None:
    with pytest.raises(ValueError, match=r"^token ") as raised:
        local.adopt("m", token)
    assert message(raised) == "token must be the positive fencing token that lock() issued."
    assert not local.holds("m")


def test_the_largest_token_can_be_adopted(local: MachineMemory) -> None:
    local.adopt("m", 2**63 - 1)
    assert local.held_token("m") == 2**63 - 1


def test_states_outside_django_have_no_database_alias(local: MachineMemory) -> None:
    # The admin, the API and the commands need one; say so instead of failing later.
    with pytest.raises(MachineMemoryError) as raised:
        _ = local.using
    assert message(raised) == f"{local.store!r} keeps its states outside Django's databases."


def test_a_lock_backend_without_force_release(alias: str, mid: str) -> None:
    # force_release is optional for third-party backends; asking one that lacks it says so.
    memory = MachineMemory(using=alias, lock_backend=ExternalLocks)
    with pytest.raises(NotImplementedError) as raised:
        memory.force_unlock(mid)
    assert message(raised) == "ExternalLocks cannot force-release locks."


def test_create_or_overwrite_gives_up_after_three_tries() -> None:
    # Each try finds no state under the row lock and then loses the create to another
    # writer: three tries, then the last WriteConflict (nothing of ours was stored).
    store = churning_store()
    memory = MachineMemory(store=store, lock_backend=InMemoryLockBackend(shared=store.shared))
    with pytest.raises(WriteConflict) as raised:
        memory.overwrite("m", {"n": 1}, create=True)
    assert store.looks == 3
    assert (raised.value.expected_version, raised.value.actual_version) == (None, 1)
    assert memory.read("m") == {"theirs": True}


def test_a_memory_shows_its_storage_and_owner() -> None:
    memory = SimpleMachineMemory(owner="worker-1")
    assert repr(memory) == (
        f"<MachineMemory store={memory.store!r} locks=InMemoryLockBackend owner='worker-1'>"
    )


def test_the_in_memory_lock_backend_does_not_fence_database_states(alias: str) -> None:
    # It fences through lock rows of its own store, which a database's states never see.
    with pytest.raises(MachineMemoryError, match="fences writes through lock rows beside"):
        MachineMemory(using=alias, lock_backend="machine_memory.locks.memory.InMemoryLockBackend")

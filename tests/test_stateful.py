"""Random operation sequences, the same in two worlds: a database-backed memory and the
in-process ``SimpleMachineMemory`` (the documented twin), compared after every step.

Three owners work on two ids, so operations collide: reads, writes from the last read, from
no read (create), from a stale earlier read and from a plain equal dict; lock, unlock,
extend, an operator's force_unlock (which lets another owner take over, so the old holder's
writes fail with LockLost), cleanup and delete. Every result must agree: read contents,
booleans, lock_info owners (the same owner names in both worlds), the exception type
raised (WriteConflict, LockLost or none), holds(), and the stored states. Fencing tokens
differ between the worlds by nature, so they are compared by their relative order only.
TTLs are long, so expiry never races the test. Run on SQLite, PostgreSQL and MariaDB with
database locks, and on PostgreSQL with Redis locks.
"""

from __future__ import annotations

import copy
import itertools
import os
import uuid
from typing import TYPE_CHECKING, Any, ClassVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from machine_memory import MachineMemory
from machine_memory.exceptions import MachineMemoryError
from machine_memory.testing import SimpleMachineMemory
from tests.support import new_id

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from machine_memory.locks.base import LockInfo

OWNERS = 3
IDS = 2
TTL = 600.0
# More for a longer hunt: MM_STATEFUL_EXAMPLES=500.
EXAMPLES = int(os.environ.get("MM_STATEFUL_EXAMPLES", "25"))

# ("ok", value) or ("raised", exception type name)
Outcome = tuple[str, Any]


def outcome(call: Callable[[], Any]) -> Outcome:
    try:
        return ("ok", call())
    except MachineMemoryError as exc:
        return ("raised", type(exc).__name__)


def database_memory(alias: str, locks: str, **options: Any) -> MachineMemory:
    if locks == "redis":
        from machine_memory.locks.redis import RedisLockBackend

        backend = RedisLockBackend(database=alias, cache="redis_faults")
        return MachineMemory(using=alias, lock_backend=backend, **options)
    return MachineMemory(using=alias, **options)


class TokenOrder:
    """Pairs of fencing tokens (database world, simple world) that must be in the same order."""

    def __init__(self) -> None:
        self.pairs: set[tuple[int, int]] = set()

    def add(self, db_token: int | None, simple_token: int | None) -> None:
        assert (db_token is None) == (simple_token is None), (db_token, simple_token)
        if db_token is None or simple_token is None:
            return
        self.pairs.add((db_token, simple_token))
        ordered = sorted(self.pairs)
        for (db_a, simple_a), (db_b, simple_b) in itertools.pairwise(ordered):
            if db_a == db_b:
                assert simple_a == simple_b, f"one token {db_a} stands for {simple_a}, {simple_b}"
            else:
                assert simple_a < simple_b, f"tokens out of order: {ordered}"


class MemoryComparison(RuleBasedStateMachine):
    alias: ClassVar[str]
    locks: ClassVar[str]

    def __init__(self) -> None:
        super().__init__()
        self.ids = [new_id("stateful") for _ in range(IDS)]
        run = uuid.uuid4().hex[:8]
        names = [f"owner-{run}-{index}" for index in range(OWNERS)]
        options: dict[str, Any] = {"lock_retries": 0, "lock_ttl": TTL, "cleanup": "delete"}
        self.db = [self.database_memory(owner=name, **options) for name in names]
        # An operator (force_unlock, lock_info, reads of the stored states) in each world; the
        # simple world's owners are its peers, sharing one in-process store.
        self.db_operator = self.database_memory(owner=f"operator-{run}")
        self.simple_operator = SimpleMachineMemory(owner=f"operator-{run}")
        self.simple = [self.simple_operator.peer(owner=name, **options) for name in names]
        # Per owner and id: the (database, simple) objects read or written, oldest first.
        self.seen: list[list[list[tuple[dict[str, Any], dict[str, Any]]]]] = [
            [[] for _ in range(IDS)] for _ in range(OWNERS)
        ]
        self.tokens = TokenOrder()

    @classmethod
    def database_memory(cls, **options: Any) -> MachineMemory:
        return database_memory(cls.alias, cls.locks, **options)

    def both(
        self, call: Callable[[MachineMemory], Any], owner: int | None
    ) -> tuple[Outcome, Outcome]:
        """``call`` on the owner's memory in each world; the two outcomes must agree."""
        db = self.db_operator if owner is None else self.db[owner]
        simple = self.simple_operator if owner is None else self.simple[owner]
        got = outcome(lambda: call(db)), outcome(lambda: call(simple))
        return got

    def same(self, outcomes: tuple[Outcome, Outcome]) -> Outcome:
        db, simple = outcomes
        assert db == simple, f"database {db} != simple {simple}"
        return db

    def same_lock(self, outcomes: tuple[Outcome, Outcome]) -> None:
        """Two lock_info / force_unlock results: same owner, tokens in the same order."""
        (db_kind, db_info), (simple_kind, simple_info) = outcomes
        assert db_kind == simple_kind == "ok", outcomes
        db_lock: LockInfo | None = db_info
        simple_lock: LockInfo | None = simple_info
        assert (db_lock is None) == (simple_lock is None), outcomes
        if db_lock is not None and simple_lock is not None:
            assert db_lock.owner == simple_lock.owner
            self.tokens.add(db_lock.token, simple_lock.token)

    def prev_for(self, owner: int, which: int, kind: str, pick: int) -> tuple[Any, Any]:
        history = self.seen[owner][which]
        if kind == "none" or not history:
            return None, None
        if kind == "last":
            return history[-1]
        if kind == "stale":
            return history[pick % len(history)]
        # "equal": a plain dict with the content of the last one (not an object read()
        # handed out: compared by content).
        return copy.deepcopy(history[-1][0]), copy.deepcopy(history[-1][1])

    # -- the operations --------------------------------------------------------------------

    owners = st.integers(0, OWNERS - 1)
    which_id = st.integers(0, IDS - 1)
    prev_kinds = st.sampled_from(["last", "none", "stale", "equal"])

    @rule(owner=owners, which=which_id)
    def read(self, owner: int, which: int) -> None:
        mid = self.ids[which]
        db, simple = self.both(lambda memory: memory.read(mid), owner)
        self.same((db, simple))
        if db[1] is not None:
            self.seen[owner][which].append((db[1], simple[1]))

    @rule(
        owner=owners,
        which=which_id,
        prev=prev_kinds,
        pick=st.integers(0, 1000),
        value=st.integers(0, 2),
    )
    def write(self, owner: int, which: int, prev: str, pick: int, value: int) -> None:
        mid = self.ids[which]
        prev_db, prev_simple = self.prev_for(owner, which, prev, pick)
        # Few distinct values, so that a stale read often equals the stored content.
        data_db, data_simple = {"v": value}, {"v": value}
        result = self.same(
            (
                outcome(lambda: self.db[owner].write(mid, data_db, prev_db)),
                outcome(lambda: self.simple[owner].write(mid, data_simple, prev_simple)),
            )
        )
        if result[0] == "ok":
            self.seen[owner][which].append((data_db, data_simple))

    @rule(owner=owners, which=which_id)
    def lock(self, owner: int, which: int) -> None:
        mid = self.ids[which]
        result = self.same(self.both(lambda memory: memory.lock(mid), owner))
        if result == ("ok", True):
            self.tokens.add(self.db[owner].held_token(mid), self.simple[owner].held_token(mid))

    @rule(owner=owners, which=which_id)
    def unlock(self, owner: int, which: int) -> None:
        mid = self.ids[which]
        self.same(self.both(lambda memory: memory.unlock(mid), owner))

    @rule(owner=owners, which=which_id)
    def extend(self, owner: int, which: int) -> None:
        mid = self.ids[which]
        self.same(self.both(lambda memory: memory.extend(mid), owner))

    @rule(which=which_id)
    def force_unlock(self, which: int) -> None:
        mid = self.ids[which]
        self.same_lock(self.both(lambda memory: memory.force_unlock(mid), None))

    @rule(which=which_id)
    def lock_info(self, which: int) -> None:
        mid = self.ids[which]
        self.same_lock(self.both(lambda memory: memory.lock_info(mid), None))

    @rule(owner=owners, which=which_id, data=prev_kinds, pick=st.integers(0, 1000))
    def cleanup(self, owner: int, which: int, data: str, pick: int) -> None:
        """CLEANUP="delete": delete the state if it is still ``data``, then unlock."""
        mid = self.ids[which]
        data_db, data_simple = self.prev_for(owner, which, data, pick)
        self.same(
            (
                outcome(lambda: self.db[owner].cleanup(mid, data_db, None)),
                outcome(lambda: self.simple[owner].cleanup(mid, data_simple, None)),
            ),
        )

    @rule(owner=owners, which=which_id, prev=prev_kinds, pick=st.integers(0, 1000))
    def delete(self, owner: int, which: int, prev: str, pick: int) -> None:
        mid = self.ids[which]
        prev_db, prev_simple = self.prev_for(owner, which, prev, pick)
        self.same(
            (
                outcome(lambda: self.db[owner].delete(mid, prev_db)),
                outcome(lambda: self.simple[owner].delete(mid, prev_simple)),
            ),
        )

    # -- after every step ------------------------------------------------------------------

    @invariant()
    def same_holders(self) -> None:
        STEPS.append(1)
        for owner in range(OWNERS):
            for mid in self.ids:
                db, simple = self.db[owner], self.simple[owner]
                assert db.holds(mid) == simple.holds(mid), (owner, mid)
                self.tokens.add(db.held_token(mid), simple.held_token(mid))

    @invariant()
    def same_states(self) -> None:
        for mid in self.ids:
            assert self.db_operator.read(mid) == self.simple_operator.read(mid), mid

    def teardown(self) -> None:
        for memory in [*self.db, self.db_operator]:
            for mid in self.ids:
                memory.unlock(mid)
            memory.close()


# Invariant checks run, across all examples of a test (proof that steps really ran).
STEPS: list[int] = []


@pytest.fixture
def hypothesis_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Hypothesis's own files (its constants cache) under pytest's tmp dir, not the repo."""
    set_hypothesis_home_dir(tmp_path_factory.mktemp("hypothesis"))
    yield
    set_hypothesis_home_dir(None)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("alias", "locks"),
    [
        ("default", "database"),
        ("postgres", "database"),
        ("mariadb", "database"),
        ("postgres", "redis"),
    ],
    ids=["sqlite", "postgres", "mariadb", "postgres-redis"],
    indirect=["alias"],
)
def test_database_memory_behaves_like_the_simple_memory(
    alias: str, locks: str, request: pytest.FixtureRequest, hypothesis_home: None
) -> None:
    if locks == "redis":
        request.getfixturevalue("redis_faults")
    machine = type(
        f"MemoryComparison_{alias}_{locks}",
        (MemoryComparison,),
        {"alias": alias, "locks": locks},
    )
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=25,
            deadline=None,
            database=None,  # nothing written to .hypothesis/
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
    assert len(STEPS) >= EXAMPLES * 10, f"only {len(STEPS)} steps ran"
    STEPS.clear()


@pytest.mark.parametrize(
    ("alias", "locks"),
    [("default", "database"), ("postgres", "database"), ("postgres", "redis")],
    ids=["sqlite", "postgres", "postgres-redis"],
    indirect=["alias"],
)
@pytest.mark.parametrize("operation", ["delete", "cleanup"])
def test_delete_of_a_missing_state_after_a_takeover_is_no_error(
    alias: str, locks: str, operation: str, request: pytest.FixtureRequest
) -> None:
    """Found by the state machine: A locks, an operator force-unlocks, B locks, A deletes an id
    that has no state. "A missing state is not an error" (docs/contract.md, delete): with
    database locks (and in SimpleMachineMemory) nothing happens; with Redis locks the fence
    check used to run first and raise LockLost."""
    if locks == "redis":
        request.getfixturevalue("redis_faults")
    mid = new_id("missing")
    holder = database_memory(alias, locks, lock_retries=0, cleanup="delete")
    heir = database_memory(alias, locks, lock_retries=0)
    operator = database_memory(alias, locks)
    assert holder.lock(mid)
    assert operator.force_unlock(mid) is not None
    assert heir.lock(mid)
    if operation == "delete":
        holder.delete(mid)
    else:
        holder.cleanup(mid, None, None)
    assert heir.unlock(mid)

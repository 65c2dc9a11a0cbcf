"""``MachineMemory``: the Arvo ``read / write / lock / unlock`` contract on Django's databases.

``BaseMachineMemory`` holds everything that is the contract itself (validation, the
version a ``read`` handed out, retries and backoff, fencing bookkeeping, the async twins);
a subclass supplies single-attempt storage primitives. ``MachineMemory`` stores state in
a database and locks in a lock backend; ``testing.SimpleMachineMemory`` keeps both in
process memory.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import random
import secrets
import socket
import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

from asgiref.sync import sync_to_async

from machine_memory.conf import conf
from machine_memory.exceptions import (
    InvalidState,
    LockError,
    LockLost,
    LockNotAcquired,
    MachineMemoryError,
    ReadError,
    WriteConflict,
    WriteError,
)
from machine_memory.sql.base import NO_FENCE
from machine_memory.sql.cursor import cursor_for
from machine_memory.validation import (
    decode_state,
    encode_state,
    json_equal,
    resolve_metadata,
    validate_id,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator, Mapping

    from django.db.backends.base.base import BaseDatabaseWrapper

    from machine_memory.locks.base import LockBackend, LockInfo
    from machine_memory.sql.base import Fence, Metadata

    # What _load returns: the stored document, its version, its metadata columns.
    Stored = tuple[Any, int, Metadata]

logger = logging.getLogger("machine_memory")

T = TypeVar("T")

# read gives up within this many seconds, whatever READ_RETRIES says (SPEC §2).
READ_DEADLINE = 1.0
# unlock never raises for storage errors: a couple of quick retries, then False.
UNLOCK_ATTEMPTS = 3
UNLOCK_BACKOFF = 0.02
# How many (id, object) pairs handed out by read() are remembered for write()'s version
# check; the oldest are forgotten first (a forgotten one falls back to a content compare).
SEEN_LIMIT = 4096


def default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def _seconds(value: Any, name: str) -> float:
    if isinstance(value, datetime.timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"{name} must be a positive number of seconds or a timedelta.")
    return float(value)


# The same rules as the system checks (checks.py), for values passed to the constructor.
def _count(value: Any, name: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int of at least {minimum}.")
    return value


def _delay(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ValueError(f"{name} must be a non-negative number of seconds.")
    return float(value)


class BaseMachineMemory(ABC):
    """The contract, on top of single-attempt storage primitives."""

    def __init__(
        self,
        *,
        lock_ttl: float | datetime.timedelta | None = None,
        owner: str | None = None,
        lock_retries: int | None = None,
        lock_backoff: float | None = None,
        read_retries: int | None = None,
        read_backoff: float | None = None,
        max_state_bytes: int | None = None,
        cleanup: str | None = None,
    ) -> None:
        self.lock_ttl = _seconds(conf.LOCK_TTL if lock_ttl is None else lock_ttl, "lock_ttl")
        self.owner = default_owner() if owner is None else owner
        if not isinstance(self.owner, str) or not 0 < len(self.owner) <= 255:
            raise ValueError("owner must be a non-empty str of at most 255 characters.")
        self.lock_retries = _count(
            conf.LOCK_RETRIES if lock_retries is None else lock_retries, "lock_retries"
        )
        self.lock_backoff = _delay(
            conf.LOCK_BACKOFF if lock_backoff is None else lock_backoff, "lock_backoff"
        )
        self.read_retries = _count(
            conf.READ_RETRIES if read_retries is None else read_retries, "read_retries"
        )
        self.read_backoff = _delay(
            conf.READ_BACKOFF if read_backoff is None else read_backoff, "read_backoff"
        )
        self.max_state_bytes = _count(
            conf.MAX_STATE_BYTES if max_state_bytes is None else max_state_bytes,
            "max_state_bytes",
            minimum=1,
        )
        self.cleanup_mode = conf.CLEANUP if cleanup is None else cleanup
        if self.cleanup_mode not in ("keep", "delete"):
            raise ValueError("cleanup must be 'keep' or 'delete'.")
        # Locks this instance acquired and has not released: id -> fencing token.
        self._held: dict[str, int] = {}
        # Objects handed out by read() (and accepted by write()): (id, id(obj)) -> (obj,
        # version). write() follows the version, not the content, because callers may
        # mutate the object they read before passing it back as prev_data.
        self._seen: OrderedDict[tuple[str, int], tuple[dict[str, Any], int, Metadata]] = (
            OrderedDict()
        )
        self._seen_lock = threading.Lock()
        # Errors of the state storage, and the subset worth a retry on a new connection.
        self.storage_errors: tuple[type[BaseException], ...] = ()
        self.transient_errors: tuple[type[BaseException], ...] = ()

    # -- storage primitives (one attempt each) ------------------------------------------

    @abstractmethod
    def _load(self, machine_id: str) -> Stored | None:
        """The stored document (text or decoded), its version and metadata, or None."""

    @abstractmethod
    def _store(
        self,
        machine_id: str,
        text: str,
        expected_version: int | None,
        meta: Metadata | None,
        token: int | None,
    ) -> bool:
        """Create (expected None) or compare-and-set; fenced by ``token`` when held.

        ``meta`` None (updates only): the metadata did not change; leave it as stored.
        """

    @abstractmethod
    def _remove(self, machine_id: str, expected_version: int, token: int | None) -> bool:
        """Delete the row if it still has ``expected_version`` (fenced like ``_store``)."""

    @abstractmethod
    def _lock_lost(self, machine_id: str, token: int) -> bool:
        """After a rejected write: was the lock with ``token`` taken over?"""

    @abstractmethod
    def _acquire(self, machine_id: str, ttl: float) -> int | None: ...

    @abstractmethod
    def _release(self, machine_id: str) -> bool: ...

    @abstractmethod
    def _extend(self, machine_id: str, token: int, ttl: float) -> bool: ...

    @abstractmethod
    def _lock_info(self, machine_id: str) -> LockInfo | None: ...

    def _force_release(self, machine_id: str) -> LockInfo | None:
        """Expire the live lock whoever holds it; the lock as it was, or None."""
        raise NotImplementedError(f"{type(self).__name__} cannot force-release locks.")

    # Lock storage errors: mapped to LockError (lock, extend) or False (unlock).
    def _lock_errors(self) -> tuple[type[BaseException], ...]:
        return self.storage_errors

    # The subset worth one more try on a fresh connection.
    def _lock_transient_errors(self) -> tuple[type[BaseException], ...]:
        return self.transient_errors

    def _in_transaction(self) -> bool:
        """True while the caller's transaction is open: no reconnecting then."""
        return False

    def _recover(self) -> None:
        """Replace connections after a transient error."""

    # -- the seen-version map -----------------------------------------------------------

    def _remember(self, machine_id: str, obj: dict[str, Any], version: int, meta: Metadata) -> None:
        with self._seen_lock:
            self._seen[(machine_id, id(obj))] = (obj, version, meta)
            if len(self._seen) > SEEN_LIMIT:
                self._seen.popitem(last=False)

    def _seen_version(self, machine_id: str, obj: object) -> tuple[int, Metadata] | None:
        with self._seen_lock:
            entry = self._seen.get((machine_id, id(obj)))
        return (entry[1], entry[2]) if entry is not None and entry[0] is obj else None

    def _forget(self, machine_id: str, obj: object) -> None:
        with self._seen_lock:
            entry = self._seen.get((machine_id, id(obj)))
            if entry is not None and entry[0] is obj:
                del self._seen[(machine_id, id(obj))]

    # -- read -------------------------------------------------------------------------

    def _read_delays(self) -> Iterator[float | None]:
        """Sleep before each retry of a transient failure; None: give up."""
        deadline = time.monotonic() + READ_DEADLINE
        for attempt in range(self.read_retries):
            delay = self.read_backoff * (2**attempt)
            if self._in_transaction() or time.monotonic() + delay >= deadline:
                break
            yield delay
        yield None

    def _read_attempt(self, machine_id: str) -> dict[str, Any] | None:
        row = self._load(machine_id)
        if row is None:
            return None
        data = decode_state(row[0])
        self._remember(machine_id, data, row[1], row[2])
        return data

    def read(self, machine_id: str) -> dict[str, Any] | None:
        """The stored state (a fresh dict each call), or None when there is none yet."""
        machine_id = validate_id(machine_id)
        for delay in self._read_delays():
            try:
                return self._read_attempt(machine_id)
            except self.transient_errors as exc:
                if delay is None:
                    raise ReadError(f"Reading machine {machine_id!r} failed: {exc}") from exc
                self._recover()
                time.sleep(delay)
            except self.storage_errors as exc:
                raise ReadError(f"Reading machine {machine_id!r} failed: {exc}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def aread(self, machine_id: str) -> dict[str, Any] | None:
        machine_id = validate_id(machine_id)
        attempt = sync_to_async(self._read_attempt)
        recover = sync_to_async(self._recover)
        for delay in self._read_delays():
            try:
                return await attempt(machine_id)
            except self.transient_errors as exc:
                if delay is None:
                    raise ReadError(f"Reading machine {machine_id!r} failed: {exc}") from exc
                await recover()
                await asyncio.sleep(delay)
            except self.storage_errors as exc:
                raise ReadError(f"Reading machine {machine_id!r} failed: {exc}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    # -- write ------------------------------------------------------------------------

    def write(
        self,
        machine_id: str,
        data: dict[str, Any],
        prev_data: dict[str, Any] | None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        """Store ``data`` if the stored state is still the one ``prev_data`` was read from."""
        machine_id = validate_id(machine_id)
        text = encode_state(data, self.max_state_bytes)
        meta = resolve_metadata(data, metadata, machine_id)
        if prev_data is not None and not isinstance(prev_data, dict):
            raise InvalidState(
                "prev_data must be the dict read() returned (or an equal dict), or None "
                f"to create the state; got {type(prev_data).__name__}."
            )
        token = self._held.get(machine_id)
        expected: int | None = None
        changed: Metadata | None = meta
        if prev_data is not None:
            expected, stored_meta = self._expected_version(machine_id, prev_data)
            if stored_meta == meta:
                changed = None
        try:
            stored = self._store(machine_id, text, expected, changed, token)
        except self.transient_errors as exc:
            stored = self._landed_after_failure(machine_id, data, expected, exc)
        except self.storage_errors as exc:
            raise WriteError(f"Writing machine {machine_id!r} failed: {exc}") from exc
        if not stored:
            self._raise_rejected(machine_id, expected, token)
        if prev_data is not None:
            self._forget(machine_id, prev_data)
        # Inside the caller's transaction the new version may still be rolled back; a later
        # write from `data` then falls back to the content compare, which is always right.
        if not self._in_transaction():
            self._remember(machine_id, data, 1 if expected is None else expected + 1, meta)

    def _expected_version(self, machine_id: str, prev_data: dict[str, Any]) -> tuple[int, Metadata]:
        """The version (and its metadata) that ``prev_data`` stands for."""
        seen = self._seen_version(machine_id, prev_data)
        if seen is not None:
            return seen
        # Not an object read() handed out here: accept it if it equals the stored state,
        # and then compare-and-set against the version that was compared. The version
        # check in _store closes the gap between the two statements, so no row lock (and,
        # on SQLite, no read-to-write lock upgrade) is needed.
        try:
            row = self._load(machine_id)
        except self.storage_errors as exc:
            raise WriteError(f"Writing machine {machine_id!r} failed: {exc}") from exc
        if row is None:
            raise WriteConflict(
                machine_id,
                None,
                None,
                f"Machine {machine_id!r} has no stored state, but prev_data was given; "
                "pass prev_data=None to create it.",
            )
        if not json_equal(decode_state(row[0]), prev_data):
            raise WriteConflict(
                machine_id,
                None,
                row[1],
                f"Machine {machine_id!r}: prev_data is neither the object read() returned nor "
                f"equal to the stored state (version {row[1]}). Read again and retry.",
            )
        return row[1], row[2]

    def _landed_after_failure(
        self, machine_id: str, data: dict[str, Any], expected: int | None, exc: BaseException
    ) -> bool:
        """The connection died mid-write: find out on a fresh one whether it landed."""
        error = WriteError(f"Writing machine {machine_id!r} failed: {exc}")
        if self._in_transaction():
            # The caller's transaction is gone with the connection: nothing was committed.
            raise error from exc
        self._recover()
        try:
            row = self._load(machine_id)
        except self.storage_errors:
            raise error from exc
        landed = (
            row is not None
            and row[1] == (1 if expected is None else expected + 1)
            and json_equal(decode_state(row[0]), data)
        )
        if not landed:
            raise error from exc
        logger.info("Write to %r landed although its connection failed.", machine_id)
        return True

    def _raise_rejected(self, machine_id: str, expected: int | None, token: int | None) -> None:
        try:
            actual = self._current_version(machine_id)
            # The token stays in _held: until this instance unlocks, every later write to the
            # id must keep failing, not slip through as an unfenced write. An update refused
            # although the version still matched was refused by its fence: a higher token
            # has written the row (with Redis locks, also when Redis has since forgotten
            # that takeover, as after a failover).
            fenced_out = expected is not None and actual == expected
            if token is not None and (fenced_out or self._lock_lost(machine_id, token)):
                raise LockLost(
                    machine_id,
                    expected,
                    actual,
                    f"Machine {machine_id!r}: this worker's lock (token {token}) was taken "
                    "over by another owner; nothing was written. Drop the event; it will be "
                    "redelivered.",
                )
        except (*self.storage_errors, *self._lock_errors()) as exc:
            raise WriteError(f"Writing machine {machine_id!r} was rejected: {exc}") from exc
        if expected is None and actual is None:
            raise WriteError(
                f"Creating machine {machine_id!r} was refused by the database although no "
                "state exists; nothing was stored."
            )
        if expected is None:
            raise WriteConflict(
                machine_id,
                None,
                actual,
                f"Machine {machine_id!r} already has a state (version {actual}); "
                "read it and pass it as prev_data.",
            )
        raise WriteConflict(machine_id, expected, actual)

    def _current_version(self, machine_id: str) -> int | None:
        row = self._load(machine_id)
        return None if row is None else row[1]

    def version_of(self, machine_id: str, data: object) -> int | None:
        """The stored version of ``data``, an object ``read()`` returned or ``write()`` stored.

        None for any other object. For front ends that expose versions (the REST API's
        ETags): the version comes from the same statement as the content, so a
        compare-and-set against it can never pass for content read at another version.
        """
        seen = self._seen_version(validate_id(machine_id), data)
        return None if seen is None else seen[0]

    async def awrite(
        self,
        machine_id: str,
        data: dict[str, Any],
        prev_data: dict[str, Any] | None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        await sync_to_async(self.write)(machine_id, data, prev_data, metadata)

    # -- locks ------------------------------------------------------------------------

    def _lock_delays(self) -> Iterator[float | None]:
        """Sleep before each retry on a live lock (doubling, ±10% jitter); None: give up."""
        for attempt in range(self.lock_retries):
            yield self.lock_backoff * (2**attempt) * random.uniform(0.9, 1.1)
        yield None

    def _lock_attempt(self, machine_id: str, ttl: float) -> bool:
        try:
            try:
                token = self._acquire(machine_id, ttl)
            except self._lock_transient_errors():
                token = self._acquire_after_reconnect(machine_id, ttl)
        except self._lock_errors() as exc:
            self._after_failed_acquire(machine_id)
            raise LockError(f"Locking machine {machine_id!r} failed: {exc}") from exc
        if token is None:
            return False
        self._held[machine_id] = token
        return True

    def _acquire_after_reconnect(self, machine_id: str, ttl: float) -> int | None:
        # A stale or killed connection (a pooler reset, a failover, a restarted server)
        # fails its first statement, and that attempt may even have committed. One look on
        # a fresh connection settles it, instead of failing the event for nothing.
        self._recover()
        info = self._lock_info(machine_id)
        if info is not None and info.owner == self.owner:
            # Ours: either the failed attempt landed (adopt it) or this instance already
            # held the lock before this call (lock() is not reentrant: denied).
            return None if self._held.get(machine_id) == info.token else info.token
        return self._acquire(machine_id, ttl)

    def _reconnecting(self, operation: Callable[..., T], *args: Any) -> T:
        """Run a lock operation; after a transient error, once more on a fresh connection."""
        try:
            return operation(*args)
        except self._lock_transient_errors():
            self._recover()
            return operation(*args)

    def _after_failed_acquire(self, machine_id: str) -> None:
        # The acquisition may have committed before its connection died. Nobody will call
        # unlock after a LockError, so release on a fresh connection rather than leave the
        # id blocked for a whole TTL. Best effort: the TTL is the fallback.
        self._recover()
        try:
            self._release(machine_id)
        except self._lock_errors():
            logger.warning("Could not release %r after a failed lock().", machine_id)

    def _ttl(self, ttl: float | datetime.timedelta | None) -> float:
        return self.lock_ttl if ttl is None else _seconds(ttl, "ttl")

    def lock(self, machine_id: str, ttl: float | datetime.timedelta | None = None) -> bool:
        """Acquire the lock; False (after a few short retries) if another owner holds it."""
        machine_id = validate_id(machine_id)
        seconds = self._ttl(ttl)
        for delay in self._lock_delays():
            if self._lock_attempt(machine_id, seconds):
                return True
            if delay is None:
                logger.debug("Lock on %r denied: held by another owner.", machine_id)
                return False
            logger.debug("Lock on %r busy; retrying in %.3f s.", machine_id, delay)
            time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    async def alock(self, machine_id: str, ttl: float | datetime.timedelta | None = None) -> bool:
        machine_id = validate_id(machine_id)
        seconds = self._ttl(ttl)
        attempt = sync_to_async(self._lock_attempt)
        for delay in self._lock_delays():
            if await attempt(machine_id, seconds):
                return True
            if delay is None:
                logger.debug("Lock on %r denied: held by another owner.", machine_id)
                return False
            logger.debug("Lock on %r busy; retrying in %.3f s.", machine_id, delay)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def _unlock_attempt(self, machine_id: str) -> bool:
        released = self._release(machine_id)
        self._held.pop(machine_id, None)
        return released

    def _unlock_failed(self, machine_id: str, exc: BaseException, last: bool) -> None:
        if last:
            logger.warning("Unlocking machine %r failed; leaving it to expire: %s", machine_id, exc)
        else:
            self._recover()

    def unlock(self, machine_id: str) -> bool:
        """Release this instance's lock: True if released or not held; False if another owns it.

        Storage errors never raise: a couple of quick retries, then False and a warning
        (the lock then expires by its TTL).
        """
        machine_id = validate_id(machine_id)
        for attempt in range(UNLOCK_ATTEMPTS):
            try:
                return self._unlock_attempt(machine_id)
            except self._lock_errors() as exc:
                self._unlock_failed(machine_id, exc, attempt == UNLOCK_ATTEMPTS - 1)
            if attempt < UNLOCK_ATTEMPTS - 1:
                time.sleep(UNLOCK_BACKOFF * (2**attempt))
        return False

    async def aunlock(self, machine_id: str) -> bool:
        machine_id = validate_id(machine_id)
        attempt_once = sync_to_async(self._unlock_attempt)
        failed = sync_to_async(self._unlock_failed)
        for attempt in range(UNLOCK_ATTEMPTS):
            try:
                return await attempt_once(machine_id)
            except self._lock_errors() as exc:
                await failed(machine_id, exc, attempt == UNLOCK_ATTEMPTS - 1)
            if attempt < UNLOCK_ATTEMPTS - 1:
                await asyncio.sleep(UNLOCK_BACKOFF * (2**attempt))
        return False

    def extend(self, machine_id: str, ttl: float | datetime.timedelta | None = None) -> bool:
        """Push the expiry of a lock this instance holds; False if it was lost (or never held)."""
        machine_id = validate_id(machine_id)
        seconds = self._ttl(ttl)
        token = self._held.get(machine_id)
        if token is None:
            return False
        try:
            extended = self._reconnecting(self._extend, machine_id, token, seconds)
        except self._lock_errors() as exc:
            self._recover()
            raise LockError(f"Extending the lock on {machine_id!r} failed: {exc}") from exc
        # A failed extend keeps the token: writes stay fenced until unlock().
        return extended

    async def aextend(self, machine_id: str, ttl: float | datetime.timedelta | None = None) -> bool:
        return await sync_to_async(self.extend)(machine_id, ttl)

    def lock_info(self, machine_id: str) -> LockInfo | None:
        """The live lock on ``machine_id`` (owner, token, acquired_at, expires_at), or None."""
        machine_id = validate_id(machine_id)
        try:
            return self._reconnecting(self._lock_info, machine_id)
        except self._lock_errors() as exc:
            self._recover()
            raise LockError(f"Reading the lock on {machine_id!r} failed: {exc}") from exc

    async def alock_info(self, machine_id: str) -> LockInfo | None:
        return await sync_to_async(self.lock_info)(machine_id)

    def force_unlock(self, machine_id: str) -> LockInfo | None:
        """Release the live lock on ``machine_id`` whoever holds it: an operator's tool.

        Returns the lock that was released (``expires_at`` is the moment of release), or
        None when none was live. As after an expiry, the holder's ``extend()`` returns
        False, and its writes fail with ``LockLost`` once another owner has taken the lock.
        Raises ``LockError`` when the lock storage fails.
        """
        machine_id = validate_id(machine_id)
        try:
            return self._reconnecting(self._force_release, machine_id)
        except self._lock_errors() as exc:
            self._recover()
            raise LockError(f"Force-releasing the lock on {machine_id!r} failed: {exc}") from exc

    def holds(self, machine_id: str) -> bool:
        """Whether this instance acquired the lock on ``machine_id`` and has not released it."""
        return machine_id in self._held

    def held_token(self, machine_id: str) -> int | None:
        """The fencing token of the lock this instance holds on ``machine_id``, if any."""
        return self._held.get(machine_id)

    def adopt(self, machine_id: str, token: int) -> None:
        """Carry on a lock that this owner acquired elsewhere (another request or process).

        For a stateless front end (the REST API) that hands the owner and the fencing token
        to its client: a new instance with the same ``owner`` that adopts the token writes
        fenced, extends and unlocks exactly as the instance that called ``lock()`` would.
        """
        machine_id = validate_id(machine_id)
        if isinstance(token, bool) or not isinstance(token, int) or token < 1:
            raise ValueError("token must be the positive fencing token that lock() issued.")
        self._held[machine_id] = token

    @contextmanager
    def locked(
        self, machine_id: str, ttl: float | datetime.timedelta | None = None
    ) -> Iterator[None]:
        """``with memory.locked(id):`` runs the block under the lock, or raises LockNotAcquired."""
        if not self.lock(machine_id, ttl):
            raise LockNotAcquired(machine_id)
        try:
            yield
        finally:
            self.unlock(machine_id)

    @asynccontextmanager
    async def alocked(
        self, machine_id: str, ttl: float | datetime.timedelta | None = None
    ) -> AsyncIterator[None]:
        if not await self.alock(machine_id, ttl):
            raise LockNotAcquired(machine_id)
        try:
            yield
        finally:
            await self.aunlock(machine_id)

    # -- cleanup ----------------------------------------------------------------------

    def cleanup(
        self,
        machine_id: str,
        data: dict[str, Any] | None,
        prev_data: dict[str, Any] | None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        """Arvo's hook after the final write: delete the state (CLEANUP="delete"), then unlock.

        The delete is a compare-and-set against ``data``, the state just written: if anyone
        wrote since, ``WriteConflict`` is raised and the state is kept. The lock is released
        either way.
        """
        machine_id = validate_id(machine_id)
        if metadata is not None:
            resolve_metadata(data or {}, metadata, machine_id)
        try:
            if self.cleanup_mode == "delete":
                self._delete_state(machine_id, data)
        finally:
            self.unlock(machine_id)

    def _delete_state(self, machine_id: str, data: dict[str, Any] | None) -> None:
        token = self._held.get(machine_id)
        try:
            if data is None:
                expected = self._current_version(machine_id)
            else:
                expected = self._expected_version(machine_id, data)[0]
            if expected is None or self._remove(machine_id, expected, token):
                if data is not None:
                    self._forget(machine_id, data)
                return
            if self._current_version(machine_id) is None:
                return  # already gone
        except self.storage_errors as exc:
            raise WriteError(f"Deleting machine {machine_id!r} failed: {exc}") from exc
        self._raise_rejected(machine_id, expected, token)

    def delete(self, machine_id: str, prev_data: dict[str, Any] | None = None) -> None:
        """Delete the state if it is still the one ``prev_data`` was read from.

        ``prev_data`` None: whatever version is stored. Nothing stored: nothing to do.
        Fenced like ``write`` (``LockLost``); a stale ``prev_data`` raises ``WriteConflict``
        and deletes nothing. Unlike ``cleanup`` it leaves locks alone.
        """
        machine_id = validate_id(machine_id)
        if prev_data is not None and not isinstance(prev_data, dict):
            raise InvalidState(
                "prev_data must be the dict read() returned (or an equal dict), or None; "
                f"got {type(prev_data).__name__}."
            )
        self._delete_state(machine_id, prev_data)

    async def acleanup(
        self,
        machine_id: str,
        data: dict[str, Any] | None,
        prev_data: dict[str, Any] | None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        await sync_to_async(self.cleanup)(machine_id, data, prev_data, metadata)

    def close(self) -> None:
        """Close connections this instance opened for itself."""


class MachineMemory(BaseMachineMemory):
    """State in ``MachineState`` rows of one database; locks in the configured backend."""

    def __init__(
        self,
        using: str | None = None,
        lock_backend: str | type[LockBackend] | LockBackend | None = None,
        lock_ttl: float | datetime.timedelta | None = None,
        owner: str | None = None,
        **options: Any,
    ) -> None:
        from django.db import DatabaseError, InterfaceError, OperationalError, connections

        from machine_memory.locks import backend_class
        from machine_memory.locks.base import LockBackend
        from machine_memory.sql import dialect_for

        super().__init__(lock_ttl=lock_ttl, owner=owner, **options)
        self.using = conf.DATABASE if using is None else using
        if self.using not in connections:
            raise MachineMemoryError(
                f"Database alias {self.using!r} is not in settings.DATABASES; "
                "set MACHINE_MEMORY['DATABASE'] or pass using=."
            )
        self._connections = connections
        # The vendor is known from ENGINE without connecting.
        self.dialect = dialect_for(connections[self.using])
        self.storage_errors = (DatabaseError,)
        self.transient_errors = (OperationalError, InterfaceError)
        backend = conf.LOCK_BACKEND if lock_backend is None else lock_backend
        if isinstance(backend, LockBackend):
            self.locks = backend
        else:
            cls = backend_class(backend) if isinstance(backend, str) else backend
            self.locks = cls(database=self.using)

    def __repr__(self) -> str:
        return (
            f"<MachineMemory using={self.using!r} locks={type(self.locks).__name__} "
            f"owner={self.owner!r}>"
        )

    def _connection(self) -> BaseDatabaseWrapper:
        return self._connections[self.using]

    def _fence(self, machine_id: str, token: int | None) -> Fence:
        if token is None:
            return NO_FENCE
        # A backend that asks its own storage (Redis) before the write may fail there. The
        # check only reads, so one more try on a fresh connection is safe; after that the
        # write raises WriteError (not LockError: it is write() that failed), before the
        # database statement, so nothing was stored.
        try:
            try:
                return self.locks.fence(machine_id, self.owner, token)
            except self.locks.transient_errors:
                self.locks.recover()
                return self.locks.fence(machine_id, self.owner, token)
        except self.locks.errors as exc:
            raise WriteError(
                f"Writing machine {machine_id!r} failed: the lock on it could not be checked: {exc}"
            ) from exc

    def _load(self, machine_id: str) -> Stored | None:
        connection = self._connections[self.using]
        with connection.wrap_database_errors:
            return self.dialect.read(cursor_for(connection), machine_id)

    def _store(
        self,
        machine_id: str,
        text: str,
        expected_version: int | None,
        meta: Metadata | None,
        token: int | None,
    ) -> bool:
        fence = self._fence(machine_id, token)
        connection = self._connections[self.using]
        with connection.wrap_database_errors:
            cursor = cursor_for(connection)
            if expected_version is None:
                assert meta is not None  # a new row always gets its metadata
                return self.dialect.insert_state(cursor, machine_id, text, meta, fence)
            return self.dialect.update_state(
                cursor, machine_id, text, expected_version, meta, fence
            )

    def _remove(self, machine_id: str, expected_version: int, token: int | None) -> bool:
        fence = self._fence(machine_id, token)
        connection = self._connections[self.using]
        with connection.wrap_database_errors:
            return self.dialect.delete_state(
                cursor_for(connection), machine_id, expected_version, fence
            )

    def _lock_lost(self, machine_id: str, token: int) -> bool:
        return self.locks.is_lost(machine_id, self.owner, token)

    def _lock_errors(self) -> tuple[type[BaseException], ...]:
        return self.locks.errors

    def _lock_transient_errors(self) -> tuple[type[BaseException], ...]:
        return self.locks.transient_errors

    def _acquire(self, machine_id: str, ttl: float) -> int | None:
        return self.locks.acquire(machine_id, self.owner, ttl)

    def _release(self, machine_id: str) -> bool:
        return self.locks.release(machine_id, self.owner)

    def _extend(self, machine_id: str, token: int, ttl: float) -> bool:
        return self.locks.extend(machine_id, self.owner, token, ttl)

    def _lock_info(self, machine_id: str) -> LockInfo | None:
        return self.locks.info(machine_id)

    def _force_release(self, machine_id: str) -> LockInfo | None:
        return self.locks.force_release(machine_id)

    def _in_transaction(self) -> bool:
        return self._connection().in_atomic_block

    def _recover(self) -> None:
        connection = self._connection()
        if not connection.in_atomic_block:
            connection.close()
        self.locks.recover()

    def close(self) -> None:
        self.locks.close()

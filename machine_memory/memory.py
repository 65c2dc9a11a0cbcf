"""``MachineMemory``: Arvo's ``read / write / lock / unlock`` contract over a state store
and a lock backend.

The contract itself lives here once (validation, versions, retries, fencing, what each
error means); storage is composed in: ``stores`` for states, ``locks`` for locks
(docs/contract.md, docs/design.md#one-machinememory-two-parts).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import secrets
import socket
import time
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from asgiref.sync import sync_to_async

from machine_memory.conf import RULES, conf
from machine_memory.exceptions import (
    InvalidState,
    LockError,
    LockLost,
    LockNotAcquired,
    MachineMemoryError,
    ReadError,
    WriteConflict,
    WriteError,
    WriteOutcomeUnknown,
)
from machine_memory.locks.base import NO_FENCE, LockBackend
from machine_memory.retry import Backoff
from machine_memory.stores.base import NothingSent
from machine_memory.telemetry import note, observed
from machine_memory.validation import (
    decode_state,
    encode_state,
    json_equal,
    resolve_metadata,
    validate_id,
    validate_owner,
)
from machine_memory.versions import VersionMemo

if TYPE_CHECKING:
    import datetime
    from collections.abc import AsyncIterator, Callable, Iterator, Mapping

    from machine_memory.locks.base import Fence, LockInfo
    from machine_memory.stores.base import StateStore, Stored
    from machine_memory.validation import Metadata

logger = logging.getLogger("machine_memory")

T = TypeVar("T")

# read gives up within this many seconds, whatever READ_RETRIES says.
READ_DEADLINE = 1.0
# unlock never raises for storage errors: a couple of quick retries, then False.
UNLOCK_ATTEMPTS = 3
UNLOCK_BACKOFF = 0.02
# lock(): each pause is scaled by a random factor within ±10%, so that workers denied
# together do not retry together.
LOCK_JITTER = 0.1
# overwrite(create=True): a state can be created or deleted by an unfenced writer between
# the look and the change; after this many rounds the last WriteConflict is raised.
CREATE_OR_OVERWRITE_ATTEMPTS = 3


class Locked(NamedTuple):
    """A lock just acquired, with the state read under it (``lock_and_read``)."""

    machine_id: str
    token: int
    # The state as read (None: no state yet), its version and its metadata columns.
    state: dict[str, Any] | None
    version: int | None
    meta: Metadata | None
    # The lock's owner and times: from the acquiring statement where it returned them
    # (no query), else read from the lock backend (which may raise LockError).
    lock_info: Callable[[], LockInfo | None]


class Session:
    """One event's cycle under a lock: ``s.state`` as read, ``s.write()`` stores and releases.

    Made by ``MachineMemory.session()``; ``AsyncSession`` is its twin for ``asession()``.
    """

    def __init__(self, memory: MachineMemory, locked: Locked) -> None:
        self._memory = memory
        self._locked = locked
        self.written = False

    @property
    def machine_id(self) -> str:
        return self._locked.machine_id

    @property
    def state(self) -> dict[str, Any] | None:
        """The state read under the lock (None for a new machine); pass ``write`` a new dict."""
        return self._locked.state

    @property
    def version(self) -> int | None:
        return self._locked.version

    @property
    def token(self) -> int:
        """The fencing token of the session's lock."""
        return self._locked.token

    def _check_open(self) -> None:
        if self.written:
            raise MachineMemoryError(
                f"This session on {self.machine_id!r} has written already and its lock is "
                "released; open a new session for the next event."
            )

    def write(self, data: dict[str, Any], metadata: Mapping[str, Any] | None = None) -> None:
        """Store ``data`` over the state read, fenced, and release the lock (see ``write``)."""
        self._check_open()
        self._memory._session_write(self.machine_id, self._locked, data, metadata)
        self.written = True


class AsyncSession(Session):
    async def write(  # type: ignore[override]
        self, data: dict[str, Any], metadata: Mapping[str, Any] | None = None
    ) -> None:
        self._check_open()
        await sync_to_async(self._memory._session_write)(
            self.machine_id, self._locked, data, metadata
        )
        self.written = True


def default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def _version_argument(version: object) -> int | None:
    if version is None:
        return None
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version < 2**63:
        raise ValueError(f"version must be a positive int (a stored version); got {version!r}.")
    return version


def _prev_data_argument(prev_data: object, *, create_hint: bool) -> None:
    if prev_data is not None and not isinstance(prev_data, dict):
        raise InvalidState(
            "prev_data must be the dict read() returned (or an equal dict), or None"
            + (" to create the state" if create_hint else "")
            + f"; got {type(prev_data).__name__}."
        )


def _wrote(row: Stored | None, data: dict[str, Any], expected: int | None) -> bool | None:
    """Whether the row shows that a write of ``data`` over ``expected`` landed; None: can't tell.

    Versions only move forward, so the next version with our content is ours, the old
    version means ours did not land, and anything further on could be either.
    """
    target = 1 if expected is None else expected + 1
    if row is None:
        # Never created, or deleted since by someone who saw ours: the row cannot tell.
        return None
    if row.version == target:
        # Only one compare-and-set can take ``expected`` to ``target``.
        return json_equal(decode_state(row.document), data)
    if row.version == expected:
        return False
    return None


def _deleted(row: Stored | None, expected: int) -> bool | None:
    if row is None:
        return True
    return False if row.version == expected else None


class MachineMemory:
    """Machine states in a state store, execution locks in a lock backend.

    ``MachineMemory()`` takes everything from ``settings.MACHINE_MEMORY``: states in the
    ``DATABASE`` alias, locks in ``LOCK_BACKEND``. ``store=`` composes another store.
    """

    def __init__(
        self,
        using: str | None = None,
        lock_backend: str | type[LockBackend] | LockBackend | None = None,
        lock_ttl: float | datetime.timedelta | None = None,
        owner: str | None = None,
        *,
        store: StateStore | None = None,
        lock_retries: int | None = None,
        lock_backoff: float | None = None,
        read_retries: int | None = None,
        read_backoff: float | None = None,
        max_state_bytes: int | None = None,
        cleanup: str | None = None,
    ) -> None:
        # Every value through the rule of its setting (conf.RULES), like the settings.
        self.lock_ttl: float = conf.option("LOCK_TTL", lock_ttl, "lock_ttl")
        self.lock_retries: int = conf.option("LOCK_RETRIES", lock_retries, "lock_retries")
        self.lock_backoff: float = conf.option("LOCK_BACKOFF", lock_backoff, "lock_backoff")
        self.read_retries: int = conf.option("READ_RETRIES", read_retries, "read_retries")
        self.read_backoff: float = conf.option("READ_BACKOFF", read_backoff, "read_backoff")
        self.max_state_bytes: int = conf.option(
            "MAX_STATE_BYTES", max_state_bytes, "max_state_bytes"
        )
        self.cleanup_mode: str = conf.option("CLEANUP", cleanup, "cleanup")
        self.owner = validate_owner(default_owner() if owner is None else owner)
        if store is None:
            from machine_memory.stores.database import DatabaseStateStore

            store = DatabaseStateStore(conf.DATABASE if using is None else using)
        elif using is not None:
            raise ValueError("Pass using= (a database alias) or store=, not both.")
        self.store = store
        self.locks = self._lock_backend(conf.LOCK_BACKEND if lock_backend is None else lock_backend)
        # Locks this instance acquired and has not released: id -> fencing token.
        self._held: dict[str, int] = {}
        self._versions = VersionMemo()
        # Whether lock + read and write + release can each be one round trip: the lock rows
        # live beside the states, and the store combines their statements.
        self._combined = self.locks.fences_in_store and self.store.combines_lock_statements

    def _lock_backend(self, backend: str | type[LockBackend] | LockBackend) -> LockBackend:
        from machine_memory.locks import backend_class

        if isinstance(backend, LockBackend):
            locks = backend
        else:
            cls = backend_class(backend) if isinstance(backend, str) else backend
            locks = cls(database=self.store.using)
        if locks.fences_in_store and not self.store.shares_locks_with(locks):
            raise MachineMemoryError(
                f"{type(locks).__name__} fences writes through lock rows beside the states, "
                f"but they are not in {self.store!r}; use a lock backend of the same storage."
            )
        return locks

    def __repr__(self) -> str:
        return (
            f"<MachineMemory store={self.store!r} locks={type(self.locks).__name__} "
            f"owner={self.owner!r}>"
        )

    @property
    def using(self) -> str:
        """The database alias of the states, for the ORM-based tools (admin, API, commands)."""
        if self.store.using is None:
            raise MachineMemoryError(f"{self.store!r} keeps its states outside Django's databases.")
        return self.store.using

    def _recover(self) -> None:
        """Replace connections after a transient error."""
        self.store.recover()
        self.locks.recover()

    # -- read -------------------------------------------------------------------------

    def _read_backoff(self) -> Backoff:
        # No retry inside the caller's transaction: it died with the connection.
        return Backoff(
            self.read_retries,
            self.read_backoff,
            deadline=READ_DEADLINE,
            stop=self.store.in_transaction,
        )

    def _read_once(self, machine_id: str) -> dict[str, Any] | None:
        row = self.store.load(machine_id)
        if row is None:
            note("missing")
            return None
        note("found", version=row.version, text=row.document)
        data = decode_state(row.document)
        self._versions.remember(machine_id, data, row.version, row.meta)
        return data

    def _read_failed(self, machine_id: str, exc: BaseException) -> ReadError:
        return ReadError(f"Reading machine {machine_id!r} failed: {exc}")

    @observed("read")
    def read(self, machine_id: str) -> dict[str, Any] | None:
        """The stored state (a fresh dict each call), or None when there is none yet."""
        machine_id = validate_id(machine_id)
        backoff = self._read_backoff()
        for attempt in itertools.count(1):
            note(attempts=attempt)
            try:
                return self._read_once(machine_id)
            except self.store.transient_errors as exc:
                pause = next(backoff)
                if pause is None:
                    raise self._read_failed(machine_id, exc) from exc
                self._recover()
                time.sleep(pause)
            except self.store.errors as exc:
                raise self._read_failed(machine_id, exc) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    @observed("read")
    async def aread(self, machine_id: str) -> dict[str, Any] | None:
        machine_id = validate_id(machine_id)
        read_once = sync_to_async(self._read_once)
        backoff = self._read_backoff()
        for attempt in itertools.count(1):
            note(attempts=attempt)
            try:
                return await read_once(machine_id)
            except self.store.transient_errors as exc:
                pause = next(backoff)
                if pause is None:
                    raise self._read_failed(machine_id, exc) from exc
                await sync_to_async(self._recover)()
                await asyncio.sleep(pause)
            except self.store.errors as exc:
                raise self._read_failed(machine_id, exc) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def version_of(self, machine_id: str, data: object) -> int | None:
        """The stored version of ``data``, an object ``read()`` returned or ``write()`` stored.

        None for any other object. For front ends that expose versions (the REST API's
        ETags): the version comes from the same statement as the content, so a
        compare-and-set against it can never pass for content read at another version.
        """
        seen = self._versions.lookup(validate_id(machine_id), data)
        return None if seen is None else seen[0]

    # -- write ------------------------------------------------------------------------

    @observed("write")
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
        _prev_data_argument(prev_data, create_hint=True)
        expected: int | None = None
        changed: Metadata | None = meta
        if prev_data is not None:
            expected, stored_meta = self._expected_version(machine_id, prev_data)
            if stored_meta == meta:
                changed = None  # leave the indexed columns alone (see Dialect.update_state)
        self._compare_and_set(machine_id, data, text, expected, changed)
        if prev_data is not None:
            self._versions.forget(machine_id, prev_data)
        self._written(machine_id, data, 1 if expected is None else expected + 1, meta)

    def _compare_and_set(
        self,
        machine_id: str,
        data: dict[str, Any],
        text: str,
        expected: int | None,
        changed: Metadata | None,
    ) -> None:
        """Create (``expected`` None) or update version ``expected``, fenced, in one statement.

        ``changed``: the metadata columns to set (None: leave them; a create sets them).
        """
        token = self._held.get(machine_id)
        note(fencing_token=token, expected_version=expected, text=text)
        fence = self._fence(machine_id, token)
        try:
            if expected is None:
                assert changed is not None
                stored = self.store.insert(machine_id, text, changed, fence)
            else:
                stored = self.store.update(machine_id, text, expected, changed, fence)
        except NothingSent as exc:
            raise self._not_sent("Writing", machine_id, exc) from exc.__cause__
        except self.store.transient_errors as exc:
            self._settle(machine_id, exc, lambda row: _wrote(row, data, expected))
            stored = True
        except self.store.errors as exc:
            raise WriteError(f"Writing machine {machine_id!r} failed: {exc}") from exc
        if not stored:
            self._raise_rejected(machine_id, expected, token)

    def _written(
        self,
        machine_id: str,
        data: dict[str, Any],
        version: int,
        meta: Metadata,
        *,
        inside: bool | None = None,
    ) -> None:
        """Note a landed write and remember ``data``'s version. ``inside``: whether the
        caller's transaction is open, if the caller has just asked the store."""
        note("written", version=version)
        # Inside the caller's transaction the new version may still be rolled back; a later
        # write from `data` then falls back to the content compare, which is always right.
        if inside is None:
            inside = self.store.in_transaction()
        if not inside:
            self._versions.remember(machine_id, data, version, meta)

    def _expected_version(self, machine_id: str, prev_data: dict[str, Any]) -> tuple[int, Metadata]:
        """The version (and its metadata) that ``prev_data`` stands for."""
        seen = self._versions.lookup(machine_id, prev_data)
        if seen is not None:
            return seen
        # Not an object read() handed out here: accept it if it equals the stored state,
        # and then compare-and-set against the version that was compared. The version
        # check of the write closes the gap between the two statements, so no row lock
        # (and, on SQLite, no read-to-write lock upgrade) is needed.
        try:
            row = self.store.load(machine_id)
        except self.store.errors as exc:
            raise WriteError(f"Writing machine {machine_id!r} failed: {exc}") from exc
        if row is None:
            raise WriteConflict(
                machine_id,
                None,
                None,
                f"Machine {machine_id!r} has no stored state, but prev_data was given; "
                "pass prev_data=None to create it.",
            )
        if not json_equal(decode_state(row.document), prev_data):
            raise WriteConflict(
                machine_id,
                None,
                row.version,
                f"Machine {machine_id!r}: prev_data is neither the object read() returned nor "
                f"equal to the stored state (version {row.version}). Read again and retry.",
            )
        return row.version, row.meta

    @observed("overwrite")
    def overwrite(
        self,
        machine_id: str,
        data: dict[str, Any],
        *,
        version: int | None = None,
        metadata: Mapping[str, Any] | None = None,
        create: bool = False,
    ) -> int:
        """Store ``data`` over whatever version is stored (or only over ``version``).

        Without ``version``: reads the version and writes under the row's lock in one
        transaction, so it never loses to a concurrent writer. With ``version``: one
        compare-and-set. Fenced like ``write``. Returns the new version.
        No state stored, or another version than ``version``: ``WriteConflict``, unless
        ``create`` asks to create the state then (version 1 is returned).
        """
        machine_id = validate_id(machine_id)
        text = encode_state(data, self.max_state_bytes)
        meta = resolve_metadata(data, metadata, machine_id)
        version = _version_argument(version)
        if create and version is not None:
            raise ValueError("create=True stores over whatever version exists; pass no version.")
        note(text=text)
        if version is not None:
            # The version is pinned: one conditional UPDATE decides, no row lock needed.
            self._compare_and_set(machine_id, data, text, version, meta)
            self._written(machine_id, data, version + 1, meta)
            return version + 1
        for attempt in range(CREATE_OR_OVERWRITE_ATTEMPTS):
            changed = self._change_locked_row(
                machine_id,
                None,
                "overwrite",
                lambda current, fence: self.store.update(machine_id, text, current, meta, fence),
                lambda row, current: _wrote(row, data, current),
                missing_ok=create,
            )
            if changed is not None:
                self._written(machine_id, data, changed + 1, meta)
                return changed + 1
            try:
                self._compare_and_set(machine_id, data, text, None, meta)
            except LockLost:
                raise
            except WriteConflict:
                # Created by another writer since the look: overwrite that one, a few times.
                if attempt + 1 == CREATE_OR_OVERWRITE_ATTEMPTS:
                    raise
                continue
            self._written(machine_id, data, 1, meta)
            return 1
        raise AssertionError("unreachable")  # pragma: no cover

    def _change_locked_row(
        self,
        machine_id: str,
        wanted: int | None,
        verb: str,
        change: Callable[[int, Fence], bool],
        landed: Callable[[Stored | None, int], bool | None],
        *,
        missing_ok: bool = False,
    ) -> int | None:
        """Read the row's version under its lock and ``change`` it, in one transaction.

        Returns the version that was changed; None when there was no row and
        ``missing_ok`` (with no ``wanted`` version). The fence is asked for only once there
        is a row to change, so every lock backend answers a missing state alike.
        """
        token = self._held.get(machine_id)
        # Set once the change went through inside the block: leaving it sends the COMMIT.
        committing: int | None = None
        try:
            with self.store.row_locked(machine_id) as current:
                if current is None and missing_ok and wanted is None:
                    return None
                self._check_current(machine_id, current, wanted, verb)
                assert current is not None
                note(fencing_token=token, expected_version=current)
                if not change(current, self._fence(machine_id, token)):
                    self._raise_rejected(machine_id, current, token)
                committing = current
        except self.store.transient_errors as exc:
            if committing is None:
                # The transaction was never asked to commit, so it cannot have. Its server
                # session may still be waiting for the row lock, though, and would then
                # hold it in a transaction nobody ends: end it, as far as that goes.
                self._end_lost_session_quietly()
                raise WriteError(
                    f"Could not {verb} machine {machine_id!r}: {exc}. Nothing was stored."
                ) from exc
            version = committing
            self._settle(machine_id, exc, lambda row: landed(row, version))
        except self.store.errors as exc:
            raise WriteError(f"Could not {verb} machine {machine_id!r}: {exc}") from exc
        return committing

    @staticmethod
    def _check_current(machine_id: str, current: int | None, wanted: int | None, verb: str) -> None:
        if current is None:
            raise WriteConflict(
                machine_id,
                wanted,
                None,
                f"Machine {machine_id!r} has no state to {verb}"
                + ("; create it with write(id, data, None)." if verb == "overwrite" else "."),
            )
        if wanted is not None and current != wanted:
            raise WriteConflict(machine_id, wanted, current)

    def _fence(self, machine_id: str, token: int | None) -> Fence:
        """What a write by this instance must still find true (nothing without a lock)."""
        if token is None:
            return NO_FENCE
        # A backend that asks its own storage (Redis) before the write may fail there. The
        # check only reads, so one more try on a fresh connection is safe; after that the
        # write raises WriteError (not LockError: it is write() that failed), before the
        # state statement, so nothing was stored.
        try:
            try:
                return self.locks.fence(machine_id, self.owner, token)
            except self.locks.transient_errors:
                self.locks.recover()
                return self.locks.fence(machine_id, self.owner, token)
        except self.locks.errors as exc:
            raise WriteError(
                f"Writing machine {machine_id!r} failed: the lock on it could not be checked: "
                f"{exc}. Nothing was stored."
            ) from exc

    @staticmethod
    def _not_sent(verb: str, machine_id: str, exc: NothingSent) -> WriteError:
        return WriteError(
            f"{verb} machine {machine_id!r} failed: the storage could not be reached ({exc}). "
            "Nothing was stored."
        )

    def _settle(
        self, machine_id: str, exc: BaseException, landed: Callable[[Stored | None], bool | None]
    ) -> None:
        """The connection died mid-write: return if the write landed, else raise why not.

        Before looking, the store ends the dead connection's server session and confirms it
        is gone, so that a statement still running there cannot land after the look
        (docs/contract.md#when-the-connection-dies).
        """
        failed = f"Writing machine {machine_id!r} failed: {exc}"
        if self.store.in_transaction():
            # The caller's transaction is gone with the connection: nothing can commit.
            self._end_lost_session_quietly()
            raise WriteError(f"{failed}. Nothing was stored.") from exc
        if self.store.failures_are_final:
            self.store.recover()
            raise WriteError(f"{failed}. Nothing was stored.") from exc
        try:
            ended = self.store.end_lost_session()
            row = self.store.load(machine_id)
        except self.store.errors as check:
            raise WriteOutcomeUnknown(
                machine_id,
                f"{failed}, and whether it was stored could not be checked: {check}. Read the "
                "state before you retry.",
            ) from exc
        verdict = landed(row)
        if verdict:
            logger.info("Write to %r landed although its connection failed.", machine_id)
            return
        if verdict is False and ended:
            raise WriteError(f"{failed}. Nothing was stored.") from exc
        if verdict is False:
            why = "the server session that ran it could not be confirmed ended"
        elif row is None:
            why = "there is no state now: never created, or deleted since"
        else:
            why = f"the state has moved on to version {row.version}"
        raise WriteOutcomeUnknown(
            machine_id,
            f"{failed}, and whether it was stored cannot be told ({why}). Read the state "
            "before you retry.",
        ) from exc

    def _end_lost_session_quietly(self) -> None:
        try:
            if not self.store.end_lost_session():
                logger.warning("A failed statement's server session could not be ended.")
        except self.store.errors as exc:
            logger.warning("Could not end a failed statement's server session: %s", exc)

    def _raise_rejected(self, machine_id: str, expected: int | None, token: int | None) -> None:
        try:
            actual = self._current_version(machine_id)
            # The token stays in _held: until this instance unlocks, every later write to the
            # id must keep failing, not slip through as an unfenced write. An update refused
            # although the version still matched was refused by its fence: a higher token
            # has written the row (with Redis locks, also when Redis has since forgotten
            # that takeover, as after a failover).
            fenced_out = expected is not None and actual == expected
            if token is not None and (
                fenced_out or self.locks.is_lost(machine_id, self.owner, token)
            ):
                raise LockLost(
                    machine_id,
                    expected,
                    actual,
                    f"Machine {machine_id!r}: this worker's lock (token {token}) was taken "
                    "over by another owner; nothing was written. Drop the event; it will be "
                    "redelivered.",
                )
        except (*self.store.errors, *self.locks.errors) as exc:
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
        row = self.store.load(machine_id)
        return None if row is None else row.version

    async def awrite(
        self,
        machine_id: str,
        data: dict[str, Any],
        prev_data: dict[str, Any] | None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        await sync_to_async(self.write)(machine_id, data, prev_data, metadata)

    # -- delete and cleanup -----------------------------------------------------------

    @observed("delete")
    def delete(
        self,
        machine_id: str,
        prev_data: dict[str, Any] | None = None,
        *,
        version: int | None = None,
    ) -> None:
        """Delete the state if it is still the one ``prev_data`` was read from.

        ``prev_data`` and ``version`` None: whatever version is stored (nothing stored:
        nothing to do); ``version``: only that version. Fenced like ``write``
        (``LockLost``); a stale ``prev_data`` or ``version`` raises ``WriteConflict`` and
        deletes nothing. Unlike ``cleanup`` it leaves locks alone.
        """
        machine_id = validate_id(machine_id)
        _prev_data_argument(prev_data, create_hint=False)
        version = _version_argument(version)
        if prev_data is not None and version is not None:
            raise ValueError("Pass prev_data or version, not both.")
        self._delete_state(machine_id, prev_data, version)

    def _delete_state(
        self, machine_id: str, prev_data: dict[str, Any] | None, version: int | None
    ) -> None:
        if prev_data is None:
            self._delete_current(machine_id, version)
            return
        expected = self._expected_version(machine_id, prev_data)[0]
        # Fenced after the version is known, as in write(): a missing state is a
        # WriteConflict with every lock backend.
        token = self._held.get(machine_id)
        note(fencing_token=token, expected_version=expected)
        fence = self._fence(machine_id, token)
        try:
            deleted = self.store.delete(machine_id, expected, fence)
        except NothingSent as exc:
            raise self._not_sent("Deleting", machine_id, exc) from exc.__cause__
        except self.store.transient_errors as exc:
            self._settle(machine_id, exc, lambda row: _deleted(row, expected))
            deleted = True
        except self.store.errors as exc:
            raise WriteError(f"Deleting machine {machine_id!r} failed: {exc}") from exc
        if deleted:
            note("deleted")
            self._versions.forget(machine_id, prev_data)
            return
        try:
            gone = self._current_version(machine_id) is None
        except self.store.errors as exc:
            raise WriteError(f"Deleting machine {machine_id!r} failed: {exc}") from exc
        if not gone:
            self._raise_rejected(machine_id, expected, token)
        note("missing")

    def _delete_current(self, machine_id: str, version: int | None) -> None:
        """Delete whatever version is stored (or ``version``), under the row's lock."""
        deleted = self._change_locked_row(
            machine_id,
            version,
            "delete",
            lambda current, fence: self.store.delete(machine_id, current, fence),
            _deleted,
            missing_ok=True,
        )
        note("missing" if deleted is None else "deleted")

    @observed("cleanup")
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
                self._delete_state(machine_id, data, None)
            else:
                note("kept")
        finally:
            self.unlock(machine_id)

    async def acleanup(
        self,
        machine_id: str,
        data: dict[str, Any] | None,
        prev_data: dict[str, Any] | None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        await sync_to_async(self.cleanup)(machine_id, data, prev_data, metadata)

    # -- locks ------------------------------------------------------------------------

    def _ttl(self, ttl: float | datetime.timedelta | None) -> float:
        if ttl is None:
            return self.lock_ttl
        seconds: float = RULES["LOCK_TTL"].clean(ttl, "ttl")
        return seconds

    def _lock_backoff(self) -> Backoff:
        return Backoff(self.lock_retries, self.lock_backoff, jitter=LOCK_JITTER)

    def _lock_once(self, machine_id: str, ttl: float) -> bool:
        try:
            try:
                token = self.locks.acquire(machine_id, self.owner, ttl)
            except self.locks.transient_errors:
                token = self._acquire_after_failure(machine_id, ttl)
        except self.locks.errors as exc:
            self._release_after_failed_acquire(machine_id)
            raise LockError(f"Locking machine {machine_id!r} failed: {exc}") from exc
        if token is None:
            return False
        self._held[machine_id] = token
        note(fencing_token=token)
        return True

    def _acquire_after_failure(self, machine_id: str, ttl: float) -> int | None:
        # A stale or killed connection (a pooler reset, a failover, a restarted server)
        # fails its first statement, and that attempt may even have committed. One look on
        # a fresh connection settles it, instead of failing the event for nothing.
        self.store.recover()
        self.locks.end_lost_session()
        info = self.locks.info(machine_id)
        if info is not None and info.owner == self.owner:
            # Ours: either the failed attempt landed (adopt it) or this instance already
            # held the lock before this call (lock() is not reentrant: denied).
            return None if self._held.get(machine_id) == info.token else info.token
        return self.locks.acquire(machine_id, self.owner, ttl)

    def _release_after_failed_acquire(self, machine_id: str) -> None:
        # The acquisition may have committed before its connection died. Nobody will call
        # unlock after a LockError, so release on a fresh connection rather than leave the
        # id blocked for a whole TTL. Best effort: the TTL is the fallback.
        self._recover()
        try:
            self.locks.release(machine_id, self.owner)
        except self.locks.errors:
            logger.warning("Could not release %r after a failed lock().", machine_id)

    @observed("lock")
    def lock(self, machine_id: str, ttl: float | datetime.timedelta | None = None) -> bool:
        """Acquire the lock; False (after a few short retries) if another owner holds it."""
        machine_id = validate_id(machine_id)
        seconds = self._ttl(ttl)
        backoff = self._lock_backoff()
        for attempt in itertools.count(1):
            if self._lock_once(machine_id, seconds):
                note("acquired", attempts=attempt, ttl=seconds)
                return True
            pause = next(backoff)
            if pause is None:
                note("denied", attempts=attempt)
                logger.debug("Lock on %r denied: held by another owner.", machine_id)
                return False
            logger.debug("Lock on %r busy; retrying in %.3f s.", machine_id, pause)
            time.sleep(pause)
        raise AssertionError("unreachable")  # pragma: no cover

    @observed("lock")
    async def alock(self, machine_id: str, ttl: float | datetime.timedelta | None = None) -> bool:
        machine_id = validate_id(machine_id)
        seconds = self._ttl(ttl)
        lock_once = sync_to_async(self._lock_once)
        backoff = self._lock_backoff()
        for attempt in itertools.count(1):
            if await lock_once(machine_id, seconds):
                note("acquired", attempts=attempt, ttl=seconds)
                return True
            pause = next(backoff)
            if pause is None:
                note("denied", attempts=attempt)
                logger.debug("Lock on %r denied: held by another owner.", machine_id)
                return False
            logger.debug("Lock on %r busy; retrying in %.3f s.", machine_id, pause)
            await asyncio.sleep(pause)
        raise AssertionError("unreachable")  # pragma: no cover

    def _unlock_once(self, machine_id: str) -> bool:
        released = self.locks.release(machine_id, self.owner)
        token = self._held.pop(machine_id, None)
        if not released:
            note("refused", fencing_token=token)
        elif token is None:
            note("not_held")
        else:
            note("released", fencing_token=token, released=True)
        return released

    def _unlock_failed(self, machine_id: str, exc: BaseException, last: bool) -> None:
        if last:
            note("failed")
            logger.warning("Unlocking machine %r failed; leaving it to expire: %s", machine_id, exc)
        else:
            self._recover()

    @observed("unlock")
    def unlock(self, machine_id: str) -> bool:
        """Release this instance's lock: True if released or not held; False if another owns it.

        Storage errors never raise: a couple of quick retries, then False and a warning
        (the lock then expires by its TTL).
        """
        machine_id = validate_id(machine_id)
        backoff = Backoff(UNLOCK_ATTEMPTS - 1, UNLOCK_BACKOFF)
        while True:
            try:
                return self._unlock_once(machine_id)
            except self.locks.errors as exc:
                pause = next(backoff)
                self._unlock_failed(machine_id, exc, last=pause is None)
            if pause is None:
                return False
            time.sleep(pause)

    @observed("unlock")
    async def aunlock(self, machine_id: str) -> bool:
        machine_id = validate_id(machine_id)
        unlock_once = sync_to_async(self._unlock_once)
        failed = sync_to_async(self._unlock_failed)
        backoff = Backoff(UNLOCK_ATTEMPTS - 1, UNLOCK_BACKOFF)
        while True:
            try:
                return await unlock_once(machine_id)
            except self.locks.errors as exc:
                pause = next(backoff)
                await failed(machine_id, exc, pause is None)
            if pause is None:
                return False
            await asyncio.sleep(pause)

    def _reconnecting(self, what: str, operation: Callable[..., T], *args: Any) -> T:
        """Run a lock operation, once more on a fresh connection after a transient error;
        a storage failure raises ``LockError`` (``what`` names the operation)."""
        try:
            try:
                return operation(*args)
            except self.locks.transient_errors:
                self._recover()
                return operation(*args)
        except self.locks.errors as exc:
            self._recover()
            raise LockError(f"{what} failed: {exc}") from exc

    @observed("extend")
    def extend(self, machine_id: str, ttl: float | datetime.timedelta | None = None) -> bool:
        """Push the expiry of a lock this instance holds; False if it was lost (or never held)."""
        machine_id = validate_id(machine_id)
        seconds = self._ttl(ttl)
        token = self._held.get(machine_id)
        if token is None:
            note("not_held")
            return False
        # A failed extend keeps the token: writes stay fenced until unlock().
        extended = self._reconnecting(
            f"Extending the lock on {machine_id!r}",
            self.locks.extend,
            machine_id,
            self.owner,
            token,
            seconds,
        )
        note("extended" if extended else "lock_lost", fencing_token=token, ttl=seconds)
        return extended

    async def aextend(self, machine_id: str, ttl: float | datetime.timedelta | None = None) -> bool:
        return await sync_to_async(self.extend)(machine_id, ttl)

    @observed("lock_info")
    def lock_info(self, machine_id: str) -> LockInfo | None:
        """The live lock on ``machine_id`` (owner, token, acquired_at, expires_at), or None."""
        machine_id = validate_id(machine_id)
        info = self._reconnecting(
            f"Reading the lock on {machine_id!r}", self.locks.info, machine_id
        )
        note("missing" if info is None else "found")
        return info

    async def alock_info(self, machine_id: str) -> LockInfo | None:
        return await sync_to_async(self.lock_info)(machine_id)

    @observed("force_unlock")
    def force_unlock(self, machine_id: str) -> LockInfo | None:
        """Release the live lock on ``machine_id`` whoever holds it: an operator's tool.

        Returns the lock that was released (``expires_at`` is the moment of release), or
        None when none was live. As after an expiry, the holder's ``extend()`` returns
        False, and its writes fail with ``LockLost`` once another owner has taken the lock.
        Raises ``LockError`` when the lock storage fails.
        """
        machine_id = validate_id(machine_id)
        info = self._reconnecting(
            f"Force-releasing the lock on {machine_id!r}", self.locks.force_release, machine_id
        )
        if info is None:
            note("not_held")
        else:
            note("released", fencing_token=info.token, released=True, forced=True)
        return info

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
        if isinstance(token, bool) or not isinstance(token, int) or not 1 <= token < 2**63:
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

    # -- the cycle in two round trips (docs/contract.md#the-cycle-in-one-call) ---------

    def _one_trip(self) -> bool:
        # Inside the caller's transaction the lock must commit on its own connection
        # (DatabaseLockBackend.connection): the classic statements then.
        return self._combined and not self.store.in_transaction()

    def _take_once(self, machine_id: str, ttl: float) -> Locked | None:
        """One attempt at the lock, and the state read under it."""
        if not self._one_trip():
            if not self._lock_once(machine_id, ttl):
                return None
            return self.read_holding(machine_id)
        try:
            try:
                taken = self.store.acquire_and_load(machine_id, self.owner, ttl)
            except self.store.transient_errors:
                # As in lock(): the attempt may have landed; one look settles it.
                token = self._acquire_after_failure(machine_id, ttl)
                if token is None:
                    return None
                self._held[machine_id] = token
                return self.read_holding(machine_id)
        except self.store.errors as exc:
            self._release_after_failed_acquire(machine_id)
            raise LockError(f"Locking machine {machine_id!r} failed: {exc}") from exc
        if taken is None:
            return None
        self._held[machine_id] = taken.token
        note(fencing_token=taken.token)
        row = taken.stored
        if row is None:
            return Locked(machine_id, taken.token, None, None, None, taken.lock_info)
        note(text=row.document)
        data = decode_state(row.document)
        self._versions.remember(machine_id, data, row.version, row.meta)
        return Locked(machine_id, taken.token, data, row.version, row.meta, taken.lock_info)

    def read_holding(self, machine_id: str) -> Locked:
        """The state read under the lock this instance holds on ``machine_id`` (taken by
        ``lock()`` or carried on with ``adopt()``), as ``lock_and_read`` returns it.

        A failed read raises ``ReadError`` and releases the lock: whoever asked gets no
        state to act on, and nobody would release it otherwise before its TTL.
        """
        machine_id = validate_id(machine_id)
        token = self._held.get(machine_id)
        if token is None:
            raise MachineMemoryError(
                f"This instance holds no lock on {machine_id!r}: take it with lock() or "
                "lock_and_read() (or adopt() a token) first."
            )
        try:
            data = self.read(machine_id)
        except ReadError:
            self.unlock(machine_id)
            raise

        def lock_info() -> LockInfo | None:
            return self.lock_info(machine_id)

        if data is None:
            return Locked(machine_id, token, None, None, None, lock_info)
        seen = self._versions.lookup(machine_id, data)
        assert seen is not None
        return Locked(machine_id, token, data, seen[0], seen[1], lock_info)

    @observed("lock_and_read")
    def lock_and_read(
        self, machine_id: str, ttl: float | datetime.timedelta | None = None
    ) -> Locked | None:
        """``lock()`` then ``read()``, as one round trip and one commit with database locks.

        None when denied after ``lock()``'s retries. The lock is held until ``unlock()``
        (``session()`` is the same with the release taken care of).
        """
        machine_id = validate_id(machine_id)
        seconds = self._ttl(ttl)
        backoff = self._lock_backoff()
        for attempt in itertools.count(1):
            locked = self._take_once(machine_id, seconds)
            if locked is not None:
                note("acquired", attempts=attempt, ttl=seconds, version=locked.version)
                return locked
            pause = next(backoff)
            if pause is None:
                note("denied", attempts=attempt)
                logger.debug("Lock on %r denied: held by another owner.", machine_id)
                return None
            time.sleep(pause)
        raise AssertionError("unreachable")  # pragma: no cover

    @observed("lock_and_read")
    async def alock_and_read(
        self, machine_id: str, ttl: float | datetime.timedelta | None = None
    ) -> Locked | None:
        machine_id = validate_id(machine_id)
        seconds = self._ttl(ttl)
        take_once = sync_to_async(self._take_once)
        backoff = self._lock_backoff()
        for attempt in itertools.count(1):
            locked = await take_once(machine_id, seconds)
            if locked is not None:
                note("acquired", attempts=attempt, ttl=seconds, version=locked.version)
                return locked
            pause = next(backoff)
            if pause is None:
                note("denied", attempts=attempt)
                logger.debug("Lock on %r denied: held by another owner.", machine_id)
                return None
            await asyncio.sleep(pause)
        raise AssertionError("unreachable")  # pragma: no cover

    @observed("session.write")
    def _session_write(
        self,
        machine_id: str,
        locked: Locked,
        data: dict[str, Any],
        metadata: Mapping[str, Any] | None,
    ) -> None:
        """``Session.write``: the fenced write and the release, together where they can be."""
        text = encode_state(data, self.max_state_bytes)
        meta = resolve_metadata(data, metadata, machine_id)
        expected = locked.version
        changed = None if expected is not None and locked.meta == meta else meta
        released = False
        # Inside the caller's transaction: the classic write, which commits with it, and the
        # release left to the session's exit.
        inside = self.store.in_transaction()
        if self._combined and not inside:
            note(fencing_token=locked.token, expected_version=expected, text=text)
            try:
                written, released = self.store.write_and_release(
                    machine_id, text, expected, changed, locked.token
                )
            except NothingSent as exc:
                raise self._not_sent("Writing", machine_id, exc) from exc.__cause__
            except self.store.transient_errors as exc:
                self._settle(
                    machine_id, exc, lambda row: self._wrote_and_released(row, locked, data)
                )
                written = True
            except self.store.errors as exc:
                raise WriteError(f"Writing machine {machine_id!r} failed: {exc}") from exc
            if not written:
                self._raise_rejected(machine_id, expected, locked.token)
        else:
            self._compare_and_set(machine_id, data, text, expected, changed)
        if locked.state is not None:
            self._versions.forget(machine_id, locked.state)
        self._written(
            machine_id, data, 1 if expected is None else expected + 1, meta, inside=inside
        )
        if released:
            self._held.pop(machine_id, None)
            note(released=True)
        elif not inside:
            self.unlock(machine_id)

    def _wrote_and_released(
        self, row: Stored | None, locked: Locked, data: dict[str, Any]
    ) -> bool | None:
        """``_wrote`` for a write that commits together with its release: where the row
        cannot tell (no row, or one that has moved on), the lock can. Still live with the
        session's token, it was not released, so the write did not commit either."""
        verdict = _wrote(row, data, locked.version)
        if verdict is not None:
            return verdict
        try:
            info = self.locks.info(locked.machine_id)
        except self.locks.errors:
            return None
        return False if info is not None and info.token == locked.token else None

    @contextmanager
    def session(
        self, machine_id: str, ttl: float | datetime.timedelta | None = None
    ) -> Iterator[Session]:
        """``with memory.session(id) as s:`` lock + read, then ``s.write(data)``: write +
        release; each one round trip and one commit with database locks.

        Denied after ``lock()``'s retries: ``LockNotAcquired``. Leaving the block without
        ``s.write`` (or with an exception) releases the lock.
        """
        locked = self.lock_and_read(machine_id, ttl)
        if locked is None:
            raise LockNotAcquired(validate_id(machine_id))
        try:
            yield Session(self, locked)
        finally:
            if self._held.get(locked.machine_id) == locked.token:
                self.unlock(locked.machine_id)

    @asynccontextmanager
    async def asession(
        self, machine_id: str, ttl: float | datetime.timedelta | None = None
    ) -> AsyncIterator[AsyncSession]:
        """``async with memory.asession(id) as s:`` the twin of ``session``; ``await s.write()``."""
        locked = await self.alock_and_read(machine_id, ttl)
        if locked is None:
            raise LockNotAcquired(validate_id(machine_id))
        try:
            yield AsyncSession(self, locked)
        finally:
            if self._held.get(locked.machine_id) == locked.token:
                await self.aunlock(locked.machine_id)

    def close(self) -> None:
        """Close connections this instance opened for itself."""
        self.locks.close()
        self.store.close()

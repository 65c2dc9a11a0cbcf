"""The REST API's views: states and locks, every call through ``MachineMemory``.

Concurrency rules (docs/contract.md#rest-api, docs/contract.md#write):

- A state's version is its ETag, ``"<version>"``. ``PUT`` creates with ``If-None-Match: *``,
  compares and sets with ``If-Match: "<version>"`` and overwrites with ``If-Match: *``;
  an update without a precondition is refused with 428, so no client overwrites a state
  it has not seen by accident. Updates and deletes are single ``MachineMemory.overwrite``
  / ``delete`` calls: at a version one compare-and-set, at whatever version is stored
  decided under the state row's lock, so ``If-Match: *`` never loses to concurrent
  writers. No retry loop.
- ``POST locks/{id}/`` acquires the lock for a new, random owner (or one from the client's
  own ``secret``, so that a request sent again after a lost answer finds its lock) and
  returns a lock token ``"<fencing token>.<secret>"``. The owner stored with the lock is ``"api:" +
  sha256(secret)``, so neither the database nor ``GET`` ever holds a usable token. A
  request with the ``Lock-Token`` header rebuilds that owner and ``adopt()``s the fencing
  token: extend, release and fenced writes then behave exactly as in the worker that
  called ``lock()``. A ``PUT`` with a ``Lock-Token`` and no precondition creates or
  overwrites, fenced: the holder needs to know nothing about the stored state.
- Over HTTP nothing sleeps on the server unless the client asks: a refused lock is 409
  at once, or after the client's bounded ``wait`` (docs/rest-api.md#locks).
- Every id is also reachable as ``state/?id=`` and ``lock/?id=``, which WHATWG-URL
  clients need for the ids ``.`` and ``..`` (urls.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import secrets
import time
from typing import TYPE_CHECKING, Any

from django.db import connections, transaction
from rest_framework import generics, status
from rest_framework.exceptions import NotFound, ParseError
from rest_framework.pagination import CursorPagination
from rest_framework.parsers import JSONParser
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response
from rest_framework.views import APIView

from machine_memory.conf import conf
from machine_memory.contrib.rest_framework.errors import ApiError, exception_handler
from machine_memory.contrib.rest_framework.permissions import permission_classes
from machine_memory.contrib.rest_framework.serializers import (
    LockAcquiredSerializer,
    LockAcquireSerializer,
    LockRequestSerializer,
    LockSerializer,
    StateSerializer,
    StateSummarySerializer,
    StateWriteSerializer,
    StateWrittenSerializer,
)
from machine_memory.exceptions import LockError, LockLost, WriteConflict
from machine_memory.memory import LOCK_JITTER, MachineMemory
from machine_memory.models import MachineLock, MachineState
from machine_memory.retry import Backoff
from machine_memory.validation import (
    MAX_ID_LENGTH,
    MAX_STATE_DEPTH,
    METADATA_LENGTHS,
    validate_id,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import IO

    from rest_framework.permissions import _SupportsHasPermission
    from rest_framework.request import Request

    from machine_memory.locks.base import LockInfo
    from machine_memory.memory import Locked

# A lock token is "<fencing token>.<secret>"; fencing tokens are positive BIGINTs.
LOCK_TOKEN = re.compile(r"([1-9][0-9]{0,18})\.([A-Za-z0-9_-]{16,128})\Z")
MAX_TOKEN = 2**63 - 1
# A strong entity tag that can be a version: the decimal digits str(version) produces.
VERSION_TAG = re.compile(r"[1-9][0-9]{0,18}\Z")
# One entity tag of an If-Match / If-None-Match list (RFC 9110 §8.8.3), and its separator.
ENTITY_TAG = re.compile(r'[ \t]*(W/)?"([\x21\x23-\x7e\x80-\xff]*)"[ \t]*(?:,|\Z)')
# POST locks/{id}/ with a wait: the pauses between attempts double from this.
LOCK_WAIT_BACKOFF = 0.05


def owner_for(secret: str) -> str:
    """The lock owner stored for a lock token's secret: a hash, so storage holds no token."""
    # The secret is 256 random bits (secrets.token_urlsafe(32)): an unsalted hash of it can
    # be neither reversed nor guessed, and the same secret always finds its owner again.
    return "api:" + hashlib.sha256(secret.encode()).hexdigest()


def etag(version: int) -> str:
    return f'"{version}"'


def _headers(version: int | None) -> dict[str, str]:
    return {} if version is None else {"ETag": etag(version)}


class EntityTags:
    """A parsed If-Match / If-None-Match header: ``*`` or a list of entity tags."""

    def __init__(self, header: str, name: str) -> None:
        self.any = header.strip() == "*"
        self.tags: list[tuple[bool, str]] = []  # (weak, opaque)
        if self.any:
            return
        position = 0
        while position < len(header):
            match = ENTITY_TAG.match(header, position)
            if match is None:
                raise ApiError(
                    400,
                    "invalid_precondition",
                    f'{name} must be * or a list of entity tags such as "3"; got {header!r}.',
                )
            self.tags.append((bool(match[1]), match[2]))
            position = match.end()
        if not self.tags:
            raise ApiError(400, "invalid_precondition", f"{name} is empty.")

    def matches_weakly(self, version: int) -> bool:
        """If-None-Match on GET: weak comparison (RFC 9110 §13.1.2)."""
        return self.any or any(tag == str(version) for _, tag in self.tags)

    def versions(self) -> set[int]:
        """The versions that If-Match can match: its strong tags that spell a version
        (strong comparison, RFC 9110 §13.1.1: a weak tag never matches)."""
        return {
            int(tag)
            for weak, tag in self.tags
            if not weak and VERSION_TAG.match(tag) and int(tag) <= MAX_TOKEN
        }


def _precondition(request: Request, name: str) -> EntityTags | None:
    header = request.headers.get(name)
    return None if header is None else EntityTags(header, name)


def _lock_token(request: Request, *, required: bool) -> tuple[int, str] | None:
    header = request.headers.get("Lock-Token")
    if header is None:
        if required:
            raise ApiError(
                400,
                "lock_token_required",
                "Send the lock token that POST locks/{id}/ returned in the Lock-Token header.",
            )
        return None
    match = LOCK_TOKEN.match(header.strip())
    if match is None or int(match[1]) > MAX_TOKEN:
        raise ApiError(
            400, "invalid_lock_token", "Lock-Token is not a lock token that this API issued."
        )
    return int(match[1]), match[2]


def _memory(
    request: Request, machine_id: str, *, lock_token_required: bool = False
) -> MachineMemory:
    """A MachineMemory for this request: carrying on the caller's lock when it sent one."""
    token = _lock_token(request, required=lock_token_required)
    if token is None:
        return MachineMemory()
    fencing_token, secret = token
    memory = MachineMemory(owner=owner_for(secret))
    memory.adopt(machine_id, fencing_token)
    return memory


def _query_text(request: Request, name: str, max_length: int) -> str | None:
    value = request.query_params.get(name)
    if value is not None and ("\x00" in value or len(value) > max_length):
        # PostgreSQL refuses NUL in text parameters; longer values can match nothing.
        raise ApiError(
            400,
            "invalid_request",
            f"Query parameter {name!r} must be at most {max_length} characters, without NUL.",
        )
    return value


class BoundedJSONParser(JSONParser):
    """JSON bodies; one nested too deeply for Python's parser is a 400, not a 500."""

    def parse(
        self,
        stream: IO[Any],
        media_type: str | None = None,
        parser_context: Mapping[str, Any] | None = None,
    ) -> Any:
        try:
            return super().parse(stream, media_type, parser_context)
        except RecursionError:
            # The json module recurses once per level and gives up near the interpreter's
            # recursion limit (about 1,000 levels); a state may nest MAX_STATE_DEPTH levels.
            raise ParseError(
                f"JSON parse error - nested too deeply; states nest at most "
                f"{MAX_STATE_DEPTH} levels."
            ) from None


class MachineMemoryAPIView(APIView):
    """The API's own policies: JSON only, its permissions and its error format.

    Authentication and throttling stay the project's (REST_FRAMEWORK settings).
    """

    renderer_classes = (JSONRenderer,)
    parser_classes = (BoundedJSONParser,)

    def get_permissions(self) -> list[_SupportsHasPermission]:
        return [permission() for permission in permission_classes()]

    def get_exception_handler(self) -> Callable[..., Response | None]:
        return exception_handler

    @classmethod
    def as_view(cls, **initkwargs: Any) -> Any:
        view = super().as_view(**initkwargs)
        # A lock, an unlock and a write must reach the database when the response says
        # so, and locks refuse to run inside atomic() on some databases
        # (docs/contract.md#transactions): never wrap these views in ATOMIC_REQUESTS.
        for alias in connections:
            view = transaction.non_atomic_requests(using=alias)(view)
        return view


class OneMachineAPIView(MachineMemoryAPIView):
    """A view of one machine id: from the URL path, or from ``?id=`` (urls.py)."""

    machine_id: str

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        super().initial(request, *args, **kwargs)  # authentication and permissions first
        machine_id = kwargs.get("machine_id")
        if machine_id is None:
            given = request.query_params.getlist("id")
            if len(given) != 1:
                raise ApiError(
                    400,
                    "invalid_id",
                    "Send the machine id once, as the query parameter id "
                    "(?id=... percent-encoded, as URLSearchParams does).",
                )
            machine_id = given[0]
        self.machine_id = validate_id(machine_id)


class MachineIdCursorPagination(CursorPagination):
    """Pages in id order, positioned by the last id: no COUNT(*) over a large table."""

    ordering = "machine_id"
    page_size = 50
    page_size_query_param = "page_size"
    max_page_size = 500

    def decode_cursor(self, request: Request) -> Any:
        cursor = super().decode_cursor(request)
        # A cursor is the client's text: its position is compared with ids in SQL, and a
        # NUL there is an error of the database (PostgreSQL), not a position.
        position: object = None if cursor is None else cursor.position
        if isinstance(position, str) and ("\x00" in position or len(position) > MAX_ID_LENGTH):
            raise NotFound(self.invalid_cursor_message)
        return cursor


class StateListView(MachineMemoryAPIView, generics.ListAPIView[MachineState]):
    """States in id order, without their documents; filter by status, source, parent, prefix."""

    serializer_class = StateSummarySerializer
    pagination_class = MachineIdCursorPagination
    # The project's DEFAULT_FILTER_BACKENDS (an ordering filter, say) would fight the cursor.
    filter_backends = ()

    def get_queryset(self) -> Any:
        rows = MachineState.objects.using(conf.DATABASE).summaries()
        execution_status = _query_text(self.request, "status", METADATA_LENGTHS["execution_status"])
        source = _query_text(self.request, "source", METADATA_LENGTHS["source"])
        parent = _query_text(self.request, "parent", MAX_ID_LENGTH)
        prefix = _query_text(self.request, "prefix", MAX_ID_LENGTH)
        if execution_status is not None:
            rows = rows.with_status(execution_status)
        if source is not None:
            rows = rows.from_source(source)
        if parent is not None:
            rows = rows.children_of(parent)
        if prefix:
            rows = rows.with_id_prefix(prefix)
        return rows


class StateDetailView(OneMachineAPIView):
    """One state: GET (ETag), PUT (If-None-Match: * / If-Match / Lock-Token), DELETE (If-Match)."""

    def get(self, request: Request, **kwargs: Any) -> Response:
        machine_id = self.machine_id
        memory = MachineMemory()
        try:
            row = MachineState.objects.using(memory.using).find(machine_id)
            if row is None:
                raise ApiError(404, "not_found", f"Machine {machine_id!r} has no state.")
            if_none_match = _precondition(request, "If-None-Match")
            if if_none_match is not None and if_none_match.matches_weakly(row.version):
                return Response(status=status.HTTP_304_NOT_MODIFIED, headers=_headers(row.version))
            lock = memory.lock_info(machine_id)
        finally:
            memory.close()
        body = StateSerializer(row, context={"lock": lock}).data
        return Response(body, headers=_headers(row.version))

    def put(self, request: Request, **kwargs: Any) -> Response:
        machine_id = self.machine_id
        body = StateWriteSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data: dict[str, Any] = body.validated_data["data"]
        metadata: dict[str, Any] | None = body.validated_data.get("metadata")
        if_match = _precondition(request, "If-Match")
        if_none_match = _precondition(request, "If-None-Match")
        if if_match is not None and if_none_match is not None:
            raise ApiError(400, "invalid_precondition", "Send If-Match or If-None-Match, not both.")
        if if_none_match is not None and not if_none_match.any:
            raise ApiError(
                400, "invalid_precondition", "PUT accepts If-None-Match: * (create) only."
            )
        memory = _memory(request, machine_id)
        try:
            if if_match is None and if_none_match is None and memory.holds(machine_id):
                # The lock holder (Lock-Token) stores whatever is there, fenced: Arvo writes
                # its failure record as write(id, failure, None) over an existing state.
                version = self._overwrite(memory, machine_id, data, metadata, create=True)
                created = version == 1
            elif if_match is None:
                created = self._create(memory, machine_id, data, metadata, if_none_match)
                version = 1
            elif if_match.any:
                version = self._overwrite(memory, machine_id, data, metadata, create=False)
                created = False
            else:
                version = self._compare_and_set(memory, machine_id, data, metadata, if_match)
                created = False
        finally:
            memory.close()
        return Response(
            StateWrittenSerializer({"id": machine_id, "version": version}).data,
            status=status.HTTP_201_CREATED if created else status.HTTP_200_OK,
            headers=_headers(version),
        )

    @staticmethod
    def _create(
        memory: MachineMemory,
        machine_id: str,
        data: dict[str, Any],
        metadata: dict[str, Any] | None,
        if_none_match: EntityTags | None,
    ) -> bool:
        try:
            memory.write(machine_id, data, None, metadata)
        except LockLost:
            raise
        except WriteConflict as exc:
            if if_none_match is not None:
                raise ApiError(
                    412,
                    "precondition_failed",
                    f"Machine {machine_id!r} already has a state (If-None-Match: *).",
                    _headers(exc.actual_version),
                ) from exc
            raise ApiError(
                428,
                "precondition_required",
                f"Machine {machine_id!r} has a state: send If-Match with its ETag to update "
                "it, or If-Match: * to overwrite any version.",
                _headers(exc.actual_version),
            ) from exc
        return True

    @staticmethod
    def _overwrite(
        memory: MachineMemory,
        machine_id: str,
        data: dict[str, Any],
        metadata: dict[str, Any] | None,
        *,
        create: bool,
    ) -> int:
        # Whatever version is there: one overwrite() under the state row's lock, still
        # counted as a new version (every other client's ETags rely on the counter) and
        # fenced when the request carries a Lock-Token. ``create``: the lock holder's
        # create-or-overwrite; otherwise If-Match: *, which needs a state.
        try:
            return memory.overwrite(machine_id, data, metadata=metadata, create=create)
        except LockLost:
            raise
        except WriteConflict as exc:
            if create:  # created and deleted by other writers, again and again
                raise ApiError(
                    409,
                    "conflict",
                    f"Machine {machine_id!r} kept changing between creates and deletes by "
                    "other writers; nothing was stored. Retry.",
                ) from exc
            raise ApiError(404, "not_found", f"Machine {machine_id!r} has no state.") from exc

    @staticmethod
    def _compare_and_set(
        memory: MachineMemory,
        machine_id: str,
        data: dict[str, Any],
        metadata: dict[str, Any] | None,
        if_match: EntityTags,
    ) -> int:
        version = _matching_version(memory, machine_id, if_match)
        try:
            return memory.overwrite(machine_id, data, version=version, metadata=metadata)
        except LockLost:
            raise
        except WriteConflict as exc:
            raise _stale(machine_id, exc.actual_version) from exc

    def delete(self, request: Request, **kwargs: Any) -> Response:
        machine_id = self.machine_id
        if_match = _precondition(request, "If-Match")
        memory = _memory(request, machine_id)
        try:
            if if_match is None or if_match.any:
                # Whatever version is stored; 404 when there is none. A state deleted by
                # someone else between the look and the delete is gone all the same: 204.
                if memory.read(machine_id) is None:
                    raise ApiError(404, "not_found", f"Machine {machine_id!r} has no state.")
                memory.delete(machine_id)
            else:
                version = _matching_version(memory, machine_id, if_match)
                try:
                    memory.delete(machine_id, version=version)
                except LockLost:
                    raise
                except WriteConflict as exc:
                    raise _stale(machine_id, exc.actual_version) from exc
        finally:
            memory.close()
        return Response(status=status.HTTP_204_NO_CONTENT)


def _stale(machine_id: str, current: int | None) -> ApiError:
    """412 for an If-Match that does not hold, with the current ETag when there is a state."""
    return ApiError(
        412,
        "precondition_failed",
        f"Machine {machine_id!r} is not at the version in If-Match"
        + ("; it has no state." if current is None else f"; it is at {current}."),
        _headers(current),
    )


def _matching_version(memory: MachineMemory, machine_id: str, if_match: EntityTags) -> int:
    """The version an If-Match list stands for, or 412.

    One tag is the version to compare and set against, as it is: overwrite() or delete()
    at that version decide. A list (or tags that can match no version, such as weak ones)
    needs the stored version to pick the tag that matches, if any; the write at that
    version then fails if the state changes in between.
    """
    versions = if_match.versions()
    if len(versions) == 1 and len(if_match.tags) == 1:
        return next(iter(versions))
    current = memory.read(machine_id)
    version = None if current is None else memory.version_of(machine_id, current)
    if version is None or version not in versions:
        raise _stale(machine_id, version)
    return version


class LockListView(MachineMemoryAPIView, generics.ListAPIView[MachineLock]):
    """Live locks in id order (database lock backend)."""

    serializer_class = LockSerializer
    pagination_class = MachineIdCursorPagination
    filter_backends = ()

    def get_queryset(self) -> Any:
        memory = MachineMemory()
        if not memory.locks.supports_listing:
            # Other backends (Redis) can answer for one id, but have no index of all locks.
            raise ApiError(
                501,
                "not_supported",
                f"Listing locks needs a lock backend that can list them (the database one); "
                f"{type(memory.locks).__name__} answers GET locks/{{id}}/ only.",
            )
        return MachineLock.objects.using(memory.using).live()


class LockDetailView(OneMachineAPIView):
    """One lock: GET (holder, no token), POST (acquire), PATCH (extend), DELETE (release)."""

    def get(self, request: Request, **kwargs: Any) -> Response:
        machine_id = self.machine_id
        memory = MachineMemory()
        try:
            info = memory.lock_info(machine_id)
        finally:
            memory.close()
        if info is None:
            raise ApiError(404, "not_found", f"Machine {machine_id!r} has no live lock.")
        return Response(LockSerializer({"machine_id": machine_id, **_fields(info)}).data)

    def post(self, request: Request, **kwargs: Any) -> Response:
        machine_id = self.machine_id
        options = LockAcquireSerializer(data=request.data)
        options.is_valid(raise_exception=True)
        ttl: float | None = options.validated_data.get("ttl")
        wait: float = options.validated_data.get("wait", 0.0)
        read: bool = options.validated_data.get("read", False)
        given: str | None = options.validated_data.get("secret")
        secret = secrets.token_urlsafe(32) if given is None else given
        # One attempt per try: the waiting, if any, is this view's (LOCK_RETRIES is for
        # workers, which have nobody to answer meanwhile).
        memory = MachineMemory(owner=owner_for(secret), lock_retries=0)
        body: dict[str, Any] = {"id": machine_id}
        try:
            locked = _acquire(memory, machine_id, ttl, wait, secret_given=given is not None)
            if locked is None:
                raise ApiError(
                    409, "lock_held", f"Machine {machine_id!r} is locked by another owner."
                )
            if read:
                body["state"] = _state_body(locked)
            try:
                info = locked.lock_info()
            except LockError:
                info = None  # the lock is ours all the same: hand out its token
        finally:
            memory.close()
        token = locked.token
        times = _fields(info) if info is not None and info.token == token else {}
        body |= {
            "lock_token": f"{token}.{secret}",
            "owner": memory.owner,
            "token": token,
            "acquired_at": times.get("acquired_at"),
            "expires_at": times.get("expires_at"),
        }
        return Response(LockAcquiredSerializer(body).data, status=status.HTTP_201_CREATED)

    def patch(self, request: Request, **kwargs: Any) -> Response:
        machine_id = self.machine_id
        ttl = self._ttl(request)
        memory = _memory(request, machine_id, lock_token_required=True)
        try:
            extended = memory.extend(machine_id, ttl)
        finally:
            memory.close()
        if not extended:
            raise ApiError(
                409,
                "lock_not_held",
                f"This Lock-Token does not hold the lock on {machine_id!r} (expired or taken "
                "over); acquire it again.",
            )
        return Response(status=status.HTTP_204_NO_CONTENT)

    def delete(self, request: Request, **kwargs: Any) -> Response:
        machine_id = self.machine_id
        memory = _memory(request, machine_id, lock_token_required=True)
        try:
            if memory.unlock(machine_id):
                return Response(status=status.HTTP_204_NO_CONTENT)
            # unlock() never raises: False is another owner's live lock, or a storage
            # failure it retried and logged. One look tells which.
            info = memory.lock_info(machine_id)
        finally:
            memory.close()
        if info is None:
            return Response(status=status.HTTP_204_NO_CONTENT)
        if info.owner == memory.owner:
            raise LockError(f"Releasing the lock on {machine_id!r} failed.")
        raise ApiError(
            409,
            "lock_not_held",
            f"Machine {machine_id!r} is locked by another owner; this Lock-Token does not "
            "hold it. The lock was left alone.",
        )

    @staticmethod
    def _ttl(request: Request) -> float | None:
        body = LockRequestSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        ttl: float | None = body.validated_data.get("ttl")
        return ttl


def _acquire(
    memory: MachineMemory, machine_id: str, ttl: float | None, wait: float, *, secret_given: bool
) -> Locked | None:
    """Take the lock and read the state (one round trip with database locks) until
    ``wait`` seconds have passed (0: one attempt). None: refused.

    With the client's own secret, a refusal may be the client's own lock, taken by the
    same request whose answer was lost: one look after the first refusal tells.
    """
    deadline = time.monotonic() + wait
    look = secret_given
    # Pauses doubling from LOCK_WAIT_BACKOFF, the last one cut short so that the final
    # attempt comes at the deadline. A generous count: the deadline ends the waiting.
    for pause in Backoff(64, LOCK_WAIT_BACKOFF, jitter=LOCK_JITTER):
        locked = memory.lock_and_read(machine_id, ttl)
        if locked is not None:
            return locked
        if look:
            locked = _taken_before(memory, machine_id)
            if locked is not None:
                return locked
            look = False
        left = deadline - time.monotonic()
        if pause is None or left <= 0:
            return None
        time.sleep(min(pause, left))
    raise AssertionError("unreachable")  # pragma: no cover


def _taken_before(memory: MachineMemory, machine_id: str) -> Locked | None:
    """The live lock if it is this secret's already: the same request, sent again after
    its answer was lost. It is adopted, and the state read again under it."""
    info = memory.lock_info(machine_id)
    if info is None or info.owner != memory.owner:
        return None
    memory.adopt(machine_id, info.token)
    return memory.read_holding(machine_id)


def _state_body(locked: Locked) -> dict[str, Any] | None:
    """The state read under the lock just taken, for the acquire response."""
    if locked.state is None:
        return None
    assert locked.version is not None
    return {"data": locked.state, "version": locked.version, "etag": etag(locked.version)}


def _fields(info: LockInfo) -> dict[str, Any]:
    return dataclasses.asdict(info)


class StateByIdView(StateDetailView):
    """``state/?id=``: StateDetailView for clients that cannot put every id in a path."""


class LockByIdView(LockDetailView):
    """``lock/?id=``: LockDetailView for clients that cannot put every id in a path."""

"""The OpenAPI 3 description of the REST API, for drf-spectacular (the ``api-schema`` extra).

Imported by ``urls.py`` only when drf-spectacular is installed; the API itself never needs
it. The views stay plain: their status codes and headers are described here, as
``OpenApiViewExtension``s that drf-spectacular applies when it builds the schema.
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.extensions import OpenApiSerializerExtension, OpenApiViewExtension
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_view,
)

from machine_memory.contrib.rest_framework.serializers import (
    MAX_LOCK_WAIT,
    MAX_TTL,
    MIN_TTL,
    ErrorSerializer,
    LockAcquiredSerializer,
    LockAcquireSerializer,
    LockRequestSerializer,
    LockSerializer,
    StateSerializer,
    StateSummarySerializer,
    StateWriteSerializer,
    StateWrittenSerializer,
)
from machine_memory.validation import MAX_ID_LENGTH

TAGS = ["machine memory"]
VIEWS = "machine_memory.contrib.rest_framework.views"

MACHINE_ID = OpenApiParameter(
    "machine_id",
    {"type": "string", "minLength": 1, "maxLength": MAX_ID_LENGTH},
    OpenApiParameter.PATH,
    description='The machine id as ONE path segment: quote(id, safe=""), so "/" is %2F. '
    'Ids "." and ".." cannot be sent from WHATWG-URL clients (fetch): use the ?id= form.',
)
ID_QUERY = OpenApiParameter(
    "id",
    {"type": "string", "minLength": 1, "maxLength": MAX_ID_LENGTH},
    OpenApiParameter.QUERY,
    required=True,
    description="The machine id, percent-encoded as a query value (URLSearchParams). Reaches "
    "every id from every client, dots included.",
)
LOCK_TOKEN_HELP = 'The lock_token that POST locks/{id}/ returned: "<fencing token>.<secret>".'
# What the views accept (views.LOCK_TOKEN, views.ENTITY_TAG), narrowed to the tags this API
# issues, so that generated requests exercise the API rather than its 400s.
LOCK_TOKEN_PATTERN = r"^[1-9][0-9]{0,17}\.[A-Za-z0-9_-]{43}$"
ETAGS_PATTERN = r'^(\*|(W/)?"[0-9]{1,18}"(, ?(W/)?"[0-9]{1,18}")*)$'


def _header(
    name: str, description: str, pattern: str | None = None, **kwargs: Any
) -> OpenApiParameter:
    schema = {"type": "string"} if pattern is None else {"type": "string", "pattern": pattern}
    return OpenApiParameter(
        name, schema, OpenApiParameter.HEADER, description=description, **kwargs
    )


def _error(description: str) -> OpenApiResponse:
    return OpenApiResponse(ErrorSerializer, description=description)


ETAG_HEADER = _header("ETag", 'The version, quoted: "3".', required=True, response=[200, 201])
ETAG_ON_FAILURE = _header(
    "ETag", "The current version, when there is a state.", response=[304, 412, 428]
)
RETRY_AFTER = _header("Retry-After", "Seconds to wait before retrying.", response=[503])
WWW_AUTHENTICATE = _header("WWW-Authenticate", "The authentication scheme to use.", response=[401])

# Every operation may answer these.
COMMON: dict[int | str, Any] = {
    401: _error("not_authenticated / authentication_failed"),
    403: _error("permission_denied (staff only by default), or not_authenticated"),
    406: _error("not_acceptable: the API answers in JSON"),
    429: _error("throttled (the project's REST framework throttling)"),
    503: _error("storage_unavailable: nothing was changed; retry after Retry-After"),
}
COMMON_HEADERS = [RETRY_AFTER, WWW_AUTHENTICATE]
# Writes may also end with an unknown outcome (the connection died mid-write).
WRITE_503 = _error(
    "storage_unavailable: nothing was changed; retry after Retry-After. Or "
    "write_outcome_unknown: the write may or may not have been stored; GET the state "
    "before retrying"
)
# Every operation on one id.
ON_ID: dict[int | str, Any] = {
    **COMMON,
    400: _error("invalid_id, or a malformed body, header or precondition (see code)"),
}


def _bodied(responses: dict[int | str, Any]) -> dict[int | str, Any]:
    """Responses of an operation that reads a JSON body."""
    return {**responses, 415: _error("unsupported_media_type: send application/json")}


def _list(
    serializer: type[Any],
    filters: list[OpenApiParameter],
    summary: str,
    **more: Any,
) -> Any:
    return extend_schema(
        tags=TAGS,
        summary=summary,
        parameters=[*filters, *COMMON_HEADERS],
        responses={
            200: serializer(many=True),
            400: _error("invalid_request: a query parameter is too long or holds NUL"),
            404: _error("not_found: the cursor is invalid"),
            **COMMON,
            **more,
        },
    )


def _annotated(view: Any, **operations: Any) -> Any:
    # ``view`` is the class named by target_class (drf-spectacular imports it).
    """A subclass of ``view`` carrying the operations' descriptions (the view stays as is)."""
    return extend_schema_view(**operations)(type(view.__name__, (view,), {}))


def _filter(name: str, description: str) -> OpenApiParameter:
    return OpenApiParameter(name, OpenApiTypes.STR, OpenApiParameter.QUERY, description=description)


class StrictSerializerSchema(OpenApiSerializerExtension):  # type: ignore[no-untyped-call]
    """Request bodies refuse unknown keys (``StrictSerializer``): say so in the schema."""

    target_class = "machine_memory.contrib.rest_framework.serializers.StrictSerializer"
    match_subclasses = True

    def map_serializer(self, auto_schema: Any, direction: Any) -> Any:
        schema = auto_schema._map_serializer(self.target, direction, bypass_extensions=True)
        schema["additionalProperties"] = False
        return schema


class StateListSchema(OpenApiViewExtension):  # type: ignore[no-untyped-call]
    target_class = f"{VIEWS}.StateListView"

    def view_replacement(self) -> Any:
        filters = [
            _filter("status", "Only states with this execution status (exact)."),
            _filter("source", "Only states with this source."),
            _filter("parent", "Only the children of this machine id."),
            _filter("prefix", "Only ids that start with this text (compared exactly)."),
        ]
        summary = "List states in id order, without their documents (cursor pagination)"
        return _annotated(self.target_class, get=_list(StateSummarySerializer, filters, summary))


class LockListSchema(OpenApiViewExtension):  # type: ignore[no-untyped-call]
    target_class = f"{VIEWS}.LockListView"

    def view_replacement(self) -> Any:
        operation = _list(
            LockSerializer,
            [],
            "List live locks in id order (never a lock token)",
            **{"501": _error("not_supported: listing needs the database lock backend")},
        )
        return _annotated(self.target_class, get=operation)


def _state_operations(machine_id: OpenApiParameter) -> dict[str, Any]:
    lock_token = _header(
        "Lock-Token",
        f"{LOCK_TOKEN_HELP} Fences the write: 409 lock_lost once another owner has "
        "taken the lock over.",
        LOCK_TOKEN_PATTERN,
    )
    get = extend_schema(
        tags=TAGS,
        summary="Read a state; its version is the ETag",
        parameters=[
            machine_id,
            _header(
                "If-None-Match",
                'An ETag ("3") or *: 304 while it still matches.',
                ETAGS_PATTERN,
            ),
            ETAG_HEADER,
            ETAG_ON_FAILURE,
            *COMMON_HEADERS,
        ],
        responses={
            200: StateSerializer,
            304: OpenApiResponse(description="Not modified: If-None-Match matched."),
            404: _error("not_found: no state"),
            **ON_ID,
        },
    )
    put = extend_schema(
        tags=TAGS,
        summary="Create, compare-and-set, or overwrite a state",
        description=(
            "If-None-Match: * creates (412 if a state exists). "
            'If-Match: "<version>" compares and sets (412 when stale). '
            "If-Match: * overwrites whatever version exists (404 if none). "
            "Neither, with Lock-Token: the lock holder creates or overwrites (fenced). "
            "Neither, without: creates, or 428 when a state exists."
        ),
        parameters=[
            machine_id,
            _header("If-Match", 'The ETag this write is based on ("3"), or *.', ETAGS_PATTERN),
            _header("If-None-Match", "* to create only.", r"^\*$"),
            lock_token,
            ETAG_HEADER,
            ETAG_ON_FAILURE,
            *COMMON_HEADERS,
        ],
        request=StateWriteSerializer,
        responses=_bodied(
            {
                200: StateWrittenSerializer,
                201: StateWrittenSerializer,
                404: _error("not_found: If-Match: * and no state"),
                409: _error(
                    "lock_lost: a fenced write after another owner took the lock; or "
                    "conflict: the holder's create-or-overwrite kept meeting other writers' "
                    "creates and deletes"
                ),
                412: _error("precondition_failed: stale If-Match, or If-None-Match: *"),
                428: _error("precondition_required: the state exists; send If-Match"),
                **ON_ID,
                503: WRITE_503,
            }
        ),
    )
    delete = extend_schema(
        tags=TAGS,
        summary="Delete a state",
        parameters=[
            machine_id,
            _header("If-Match", 'Delete only at this version ("3"), or *.', ETAGS_PATTERN),
            lock_token,
            ETAG_ON_FAILURE,
            *COMMON_HEADERS,
        ],
        responses={
            204: OpenApiResponse(description="Deleted."),
            404: _error("not_found: no state"),
            409: _error("lock_lost: a fenced delete after another owner took the lock"),
            412: _error("precondition_failed: stale If-Match"),
            **ON_ID,
            503: WRITE_503,
        },
    )
    return {"get": get, "put": put, "delete": delete}


def _lock_operations(machine_id: OpenApiParameter) -> dict[str, Any]:
    ttl = f"ttl: seconds, {MIN_TTL} to {MAX_TTL:g}; default MACHINE_MEMORY['LOCK_TTL']."
    required_token = _header("Lock-Token", LOCK_TOKEN_HELP, LOCK_TOKEN_PATTERN, required=True)
    get = extend_schema(
        tags=TAGS,
        summary="The live lock: holder, fencing token, expiry (never its lock token)",
        parameters=[machine_id, *COMMON_HEADERS],
        responses={200: LockSerializer, 404: _error("not_found: no live lock"), **ON_ID},
    )
    post = extend_schema(
        tags=TAGS,
        summary="Acquire the lock; the response's lock_token is the only proof of ownership",
        description=f"{ttl} wait: seconds to keep trying while another owner holds it, "
        f"0 to {MAX_LOCK_WAIT:g}; default 0 (409 at once). read: true adds the state and "
        "its ETag as they are under the lock.",
        parameters=[machine_id, *COMMON_HEADERS],
        request=LockAcquireSerializer,
        responses=_bodied(
            {
                201: LockAcquiredSerializer,
                409: _error("lock_held: another owner holds it (after wait, if asked)"),
                **ON_ID,
            }
        ),
    )
    patch = extend_schema(
        tags=TAGS,
        summary="Extend the lock held with Lock-Token",
        description=ttl,
        parameters=[machine_id, required_token, *COMMON_HEADERS],
        request=LockRequestSerializer,
        responses=_bodied(
            {
                204: OpenApiResponse(description="Extended."),
                409: _error("lock_not_held: expired or taken over"),
                **ON_ID,
            }
        ),
    )
    delete = extend_schema(
        tags=TAGS,
        summary="Release the lock held with Lock-Token (204 also when no lock is live)",
        parameters=[machine_id, required_token, *COMMON_HEADERS],
        responses={
            204: OpenApiResponse(description="Released, or no live lock."),
            409: _error("lock_not_held: another owner holds it; it was left alone"),
            **ON_ID,
        },
    )
    return {"get": get, "post": post, "patch": patch, "delete": delete}


class StateDetailSchema(OpenApiViewExtension):  # type: ignore[no-untyped-call]
    target_class = f"{VIEWS}.StateDetailView"

    def view_replacement(self) -> Any:
        return _annotated(self.target_class, **_state_operations(MACHINE_ID))


class StateByIdSchema(OpenApiViewExtension):  # type: ignore[no-untyped-call]
    target_class = f"{VIEWS}.StateByIdView"

    def view_replacement(self) -> Any:
        return _annotated(self.target_class, **_state_operations(ID_QUERY))


class LockDetailSchema(OpenApiViewExtension):  # type: ignore[no-untyped-call]
    target_class = f"{VIEWS}.LockDetailView"

    def view_replacement(self) -> Any:
        return _annotated(self.target_class, **_lock_operations(MACHINE_ID))


class LockByIdSchema(OpenApiViewExtension):  # type: ignore[no-untyped-call]
    target_class = f"{VIEWS}.LockByIdView"

    def view_replacement(self) -> Any:
        return _annotated(self.target_class, **_lock_operations(ID_QUERY))

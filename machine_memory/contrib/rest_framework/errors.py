"""Error responses of the REST API: ``{"code": ..., "detail": ...}`` with a stable ``code``.

Clients branch on ``code`` (and the status), never on ``detail``, which is prose for people
and may change. Every code the API can answer with is listed in ``CODES``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.db import DatabaseError, DataError
from django.http import Http404
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import set_rollback

from machine_memory.exceptions import (
    InvalidMachineId,
    InvalidState,
    LockError,
    LockLost,
    ReadError,
    WriteConflict,
    WriteError,
    WriteOutcomeUnknown,
)

if TYPE_CHECKING:
    from collections.abc import Mapping

logger = logging.getLogger("machine_memory")

# Seconds a client should wait before retrying after a storage failure: the memory has
# already retried transient errors itself (docs/contract.md#read, docs/contract.md#lock),
# so the storage is likely down for longer than a reconnect; a second keeps clients from
# hammering it.
RETRY_AFTER = 1

# code -> what it means. docs/rest-api.md#status-codes is this dict as a table.
CODES = {
    "invalid_id": "400: the id in the URL is not a valid machine id",
    "invalid_state": "400: the state (or its metadata) cannot be stored",
    "invalid_request": "400: the body or a query parameter is malformed; see errors",
    "invalid_precondition": "400: If-Match / If-None-Match is malformed or not allowed here",
    "invalid_lock_token": "400: the Lock-Token header is not a token this API issued",
    "lock_token_required": "400: this request needs the Lock-Token header",
    "parse_error": "400: the body is not JSON",
    "not_authenticated": "401/403: no credentials (401 when the first authenticator has a scheme)",
    "authentication_failed": "401/403: wrong credentials",
    "permission_denied": "403: authenticated, but not allowed (staff only by default)",
    "not_found": "404: no state, no live lock, or If-Match: * on a missing state",
    "method_not_allowed": "405",
    "not_acceptable": "406: the API answers in JSON only",
    "lock_held": "409: POST locks/{id}/ while another owner holds the lock",
    "lock_not_held": "409: the Lock-Token does not hold the live lock (expired, taken over)",
    "lock_lost": "409: a fenced write whose lock was taken over; nothing was written",
    "conflict": "409: a compare-and-set lost where no precondition said what to answer; retry",
    "precondition_failed": "412: If-Match / If-None-Match did not hold; ETag is the current one",
    "unsupported_media_type": "415: send application/json",
    "precondition_required": "428: an update without If-Match; ETag is the current one",
    "throttled": "429: the project's DRF throttling",
    "not_supported": "501: listing locks needs the database lock backend",
    "storage_unavailable": "503: the database or Redis failed; nothing was changed; retry after "
    "Retry-After",
    "write_outcome_unknown": "503: the connection died mid-write; the write may or may not have "
    "been stored: GET the state before retrying",
}


class ApiError(exceptions.APIException):
    """An error response with one of ``CODES`` and optional headers (ETag, Retry-After)."""

    def __init__(
        self,
        status_code: int,
        code: str,
        detail: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        assert code in CODES, code
        super().__init__(detail, code)
        self.status_code = status_code
        self.code = code
        self.headers = dict(headers or {})


def error_response(
    status_code: int,
    code: str,
    detail: str,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> Response:
    return Response({"code": code, "detail": detail, **extra}, status=status_code, headers=headers)


def _storage_unavailable(exc: Exception) -> Response:
    # The cause may name hosts and tables: it goes to the log, not to the client.
    logger.warning("REST API: storage failure: %s", exc, exc_info=exc)
    return error_response(
        status.HTTP_503_SERVICE_UNAVAILABLE,
        "storage_unavailable",
        "The machine memory's storage did not answer; nothing was changed. Retry later.",
        {"Retry-After": str(RETRY_AFTER)},
    )


def _write_outcome_unknown(exc: WriteOutcomeUnknown) -> Response:
    # Not "nothing was changed": the write may have landed (docs/contract.md#write).
    logger.warning("REST API: write outcome unknown: %s", exc, exc_info=exc)
    return error_response(
        status.HTTP_503_SERVICE_UNAVAILABLE,
        "write_outcome_unknown",
        "The connection to the machine memory's storage died during the write, and whether "
        "it was stored could not be settled: the write may or may not have been stored. GET "
        "the state before retrying.",
        {"Retry-After": str(RETRY_AFTER)},
    )


def _response_for(exc: Exception) -> Response | None:
    if isinstance(exc, ApiError):
        return error_response(exc.status_code, exc.code, str(exc.detail), exc.headers)
    if isinstance(exc, InvalidMachineId):
        return error_response(400, "invalid_id", str(exc))
    if isinstance(exc, InvalidState):
        return error_response(400, "invalid_state", str(exc))
    if isinstance(exc, LockLost):
        return error_response(409, "lock_lost", str(exc))
    if isinstance(exc, WriteConflict):  # the views turn the expected ones into 412 / 428
        return error_response(409, "conflict", str(exc))
    if isinstance(exc, WriteError) and isinstance(exc.__cause__, DataError):
        # The database refused the value itself (something validation could not foresee):
        # retrying cannot help, so this is the client's 400, not a 503.
        cause = str(exc.__cause__).splitlines()[0]
        return error_response(400, "invalid_state", f"The database refused the state: {cause}")
    if isinstance(exc, WriteOutcomeUnknown):
        return _write_outcome_unknown(exc)
    if isinstance(exc, ReadError | LockError | WriteError | DatabaseError):
        return _storage_unavailable(exc)
    if isinstance(exc, Http404):
        exc = exceptions.NotFound(*exc.args)
    elif isinstance(exc, DjangoPermissionDenied):
        exc = exceptions.PermissionDenied(*exc.args)
    if isinstance(exc, exceptions.ValidationError):
        return error_response(
            400, "invalid_request", "The request is not valid; see errors.", errors=exc.detail
        )
    if isinstance(exc, exceptions.APIException):
        headers = {}
        auth_header = getattr(exc, "auth_header", None)
        if auth_header:
            headers["WWW-Authenticate"] = str(auth_header)
        wait = getattr(exc, "wait", None)
        if wait:
            headers["Retry-After"] = str(int(wait))
        codes = exc.get_codes()
        code = codes if isinstance(codes, str) else exc.default_code
        return error_response(exc.status_code, str(code), str(exc.detail), headers)
    return None


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """The API's own handler: the project's EXCEPTION_HANDLER keeps serving its other views."""
    response = _response_for(exc)
    if response is not None:
        set_rollback()
    return response

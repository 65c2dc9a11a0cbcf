"""The REST API (machine_memory.contrib.rest_framework) on every database, with DRF's client.

Users live on "default" (django.contrib.auth); the machine memory is routed to the alias
under test with MACHINE_MEMORY["DATABASE"], as a project would route it.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

import pytest
from django.contrib.auth import get_user_model
from django.db import connections
from django.test import override_settings
from django.urls import include, path, reverse
from rest_framework.permissions import IsAdminUser, IsAuthenticated
from rest_framework.test import APIClient

from machine_memory import MachineMemory
from machine_memory.contrib.rest_framework import quote_id
from machine_memory.contrib.rest_framework.errors import CODES, RETRY_AFTER, ApiError
from machine_memory.contrib.rest_framework.views import LOCK_TOKEN, StateDetailView, owner_for
from machine_memory.exceptions import InvalidState, LockLost, WriteConflict
from machine_memory.locks.base import LockBackend
from machine_memory.locks.memory import InMemoryLockBackend
from tests.support import churning_store, new_id
from tests.test_checks import assert_reported, messages_for
from tests.workers import in_thread

if TYPE_CHECKING:
    from collections.abc import Iterator

    from django.contrib.auth.models import AbstractBaseUser
    from rest_framework.response import _MonkeyPatchedResponse as TestResponse

    from machine_memory.locks.base import Fence, LockInfo
    from tests.conftest import ProxiedDatabase

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "/api/machine-memory"

# The URLconf of these tests (pytest.mark.urls): the API mounted as a project mounts it.
urlpatterns = [path("api/machine-memory/", include("machine_memory.contrib.rest_framework.urls"))]

pytestmark = pytest.mark.urls("tests.test_api")

# Every valid id is one path segment: the characters of docs/contract.md#ids, and the ones
# URLs care about.
IDS = [
    "a/b",
    "/",
    "//a//",
    "trailing/",
    "QmFzZTY0+/=",
    "50%",
    "%2F",
    "%41",
    "with space",
    " padded ",
    "é",
    "e\u0301",
    "日本語/サブジェクト",
    "emoji 🎉",
    "line\nbreak",
    "tab\there",
    "?query=1&x#frag",
    "a/../b",
    "./x/..",
    "+",
    "\\",
    "x" * 512,
]


def state_url(machine_id: str) -> str:
    return f"{PREFIX}/states/{quote(machine_id, safe='')}/"


def lock_url(machine_id: str) -> str:
    return f"{PREFIX}/locks/{quote(machine_id, safe='')}/"


def make_user(*, staff: bool) -> AbstractBaseUser:
    return get_user_model().objects.create_user(username=new_id("user"), is_staff=staff)


def client_for(user: AbstractBaseUser | None) -> APIClient:
    client = APIClient()
    if user is not None:
        client.force_authenticate(user)
    return client


def body(response: TestResponse) -> Any:
    return json.loads(response.content)


def assert_error(response: TestResponse, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.content)
    assert response["Content-Type"] == "application/json"
    error: dict[str, Any] = body(response)
    assert error["code"] == code, error
    assert code in CODES
    assert isinstance(error["detail"], str) and error["detail"]
    return error


class Api:
    """A staff client of the API, with the request shapes the tests repeat.

    It notes the locks the API grants it (``acquire``, ``post_lock``), and the ``api``
    fixture releases those still noted when the test ends: a test leaves no live lock behind
    (tests/conftest.py).
    """

    def __init__(self, client: APIClient) -> None:
        self.client = client
        self.granted: dict[str, str] = {}  # id: lock token

    def put(self, machine_id: str, data: dict[str, Any], **headers: str) -> TestResponse:
        return self.put_body(machine_id, {"data": data}, **headers)

    def put_body(self, machine_id: str, payload: Any, **headers: str) -> TestResponse:
        return self.client.put(state_url(machine_id), payload, format="json", headers=headers)

    def get(self, machine_id: str, **headers: str) -> TestResponse:
        return self.client.get(state_url(machine_id), headers=headers)

    def delete(self, machine_id: str, **headers: str) -> TestResponse:
        return self.client.delete(state_url(machine_id), headers=headers)

    def create(self, machine_id: str, data: dict[str, Any]) -> None:
        response = self.put(machine_id, data, **{"If-None-Match": "*"})
        assert response.status_code == 201, response.content

    def acquire(self, machine_id: str, ttl: float | None = None) -> dict[str, Any]:
        payload = {} if ttl is None else {"ttl": ttl}
        response = self.post_lock(machine_id, **payload)
        assert response.status_code == 201, response.content
        acquired: dict[str, Any] = body(response)
        return acquired

    def post_lock(self, machine_id: str, **options: Any) -> TestResponse:
        """POST locks/{id}/ with ``options`` as the body, whatever the answer."""
        response = self.client.post(lock_url(machine_id), options, format="json")
        if response.status_code == 201:
            self.granted[machine_id] = body(response)["lock_token"]
        return response

    def lock_get(self, machine_id: str) -> TestResponse:
        return self.client.get(lock_url(machine_id))

    def extend(self, machine_id: str, token: str | None, ttl: float | None = None) -> TestResponse:
        headers = {} if token is None else {"Lock-Token": token}
        payload = {} if ttl is None else {"ttl": ttl}
        return self.client.patch(lock_url(machine_id), payload, format="json", headers=headers)

    def release(self, machine_id: str, token: str | None) -> TestResponse:
        headers = {} if token is None else {"Lock-Token": token}
        response = self.client.delete(lock_url(machine_id), headers=headers)
        if response.status_code == 204 and token == self.granted.get(machine_id):
            del self.granted[machine_id]
        return response

    def release_granted(self) -> None:
        """Release the locks granted to this client and not released yet (a lock taken
        over since stays with its new holder: 409)."""
        for machine_id, token in list(self.granted.items()):
            self.release(machine_id, token)


def api_settings(alias: str, **more: Any) -> dict[str, Any]:
    # One quick retry on a denied lock: the tests that meet a held lock want the 409 fast.
    return {"DATABASE": alias, "LOCK_RETRIES": 1, "LOCK_BACKOFF": 0.01, **more}


@pytest.fixture
def api(alias: str) -> Iterator[Api]:
    with override_settings(MACHINE_MEMORY=api_settings(alias)):
        client = Api(client_for(make_user(staff=True)))
        yield client
        client.release_granted()


# -- states: read -----------------------------------------------------------------------


def test_get_state_with_etag_metadata_and_lock(api: Api, mid: str) -> None:
    document = {"n": 1, "executionStatus": "active", "source": "com.orders", "nested": {"é": [1]}}
    api.create(mid, document)
    response = api.get(mid)
    assert response.status_code == 200
    assert response["ETag"] == '"1"'
    state = body(response)
    assert state["id"] == mid
    assert state["data"] == document
    assert state["version"] == 1
    assert state["metadata"] == {
        "execution_status": "active",
        "parent_id": None,
        "initiator": None,
        "source": "com.orders",
    }
    assert state["created_at"] and state["updated_at"]
    assert state["lock"] is None

    acquired = api.acquire(mid)
    state = body(api.get(mid))
    assert state["lock"]["token"] == acquired["token"]
    assert state["lock"]["owner"] == acquired["owner"]
    assert acquired["lock_token"] not in json.dumps(state)


def test_get_missing_state_is_404(api: Api, mid: str) -> None:
    assert_error(api.get(mid), 404, "not_found")


def test_get_if_none_match_is_304_while_unchanged(api: Api, mid: str) -> None:
    api.create(mid, {"n": 1})
    for header in ['"1"', 'W/"1"', '"7", "1"', "*"]:
        response = api.get(mid, **{"If-None-Match": header})
        assert response.status_code == 304, header
        assert response["ETag"] == '"1"'
        assert response.content == b""
    assert api.put(mid, {"n": 2}, **{"If-Match": '"1"'}).status_code == 200
    response = api.get(mid, **{"If-None-Match": '"1"'})
    assert response.status_code == 200
    assert response["ETag"] == '"2"'


# -- states: write ----------------------------------------------------------------------


def test_put_if_none_match_star_creates_once(api: Api, mid: str) -> None:
    response = api.put(mid, {"n": 1}, **{"If-None-Match": "*"})
    assert response.status_code == 201
    assert response["ETag"] == '"1"'
    assert body(response) == {"id": mid, "version": 1}
    response = api.put(mid, {"n": 2}, **{"If-None-Match": "*"})
    assert_error(response, 412, "precondition_failed")
    assert response["ETag"] == '"1"'
    assert body(api.get(mid))["data"] == {"n": 1}


def test_put_without_precondition_creates_then_428(api: Api, mid: str) -> None:
    assert api.put(mid, {"n": 1}).status_code == 201
    response = api.put(mid, {"n": 2})
    assert_error(response, 428, "precondition_required")
    assert response["ETag"] == '"1"'
    assert body(api.get(mid))["data"] == {"n": 1}


def test_put_if_match_compares_and_sets(api: Api, mid: str) -> None:
    api.create(mid, {"n": 1})
    response = api.put(mid, {"n": 2}, **{"If-Match": '"1"'})
    assert response.status_code == 200
    assert response["ETag"] == '"2"'
    assert body(response) == {"id": mid, "version": 2}

    # Stale: 412 with the current ETag, nothing written.
    stale = api.put(mid, {"n": 99}, **{"If-Match": '"1"'})
    assert_error(stale, 412, "precondition_failed")
    assert stale["ETag"] == '"2"'
    # If-Match compares strongly: a weak tag never matches (RFC 9110 §13.1.1).
    assert_error(api.put(mid, {"n": 99}, **{"If-Match": 'W/"2"'}), 412, "precondition_failed")
    assert body(api.get(mid))["data"] == {"n": 2}

    # A list matches when any tag does.
    assert api.put(mid, {"n": 3}, **{"If-Match": '"7", "2"'}).status_code == 200
    assert api.get(mid)["ETag"] == '"3"'


def test_put_if_match_on_a_missing_state_is_412(api: Api, mid: str) -> None:
    response = api.put(mid, {"n": 1}, **{"If-Match": '"1"'})
    assert_error(response, 412, "precondition_failed")
    assert "ETag" not in response
    assert_error(api.get(mid), 404, "not_found")


def test_put_if_match_star_overwrites_any_version(api: Api, mid: str) -> None:
    assert_error(api.put(mid, {"failed": True}, **{"If-Match": "*"}), 404, "not_found")
    api.create(mid, {"n": 1})
    api.put(mid, {"n": 2}, **{"If-Match": '"1"'})
    response = api.put(mid, {"failed": True}, **{"If-Match": "*"})
    assert response.status_code == 200
    assert response["ETag"] == '"3"'
    assert body(api.get(mid))["data"] == {"failed": True}


@pytest.mark.parametrize(
    "headers",
    [
        {"If-Match": "1"},
        {"If-Match": '"1'},
        {"If-Match": ""},
        {"If-Match": '"1" "2"'},
        {"If-None-Match": '"1"'},
        {"If-Match": '"1"', "If-None-Match": "*"},
    ],
)
def test_put_malformed_preconditions_are_400(api: Api, mid: str, headers: dict[str, str]) -> None:
    api.create(mid, {"n": 1})
    assert_error(api.put(mid, {"n": 2}, **headers), 400, "invalid_precondition")
    assert body(api.get(mid))["data"] == {"n": 1}


@pytest.mark.parametrize(
    "payload",
    [
        {},
        {"data": [1, 2]},
        {"data": "text"},
        {"data": None},
        {"state": {"n": 1}},
        {"data": {"n": 1}, "extra": 1},
        {"data": {"n": 1}, "metadata": {"colour": "red"}},
        {"data": {"n": 1}, "metadata": "x"},
        [{"data": {"n": 1}}],
    ],
)
def test_put_malformed_bodies_are_400(api: Api, mid: str, payload: Any) -> None:
    error = assert_error(api.put_body(mid, payload), 400, "invalid_request")
    assert isinstance(error["errors"], dict)
    assert_error(api.get(mid), 404, "not_found")


def test_put_states_the_memory_refuses_are_400(api: Api, alias: str, mid: str) -> None:
    mismatch = {"data": {"n": 1}, "metadata": {"subject": "another id"}}
    assert_error(api.put_body(mid, mismatch), 400, "invalid_state")
    with override_settings(MACHINE_MEMORY=api_settings(alias, MAX_STATE_BYTES=64)):
        assert_error(api.put(mid, {"text": "x" * 100}), 400, "invalid_state")
    # Not JSON at all, NaN (strict JSON), and a form: the parser's codes.
    for content, content_type, status, code in [
        ("{not json", "application/json", 400, "parse_error"),
        ('{"data": {"n": NaN}}', "application/json", 400, "parse_error"),
        ("data=1", "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
    ]:
        response = api.client.generic("PUT", state_url(mid), content, content_type)
        assert_error(response, status, code)
    assert_error(api.get(mid), 404, "not_found")


def test_put_nul_in_a_string(api: Api, mid: str) -> None:
    # Valid JSON, but PostgreSQL's jsonb cannot hold \u0000: refused on every database.
    response = api.put(mid, {"text": "a\x00b"})
    assert_error(response, 400, "invalid_state")
    assert_error(api.get(mid), 404, "not_found")


def test_put_metadata(api: Api, mid: str) -> None:
    parent = new_id("parent")
    payload = {
        "data": {"executionStatus": "done", "source": "from-document"},
        "metadata": {"subject": mid, "parent_subject": parent, "initiator": "me", "source": ""},
    }
    assert api.put_body(mid, payload).status_code == 201
    assert body(api.get(mid))["metadata"] == {
        "execution_status": "done",
        "parent_id": parent,
        "initiator": "me",
        "source": "",
    }


def test_put_metadata_on_every_way_of_writing(api: Api, mid: str) -> None:
    """The metadata reach the columns whichever precondition the PUT carries: an ETag, *,
    or none from the lock holder."""

    def put(initiator: str, **headers: str) -> None:
        payload = {"data": {"n": initiator}, "metadata": {"initiator": initiator}}
        response = api.put_body(mid, payload, **headers)
        assert response.status_code in (200, 201), response.content

    def initiator() -> str:
        value: str = body(api.get(mid))["metadata"]["initiator"]
        return value

    put("creator", **{"If-None-Match": "*"})
    assert initiator() == "creator"
    put("by-etag", **{"If-Match": '"1"'})
    assert initiator() == "by-etag"
    put("by-star", **{"If-Match": "*"})
    assert initiator() == "by-star"
    token = api.acquire(mid)["lock_token"]
    put("by-holder", **{"Lock-Token": token})
    assert initiator() == "by-holder"
    assert api.release(mid, token).status_code == 204


# -- states: delete -----------------------------------------------------------------------


def test_delete_state(api: Api, mid: str) -> None:
    assert_error(api.delete(mid), 404, "not_found")
    api.create(mid, {"n": 1})
    assert api.delete(mid).status_code == 204
    assert_error(api.get(mid), 404, "not_found")
    assert_error(api.delete(mid), 404, "not_found")
    # The id can be created again from scratch.
    api.create(mid, {"n": 1})


def test_delete_honours_if_match(api: Api, mid: str) -> None:
    api.create(mid, {"n": 1})
    api.put(mid, {"n": 2}, **{"If-Match": '"1"'})
    stale = api.delete(mid, **{"If-Match": '"1"'})
    assert_error(stale, 412, "precondition_failed")
    assert stale["ETag"] == '"2"'
    assert api.get(mid).status_code == 200
    assert api.delete(mid, **{"If-Match": '"2"'}).status_code == 204
    assert_error(api.delete(mid, **{"If-Match": '"2"'}), 412, "precondition_failed")
    assert_error(api.delete(mid, **{"If-Match": "*"}), 404, "not_found")
    api.create(mid, {"n": 1})
    assert api.delete(mid, **{"If-Match": "*"}).status_code == 204


# -- ids ----------------------------------------------------------------------------------


@pytest.mark.parametrize("machine_id", IDS, ids=lambda value: repr(value)[:40])
def test_every_valid_id_is_one_path_segment(api: Api, machine_id: str) -> None:
    # Each id is used by this test only, once per database of the run.
    api.create(machine_id, {"id": machine_id})
    response = api.get(machine_id)
    assert body(response)["id"] == machine_id
    assert body(response)["data"] == {"id": machine_id}
    # The same resource through quote_id() and through Django's reverse().
    assert api.client.get(f"{PREFIX}/states/{quote_id(machine_id)}/").status_code == 200
    url = reverse("machine_memory_api:state-detail", kwargs={"machine_id": machine_id})
    assert body(api.client.get(url))["id"] == machine_id
    assert api.put(machine_id, {"n": 2}, **{"If-Match": '"1"'}).status_code == 200

    acquired = api.acquire(machine_id)
    assert body(api.lock_get(machine_id))["id"] == machine_id
    assert api.extend(machine_id, acquired["lock_token"]).status_code == 204
    assert api.release(machine_id, acquired["lock_token"]).status_code == 204
    assert_error(api.lock_get(machine_id), 404, "not_found")

    listed = body(api.client.get(f"{PREFIX}/states/", {"prefix": machine_id}))
    assert machine_id in [row["id"] for row in listed["results"]]
    assert api.delete(machine_id).status_code == 204


@pytest.mark.parametrize("machine_id", [".", ".."], ids=["dot", "dotdot"])
def test_dot_segments_by_themselves(api: Api, machine_id: str) -> None:
    # The only ids whose quote() is not enough for a real client; the test client sends
    # the path as it is, so both spellings reach the same id.
    api.create(machine_id, {"n": 1})
    assert body(api.client.get(f"{PREFIX}/states/{quote_id(machine_id)}/"))["id"] == machine_id
    assert api.delete(machine_id).status_code == 204


def test_ids_compare_exactly(api: Api, mid: str) -> None:
    api.create(mid + "-ab", {"which": "lower"})
    for other in [mid + "-AB", mid + "-ab ", mid + "-áb", mid.upper() + "-ab"]:
        assert_error(api.get(other), 404, "not_found")
    listed = body(api.client.get(f"{PREFIX}/states/", {"prefix": mid.upper()}))
    assert listed["results"] == []


@pytest.mark.parametrize(
    ("segment", "status", "code"),
    [
        ("x" * 513, 400, "invalid_id"),
        ("a%00b", 400, "invalid_id"),
        ("", 404, "not_found"),
    ],
)
def test_invalid_ids(api: Api, segment: str, status: int, code: str) -> None:
    for url in [f"{PREFIX}/states/{segment}/", f"{PREFIX}/locks/{segment}/"]:
        response = api.client.get(url)
        assert response.status_code == status
        if status == 400:
            assert_error(response, status, code)
    assert_error(api.client.post(f"{PREFIX}/locks/{'x' * 513}/"), 400, "invalid_id")


# -- states: list -----------------------------------------------------------------------


def test_list_pages_by_cursor_without_counts(api: Api, mid: str) -> None:
    ids = [f"{mid}/{n}" for n in range(5)]
    for machine_id in reversed(ids):
        api.create(machine_id, {"big": "x" * 1000})
    url: str | None = f"{PREFIX}/states/?prefix={quote(mid)}&page_size=2"
    seen: list[str] = []
    pages = 0
    while url is not None:
        page = body(api.client.get(url))
        assert set(page) == {"next", "previous", "results"}  # no "count": no COUNT(*)
        for row in page["results"]:
            assert "data" not in row  # listings leave the documents out
            assert row["version"] == 1
        seen += [row["id"] for row in page["results"]]
        pages += 1
        url = page["next"]
        if url is not None:
            parts = urlsplit(url)
            url = f"{parts.path}?{parts.query}"
    assert seen == ids
    assert pages == 3
    assert_error(api.client.get(f"{PREFIX}/states/?cursor=garbage"), 404, "not_found")


def test_list_filters(api: Api, mid: str) -> None:
    parent = new_id("parent")
    rows = {
        f"{mid}/1": {"executionStatus": "done", "source": "a", "parentSubject": parent},
        f"{mid}/2": {"executionStatus": "active", "source": "a"},
        f"{mid}/3": {"executionStatus": "done", "source": "b"},
        f"{mid.upper()}/4": {"executionStatus": "done", "source": "a"},
    }
    for machine_id, document in rows.items():
        api.create(machine_id, document)

    def listed(**params: str) -> list[str]:
        page = body(api.client.get(f"{PREFIX}/states/", {"prefix": mid, **params}))
        return [row["id"] for row in page["results"]]

    assert listed() == [f"{mid}/1", f"{mid}/2", f"{mid}/3"]
    assert listed(status="done") == [f"{mid}/1", f"{mid}/3"]
    assert listed(source="a") == [f"{mid}/1", f"{mid}/2"]
    assert listed(status="done", source="b") == [f"{mid}/3"]
    assert listed(parent=parent) == [f"{mid}/1"]
    assert listed(prefix=f"{mid}/2") == [f"{mid}/2"]
    for name in ["status", "source", "parent", "prefix"]:
        response = api.client.get(f"{PREFIX}/states/", {name: "a\x00"})
        assert_error(response, 400, "invalid_request")
    assert_error(api.client.get(f"{PREFIX}/states/", {"prefix": "x" * 513}), 400, "invalid_request")


# -- concurrency --------------------------------------------------------------------------


def race(requests: list[Any]) -> list[int]:
    """Run each request (a callable taking an APIClient) in a thread of its own, at once."""
    user = make_user(staff=True)
    barrier = threading.Barrier(len(requests))
    statuses: list[int] = [0] * len(requests)
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            client = client_for(user)
            barrier.wait(timeout=10)
            statuses[index] = requests[index](client).status_code
        except BaseException as exc:
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=run, args=(n,)) for n in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors, errors
    return statuses


def test_two_clients_racing_from_the_same_etag(api: Api, mid: str) -> None:
    api.create(mid, {"n": 0})
    for version in range(1, 6):
        etag = api.get(mid)["ETag"]
        assert etag == f'"{version}"'
        writers = [writer(mid, {"by": name}, etag) for name in ("first", "second")]
        statuses = race(writers)
        assert sorted(statuses) == [200, 412], statuses
    assert body(api.get(mid))["version"] == 6


def writer(machine_id: str, data: dict[str, Any], etag: str) -> Any:
    def write(client: APIClient) -> TestResponse:
        return client.put(
            state_url(machine_id), {"data": data}, format="json", headers={"If-Match": etag}
        )

    return write


def contend(
    threads: int, rounds: int, request: Any, start: threading.Barrier | None = None
) -> list[tuple[int, str | None, Any]]:
    """``threads`` threads (one APIClient each) send ``request(client, thread, round)``
    ``rounds`` times each, all starting at once; every (status, ETag, request) in order."""
    user = make_user(staff=True)
    barrier = start or threading.Barrier(threads)
    results: list[list[tuple[int, str | None, Any]]] = [[] for _ in range(threads)]
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            client = client_for(user)
            barrier.wait(timeout=10)
            for number in range(rounds):
                response, sent = request(client, index, number)
                results[index].append((response.status_code, response.get("ETag"), sent))
        except BaseException as exc:
            errors.append(exc)
        finally:
            connections.close_all()

    workers = [threading.Thread(target=run, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert not errors, errors
    return [result for thread_results in results for result in thread_results]


def test_overwrites_under_contention_all_land(api: Api, mid: str) -> None:
    """If-Match: * from many clients at once: every one is stored, none gives up with 409.

    (It used to read and compare-and-set, and answered 409 after five lost races.)
    """
    api.create(mid, {"n": 0})
    threads, rounds = 6, 15

    def overwrite(client: APIClient, thread: int, number: int) -> tuple[TestResponse, Any]:
        data = {"thread": thread, "round": number}
        response = client.put(
            state_url(mid), {"data": data}, format="json", headers={"If-Match": "*"}
        )
        return response, data

    results = contend(threads, rounds, overwrite)
    assert [status for status, _, _ in results] == [200] * threads * rounds, results
    # Each overwrite got a version of its own, and none was lost.
    versions = {int(etag.strip('"')): data for _, etag, data in results if etag}
    assert sorted(versions) == list(range(2, 2 + threads * rounds))
    final = api.get(mid)
    assert final["ETag"] == f'"{1 + threads * rounds}"'
    assert body(final)["data"] == versions[1 + threads * rounds]


def test_delete_under_contention_with_overwrites(api: Api, mid: str) -> None:
    """A DELETE racing If-Match: * overwrites deletes (204), never 409; overwrites after it 404."""
    api.create(mid, {"n": 0})
    threads, rounds = 4, 10
    start = threading.Barrier(threads + 1)

    def overwrite(client: APIClient, thread: int, number: int) -> tuple[TestResponse, Any]:
        data = {"thread": thread, "round": number}
        response = client.put(
            state_url(mid), {"data": data}, format="json", headers={"If-Match": "*"}
        )
        return response, data

    deleted: list[int] = []

    def delete() -> None:
        client = client_for(make_user(staff=True))
        try:
            start.wait(timeout=10)
            deleted.append(client.delete(state_url(mid)).status_code)
        finally:
            connections.close_all()

    deleter = threading.Thread(target=delete)
    deleter.start()
    results = contend(threads, rounds, overwrite, start)
    deleter.join(timeout=60)
    assert deleted == [204]
    statuses = [status for status, _, _ in results]
    assert set(statuses) <= {200, 404}, statuses
    # Overwrites only go on while the state exists: every 404 comes after every 200 of the
    # same thread.
    for thread in range(threads):
        mine = statuses[thread * rounds : (thread + 1) * rounds]
        assert mine == sorted(mine), mine
    versions = [int(etag.strip('"')) for status, etag, _ in results if status == 200 and etag]
    assert len(set(versions)) == len(versions)
    assert_error(api.get(mid), 404, "not_found")


def test_stale_if_match_overwrites_are_412_with_the_winners_etag(api: Api, mid: str) -> None:
    api.create(mid, {"n": 0})
    writers = [writer(mid, {"by": name}, '"1"') for name in ("a", "b", "c", "d")]
    user = make_user(staff=True)
    responses: list[TestResponse] = []
    barrier = threading.Barrier(len(writers))

    def run(index: int) -> None:
        try:
            barrier.wait(timeout=10)
            responses.append(writers[index](client_for(user)))
        finally:
            connections.close_all()

    workers = [threading.Thread(target=run, args=(n,)) for n in range(len(writers))]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert sorted(r.status_code for r in responses) == [200, 412, 412, 412]
    for response in responses:
        assert response["ETag"] == '"2"'  # the winner's version, on the 412s too
        if response.status_code == 412:
            assert_error(response, 412, "precondition_failed")
    [winner] = [r for r in responses if r.status_code == 200]
    stored = body(api.get(mid))
    assert stored["version"] == 2
    # A list of tags picks the one that matches; stale lists are 412 with the current ETag.
    stale = api.put(mid, {"n": 9}, **{"If-Match": '"7", "1"'})
    assert_error(stale, 412, "precondition_failed")
    assert stale["ETag"] == '"2"'
    assert body(api.get(mid))["data"] == stored["data"] != {"n": 9}
    assert winner["ETag"] == '"2"'
    assert api.put(mid, {"n": 3}, **{"If-Match": '"1", W/"2", "2"'}).status_code == 200
    # Stale deletes from one ETag: one wins, the others find no state (412, no ETag).
    statuses = race([deleter(mid, '"3"')] * 3)
    assert sorted(statuses) == [204, 412, 412], statuses
    assert_error(api.get(mid), 404, "not_found")


def deleter(machine_id: str, etag: str) -> Any:
    def delete(client: APIClient) -> TestResponse:
        return client.delete(state_url(machine_id), headers={"If-Match": etag})

    return delete


def test_racing_creates_make_one_state(api: Api, mid: str) -> None:
    def create(client: APIClient) -> TestResponse:
        return client.put(
            state_url(mid), {"data": {"n": 1}}, format="json", headers={"If-None-Match": "*"}
        )

    statuses = race([create] * 4)
    assert sorted(statuses) == [201, 412, 412, 412], statuses


def test_racing_acquires_grant_one_lock(api: Api, mid: str) -> None:
    granted: list[str] = []

    def acquire(client: APIClient) -> TestResponse:
        response = client.post(lock_url(mid), {"ttl": 30}, format="json")
        if response.status_code == 201:
            granted.append(body(response)["lock_token"])
        return response

    statuses = race([acquire] * 4)
    assert sorted(statuses) == [201, 409, 409, 409], statuses
    assert api.release(mid, granted[0]).status_code == 204


# -- locks ------------------------------------------------------------------------------


def test_acquire_returns_a_token_that_only_it_knows(api: Api, mid: str) -> None:
    acquired = api.acquire(mid, ttl=30)
    assert set(acquired) == {"id", "lock_token", "owner", "token", "acquired_at", "expires_at"}
    match = LOCK_TOKEN.match(acquired["lock_token"])
    assert match is not None
    assert int(match[1]) == acquired["token"]
    # The stored owner is a hash of the secret: neither storage nor GET holds the token.
    assert acquired["owner"] == owner_for(match[2])
    assert acquired["owner"] == "api:" + hashlib.sha256(match[2].encode()).hexdigest()
    assert acquired["expires_at"] > acquired["acquired_at"]

    held = body(api.lock_get(mid))
    assert held == {key: acquired[key] for key in held}
    assert set(held) == {"id", "owner", "token", "acquired_at", "expires_at"}
    assert match[2] not in json.dumps(held)

    again = api.post_lock(mid)
    assert_error(again, 409, "lock_held")
    assert match[2] not in again.content.decode()


def test_acquire_uses_lock_ttl_by_default(api: Api, alias: str, mid: str) -> None:
    with override_settings(MACHINE_MEMORY=api_settings(alias, LOCK_TTL=0.3)):
        api.acquire(mid)
        time.sleep(0.5)
        assert_error(api.lock_get(mid), 404, "not_found")
        api.acquire(mid)  # expired: taken over


@pytest.mark.parametrize(
    "payload", [{"ttl": 0}, {"ttl": -1}, {"ttl": "5"}, {"ttl": True}, {"ttl": 1e9}, {"tll": 5}]
)
def test_lock_ttl_must_be_a_sane_number(api: Api, mid: str, payload: dict[str, Any]) -> None:
    response = api.post_lock(mid, **payload)
    assert_error(response, 400, "invalid_request")
    assert_error(api.lock_get(mid), 404, "not_found")
    acquired = api.acquire(mid)
    assert_error(api.extend(mid, acquired["lock_token"], ttl=-1), 400, "invalid_request")


def test_extend(api: Api, mid: str) -> None:
    acquired = api.acquire(mid, ttl=5)
    response = api.extend(mid, acquired["lock_token"], ttl=600)
    assert response.status_code == 204
    lock = body(api.lock_get(mid))
    assert lock["expires_at"] > acquired["expires_at"]
    # By the TTL asked for, not the default: 600 s from the extend, so at least 599 s after
    # the acquisition.
    acquired_at, expires_at = (
        datetime.datetime.fromisoformat(lock[key].replace("Z", "+00:00"))
        for key in ("acquired_at", "expires_at")
    )
    assert (
        datetime.timedelta(seconds=599)
        <= expires_at - acquired_at
        <= datetime.timedelta(seconds=601)
    )
    assert_error(api.extend(mid, None), 400, "lock_token_required")
    assert_error(api.extend(mid, "nonsense"), 400, "invalid_lock_token")
    assert_error(api.extend(mid, f"{2**63}.{'a' * 43}"), 400, "invalid_lock_token")
    forged = f"{acquired['token']}.{'A' * 43}"
    assert_error(api.extend(mid, forged), 409, "lock_not_held")


def test_release_with_a_wrong_token_is_409_and_keeps_the_lock(api: Api, mid: str) -> None:
    acquired = api.acquire(mid, ttl=30)
    other = api.acquire(new_id())  # a real token, for another id
    for wrong in [other["lock_token"], f"{acquired['token']}.{'A' * 43}"]:
        assert_error(api.release(mid, wrong), 409, "lock_not_held")
        assert body(api.lock_get(mid))["token"] == acquired["token"]
    assert_error(api.release(mid, None), 400, "lock_token_required")
    assert_error(api.release(mid, "1.short"), 400, "invalid_lock_token")

    assert api.release(mid, acquired["lock_token"]).status_code == 204
    assert_error(api.lock_get(mid), 404, "not_found")
    # Releasing again is fine (docs/contract.md#unlock: unlock is tolerant), and so is a stranger's
    # release once no lock is live.
    assert api.release(mid, acquired["lock_token"]).status_code == 204
    assert api.release(mid, other["lock_token"]).status_code == 204
    # Tokens keep increasing across releases.
    assert api.acquire(mid)["token"] > acquired["token"]


def test_fenced_writes_after_a_takeover_are_409(api: Api, mid: str) -> None:
    api.create(mid, {"n": 0})
    first = api.acquire(mid, ttl=0.3)
    # The holder writes through its token.
    fenced = {"Lock-Token": first["lock_token"]}
    assert api.put(mid, {"n": 1}, **{"If-Match": '"1"'}, **fenced).status_code == 200
    time.sleep(0.5)
    second = api.acquire(mid, ttl=30)
    assert second["token"] > first["token"]

    # Every write through the lost token is refused, whatever its precondition.
    for headers in [{"If-Match": '"2"'}, {"If-Match": "*"}]:
        assert_error(api.put(mid, {"n": 99}, **headers, **fenced), 409, "lock_lost")
    assert_error(api.delete(mid, **fenced), 409, "lock_lost")
    assert_error(api.extend(mid, first["lock_token"]), 409, "lock_not_held")
    assert_error(api.release(mid, first["lock_token"]), 409, "lock_not_held")
    assert body(api.lock_get(mid))["token"] == second["token"]
    assert body(api.get(mid))["data"] == {"n": 1}

    # The new holder writes; without a token a write is only version-checked
    # (docs/contract.md#write).
    new = {"Lock-Token": second["lock_token"]}
    assert api.put(mid, {"n": 2}, **{"If-Match": '"2"'}, **new).status_code == 200
    assert api.put(mid, {"n": 3}, **{"If-Match": '"3"'}).status_code == 200
    assert api.release(mid, second["lock_token"]).status_code == 204


def test_fenced_create_after_a_takeover_is_409(api: Api, mid: str) -> None:
    first = api.acquire(mid, ttl=0.3)
    time.sleep(0.5)
    api.acquire(mid)
    response = api.put(mid, {"n": 1}, **{"If-None-Match": "*", "Lock-Token": first["lock_token"]})
    assert_error(response, 409, "lock_lost")
    assert_error(api.get(mid), 404, "not_found")


def test_list_locks(api: Api, mid: str) -> None:
    mine = {f"{mid}/{n}": api.acquire(f"{mid}/{n}", ttl=30) for n in range(3)}
    api.release(f"{mid}/1", mine[f"{mid}/1"]["lock_token"])
    found: dict[str, Any] = {}
    url: str | None = f"{PREFIX}/locks/?page_size=500"
    while url is not None:
        page = body(api.client.get(url))
        assert set(page) == {"next", "previous", "results"}
        found.update((row["id"], row) for row in page["results"] if row["id"].startswith(mid))
        url = page["next"]
    assert sorted(found) == [f"{mid}/0", f"{mid}/2"]
    for machine_id, row in found.items():
        assert row["token"] == mine[machine_id]["token"]
        assert mine[machine_id]["lock_token"].split(".")[1] not in json.dumps(row)


class UnlistedLocks(LockBackend):
    """A lock backend with no table to list (like Redis): only constructed, never used."""

    def acquire(self, machine_id: str, owner: str, ttl: float) -> int | None:
        raise NotImplementedError

    def release(self, machine_id: str, owner: str) -> bool:
        raise NotImplementedError

    def extend(self, machine_id: str, owner: str, token: int, ttl: float) -> bool:
        raise NotImplementedError

    def info(self, machine_id: str) -> LockInfo | None:
        raise NotImplementedError

    def fence(self, machine_id: str, owner: str, token: int) -> Fence:
        raise NotImplementedError

    def is_lost(self, machine_id: str, owner: str, token: int) -> bool:
        raise NotImplementedError


def test_list_locks_needs_the_database_backend(api: Api, alias: str) -> None:
    backend = f"{__name__}.UnlistedLocks"
    with override_settings(MACHINE_MEMORY=api_settings(alias, LOCK_BACKEND=backend)):
        assert_error(api.client.get(f"{PREFIX}/locks/"), 501, "not_supported")


# -- errors -------------------------------------------------------------------------------


def test_storage_failures_are_503_with_retry_after(alias: str, mid: str) -> None:
    from django.conf import settings

    down = settings.DOWN_DATABASES[alias]
    api = Api(client_for(make_user(staff=True)))
    with override_settings(MACHINE_MEMORY=api_settings(down, READ_RETRIES=0)):
        token = {"Lock-Token": f"1.{'a' * 43}"}
        responses: list[TestResponse] = [
            api.get(mid),
            api.put(mid, {"n": 1}),
            api.put(mid, {"n": 1}, **{"If-Match": '"1"'}),
            api.put(mid, {"n": 1}, **{"If-Match": "*"}),
            api.delete(mid),
            api.client.get(f"{PREFIX}/states/"),
            api.client.get(f"{PREFIX}/locks/"),
            api.lock_get(mid),
            api.client.post(lock_url(mid), {}, format="json"),
            api.extend(mid, token["Lock-Token"]),
            api.release(mid, token["Lock-Token"]),
        ]
        for response in responses:
            assert_error(response, 503, "storage_unavailable")
            assert response["Retry-After"] == str(RETRY_AFTER)


WRITES_THAT_COMMIT = {
    "put-any": lambda api, mid: api.put(mid, {"n": 2}, **{"If-Match": "*"}),
    "put-version": lambda api, mid: api.put(mid, {"n": 2}, **{"If-Match": '"1"'}),
    "delete": lambda api, mid: api.delete(mid),
}
# The statement whose reply is lost: the COMMIT of a change under the row's lock, or the
# one autocommitted compare-and-set of an If-Match at a version.
COMMITTED_BY = {
    "put-any": b"COMMIT",
    "put-version": b"UPDATE machine_memory_state",
    "delete": b"COMMIT",
}


@pytest.mark.parametrize("request_kind", list(WRITES_THAT_COMMIT))
def test_write_whose_outcome_is_unknown_is_503_write_outcome_unknown(
    proxied: ProxiedDatabase, mid: str, request_kind: str
) -> None:
    """A real fault: the server commits, the reply is lost on the way back, and every new
    connection is refused, so the memory cannot look whether the write was stored."""
    api = Api(client_for(make_user(staff=True)))
    # Plain SQL on the wire (as the proxied fixture sets it), so the trigger can see it.
    with override_settings(MACHINE_MEMORY=api_settings(proxied.alias, PREPARED_STATEMENTS=False)):
        api.create(mid, {"n": 1})
        trigger = proxied.proxy.cut_after_reply(COMMITTED_BY[request_kind], then="refuse")
        response = WRITES_THAT_COMMIT[request_kind](api, mid)
        assert trigger.count == 1
        error = assert_error(response, 503, "write_outcome_unknown")
        assert response["Retry-After"] == str(RETRY_AFTER)
        assert "may or may not have been stored" in error["detail"]
        assert "nothing was changed" not in error["detail"].lower()
        proxied.proxy.accept()
    # It had in fact been stored: "nothing was changed" would have been a lie.
    expected = None if request_kind == "delete" else {"n": 2}
    assert MachineMemory(using=proxied.real).read(mid) == expected


def test_write_error_stays_storage_unavailable_nothing_changed(
    proxied: ProxiedDatabase, mid: str
) -> None:
    """The connection dies before the overwrite has sent its UPDATE (while it reads the
    row's version under the row lock), and reconnecting is refused: nothing was stored."""
    api = Api(client_for(make_user(staff=True)))
    with override_settings(MACHINE_MEMORY=api_settings(proxied.alias)):
        api.create(mid, {"n": 1})
        trigger = proxied.proxy.cut_before(b"FOR UPDATE", then="refuse")
        response = api.put(mid, {"n": 2}, **{"If-Match": "*"})
        assert trigger.count == 1
        error = assert_error(response, 503, "storage_unavailable")
        assert "nothing was changed" in error["detail"]
        assert response["Retry-After"] == str(RETRY_AFTER)
        proxied.proxy.accept()
    assert MachineMemory(using=proxied.real).read(mid) == {"n": 1}


def test_a_create_or_overwrite_that_keeps_losing_is_409() -> None:
    # The lock holder's PUT without a precondition creates or overwrites; when other writers
    # create and delete the id between each of its tries, it gives up with a 409 that says
    # nothing was stored. Staged in process: a database cannot be made to lose three times
    # in a row on cue.
    store = churning_store()
    memory = MachineMemory(store=store, lock_backend=InMemoryLockBackend(shared=store.shared))
    with pytest.raises(ApiError) as raised:
        StateDetailView._overwrite(memory, "m", {"n": 1}, None, create=True)
    assert (raised.value.status_code, raised.value.code) == (409, "conflict")
    assert str(raised.value.detail) == (
        "Machine 'm' kept changing between creates and deletes by other writers; nothing was "
        "stored. Retry."
    )
    assert memory.read("m") == {"theirs": True}


def test_a_release_refused_for_a_lock_that_is_gone_when_the_view_looks_is_204(
    api: Api, alias: str, mid: str
) -> None:
    """The release was refused because another owner held the lock; by the time the view
    looks, nobody does. The client wanted the id free of its lock, and it is: 204."""
    stale = api.acquire(mid, ttl=0.2)["lock_token"]
    time.sleep(0.3)
    other = MachineMemory(using=alias)
    assert other.lock(mid)  # took it over
    looks: list[str] = []
    released: list[bool] = []

    def let_the_other_release_first(
        execute: Any, sql: str, params: Any, many: bool, context: Any
    ) -> Any:
        # The release's own look finds the other's lock (unlock() is False); before the
        # view's look, the other releases it.
        if sql.startswith("SELECT owner, token, acquired_at, expires_at"):
            looks.append(sql)
            if len(looks) == 2:
                released.append(in_thread(lambda: other.unlock(mid)))
        return execute(sql, params, many, context)

    try:
        with connections[alias].execute_wrapper(let_the_other_release_first):
            response = api.release(mid, stale)
    finally:
        other.unlock(mid)
    assert len(looks) == 2 and released == [True]  # the view looked after the release
    assert response.status_code == 204
    assert_error(api.lock_get(mid), 404, "not_found")


def test_a_release_that_storage_fails_is_503_and_leaves_the_lock(
    proxied: ProxiedDatabase, mid: str, caplog: pytest.LogCaptureFixture
) -> None:
    """unlock() never raises: it answers False after its retries. The view looks once more
    and finds the lock still this token's, so the release failed (503), not a 409."""
    api = Api(client_for(make_user(staff=True)))
    with override_settings(MACHINE_MEMORY=api_settings(proxied.alias, PREPARED_STATEMENTS=False)):
        token = api.acquire(mid)["lock_token"]
        trigger = proxied.proxy.cut_before(b"UPDATE machine_memory_lock", times=None)
        with caplog.at_level(logging.WARNING, logger="machine_memory"):
            response = api.release(mid, token)
        assert trigger.count >= 1
        assert_error(response, 503, "storage_unavailable")
        proxied.proxy.disarm()
        said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert said[-1] == f"REST API: storage failure: Releasing the lock on {mid!r} failed."
        assert api.release(mid, token).status_code == 204  # still held, by this token


def test_atomic_requests_do_not_wrap_the_api(api: Api, alias: str, mid: str) -> None:
    # Locks must commit at once (docs/contract.md#transactions), so the views opt out of
    # ATOMIC_REQUESTS.
    settings_dict = connections[alias].settings_dict
    settings_dict["ATOMIC_REQUESTS"] = True
    try:
        acquired = api.acquire(mid)
        api.create(mid, {"n": 1})
    finally:
        settings_dict["ATOMIC_REQUESTS"] = False
    info = MachineMemory(using=alias).lock_info(mid)
    assert info is not None and info.token == acquired["token"]


def test_json_only(api: Api, mid: str) -> None:
    response = api.client.get(state_url(mid), headers={"Accept": "text/html"})
    assert_error(response, 406, "not_acceptable")
    assert_error(api.client.post(state_url(mid)), 405, "method_not_allowed")


# -- permissions ------------------------------------------------------------------------

ENDPOINTS = [
    ("get", "states/"),
    ("get", "states/{id}/"),
    ("put", "states/{id}/"),
    ("delete", "states/{id}/"),
    ("get", "locks/"),
    ("get", "locks/{id}/"),
    ("post", "locks/{id}/"),
    ("patch", "locks/{id}/"),
    ("delete", "locks/{id}/"),
]


def call(client: APIClient, method: str, endpoint: str, machine_id: str) -> TestResponse:
    url = f"{PREFIX}/{endpoint.format(id=quote(machine_id, safe=''))}"
    response: TestResponse = getattr(client, method)(url, {"data": {"n": 1}}, format="json")
    return response


@pytest.mark.parametrize(("method", "endpoint"), ENDPOINTS)
def test_anonymous_and_non_staff_users_are_refused(
    db_access: None, method: str, endpoint: str
) -> None:
    machine_id = new_id() + "/x"
    # DRF's default authenticators put SessionAuthentication first, which has no
    # WWW-Authenticate scheme: anonymous requests get 403 (401 where the first one has a
    # scheme, as in the example project: see test_api_live).
    assert_error(call(client_for(None), method, endpoint, machine_id), 403, "not_authenticated")
    user = make_user(staff=False)
    response = call(client_for(user), method, endpoint, machine_id)
    assert_error(response, 403, "permission_denied")
    # Nothing was touched.
    assert MachineMemory().read(machine_id) is None
    assert MachineMemory().lock_info(machine_id) is None


def test_basic_authentication_of_a_real_staff_user(db_access: None, mid: str) -> None:
    username = new_id("staff")
    get_user_model().objects.create_user(username=username, password="pw-1", is_staff=True)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=basic(username, "pw-1"))
    assert client.put(state_url(mid), {"data": {"n": 1}}, format="json").status_code == 201
    client.credentials(HTTP_AUTHORIZATION=basic(username, "wrong"))
    assert_error(client.get(state_url(mid)), 403, "authentication_failed")


def basic(username: str, password: str) -> str:
    import base64

    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


COMPOSED = IsAuthenticated & IsAdminUser


@pytest.mark.parametrize(
    ("classes", "anonymous", "non_staff"),
    [
        (["rest_framework.permissions.IsAuthenticated"], 403, 201),
        (("rest_framework.permissions.AllowAny",), 201, 201),
        ([f"{__name__}.COMPOSED"], 403, 403),
    ],
)
def test_api_permission_classes_setting(
    db_access: None, mid: str, classes: list[str], anonymous: int, non_staff: int
) -> None:
    with override_settings(MACHINE_MEMORY={"API_PERMISSION_CLASSES": classes}):
        anonymous_put = client_for(None).put(state_url(mid + "a"), {"data": {}}, format="json")
        assert anonymous_put.status_code == anonymous
        user = make_user(staff=False)
        non_staff_put = client_for(user).put(state_url(mid + "b"), {"data": {}}, format="json")
        assert non_staff_put.status_code == non_staff
        assert messages_for({"API_PERMISSION_CLASSES": classes}) == []


# -- machine_memory.E015 ------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "rest_framework.permissions.IsAdminUser",
        [],
        [1],
        [""],
        ["no_such_module.Permission"],
        ["rest_framework.permissions.NoSuchClass"],
        ["machine_memory.conf.Settings"],
        ["rest_framework.permissions.IsAdminUser", "machine_memory.conf.conf"],
    ],
)
def test_e015_api_permission_classes(value: Any) -> None:
    message = assert_reported(messages_for({"API_PERMISSION_CLASSES": value}), "E015")
    assert "API_PERMISSION_CLASSES" in message.msg


def test_e015_without_rest_framework(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "rest_framework.permissions", None)
    value = {"API_PERMISSION_CLASSES": ["rest_framework.permissions.IsAdminUser"]}
    message = assert_reported(messages_for(value), "E015")
    assert "django-machine-memory[drf]" in message.msg


# -- packaging ------------------------------------------------------------------------------


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={"DJANGO_SETTINGS_MODULE": "tests.settings", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_import_without_rest_framework_names_the_extra() -> None:
    result = run_python(
        "import sys; sys.modules['rest_framework'] = None\n"
        "try:\n"
        "    import machine_memory.contrib.rest_framework\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    assert result.returncode == 0, result.stderr
    assert 'pip install "django-machine-memory[drf]"' in result.stdout


def test_the_api_works_without_drf_spectacular() -> None:
    result = run_python(
        "import sys; sys.modules['drf_spectacular'] = None\n"
        "import django; django.setup()\n"
        "from django.urls import resolve\n"
        "from machine_memory.contrib.rest_framework import urls\n"
        "assert 'machine_memory.contrib.rest_framework.schema' not in sys.modules\n"
        "print(resolve('/states/a/b/', urls).kwargs)\n"
    )
    assert result.returncode == 0, result.stderr
    assert "{'machine_id': 'a/b'}" in result.stdout


def test_the_schema_is_valid_openapi() -> None:
    from drf_spectacular.generators import SchemaGenerator
    from drf_spectacular.validation import validate_schema

    generator = SchemaGenerator(urlconf=__name__)  # type: ignore[no-untyped-call]
    # As a project that uses drf-spectacular configures it (the example project does).
    with override_settings(
        REST_FRAMEWORK={"DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema"}
    ):
        schema = generator.get_schema(request=None, public=True)  # type: ignore[no-untyped-call]
    validate_schema(schema)  # type: ignore[no-untyped-call]
    paths = schema["paths"]
    assert set(paths) == {
        f"{PREFIX}/states/",
        f"{PREFIX}/states/{{machine_id}}/",
        f"{PREFIX}/state/",
        f"{PREFIX}/locks/",
        f"{PREFIX}/locks/{{machine_id}}/",
        f"{PREFIX}/lock/",
    }
    for state_path, where in [
        (f"{PREFIX}/states/{{machine_id}}/", "path"),
        (f"{PREFIX}/state/", "query"),
    ]:
        put = paths[state_path]["put"]
        assert {"200", "201", "400", "404", "409", "412", "428", "503"} <= set(put["responses"])
        assert "ETag" in put["responses"]["200"]["headers"]
        headers = {p["name"] for p in put["parameters"] if p["in"] == "header"}
        assert headers == {"If-Match", "If-None-Match", "Lock-Token"}
        ids = [p for p in put["parameters"] if p["in"] == where]
        assert [p["name"] for p in ids] == (["machine_id"] if where == "path" else ["id"])
    for lock_path in [f"{PREFIX}/locks/{{machine_id}}/", f"{PREFIX}/lock/"]:
        post = paths[lock_path]["post"]
        request = post["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        acquire = schema["components"]["schemas"][request.rsplit("/", 1)[1]]
        assert set(acquire["properties"]) == {"ttl", "wait", "read", "secret"}
        assert acquire["properties"]["wait"]["maximum"] == 1.0
        response = post["responses"]["201"]["content"]["application/json"]["schema"]["$ref"]
        acquired = schema["components"]["schemas"][response.rsplit("/", 1)[1]]
        assert "state" in acquired["properties"]


# -- the two MachineMemory methods the API needs ------------------------------------------


def test_version_of_follows_read_and_write(memory: MachineMemory, mid: str) -> None:
    assert memory.version_of(mid, {}) is None
    memory.write(mid, {"n": 1}, None)
    first = memory.read(mid)
    assert first is not None
    assert memory.version_of(mid, first) == 1
    second = {"n": 2}
    memory.write(mid, second, first)
    assert memory.version_of(mid, second) == 2
    assert memory.version_of(mid, {"n": 2}) is None  # an equal dict is not that object
    assert memory.version_of(mid + "-other", second) is None


def test_delete(memory: MachineMemory, alias: str, mid: str) -> None:
    memory.delete(mid)  # nothing stored: nothing to do
    memory.write(mid, {"n": 1}, None)
    stale = memory.read(mid)
    assert stale is not None
    memory.write(mid, {"n": 2}, stale)
    with pytest.raises(WriteConflict):
        memory.delete(mid, stale)
    with pytest.raises(InvalidState):
        memory.delete(mid, [1])  # type: ignore[arg-type]
    memory.delete(mid, {"n": 2})  # an equal dict is accepted, as by write()
    assert memory.read(mid) is None

    # Fenced like write(): after a takeover the old holder deletes nothing.
    memory.write(mid, {"n": 1}, None)
    assert memory.lock(mid, ttl=0.2)
    time.sleep(0.4)
    other = MachineMemory(using=alias)
    assert other.lock(mid)
    with pytest.raises(LockLost):
        memory.delete(mid)
    assert memory.read(mid) == {"n": 1}
    other.delete(mid)
    assert other.read(mid) is None
    other.unlock(mid)


# -- what a refusal says ---------------------------------------------------------------------
# The code is for programs, the detail for the person reading it: both are pinned whole.


def refusal(response: TestResponse, status: int, code: str) -> str:
    detail: str = assert_error(response, status, code)["detail"]
    return detail


def test_the_precondition_refusals_say_what_to_send(api: Api, mid: str) -> None:
    both = {"If-Match": '"1"', "If-None-Match": "*"}
    assert refusal(api.put(mid, {"n": 1}, **both), 400, "invalid_precondition") == (
        "Send If-Match or If-None-Match, not both."
    )
    not_star = {"If-None-Match": '"1"'}
    assert refusal(api.put(mid, {"n": 1}, **not_star), 400, "invalid_precondition") == (
        "PUT accepts If-None-Match: * (create) only."
    )
    garbled = {"If-Match": "1"}
    assert refusal(api.put(mid, {"n": 1}, **garbled), 400, "invalid_precondition") == (
        "If-Match must be * or a list of entity tags such as \"3\"; got '1'."
    )
    assert refusal(api.put(mid, {"n": 1}, **{"If-Match": ""}), 400, "invalid_precondition") == (
        "If-Match is empty."
    )
    assert refusal(api.put(mid, {"n": 1}, **{"If-Match": "*"}), 404, "not_found") == (
        f"Machine {mid!r} has no state."
    )
    assert refusal(api.put(mid, {"n": 1}, **{"If-Match": '"1"'}), 412, "precondition_failed") == (
        f"Machine {mid!r} is not at the version in If-Match; it has no state."
    )
    api.create(mid, {"n": 1})
    create = {"If-None-Match": "*"}
    assert refusal(api.put(mid, {"n": 2}, **create), 412, "precondition_failed") == (
        f"Machine {mid!r} already has a state (If-None-Match: *)."
    )
    assert refusal(api.put(mid, {"n": 2}), 428, "precondition_required") == (
        f"Machine {mid!r} has a state: send If-Match with its ETag to update it, or "
        "If-Match: * to overwrite any version."
    )
    stale = {"If-Match": '"2", "3"'}
    assert refusal(api.put(mid, {"n": 2}, **stale), 412, "precondition_failed") == (
        f"Machine {mid!r} is not at the version in If-Match; it is at 1."
    )
    assert refusal(api.delete(mid, **{"If-Match": '"5"'}), 412, "precondition_failed") == (
        f"Machine {mid!r} is not at the version in If-Match; it is at 1."
    )


def test_a_state_that_is_not_there_is_404_that_says_so(api: Api, mid: str) -> None:
    for response in (api.get(mid), api.delete(mid), api.delete(mid, **{"If-Match": "*"})):
        assert refusal(response, 404, "not_found") == f"Machine {mid!r} has no state."


def test_delete_with_a_list_of_entity_tags_deletes_the_version_listed(api: Api, mid: str) -> None:
    api.create(mid, {"n": 1})
    assert api.delete(mid, **{"If-Match": '"3", "1"'}).status_code == 204
    assert_error(api.get(mid), 404, "not_found")


def test_the_lock_refusals_say_what_to_do(api: Api, mid: str) -> None:
    assert refusal(api.release(mid, None), 400, "lock_token_required") == (
        "Send the lock token that POST locks/{id}/ returned in the Lock-Token header."
    )
    assert refusal(api.extend(mid, "7.short"), 400, "invalid_lock_token") == (
        "Lock-Token is not a lock token that this API issued."
    )
    # The largest token there can be is a token, just not one that holds this lock.
    largest = f"{2**63 - 1}.{'a' * 43}"
    assert refusal(api.extend(mid, largest), 409, "lock_not_held").startswith("This Lock-Token")
    assert refusal(api.lock_get(mid), 404, "not_found") == f"Machine {mid!r} has no live lock."
    token = api.acquire(mid)["lock_token"]
    assert refusal(api.post_lock(mid), 409, "lock_held") == (
        f"Machine {mid!r} is locked by another owner."
    )
    other = f"{token.partition('.')[0]}.{'b' * 43}"
    assert refusal(api.release(mid, other), 409, "lock_not_held") == (
        f"Machine {mid!r} is locked by another owner; this Lock-Token does not hold it. The "
        "lock was left alone."
    )
    assert refusal(api.extend(mid, other), 409, "lock_not_held") == (
        f"This Lock-Token does not hold the lock on {mid!r} (expired or taken over); acquire "
        "it again."
    )

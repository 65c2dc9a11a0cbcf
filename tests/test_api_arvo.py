"""What an HTTP client of the Arvo contract needs from the REST API (docs/rest-api.md).

A refused lock answered at once (or after a bounded wait the client asked for), lock and
read in one request, a create-or-overwrite for the lock holder, every id reachable as a
query parameter, and bad input answered with a 4xx, never a 5xx. On every database, with
DRF's test client; tests/test_api_live.py drives the same through a real server.
"""

from __future__ import annotations

import base64
import json
import time
from collections import Counter
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

import pytest
from django.db import connections
from django.test import override_settings

from machine_memory import MachineMemory
from machine_memory.contrib.rest_framework.views import owner_for
from machine_memory.exceptions import LockLost, WriteConflict
from machine_memory.sql import dialect_for
from machine_memory.validation import MAX_STATE_DEPTH
from tests import test_api
from tests.support import new_id
from tests.test_api import (
    IDS,
    PREFIX,
    Api,
    api_settings,
    assert_error,
    body,
    client_for,
    lock_url,
    make_user,
    state_url,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from rest_framework.response import _MonkeyPatchedResponse as TestResponse

pytestmark = pytest.mark.urls("tests.test_api")

api = test_api.api  # the fixture: a staff client, the memory on the alias under test


def by_id(resource: str, machine_id: str) -> str:
    """The query-parameter form of a URL, as URLSearchParams builds it."""
    return f"{PREFIX}/{resource}/?{urlencode({'id': machine_id})}"


def acquire(api: Api, machine_id: str, **options: Any) -> TestResponse:
    return api.post_lock(machine_id, **options)


def raw_post(api: Api, url: str, text: str) -> TestResponse:
    return api.client.generic("POST", url, text, content_type="application/json")


def raw_put(api: Api, url: str, text: str, **headers: str) -> TestResponse:
    return api.client.generic("PUT", url, text, content_type="application/json", headers=headers)


# -- ids as query parameters ----------------------------------------------------------------


@pytest.mark.parametrize("suffix", [*IDS[:-1], ".", "..", "&id=x", "+ =%2E"])
def test_every_id_is_reachable_as_a_query_parameter(api: Api, mid: str, suffix: str) -> None:
    # "." and ".." by themselves are the point: fetch() cannot send them in a path.
    machine_id = suffix if suffix in {".", ".."} else mid + suffix
    created = api.client.put(
        by_id("state", machine_id),
        {"data": {"n": 1}},
        format="json",
        headers={"If-None-Match": "*"},
    )
    assert created.status_code == 201, created.content
    # The same resource as the path form.
    assert body(api.get(machine_id))["data"] == {"n": 1}
    state = api.client.get(by_id("state", machine_id))
    assert body(state)["id"] == machine_id
    assert state["ETag"] == '"1"'

    locked = api.client.post(by_id("lock", machine_id), {"ttl": 30}, format="json")
    assert locked.status_code == 201
    token = body(locked)["lock_token"]
    assert body(api.lock_get(machine_id))["token"] == body(locked)["token"]
    assert body(api.client.get(by_id("lock", machine_id)))["id"] == machine_id
    extended = api.client.patch(
        by_id("lock", machine_id), {}, format="json", headers={"Lock-Token": token}
    )
    assert extended.status_code == 204
    released = api.client.delete(by_id("lock", machine_id), headers={"Lock-Token": token})
    assert released.status_code == 204
    assert_error(api.lock_get(machine_id), 404, "not_found")

    deleted = api.client.delete(by_id("state", machine_id), headers={"If-Match": '"1"'})
    assert deleted.status_code == 204
    assert_error(api.get(machine_id), 404, "not_found")


@pytest.mark.parametrize(
    "query", ["", "?id=", "?id=a&id=b", "?ID=a", f"?id={'x' * 513}", "?id=a%00b"]
)
@pytest.mark.parametrize("resource", ["state", "lock"])
def test_the_query_id_must_be_one_valid_id(api: Api, resource: str, query: str) -> None:
    for method in ["get", "delete"]:
        response = getattr(api.client, method)(f"{PREFIX}/{resource}/{query}")
        assert_error(response, 400, "invalid_id")
    if query == "?id=a&id=b":  # nothing was touched under either id
        assert_error(api.get("a"), 404, "not_found")
        assert_error(api.lock_get("b"), 404, "not_found")


def test_query_ids_need_the_same_permissions(api: Api, mid: str) -> None:
    # Authentication and permissions come before the id: no 400 tells a stranger anything.
    stranger = client_for(make_user(staff=False))
    assert_error(stranger.get(f"{PREFIX}/state/"), 403, "permission_denied")
    assert_error(stranger.get(by_id("state", mid)), 403, "permission_denied")


# -- a refused lock over HTTP -------------------------------------------------------------


@pytest.fixture
def attempts(alias: str, monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Lock attempts that reached the database, counted per statement of the vendor module:
    ``acquire`` (lock alone) or ``acquire_and_read`` (lock + read in one round trip)."""
    dialect = dialect_for(connections[alias])
    counted: Counter[str] = Counter()

    def counted_as(name: str) -> Callable[..., Any]:
        original = getattr(dialect, name)

        def counting(*args: Any) -> Any:
            counted[name] += 1
            return original(*args)

        return counting

    for name in ("acquire", "acquire_and_read"):
        monkeypatch.setattr(dialect, name, counted_as(name))
    return counted


def test_a_refused_lock_is_answered_at_once(
    api: Api, alias: str, mid: str, attempts: Counter[str]
) -> None:
    # Workers' LOCK_RETRIES stay for workers: over HTTP one attempt, then 409. With these
    # settings the old server-side retries would have slept 0.5 + 1 + 2 seconds.
    with override_settings(MACHINE_MEMORY=api_settings(alias, LOCK_RETRIES=3, LOCK_BACKOFF=0.5)):
        held = api.acquire(mid, ttl=30)
        attempts.clear()
        refused: list[dict[str, Any]] = [{}, {"wait": 0}, {"read": True}]
        for options in refused:
            assert_error(acquire(api, mid, **options), 409, "lock_held")
        # One statement each: the lock and the read together (issue 11).
        assert attempts == {"acquire_and_read": 3}
        # The holder still holds it.
        assert body(api.lock_get(mid))["token"] == held["token"]


def test_a_bounded_wait_takes_a_lock_freed_meanwhile(
    api: Api, alias: str, mid: str, attempts: Counter[str]
) -> None:
    with override_settings(MACHINE_MEMORY=api_settings(alias)):
        held = api.acquire(mid, ttl=0.6)
        attempts.clear()
        waited = acquire(api, mid, wait=1.0)
        assert waited.status_code == 201, waited.content
        granted = body(waited)
        # Taken once the holder's lock had expired, by the database's clock.
        assert granted["acquired_at"] >= held["expires_at"]
        assert granted["token"] > held["token"]
        assert attempts["acquire_and_read"] > 1
        # A wait that ends before the holder lets go is a 409, after trying again.
        attempts.clear()
        assert_error(acquire(api, mid, wait=0.3), 409, "lock_held")
        assert attempts["acquire_and_read"] >= 2


@pytest.mark.parametrize(
    "options",
    [
        {"wait": -0.1},
        {"wait": 1.5},
        {"wait": "0.5"},
        {"wait": True},
        {"wait": None},
        {"read": "true"},
        {"read": 1},
        {"read": None},
        {"waiting": 1},
    ],
)
def test_acquire_options_are_checked(api: Api, mid: str, options: dict[str, Any]) -> None:
    assert_error(acquire(api, mid, **options), 400, "invalid_request")
    assert_error(api.lock_get(mid), 404, "not_found")


def test_wait_and_read_are_acquire_options_only(api: Api, mid: str) -> None:
    held = api.acquire(mid, ttl=30)
    token = {"Lock-Token": held["lock_token"]}
    for options in [{"wait": 0.5}, {"read": True}]:
        response = api.client.patch(lock_url(mid), options, format="json", headers=token)
        assert_error(response, 400, "invalid_request")


# -- the client's own secret: an acquire sent again after a lost answer ---------------------


def test_an_acquire_sent_again_with_its_secret_finds_its_lock(api: Api, mid: str) -> None:
    secret = "s" * 43
    first = body(acquire(api, mid, ttl=30, secret=secret))
    assert first["owner"] == owner_for(secret)
    assert first["lock_token"] == f"{first['token']}.{secret}"
    # The answer was lost; the client sends the same request again: the same lock.
    again = acquire(api, mid, ttl=30, secret=secret, read=True)
    assert again.status_code == 201, again.content
    assert body(again)["lock_token"] == first["lock_token"]
    assert body(again)["state"] is None
    # Another secret is refused as before, and the lock is still the first one.
    assert_error(acquire(api, mid, secret="t" * 43), 409, "lock_held")
    assert_error(acquire(api, mid), 409, "lock_held")
    assert body(api.lock_get(mid))["token"] == first["token"]
    # Its token works as any other: fenced writes, release.
    holder = {"Lock-Token": first["lock_token"]}
    assert api.put(mid, {"n": 1}, **holder).status_code == 201
    assert api.release(mid, first["lock_token"]).status_code == 204
    assert_error(api.lock_get(mid), 404, "not_found")


def test_a_secret_after_a_takeover_is_refused(api: Api, mid: str) -> None:
    secret = "u" * 43
    acquire(api, mid, ttl=0.2, secret=secret)
    time.sleep(0.4)
    other = api.acquire(mid, ttl=30)
    assert_error(acquire(api, mid, secret=secret), 409, "lock_held")
    assert body(api.lock_get(mid))["token"] == other["token"]


@pytest.mark.parametrize("secret", ["short", "x" * 31, "x" * 129, "a b" * 20, "é" * 40, 42])
def test_a_secret_must_be_long_and_url_safe(api: Api, mid: str, secret: Any) -> None:
    assert_error(acquire(api, mid, secret=secret), 400, "invalid_request")
    assert_error(api.lock_get(mid), 404, "not_found")


# -- lock and read in one request ---------------------------------------------------------


def test_acquire_can_return_the_state_and_its_etag(api: Api, mid: str) -> None:
    first = body(acquire(api, mid, read=True, ttl=30))
    assert first["state"] is None  # no state yet: null, which is not "not asked"
    holder = {"Lock-Token": first["lock_token"]}
    assert api.put(mid, {"step": 1}, **{"If-None-Match": "*"}, **holder).status_code == 201
    assert api.release(mid, first["lock_token"]).status_code == 204

    second = body(acquire(api, mid, read=True, ttl=30))
    assert second["state"] == {"data": {"step": 1}, "version": 1, "etag": '"1"'}
    assert second["token"] > first["token"]
    # The ETag is the one a compare-and-set needs.
    holder = {"Lock-Token": second["lock_token"]}
    written = api.put(mid, {"step": 2}, **{"If-Match": second["state"]["etag"]}, **holder)
    assert written.status_code == 200
    assert api.release(mid, second["lock_token"]).status_code == 204

    plain = body(acquire(api, mid, ttl=30))
    assert "state" not in plain
    assert body(acquire(api, new_id(), read=False))["id"] != mid


# -- the lock holder's create-or-overwrite ----------------------------------------------------


def test_the_lock_holder_creates_or_overwrites_without_a_precondition(api: Api, mid: str) -> None:
    holder = {"Lock-Token": api.acquire(mid, ttl=30)["lock_token"]}
    created = api.put(mid, {"step": 1}, **holder)
    assert created.status_code == 201
    assert created["ETag"] == '"1"'
    assert body(created) == {"id": mid, "version": 1}
    # Arvo's failure record: write(id, failure, None) over the state it has.
    failed = api.put(mid, {"failed": True}, **holder)
    assert failed.status_code == 200
    assert failed["ETag"] == '"2"'
    assert body(api.get(mid))["data"] == {"failed": True}
    # Without the Lock-Token nothing changes for other clients: 428 as before.
    assert_error(api.put(mid, {"step": 9}), 428, "precondition_required")
    assert body(api.get(mid))["version"] == 2
    # Deleted by someone else meanwhile: created again.
    assert api.delete(mid).status_code == 204
    again = api.put(mid, {"step": 3}, **holder)
    assert again.status_code == 201
    assert body(api.get(mid))["data"] == {"step": 3}


@pytest.mark.parametrize("exists", [False, True], ids=["missing", "existing"])
def test_a_stale_holder_stores_nothing(api: Api, mid: str, exists: bool) -> None:
    if exists:
        api.create(mid, {"n": 1})
    stale = {"Lock-Token": api.acquire(mid, ttl=0.2)["lock_token"]}
    time.sleep(0.4)
    current = api.acquire(mid, ttl=30)
    assert_error(api.put(mid, {"n": 99}, **stale), 409, "lock_lost")
    if exists:
        assert body(api.get(mid))["data"] == {"n": 1}
    else:
        assert_error(api.get(mid), 404, "not_found")
    fresh = api.put(mid, {"n": 2}, **{"Lock-Token": current["lock_token"]})
    assert fresh.status_code == (200 if exists else 201)


@pytest.mark.parametrize("lock_backend", ["database", "redis"])
def test_overwrite_create_in_python(
    alias: str, redis_cache: str, mid: str, lock_backend: str
) -> None:
    with override_settings(MACHINE_MEMORY={"REDIS_CACHE": redis_cache}):
        overwrite_create(alias, mid, lock_backend)


def overwrite_create(alias: str, mid: str, lock_backend: str) -> None:
    memory = MachineMemory(using=alias, lock_backend=lock_backend)
    assert memory.overwrite(mid, {"n": 1}, create=True) == 1
    assert memory.overwrite(mid, {"n": 2}, create=True) == 2
    state = memory.read(mid)
    assert state == {"n": 2}
    memory.write(mid, {"n": 3}, state)  # the version it returned is the stored one
    with pytest.raises(ValueError, match="no version"):
        memory.overwrite(mid, {"n": 4}, version=3, create=True)
    with pytest.raises(WriteConflict):
        memory.overwrite(new_id(), {"n": 1})  # without create: still a conflict

    # Fenced, on both of its paths (create and overwrite).
    for existing in [mid, new_id()]:
        assert memory.lock(existing, ttl=0.2)
        time.sleep(0.4)
        other = MachineMemory(using=alias, lock_backend=lock_backend)
        assert other.lock(existing)
        before = other.read(existing)
        with pytest.raises(LockLost):
            memory.overwrite(existing, {"stale": True}, create=True)
        assert other.read(existing) == before
        assert other.unlock(existing)
        memory.unlock(existing)


# -- bad input is a 4xx, never a 5xx -----------------------------------------------------------


def nested(depth: int) -> str:
    return '{"a": ' * depth + "1" + "}" * depth


@pytest.mark.parametrize("depth", [1_000, 100_000])
def test_json_nested_too_deeply_is_400(api: Api, mid: str, depth: int) -> None:
    # How deep the json module gets before RecursionError depends on the interpreter
    # (about 1,000 levels on 3.11, several thousand on 3.12 and 3.13); deeper than a state
    # may nest, the memory refuses what the parser let through. Never a 500.
    too_deep_to_parse = depth > 50_000
    document = '{"data": ' + nested(depth) + "}"
    response = raw_put(api, state_url(mid), document, **{"If-None-Match": "*"})
    if too_deep_to_parse:
        assert_error(response, 400, "parse_error")
        assert "nested too deeply" in body(response)["detail"]
    else:
        assert response.status_code == 400
        assert body(response)["code"] in {"parse_error", "invalid_state"}
    locking = raw_post(api, lock_url(mid), '{"ttl": ' + nested(depth) + "}")
    assert locking.status_code == 400
    assert body(locking)["code"] in (
        {"parse_error"} if too_deep_to_parse else {"parse_error", "invalid_request"}
    )
    assert_error(api.get(mid), 404, "not_found")
    assert_error(api.lock_get(mid), 404, "not_found")


def test_json_deeper_than_a_state_may_nest_is_400(api: Api, mid: str) -> None:
    document = '{"data": ' + nested(MAX_STATE_DEPTH + 1) + "}"
    response = raw_put(api, state_url(mid), document, **{"If-None-Match": "*"})
    assert_error(response, 400, "invalid_state")
    assert_error(api.get(mid), 404, "not_found")


@pytest.mark.parametrize("field", ["ttl", "wait"])
@pytest.mark.parametrize("number", ["9" * 400, "-" + "9" * 400, "1" + "0" * 20, "1e400"])
def test_numbers_out_of_any_range_are_400(api: Api, mid: str, field: str, number: str) -> None:
    response = raw_post(api, lock_url(mid), f'{{"{field}": {number}}}')
    assert response.status_code == 400, response.content
    assert body(response)["code"] in {"invalid_request", "parse_error"}
    assert_error(api.lock_get(mid), 404, "not_found")
    holder = api.acquire(mid)["lock_token"]
    if field == "ttl":
        response = api.client.generic(
            "PATCH",
            lock_url(mid),
            f'{{"ttl": {number}}}',
            content_type="application/json",
            headers={"Lock-Token": holder},
        )
        assert response.status_code == 400, response.content


def cursor(query: str) -> str:
    return quote(base64.b64encode(query.encode()).decode())


@pytest.mark.parametrize(
    "value",
    [
        cursor("p=%00"),
        cursor("p=a%00b&r=0"),
        cursor("p=" + "x" * 600),
        cursor("r=x&p=a"),
        cursor("o=-1"),
        quote(base64.b64encode(b"\xff\xfe").decode()),
        "x" * 10_000,
    ],
)
@pytest.mark.parametrize("listing", ["states", "locks"])
def test_malformed_cursors_are_404_not_503(api: Api, listing: str, value: str) -> None:
    response = api.client.get(f"{PREFIX}/{listing}/?cursor={value}")
    assert_error(response, 404, "not_found")
    assert "Retry-After" not in response


def test_a_valid_cursor_still_pages(api: Api, mid: str) -> None:
    for n in range(3):
        api.create(f"{mid}/{n}", {"n": n})
    position = cursor(f"p={quote(mid + '/0')}")
    page = body(api.client.get(f"{PREFIX}/states/?prefix={quote(mid)}&cursor={position}"))
    assert [row["id"] for row in page["results"]] == [f"{mid}/1", f"{mid}/2"]


def test_every_error_body_is_json(api: Api, mid: str) -> None:
    # The classes above, once more through a json round trip of the whole response.
    for response in [
        raw_put(api, state_url(mid), '{"data": ' + nested(5_000) + "}"),
        raw_post(api, lock_url(mid), '{"ttl": ' + "9" * 400 + "}"),
        api.client.get(f"{PREFIX}/states/?cursor={cursor('p=%00')}"),
    ]:
        assert 400 <= response.status_code < 500
        assert set(json.loads(response.content)) >= {"code", "detail"}

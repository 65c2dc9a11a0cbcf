"""The admin through Django's test client: as superuser, as staff without permissions, anonymous.

Users and sessions live on "default"; the machine memory's tables on the alias under test
(``MACHINE_MEMORY['DATABASE']``), which the admin reads and writes through.
"""

from __future__ import annotations

import html
import json
import re
from typing import TYPE_CHECKING, Any

import pytest
from django.contrib.admin.utils import quote
from django.contrib.auth.models import Permission, User
from django.core.checks import Error
from django.db import connections
from django.test import Client, override_settings
from django.test.utils import CaptureQueriesContext
from django.urls import include, path, reverse

from machine_memory import MachineMemory, admin
from machine_memory.checks import check_settings
from machine_memory.locks.base import LockBackend
from machine_memory.models import MachineLock, MachineState, StorageTime
from tests import urls
from tests.support import new_id
from tests.test_clock import SKEWS, app_clock_moved

if TYPE_CHECKING:
    from collections.abc import Iterator

    from machine_memory.locks.base import Fence, LockInfo


STATES = reverse("admin:machine_memory_machinestate_changelist")
LOCKS = reverse("admin:machine_memory_machinelock_changelist")
API = "/api/machine-memory"

# The URLconf of the tests that compare the admin with the REST API (pytest.mark.urls).
urlpatterns = [
    *urls.urlpatterns,
    path("api/machine-memory/", include("machine_memory.contrib.rest_framework.urls")),
]


def state_url(machine_id: str) -> str:
    return reverse("admin:machine_memory_machinestate_change", args=[quote(machine_id)])


def lock_url(machine_id: str) -> str:
    return reverse("admin:machine_memory_machinelock_change", args=[quote(machine_id)])


@pytest.fixture
def routed(alias: str) -> Iterator[str]:
    with override_settings(MACHINE_MEMORY={"DATABASE": alias}):
        yield alias


def user(*permissions: str, superuser: bool = False) -> Client:
    name = new_id("user")
    if superuser:
        account = User.objects.create_superuser(name, password="pw")
    else:
        account = User.objects.create_user(name, password="pw", is_staff=True)
        for codename in permissions:
            account.user_permissions.add(Permission.objects.get(codename=codename))
    client = Client()
    client.force_login(account)
    return client


@pytest.fixture
def superuser(db_access: None) -> Client:
    return user(superuser=True)


def text(response: Any) -> str:
    return str(response.content.decode())


def write(alias: str, document: dict[str, Any], **metadata: Any) -> str:
    machine_id = new_id("adm") + "/+="  # the characters of base64 subjects, quoted in URLs
    MachineMemory(using=alias).write(machine_id, document, None, metadata or None)
    return machine_id


def action(client: Client, url: str, name: str, ids: list[str], **extra: Any) -> Any:
    data = {"action": name, "_selected_action": ids, "index": 0, **extra}
    return client.post(url, data, follow=True)


def listed(response: Any) -> set[str]:
    """The ids in the first column of a change list."""
    return set(listed_in_order(response))


def listed_in_order(response: Any) -> list[str]:
    found = re.findall(
        r'<th class="field-machine_id"><a href="[^"]*">([^<]*)</a></th>', text(response)
    )
    return [html.unescape(machine_id) for machine_id in found]


def cells(response: Any) -> dict[str, str]:
    """A one-row change list's cells (list_display name: HTML), the id column left out."""
    return dict(re.findall(r'<td class="field-(\w+)[^"]*">(.*?)</td>', text(response), re.DOTALL))


def fields(response: Any) -> dict[str, str]:
    """A change page's read-only fields (name: HTML)."""
    rows = re.findall(
        r'<div class="form-row[^"]* field-(\w+)[^"]*">.*?<div class="readonly">(.*?)</div>',
        text(response),
        re.DOTALL,
    )
    return dict(rows)


def messages_of(response: Any) -> list[str]:
    return [str(m) for m in response.context["messages"]]


# -- who may see what --------------------------------------------------------------------


@pytest.mark.parametrize("url", [STATES, LOCKS])
def test_anonymous_is_sent_to_the_login_page(routed: str, url: str) -> None:
    response = Client().get(url)
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("admin:login"))


def test_anonymous_cannot_run_actions(routed: str) -> None:
    machine_id = write(routed, {"a": 1})
    holder = MachineMemory(using=routed)
    assert holder.lock(machine_id)
    response = Client().post(STATES, {"action": "release_locks", "_selected_action": [machine_id]})
    assert response.status_code == 302
    assert holder.lock_info(machine_id) is not None
    assert holder.unlock(machine_id)


def test_staff_without_permissions_is_refused(routed: str) -> None:
    client = user()
    machine_id = write(routed, {"a": 1})
    holder = MachineMemory(using=routed)
    assert holder.lock(machine_id)
    for url in (STATES, LOCKS, state_url(machine_id), lock_url(machine_id)):
        assert client.get(url).status_code == 403, url
    response = client.post(STATES, {"action": "release_locks", "_selected_action": [machine_id]})
    assert response.status_code == 403
    response = client.post(STATES, {"action": "delete_selected", "_selected_action": [machine_id]})
    assert response.status_code == 403
    assert holder.lock_info(machine_id) is not None
    assert MachineState.objects.using(routed).filter(pk=machine_id).exists()
    assert holder.unlock(machine_id)
    index = text(client.get(reverse("admin:index")))
    assert "Machine states" not in index


def test_staff_with_view_permission_sees_but_cannot_act(routed: str) -> None:
    client = user("view_machinestate", "view_machinelock")
    machine_id = write(routed, {"a": 1})
    holder = MachineMemory(using=routed)
    assert holder.lock(machine_id)
    page = text(client.get(STATES, {"q": machine_id}))
    assert html.escape(machine_id) in page
    assert 'name="action"' not in page  # no action the user may run
    response = client.post(STATES, {"action": "release_locks", "_selected_action": [machine_id]})
    assert holder.lock_info(machine_id) is not None
    assert response.status_code in (200, 302)
    assert client.get(state_url(machine_id)).status_code == 200
    assert holder.unlock(machine_id)


# -- the state list ----------------------------------------------------------------------


def test_state_list_columns_and_lock_status(routed: str, superuser: Client) -> None:
    source = f"src-{new_id()}"
    parent = write(routed, {"source": source})
    live = write(routed, {"executionStatus": "running", "source": source, "parentSubject": parent})
    expired = write(routed, {"executionStatus": "done", "source": source})
    holder = MachineMemory(using=routed)
    assert holder.lock(live)
    assert holder.lock(expired)
    assert holder.unlock(expired)
    page = text(superuser.get(STATES, {"q": source}))
    rows = {
        machine_id: row
        for row in re.findall(r"<tr>.*?</tr>", page, re.DOTALL)
        for machine_id in (parent, live, expired)
        if html.escape(machine_id) in row.split("</th>")[0]
    }
    assert set(rows) == {parent, live, expired}
    # The owner under the status, cut to the column with an ellipsis, whole in its title.
    owner = f'<span class="machine-memory-owner" title="{holder.owner}">{holder.owner}</span>'
    assert f"live<br>{owner}" in rows[live]
    assert f"expired<br>{owner}" in rows[expired]
    assert 'class="field-lock_status">-<' in rows[parent]
    assert "running" in rows[live] and source in rows[live]
    assert f'href="{state_url(parent)}"' in rows[live]  # the parent column links to it
    assert "3 machine states" in page
    assert holder.unlock(live)


def test_state_list_filters(routed: str, superuser: Client) -> None:
    status, source = f"st-{new_id()}", f"src-{new_id()}"
    root = write(routed, {"executionStatus": status, "source": source})
    child = write(routed, {"executionStatus": status, "source": source, "parentSubject": root})
    other = write(routed, {"executionStatus": "zz-other", "source": source})
    holder = MachineMemory(using=routed)
    assert holder.lock(child)
    assert holder.lock(other)
    assert holder.unlock(other)

    def shown(**params: str) -> set[str]:
        return listed(superuser.get(STATES, {"q": source, **params}))

    assert shown() == {root, child, other}
    assert shown(status=status) == {root, child}
    assert shown(source=source) == {root, child, other}
    assert shown(lock="live") == {child}
    assert shown(lock="expired") == {other}
    assert shown(lock="none") == {root}
    assert shown(roots="yes") == {root, other}
    page = text(superuser.get(STATES))
    # The choices of the status and source filters come from the table itself.
    assert f"?status={status}" in page and f"?source={source}" in page
    assert holder.unlock(child)


def test_state_search_is_exact_on_id_parent_and_source(routed: str, superuser: Client) -> None:
    source = f"src-{new_id()}"
    parent = write(routed, {"source": source})
    child = write(routed, {"parentSubject": parent})

    def found(term: str) -> set[str]:
        return listed(superuser.get(STATES, {"q": term}))

    assert found(parent) == {parent, child}  # its own id, and as the child's parent
    assert found(child) == {child}
    assert found(source) == {parent}
    assert found(source[:-3]) == set()  # exact: no substring matches
    assert found(source[:-3] + "*") == {parent}  # a prefix when asked for


def test_state_list_makes_no_per_row_queries(routed: str, superuser: Client) -> None:
    source = f"src-{new_id()}"
    holder = MachineMemory(using=routed)
    ids = [write(routed, {"source": source, "executionStatus": "done"}) for _ in range(30)]
    for machine_id in ids[:10]:
        assert holder.lock(machine_id)

    def queries(**params: str) -> list[str]:
        with CaptureQueriesContext(connections[routed]) as captured:
            assert superuser.get(STATES, params).status_code == 200
        return [q["sql"] for q in captured.captured_queries]

    one = queries(q=ids[0])
    thirty = queries(q=source)
    assert len(one) == len(thirty)
    for sql in thirty:
        # Every count is capped: COUNT(*) over a LIMITed subquery, never the whole table.
        if "COUNT(" in sql.upper():
            assert "LIMIT" in sql.upper(), sql
    for machine_id in ids[:10]:
        assert holder.unlock(machine_id)


def test_state_list_count_is_capped(
    routed: str, superuser: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = f"src-{new_id()}"
    for _ in range(7):
        write(routed, {"source": source})
    monkeypatch.setattr(admin, "COUNT_CAP", 5)
    page = text(superuser.get(STATES, {"q": source}))
    assert re.search(r"\b5\+ machine states", page)
    monkeypatch.setattr(admin, "COUNT_CAP", 10)
    page = text(superuser.get(STATES, {"q": source}))
    assert re.search(r"\b7 machine states", page) and "7+" not in page


def test_state_list_sorts_only_by_the_primary_key(routed: str, superuser: Client) -> None:
    write(routed, {"executionStatus": "done"})  # an empty list has no table
    page = text(superuser.get(STATES))
    headers = re.findall(r'<th scope="col" class="([^"]*)"', page)
    sortable = {h.split()[1].removeprefix("column-") for h in headers if "sortable" in h}
    assert sortable == {"machine_id"}
    # A hand-written ?o= for another column is ignored (it would sort the whole table).
    with CaptureQueriesContext(connections[routed]) as captured:
        assert superuser.get(STATES, {"o": "2"}).status_code == 200
    [page_query] = [q["sql"] for q in captured.captured_queries if "ORDER BY" in q["sql"]
                    and "lock_owner" in q["sql"]]  # fmt: skip
    assert "execution_status" not in page_query.split("ORDER BY")[-1]


# Ids that sort differently by bytes, by case-folding and by a language's collation: the
# admin and the API list them however the database orders the id column, in the same order.
ORDER_SUFFIXES = ["b", "B", "a", "a/b", "a-b", "a b", "a.b", "_x", "é", "e", "Z", "10", "9", "~"]


def api_ids(client: Any, url: str, **params: Any) -> list[str]:
    """Every id a cursor-paginated list of the REST API returns, in its order."""
    found: list[str] = []
    next_url: str | None = url
    while next_url is not None:
        page = json.loads(client.get(next_url, params).content)
        found += [row["id"] for row in page["results"]]
        next_url, params = page["next"], {}
    return found


@pytest.mark.urls(__name__)
def test_lists_are_in_the_order_of_the_rest_api(routed: str, superuser: Client) -> None:
    from rest_framework.test import APIClient

    prefix = new_id("ord")
    ids = [f"{prefix}/{suffix}" for suffix in ORDER_SUFFIXES]
    holder = MachineMemory(using=routed)
    for machine_id in ids:
        holder.write(machine_id, {"a": 1}, None)
        assert holder.lock(machine_id, ttl=60)
    try:
        api = APIClient()
        api.force_authenticate(User.objects.create_user(new_id("api"), is_staff=True))
        states = api_ids(api, f"{API}/states/", prefix=prefix, page_size=5)
        assert sorted(states) == sorted(ids)
        # The admin's default order: the API's (by the id, ascending).
        assert listed_in_order(superuser.get(STATES, {"q": f"{prefix}*"})) == states
        # The id's column sorted descending is the same order backwards.
        assert listed_in_order(superuser.get(STATES, {"q": f"{prefix}*", "o": "-1"})) == [
            *reversed(states)
        ]
        # Live locks, as the API lists them (all of them: it has no prefix filter).
        locks = [i for i in api_ids(api, f"{API}/locks/", page_size=500) if i.startswith(prefix)]
        assert locks == states
        page = superuser.get(LOCKS, {"q": f"{prefix}*", "live": "yes"})
        assert listed_in_order(page) == locks
    finally:
        for machine_id in ids:
            holder.unlock(machine_id)


# -- the state page ----------------------------------------------------------------------


def test_state_page_shows_pretty_escaped_json_lock_parent_and_children(
    routed: str, superuser: Client
) -> None:
    parent = write(routed, {"executionStatus": "running"})
    document = {"html": "<script>alert(1)</script>", "nested": {"list": [1, 2]}, "é": "漢"}
    machine_id = write(routed, {**document, "parentSubject": parent})
    children = [write(routed, {"parentSubject": machine_id}) for _ in range(2)]
    holder = MachineMemory(using=routed)
    assert holder.lock(machine_id, ttl=60)
    response = superuser.get(state_url(machine_id))
    assert response.status_code == 200
    page = text(response)
    pretty = json.dumps({**document, "parentSubject": parent}, indent=2, ensure_ascii=False)
    pretty = json.dumps(json.loads(pretty), indent=2, ensure_ascii=False, sort_keys=True)
    assert '<pre class="machine-memory-state"' in page
    assert html.escape(pretty) in page
    assert "<script>alert(1)</script>" not in page
    assert re.search(rf"live, [\d.]+ s left: {re.escape(holder.owner)}, token \d+", page)
    assert f'href="{state_url(parent)}"' in page
    for child in children:
        assert f'href="{state_url(child)}"' in page
    # Read-only: no form field for the document, no save button.
    assert 'name="state"' not in page and 'name="_save"' not in page
    assert holder.unlock(machine_id)


def test_state_page_links_to_all_children_when_there_are_many(
    routed: str, superuser: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(admin, "CHILDREN_SHOWN", 2)
    parent = write(routed, {})
    children = [write(routed, {"parentSubject": parent}) for _ in range(3)]
    page = text(superuser.get(state_url(parent)))
    assert sum(f'href="{state_url(c)}"' in page for c in children) == 2
    link = re.search(r'href="([^"]*parent_id__exact=[^"]*)">all children<', page)
    assert link
    assert listed(superuser.get(html.unescape(link[1]))) == set(children)


def test_read_only_state_cannot_be_changed(routed: str, superuser: Client) -> None:
    machine_id = write(routed, {"a": 1})
    response = superuser.post(state_url(machine_id), {"state": '{"a": 2}', "shown_version": 1})
    assert response.status_code == 403
    assert MachineState.objects.using(routed).get(pk=machine_id).state == {"a": 1}
    assert superuser.get(reverse("admin:machine_memory_machinestate_add")).status_code == 403


def test_editable_state_is_written_through_machine_memory(alias: str, superuser: Client) -> None:
    with override_settings(MACHINE_MEMORY={"DATABASE": alias, "ADMIN_READONLY": False}):
        machine_id = write(alias, {"a": 1}, parent_subject="p-1", source="from-metadata")
        page = text(superuser.get(state_url(machine_id)))
        assert 'name="state"' in page and 'name="shown_version" value="1"' in page
        response = superuser.post(
            state_url(machine_id),
            {"state": '{"a": 2, "executionStatus": "done"}', "shown_version": 1},
            follow=True,
        )
        assert response.status_code == 200
        row = MachineState.objects.using(alias).get(pk=machine_id)
        assert (row.state, row.version) == ({"a": 2, "executionStatus": "done"}, 2)
        # Metadata passed by the worker beside the document is kept.
        assert (row.execution_status, row.parent_id, row.source) == ("done", "p-1", "from-metadata")
        # A form shown at an older version is turned away.
        response = superuser.post(
            state_url(machine_id), {"state": '{"a": 3}', "shown_version": 1}, follow=True
        )
        assert "written since you opened it" in text(response)
        bad = superuser.post(state_url(machine_id), {"state": "[1, 2]", "shown_version": 2})
        assert "must be a JSON object" in text(bad)
        assert MachineState.objects.using(alias).get(pk=machine_id).version == 2


@pytest.fixture
def editable(alias: str) -> Iterator[str]:
    with override_settings(MACHINE_MEMORY={"DATABASE": alias, "ADMIN_READONLY": False}):
        yield alias


def form_document(page: str) -> Any:
    """The document in the change form's ``state`` field, parsed."""
    found = re.search(r'<textarea name="state"[^>]*>(.*?)</textarea>', page, re.DOTALL)
    assert found, "no state field"
    return json.loads(html.unescape(found[1]))


def shown_document(page: str) -> Any:
    """The document in the read-only pretty view."""
    found = re.search(r'<pre class="machine-memory-state"[^>]*>(.*?)</pre>', page, re.DOTALL)
    assert found, "no pretty state"
    return json.loads(html.unescape(found[1]))


def changes_logged(machine_id: str) -> int:
    from django.contrib.admin.models import CHANGE, LogEntry

    return LogEntry.objects.filter(object_id=machine_id, action_flag=CHANGE).count()


def test_stale_edit_shows_the_stored_document_and_writes_nothing(
    editable: str, superuser: Client
) -> None:
    machine_id = write(editable, {"a": 1})
    page = text(superuser.get(state_url(machine_id)))
    assert form_document(page) == {"a": 1} and 'name="shown_version" value="1"' in page
    # A worker writes while the form is open.
    worker = MachineMemory(using=editable)
    stored = {"a": 2, "by": "worker"}
    worker.write(machine_id, stored, worker.read(machine_id))

    response = superuser.post(
        state_url(machine_id), {"state": '{"a": 1, "by": "admin"}', "shown_version": 1}, follow=True
    )
    assert response.status_code == 200
    [message] = messages_of(response)
    assert "not saved" in message and "written since you opened it" in message
    assert "now at version 2" in message and "make your change again" in message
    page = text(response)
    # The page is the state's own, showing what is stored, at the stored version.
    assert response.redirect_chain[-1][0].startswith(state_url(machine_id))
    assert form_document(page) == stored
    assert shown_document(page) == stored
    assert 'name="shown_version" value="2"' in page
    assert '"admin"' not in page
    row = MachineState.objects.using(editable).get(pk=machine_id)
    assert (row.state, row.version) == (stored, 2)
    assert changes_logged(machine_id) == 0
    # Made again on the stored document, the edit is saved.
    response = superuser.post(
        state_url(machine_id), {"state": '{"a": 3, "by": "admin"}', "shown_version": 2}, follow=True
    )
    assert "was changed successfully" in " ".join(messages_of(response))
    row = MachineState.objects.using(editable).get(pk=machine_id)
    assert (row.state, row.version) == ({"a": 3, "by": "admin"}, 3)
    assert changes_logged(machine_id) == 1


def test_edit_racing_a_worker_write_is_refused_by_the_overwrite(
    editable: str, superuser: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker writes after the admin loaded the row at the shown version, just before
    the save: overwrite() at that version refuses it, and the page shows the worker's."""
    machine_id = write(editable, {"a": 1})
    worker = MachineMemory(using=editable)
    original = MachineMemory.overwrite
    raced: list[int] = []

    def worker_writes_first(self: MachineMemory, *args: Any, **kwargs: Any) -> int:
        if not raced:
            worker.write(machine_id, {"a": "worker"}, worker.read(machine_id))
            raced.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MachineMemory, "overwrite", worker_writes_first)
    response = superuser.post(
        state_url(machine_id), {"state": '{"a": "admin"}', "shown_version": 1}, follow=True
    )
    assert raced == [1]
    [message] = messages_of(response)
    assert "written since you opened it" in message and "now at version 2" in message
    page = text(response)
    assert form_document(page) == {"a": "worker"} == shown_document(page)
    assert 'name="shown_version" value="2"' in page
    row = MachineState.objects.using(editable).get(pk=machine_id)
    assert (row.state, row.version) == ({"a": "worker"}, 2)
    assert changes_logged(machine_id) == 0


def test_edit_of_a_state_deleted_meanwhile(editable: str, superuser: Client) -> None:
    machine_id = write(editable, {"a": 1})
    MachineMemory(using=editable).delete(machine_id)
    response = superuser.post(
        state_url(machine_id), {"state": '{"a": 2}', "shown_version": 1}, follow=True
    )
    # Django's own answer for a row that is gone.
    assert response.redirect_chain[-1][0] == reverse("admin:index")
    assert "Perhaps it was deleted?" in " ".join(messages_of(response))
    assert not MachineState.objects.using(editable).filter(pk=machine_id).exists()


def test_edit_of_a_state_deleted_after_loading(
    editable: str, superuser: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    machine_id = write(editable, {"a": 1})
    original = MachineMemory.overwrite

    def deleted_first(self: MachineMemory, *args: Any, **kwargs: Any) -> int:
        MachineMemory(using=editable).delete(machine_id)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MachineMemory, "overwrite", deleted_first)
    response = superuser.post(
        state_url(machine_id), {"state": '{"a": 2}', "shown_version": 1}, follow=True
    )
    assert response.redirect_chain[-1][0] == STATES
    [message] = messages_of(response)
    assert "deleted since you opened it" in message and "Nothing was written" in message
    assert not MachineState.objects.using(editable).filter(pk=machine_id).exists()
    assert changes_logged(machine_id) == 0


# -- actions ----------------------------------------------------------------------------


def test_release_locks_action_on_states(routed: str, superuser: Client) -> None:
    locked, free = write(routed, {"a": 1}), write(routed, {"a": 2})
    holder = MachineMemory(using=routed)
    assert holder.lock(locked)
    response = action(superuser, STATES, "release_locks", [locked, free])
    assert response.status_code == 200
    [message] = messages_of(response)
    assert f"Released 1 lock(s): {locked} (held by {holder.owner}, token" in message
    assert holder.lock_info(locked) is None
    response = action(superuser, STATES, "release_locks", [free])
    assert messages_of(response) == ["None of the selected machines had a live lock."]


@pytest.mark.parametrize("url", [STATES, LOCKS], ids=["states", "locks"])
def test_release_action_releases_only_the_selected_lock(
    routed: str, superuser: Client, url: str
) -> None:
    selected, other = write(routed, {"a": 1}), write(routed, {"a": 2})
    first, second = MachineMemory(using=routed), MachineMemory(using=routed)
    assert first.lock(selected, ttl=60)
    assert second.lock(other, ttl=60)
    token = first.held_token(selected)
    before = second.lock_info(other)
    response = action(superuser, url, "release_locks", [selected])
    [message] = messages_of(response)
    assert message == f"Released 1 lock(s): {selected} (held by {first.owner}, token {token})."
    assert first.lock_info(selected) is None
    assert first.extend(selected) is False
    # The other lock is untouched: same holder, same token, same expiry.
    info = second.lock_info(other)
    assert info is not None and info == before and info.owner == second.owner
    assert info.token == second.held_token(other)
    assert second.extend(other) is True
    # The other lock is still its holder's to release.
    assert second.unlock(other)
    assert second.lock_info(other) is None


class NoForceRelease(LockBackend):
    """A lock backend whose flag says it cannot force-release: only constructed."""

    supports_force_release = False

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

    def force_release(self, machine_id: str) -> LockInfo | None:
        raise AssertionError("the admin asked a backend that cannot force-release")


def test_release_action_with_a_backend_that_cannot_force_release(
    alias: str, superuser: Client
) -> None:
    backend = f"{__name__}.NoForceRelease"
    with override_settings(MACHINE_MEMORY={"DATABASE": alias, "LOCK_BACKEND": backend}):
        machine_id = write(alias, {"a": 1})
        response = action(superuser, STATES, "release_locks", [machine_id])
    [message] = messages_of(response)
    assert "cannot force-release locks: nothing was released" in message


def test_release_locks_needs_the_lock_change_permission(routed: str) -> None:
    client = user("view_machinestate", "delete_machinestate")
    machine_id = write(routed, {"a": 1})
    holder = MachineMemory(using=routed)
    assert holder.lock(machine_id)
    action(client, STATES, "release_locks", [machine_id])
    assert holder.lock_info(machine_id) is not None
    client = user("view_machinestate", "change_machinelock")
    action(client, STATES, "release_locks", [machine_id])
    assert holder.lock_info(machine_id) is None


def test_delete_states_action(routed: str, superuser: Client) -> None:
    doomed, kept = write(routed, {"a": 1}), write(routed, {"a": 2})
    confirm = action(superuser, STATES, "delete_selected", [doomed])
    assert "Are you sure" in text(confirm)
    response = action(superuser, STATES, "delete_selected", [doomed], post="yes")
    assert "Successfully deleted 1 machine state" in " ".join(messages_of(response))
    remaining = MachineState.objects.using(routed).filter(pk__in=[doomed, kept])
    assert set(remaining.values_list("pk", flat=True)) == {kept}


def test_delete_one_state_from_its_page(routed: str, superuser: Client) -> None:
    machine_id = write(routed, {"a": 1})
    url = reverse("admin:machine_memory_machinestate_delete", args=[quote(machine_id)])
    assert superuser.get(url).status_code == 200
    superuser.post(url, {"post": "yes"})
    assert not MachineState.objects.using(routed).filter(pk=machine_id).exists()


# -- the lock admin ---------------------------------------------------------------------


def test_lock_list_shows_time_left_by_the_database_clock(routed: str, superuser: Client) -> None:
    live, expired = new_id("lk"), new_id("lk")
    holder = MachineMemory(using=routed)
    assert holder.lock(live, ttl=90)
    assert holder.lock(expired)
    assert holder.unlock(expired)
    page = text(superuser.get(LOCKS, {"q": live}))
    assert holder.owner in page and ">live<" in page
    left = re.search(r'class="field-time_left">([\d.]+) s<', page)
    assert left and 80 < float(left[1]) <= 90
    page = text(superuser.get(LOCKS, {"q": expired}))
    assert ">expired<" in page and 'class="field-time_left">-<' in page
    assert listed(superuser.get(LOCKS, {"live": "yes", "q": live})) == {live}
    assert listed(superuser.get(LOCKS, {"live": "no", "q": live})) == set()
    assert listed(superuser.get(LOCKS, {"live": "no", "q": expired})) == {expired}
    page = text(superuser.get(lock_url(live)))
    assert holder.owner in page and 'name="_save"' not in page
    assert holder.unlock(live)


@SKEWS
def test_lock_filters_status_and_purge_follow_the_database_clock(
    routed: str, superuser: Client, skew: float
) -> None:
    # With the application's clock an hour ahead, judging by it would list a lock with a
    # minute left as expired (and purge it); an hour behind, one that expired a minute ago
    # as live (and keep it).
    holder = MachineMemory(using=routed)
    expired, live = write(routed, {"a": 1}), write(routed, {"a": 2})
    assert holder.lock(expired)
    assert holder.unlock(expired)
    MachineLock.objects.using(routed).filter(pk=expired).update(expires_at=StorageTime(-60))
    assert holder.lock(live, ttl=90)  # the token high-water row (SQLite keeps it) is live
    with app_clock_moved(skew):
        for machine_id, status in ((live, "yes"), (expired, "no")):
            assert listed(superuser.get(LOCKS, {"live": status, "q": machine_id})) == {machine_id}
            other = "no" if status == "yes" else "yes"
            assert listed(superuser.get(LOCKS, {"live": other, "q": machine_id})) == set()
        page = text(superuser.get(LOCKS, {"q": live}))
        assert ">live<" in page
        left = re.search(r'class="field-time_left">([\d.]+) s<', page)
        assert left and 60 < float(left[1]) <= 90
        page = text(superuser.get(LOCKS, {"q": expired}))
        assert ">expired<" in page and 'class="field-time_left">-<' in page
        # The state list's lock filter.
        for machine_id, status in ((live, "live"), (expired, "expired")):
            assert listed(superuser.get(STATES, {"lock": status, "q": machine_id})) == {machine_id}
            other = "expired" if status == "live" else "live"
            assert listed(superuser.get(STATES, {"lock": other, "q": machine_id})) == set()
        response = action(superuser, LOCKS, "purge_expired", [live, expired])
        assert messages_of(response) == ["Purged 1 expired lock(s)."]
        rows = MachineLock.objects.using(routed).filter(pk__in=[live, expired])
        assert set(rows.values_list("pk", flat=True)) == {live}
    info = holder.lock_info(live)
    assert info is not None and info.owner == holder.owner
    assert holder.unlock(live)


def test_lock_rows_cannot_be_added_changed_or_deleted(routed: str, superuser: Client) -> None:
    machine_id = new_id("lk")
    holder = MachineMemory(using=routed)
    assert holder.lock(machine_id)
    assert superuser.get(reverse("admin:machine_memory_machinelock_add")).status_code == 403
    delete = reverse("admin:machine_memory_machinelock_delete", args=[quote(machine_id)])
    assert superuser.post(delete, {"post": "yes"}).status_code == 403
    response = action(superuser, LOCKS, "delete_selected", [machine_id], post="yes")
    assert MachineLock.objects.using(routed).filter(pk=machine_id).exists()
    assert response.status_code == 200
    assert holder.unlock(machine_id)


def test_lock_actions_release_and_purge(routed: str, superuser: Client) -> None:
    holder = MachineMemory(using=routed)
    live, expired = new_id("lk"), new_id("lk")
    assert holder.lock(expired)
    assert holder.unlock(expired)
    assert holder.lock(live)
    response = action(superuser, LOCKS, "purge_expired", [live, expired])
    assert messages_of(response) == ["Purged 1 expired lock(s)."]
    assert set(MachineLock.objects.using(routed).filter(pk__in=[live, expired])
               .values_list("pk", flat=True)) == {live}  # fmt: skip
    response = action(superuser, LOCKS, "release_locks", [live])
    assert f"Released 1 lock(s): {live} (held by {holder.owner}" in messages_of(response)[0]
    assert holder.lock_info(live) is None
    # Released rows stay (token history) until purged.
    assert MachineLock.objects.using(routed).filter(pk=live).exists()


def test_purge_needs_the_lock_delete_permission(routed: str) -> None:
    expired = new_id("lk")
    holder = MachineMemory(using=routed)
    assert holder.lock(expired)
    assert holder.unlock(expired)
    high_water = new_id("lk")
    assert holder.lock(high_water)  # the high-water row is someone else's
    MachineLock.objects.using(routed).filter(pk=expired).update(expires_at=StorageTime(-60))
    client = user("view_machinelock", "change_machinelock")
    action(client, LOCKS, "purge_expired", [expired])
    assert MachineLock.objects.using(routed).filter(pk=expired).exists()
    client = user("view_machinelock", "delete_machinelock")
    action(client, LOCKS, "purge_expired", [expired])
    assert not MachineLock.objects.using(routed).filter(pk=expired).exists()
    assert holder.unlock(high_water)


# -- ADMIN_READONLY ---------------------------------------------------------------------


@pytest.mark.parametrize("value", ["no", 0, 1, None])
def test_e016_admin_readonly_must_be_a_bool(value: Any) -> None:
    with override_settings(MACHINE_MEMORY={"ADMIN_READONLY": value}):
        messages = check_settings()
    [message] = [m for m in messages if m.id == "machine_memory.E016"]
    assert isinstance(message, Error) and message.hint


@pytest.mark.parametrize("value", [True, False])
def test_admin_readonly_valid_values(value: bool) -> None:
    from machine_memory.conf import conf

    with override_settings(MACHINE_MEMORY={"ADMIN_READONLY": value}):
        assert check_settings() == []
        assert conf.ADMIN_READONLY is value
    assert conf.ADMIN_READONLY is True


# -- values no row can hold ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "params"),
    [
        (STATES, {"status": "a\x00b"}),
        (STATES, {"source": "\x00"}),
        (STATES, {"q": "x\x00"}),
        (STATES, {"q": "x\x00*"}),
        (STATES, {"lock": "live\x00"}),
        (LOCKS, {"q": "\x00"}),
        (LOCKS, {"live": "yes\x00"}),
    ],
)
def test_nul_in_filters_and_searches_is_no_server_error(
    routed: str, superuser: Client, url: str, params: dict[str, str]
) -> None:
    # PostgreSQL refuses NUL in text parameters, and no id, status or source holds one: the
    # admin answers as it does for a lookup it cannot run, not with a 500.
    response = superuser.get(url, params)
    assert response.status_code == 302
    assert response["Location"].endswith("?e=1")
    assert superuser.get(response["Location"]).status_code == 200


def test_nul_in_an_object_url_is_not_found(routed: str, superuser: Client) -> None:
    for url in [state_url("a\x00b"), lock_url("\x00")]:
        response = superuser.get(url, follow=True)
        assert response.status_code == 200  # the admin's "does not exist" redirect
        assert any("doesn\u2019t exist" in message for message in messages_of(response))


@pytest.mark.parametrize("url", [STATES, LOCKS])
def test_nul_in_the_ids_an_action_selects_is_no_server_error(
    routed: str, superuser: Client, url: str
) -> None:
    name = "release_locks" if url == STATES else "purge_expired"
    data = {"action": name, "_selected_action": ["a\x00b"], "index": 0}
    response = superuser.post(url, data)
    assert response.status_code == 302
    assert response["Location"].endswith("?e=1")


# -- deleting states whose lock is live ------------------------------------------------------


def test_a_state_with_a_live_lock_is_not_deleted_from_its_page(
    routed: str, superuser: Client
) -> None:
    machine_id = write(routed, {"a": 1})
    holder = MachineMemory(using=routed)
    assert holder.lock(machine_id)
    url = reverse("admin:machine_memory_machinestate_delete", args=[quote(machine_id)])
    response = superuser.get(url, follow=True)
    said = " ".join(messages_of(response))
    assert "Not deleted" in said and "has a live lock (live, " in said and holder.owner in said
    superuser.post(url, {"post": "yes"})
    assert MachineState.objects.using(routed).filter(pk=machine_id).exists()
    assert holder.unlock(machine_id)
    superuser.post(url, {"post": "yes"})
    assert not MachineState.objects.using(routed).filter(pk=machine_id).exists()


def test_a_lock_taken_after_the_confirmation_keeps_the_state(
    routed: str, superuser: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    machine_id = write(routed, {"a": 1})
    url = reverse("admin:machine_memory_machinestate_delete", args=[quote(machine_id)])
    assert "Are you sure" in text(superuser.get(url))
    holder = MachineMemory(using=routed)
    assert holder.lock(machine_id)  # a worker starts its cycle meanwhile
    # The page's own look found no lock (it came just before the worker's lock() landed);
    # the DELETE checks again in its own statement.
    looks = iter([None])
    real = admin.live_lock
    monkeypatch.setattr(admin, "live_lock", lambda mid: next(looks, real(mid)))
    try:
        response = superuser.post(url, {"post": "yes"}, follow=True)
        said = " ".join(messages_of(response))
        assert "Not deleted" in said and "deleted successfully" not in said
        assert MachineState.objects.using(routed).filter(pk=machine_id).exists()
    finally:
        assert holder.unlock(machine_id)


def test_the_delete_action_leaves_states_with_a_live_lock(routed: str, superuser: Client) -> None:
    locked, free = write(routed, {"a": 1}), write(routed, {"a": 2})
    holder = MachineMemory(using=routed)
    assert holder.lock(locked)
    try:
        confirm = action(superuser, STATES, "delete_selected", [locked, free])
        page = text(confirm)
        assert "Are you sure" in page and free in page and locked not in page
        assert "have a live lock" in " ".join(messages_of(confirm))
        response = action(superuser, STATES, "delete_selected", [locked, free], post="yes")
        assert "Successfully deleted 1 machine state" in " ".join(messages_of(response))
        remaining = MachineState.objects.using(routed).filter(pk__in=[locked, free])
        assert set(remaining.values_list("pk", flat=True)) == {locked}
        # Only locked states selected: nothing to confirm, nothing deleted.
        response = action(superuser, STATES, "delete_selected", [locked])
        assert "have a live lock" in " ".join(messages_of(response))
        assert MachineState.objects.using(routed).filter(pk=locked).exists()
    finally:
        assert holder.unlock(locked)


# -- empty values: one spelling -------------------------------------------------------------

# What an empty value must not look like: the spellings the admin used before (issue 12).
OTHER_SPELLINGS = {"", "&nbsp;", "—", "None", "none", "(none)", "none live"}


@pytest.mark.parametrize("spelling", [None, "∅"], ids=["django-default", "site-setting"])
def test_every_empty_value_is_spelled_as_the_admin_site_says(
    routed: str, superuser: Client, monkeypatch: pytest.MonkeyPatch, spelling: str | None
) -> None:
    from django.contrib.admin import site

    if spelling is not None:
        monkeypatch.setattr(site, "empty_value_display", spelling)
    empty = site.empty_value_display  # Django's own: "-"
    # No status, source, initiator, parent, children or lock.
    bare = write(routed, {"a": 1})
    row = cells(superuser.get(STATES, {"q": bare}))
    for column in ("status_text", "source_text", "parent", "lock_status"):
        assert row[column] == empty, (column, row)
    page = fields(superuser.get(state_url(bare)))
    for field in ("status_text", "source_text", "initiator_text", "parent", "children", "lock"):
        assert page[field].strip() == empty, (field, page)
    # A lock on a machine with no state, expired: no state to link to, no time left.
    lonely = new_id("lk")
    holder = MachineMemory(using=routed)
    assert holder.lock(lonely)
    assert holder.unlock(lonely)
    row = cells(superuser.get(LOCKS, {"q": lonely}))
    assert row["state_link"] == empty and row["time_left"] == empty, row
    assert fields(superuser.get(lock_url(lonely)))["state_link"].strip() == empty
    for shown in [*row.values(), *page.values()]:
        assert shown.strip() not in OTHER_SPELLINGS - {empty}
    # A lock backend with no table of locks (Redis), asked for the state's own page.
    backend = {"DATABASE": routed, "LOCK_BACKEND": f"{__name__}.NoLocksHeld"}
    with override_settings(MACHINE_MEMORY=backend):
        assert fields(superuser.get(state_url(bare)))["lock"].strip() == empty


class NoLocksHeld(NoForceRelease):
    """A lock backend that lists nothing and holds no lock (as Redis with none live)."""

    def info(self, machine_id: str) -> LockInfo | None:
        return None


def test_empty_strings_are_shown_apart_from_absent_values(routed: str, superuser: Client) -> None:
    # A worker may write "" as a status, source or parent; NULL means it said nothing.
    machine_id = write(
        routed, {"executionStatus": "", "source": "", "parentSubject": "", "initiator": ""}
    )
    quoted = html.escape('""')
    response = superuser.get(STATES, {"q": machine_id})
    assert response.status_code == 200
    row = cells(response)
    for column in ("status_text", "source_text", "parent"):
        assert row[column] == quoted, (column, row)
    page = fields(superuser.get(state_url(machine_id)))
    for field in ("status_text", "source_text", "parent", "initiator_text"):
        assert page[field].strip() == quoted, (field, page)
    # The filters offer "" by that name too.
    assert f">{quoted}</a>" in text(superuser.get(STATES))


def test_lock_list_links_only_to_states_that_exist(routed: str, superuser: Client) -> None:
    stateful, lonely = write(routed, {"a": 1}), new_id("lk")
    holder = MachineMemory(using=routed)
    for machine_id in (stateful, lonely):
        assert holder.lock(machine_id)
        assert holder.unlock(machine_id)
    assert (
        f'href="{state_url(stateful)}"'
        in cells(superuser.get(LOCKS, {"q": stateful}))["state_link"]
    )
    assert cells(superuser.get(LOCKS, {"q": lonely}))["state_link"] == "-"

"""URLs of the REST API, for ``include("machine_memory.contrib.rest_framework.urls")``.

A machine id is one path segment, percent-encoded as ``quote(id, safe="")``: ``a/b`` is
``states/a%2Fb/``. WSGI and ASGI servers hand Django the *decoded* path (PEP 3333's
PATH_INFO, ASGI's ``path``), so by the time the resolver sees it the id has its ``/`` back:
the pattern takes everything between ``states/`` and the final ``/`` as the id, and it is
used as it arrives, never unquoted a second time (an id may itself contain ``%41``). This
stays exact as long as nothing between client and Django rewrites the decoded path:
gunicorn, uvicorn, Django's runserver and the test client do not; Apache needs
``AllowEncodedSlashes NoDecode``, nginx a ``proxy_pass`` without a URI part.

Two ids cannot go in a path from every client: ``.`` and ``..``. Clients built on the
WHATWG URL standard (``fetch``, undici, browsers) resolve ``%2E`` and ``%2E%2E`` as dot
segments too, before sending. ``state/?id=<id>`` and ``lock/?id=<id>`` are the same two
resources with the id in the query string, which no client rewrites: the TypeScript client
uses them for every id.
"""

from __future__ import annotations

from importlib.util import find_spec

from django.urls import path, re_path

from machine_memory.contrib.rest_framework.views import (
    LockByIdView,
    LockDetailView,
    LockListView,
    StateByIdView,
    StateDetailView,
    StateListView,
)

app_name = "machine_memory_api"

# [\s\S], not ".": an id may contain a newline. \Z, not $: "$" also matches before a final
# newline, which would cut it off the id.
MACHINE_ID = r"(?P<machine_id>[\s\S]+)"

urlpatterns = [
    path("states/", StateListView.as_view(), name="state-list"),
    re_path(rf"^states/{MACHINE_ID}/\Z", StateDetailView.as_view(), name="state-detail"),
    path("locks/", LockListView.as_view(), name="lock-list"),
    re_path(rf"^locks/{MACHINE_ID}/\Z", LockDetailView.as_view(), name="lock-detail"),
    # Not under states/ and locks/: there every path is an id.
    path("state/", StateByIdView.as_view(), name="state-by-id"),
    path("lock/", LockByIdView.as_view(), name="lock-by-id"),
]

if find_spec("drf_spectacular") is not None:
    # Registers the OpenAPI description of these views with drf-spectacular (optional).
    from machine_memory.contrib.rest_framework import schema  # noqa: F401

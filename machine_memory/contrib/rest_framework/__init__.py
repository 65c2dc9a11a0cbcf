"""The machine memory over HTTP, with Django REST framework (the ``drf`` extra).

Mount it in a URLconf::

    path("api/machine-memory/", include("machine_memory.contrib.rest_framework.urls"))

Every request goes through ``MachineMemory``; see docs/rest-api.md for the
endpoints, the ETag and lock-token rules and the status codes.
"""

from __future__ import annotations

from urllib.parse import quote

try:
    import rest_framework  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "machine_memory.contrib.rest_framework needs Django REST framework; install it with "
        'pip install "django-machine-memory[drf]"'
    ) from exc


def quote_id(machine_id: str) -> str:
    """The URL path segment of a machine id: ``quote(id, safe="")``, dot segments escaped.

    HTTP clients resolve a segment that is exactly ``.`` or ``..`` before sending (RFC 3986
    §5.2.4), so those two ids go as ``%2E`` and ``%2E%2E``; the server decodes them back.
    """
    segment = quote(machine_id, safe="")
    return segment.replace(".", "%2E") if segment in (".", "..") else segment

"""DRF's token authentication, remembering each valid token for a few seconds.

DRF looks the token and its user up with an ORM query on every request, which costs more
CPU than the machine memory's own statements (docs/rest-api.md#serving-the-api). A worker
process that saw a token a moment ago takes its word for ``DEMO_TOKEN_CACHE_SECONDS``
(settings; 0 turns the memory off): a deleted token or a user made inactive is refused
that much later. Choose the window to suit.
"""

from __future__ import annotations

import threading
import time
from typing import Any, ClassVar

from django.conf import settings
from rest_framework.authentication import TokenAuthentication

# Forget everything when this many tokens are remembered: no unbounded growth.
TOKEN_CACHE_SIZE = 1000


class CachedTokenAuthentication(TokenAuthentication):
    # key -> (valid until, user, token), shared by the threads of a process
    _seen: ClassVar[dict[str, tuple[float, Any, Any]]] = {}
    _lock = threading.Lock()

    def authenticate_credentials(self, key: str) -> tuple[Any, Any]:
        now = time.monotonic()
        seen = self._seen.get(key)
        if seen is not None and seen[0] > now:
            return seen[1], seen[2]
        user, token = super().authenticate_credentials(key)  # raises for a bad token
        seconds: float = getattr(settings, "DEMO_TOKEN_CACHE_SECONDS", 5.0)
        if seconds <= 0:
            return user, token
        with self._lock:
            if len(self._seen) >= TOKEN_CACHE_SIZE:
                self._seen.clear()
            self._seen[key] = (now + seconds, user, token)
        return user, token

"""Which version each object handed out by ``read()`` stands for.

Arvo's handlers mutate the object they read and pass it back as ``prev_data``, so a
write must follow the version the read saw, not the content (docs/contract.md#write).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from machine_memory.validation import Metadata

# How many (id, object) pairs are remembered; the oldest are forgotten first, and a
# forgotten one falls back to comparing its content with the stored state.
LIMIT = 4096


class VersionMemo:
    """A bounded, thread-safe map (id, object) -> (version, metadata), keyed by identity."""

    def __init__(self, limit: int = LIMIT) -> None:
        self.limit = limit
        # The object itself is kept beside its version: id() alone could be reused by a
        # new object once the old one is garbage.
        self._entries: OrderedDict[tuple[str, int], tuple[object, int, Metadata]] = OrderedDict()
        self._mutex = threading.Lock()

    def remember(self, machine_id: str, obj: dict[str, Any], version: int, meta: Metadata) -> None:
        with self._mutex:
            self._entries[(machine_id, id(obj))] = (obj, version, meta)
            if len(self._entries) > self.limit:
                self._entries.popitem(last=False)

    def lookup(self, machine_id: str, obj: object) -> tuple[int, Metadata] | None:
        """The version ``obj`` was read (or written) at, with its metadata; None if unknown."""
        with self._mutex:
            entry = self._entries.get((machine_id, id(obj)))
        return (entry[1], entry[2]) if entry is not None and entry[0] is obj else None

    def forget(self, machine_id: str, obj: object) -> None:
        with self._mutex:
            key = (machine_id, id(obj))
            entry = self._entries.get(key)
            if entry is not None and entry[0] is obj:
                del self._entries[key]

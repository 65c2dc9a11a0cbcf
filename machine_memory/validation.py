"""Input validation, the same for every store and lock backend.

Everything here runs before storage is touched, so a bad argument raises
``InvalidMachineId`` / ``InvalidState`` / ``ValueError`` and nothing is written
(docs/contract.md#bad-arguments).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from machine_memory.exceptions import InvalidMachineId, InvalidState

MAX_ID_LENGTH = 512
MAX_OWNER_LENGTH = 255
# States nest at most this deep (containers within containers). Deeper documents are
# refused on every database alike, well before any JSON parser's or server's own limit.
MAX_STATE_DEPTH = 256

# (execution_status, parent_id, initiator, source): the metadata columns of a state.
Metadata = tuple[str | None, str | None, str | None, str | None]

# Column sizes of the metadata columns (models.MachineState); derived values are cut to fit.
METADATA_LENGTHS = {
    "execution_status": 64,
    "parent_id": MAX_ID_LENGTH,
    "initiator": 255,
    "source": 255,
}

# Arvo's MachineMemoryMetadata keys -> our columns, and the state document keys that supply
# them when no metadata is passed.
METADATA_KEYS = {"parent_subject": "parent_id", "initiator": "initiator", "source": "source"}
DOCUMENT_KEYS = {
    "executionStatus": "execution_status",
    "parentSubject": "parent_id",
    "initiator": "initiator",
    "source": "source",
}

# An escaped NUL: \u0000 after an even number of other backslashes.
_ESCAPED_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")

_encoder = json.JSONEncoder(allow_nan=False, ensure_ascii=False, separators=(",", ":"))


def validate_id(machine_id: object) -> str:
    if type(machine_id) is not str:
        if not isinstance(machine_id, str):
            raise InvalidMachineId(
                f"Machine ids must be str, not {type(machine_id).__name__}; "
                "pass the Arvo subject as a string."
            )
        # The value itself, not str(): a str subclass may override __str__ (on Python 3.11,
        # str() of a (str, Enum) member is "Kind.ORDER"), which would name another machine.
        machine_id = str.__str__(machine_id)
    if not machine_id:
        raise InvalidMachineId("Machine id must be a non-empty string.")
    if len(machine_id) > MAX_ID_LENGTH:
        raise InvalidMachineId(
            f"Machine id is {len(machine_id)} characters long; the limit is {MAX_ID_LENGTH}."
        )
    problem = _text_problem(machine_id)
    if problem:
        raise InvalidMachineId(f"Machine id {problem}.")
    return machine_id


def _text_problem(text: str) -> str | None:
    """Why ``text`` cannot be stored as a string column on every database, or None."""
    if "\x00" in text:
        return "must not contain NUL characters"
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return "contains unpaired surrogates and cannot be stored as UTF-8"
    return None


def validate_owner(owner: object) -> str:
    """A lock owner: a non-empty str of at most 255 characters that every storage keeps."""
    if not isinstance(owner, str) or not 0 < len(owner) <= MAX_OWNER_LENGTH:
        raise ValueError(
            f"owner must be a non-empty str of at most {MAX_OWNER_LENGTH} characters; "
            f"got {owner!r:.80}."
        )
    problem = _text_problem(owner)
    if problem:
        raise ValueError(f"owner {problem}.")
    return str.__str__(owner)


# What json encodes as objects and arrays.
_CONTAINERS = (dict, list, tuple)


def _check_keys(value: Any, depth: int = 1) -> None:
    # json.dumps silently turns int/float/bool/None keys into strings, so a state written as
    # {1: "a"} would read back as {"1": "a"}: refuse it instead, at any depth.
    if depth > MAX_STATE_DEPTH:
        raise InvalidState(
            f"State is nested too deeply: more than {MAX_STATE_DEPTH} levels of objects and "
            "arrays. Flatten it."
        )
    # Runs on every write: the loops are written for speed (a type tuple, not a union; the
    # exact type first), about twice as fast as the plain version on a small state.
    if isinstance(value, dict):
        for key in value:
            # str subclasses (StrEnum members) are fine: json writes their str value.
            if type(key) is not str and not isinstance(key, str):
                raise InvalidState(
                    f"State keys must be str at every depth; found {type(key).__name__} key "
                    f"{key!r}. Convert keys to strings before writing."
                )
        value = value.values()
    for item in value:
        if isinstance(item, _CONTAINERS):
            _check_keys(item, depth + 1)


def encode_state(data: object, max_bytes: int) -> str:
    """Validate ``data`` and return its compact JSON text."""
    if not isinstance(data, dict):
        raise InvalidState(f"State must be a dict (a JSON object), not {type(data).__name__}.")
    # Outside the try: its InvalidState is a ValueError, which the encoder's handler below
    # would wrap in a second message. It also bounds the depth, so the encoder (which
    # recurses once per level, as _check_keys does) meets no deeper value than it has.
    _check_keys(data)
    try:
        text = _encoder.encode(data)
    except ValueError as exc:  # NaN/Infinity, circular references
        raise InvalidState(
            f"State is not strict JSON ({exc}); NaN, Infinity and cycles are not allowed."
        ) from None
    except TypeError as exc:  # sets, bytes, datetimes, arbitrary objects
        raise InvalidState(f"State is not JSON-serialisable: {exc}.") from None
    # json escapes NUL as \u0000. PostgreSQL's jsonb cannot store it, so it is refused on
    # every database alike (a state must move between databases). The regex runs only when
    # the substring is there, to tell an escaped NUL from a literal backslash-u0000 text.
    if "\\u0000" in text and _ESCAPED_NUL.search(text):
        raise InvalidState(
            "State contains a NUL character (\\u0000) in a string or key, which PostgreSQL "
            "cannot store; remove or replace it."
        )
    size = len(text) if text.isascii() else _utf8_length(text)
    if size > max_bytes:
        raise InvalidState(
            f"State is {size} bytes as compact JSON; the limit is {max_bytes} "
            "(MACHINE_MEMORY['MAX_STATE_BYTES'])."
        )
    return text


def _utf8_length(text: str) -> int:
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidState(
            "State contains unpaired surrogates and cannot be stored as UTF-8."
        ) from None


def decode_state(stored: Any) -> dict[str, Any]:
    """Turn a stored document (text, or already decoded by the driver) into a fresh dict."""
    if isinstance(stored, str | bytes | bytearray | memoryview):
        result = json.loads(bytes(stored) if isinstance(stored, memoryview) else stored)
    else:
        # Some drivers decode JSON themselves; a JSON round trip still gives a fresh copy.
        result = json.loads(_encoder.encode(stored))
    if not isinstance(result, dict):
        raise InvalidState(f"Stored state is a {type(result).__name__}, not a JSON object.")
    return result


def resolve_metadata(
    data: Mapping[str, Any], metadata: Mapping[str, Any] | None, machine_id: str
) -> Metadata:
    """Return (execution_status, parent_id, initiator, source) for the metadata columns."""
    values: dict[str, str | None] = dict.fromkeys(METADATA_LENGTHS)
    for key, column in DOCUMENT_KEYS.items():
        item = data.get(key)
        if isinstance(item, str):
            values[column] = item[: METADATA_LENGTHS[column]]
    if metadata is not None:
        if not isinstance(metadata, Mapping):
            raise InvalidState(f"metadata must be a mapping, not {type(metadata).__name__}.")
        unknown = set(metadata) - {"subject", *METADATA_KEYS}
        if unknown:
            raise InvalidState(
                f"Unknown metadata keys {sorted(unknown)!r}; allowed: subject, "
                "parent_subject, initiator, source."
            )
        subject = metadata.get("subject")
        if subject is not None and subject != machine_id:
            raise InvalidState(
                f"metadata['subject'] is {subject!r} but the machine id is {machine_id!r}; "
                "the subject is the machine id."
            )
        for key, column in METADATA_KEYS.items():
            if key not in metadata:
                continue
            item = metadata[key]
            if item is not None and not isinstance(item, str):
                raise InvalidState(f"metadata[{key!r}] must be a str or None.")
            if item is not None:
                if len(item) > METADATA_LENGTHS[column]:
                    raise InvalidState(
                        f"metadata[{key!r}] is longer than {METADATA_LENGTHS[column]} characters."
                    )
                problem = _text_problem(item)
                if problem:
                    raise InvalidState(f"metadata[{key!r}] {problem}.")
                item = str.__str__(item)
            values[column] = item
    return (
        values["execution_status"],
        values["parent_id"],
        values["initiator"],
        values["source"],
    )


def json_equal(left: Any, right: Any) -> bool:
    """Equality of two JSON values as JSON sees them: 1 == 1.0, but True != 1."""
    if isinstance(left, bool) or isinstance(right, bool):
        return type(left) is type(right) and left == right
    if isinstance(left, int | float) and isinstance(right, int | float):
        return left == right or (math.isnan(left) and math.isnan(right))
    if isinstance(left, dict):
        return (
            isinstance(right, dict)
            and left.keys() == right.keys()
            and all(json_equal(value, right[key]) for key, value in left.items())
        )
    if isinstance(left, list | tuple):
        return (
            isinstance(right, list | tuple)
            and len(left) == len(right)
            and all(json_equal(a, b) for a, b in zip(left, right, strict=True))
        )
    if isinstance(left, str) and isinstance(right, str):
        # JSON sees the characters: a str subclass (a str Enum member) equals its value.
        return str.__eq__(left, right)
    return type(left) is type(right) and bool(left == right)

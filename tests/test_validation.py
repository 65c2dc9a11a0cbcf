"""Unit tests of machine_memory.validation: everything that runs before storage is touched."""

from __future__ import annotations

import datetime
import enum
import json
import math
from collections import OrderedDict
from types import MappingProxyType
from typing import Any

import pytest

from machine_memory.exceptions import InvalidMachineId, InvalidState, MachineMemoryError
from machine_memory.validation import (
    MAX_ID_LENGTH,
    MAX_STATE_DEPTH,
    METADATA_LENGTHS,
    decode_state,
    encode_state,
    json_equal,
    resolve_metadata,
    validate_id,
    validate_owner,
)

LIMIT = 1_048_576


class Subject(str):
    """A str subclass, like the typed ids some codebases wrap their subjects in."""


class LoudSubject(str):
    def __str__(self) -> str:
        return "not the id"


class Kind(str, enum.Enum):  # noqa: UP042 - StrEnum's str() is the value; this one's is not
    # On Python 3.11, str(Kind.ORDER) is "Kind.ORDER", not "order".
    ORDER = "order"


def nested_lists(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value


# -- validate_id ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "machine_id",
    [
        "a",
        "x" * MAX_ID_LENGTH,
        "é" * MAX_ID_LENGTH,  # the limit counts characters, not bytes
        "dGVzdA==/+base64",
        " leading and trailing ",
        "emoji 🚀 and CJK 状态",
        "\t\n\r",
    ],
)
def test_validate_id_accepts(machine_id: str) -> None:
    assert validate_id(machine_id) == machine_id
    assert type(validate_id(machine_id)) is str


@pytest.mark.parametrize("cls", [Subject, LoudSubject])
def test_validate_id_accepts_str_subclasses_by_value(cls: type[str]) -> None:
    result = validate_id(cls("abc"))
    assert result == "abc"
    assert type(result) is str


def test_validate_id_uses_the_value_of_str_enums() -> None:
    result = validate_id(Kind.ORDER)
    assert result == "order"
    assert type(result) is str


@pytest.mark.parametrize(
    "machine_id",
    [
        "",
        "x" * (MAX_ID_LENGTH + 1),
        "a\x00b",
        "\x00",
        "lone \ud800 surrogate",
        "\udfff",
        None,
        1,
        b"bytes",
        ["list"],
    ],
)
def test_validate_id_rejects(machine_id: Any) -> None:
    with pytest.raises(InvalidMachineId) as info:
        validate_id(machine_id)
    # Both a ValueError and a MachineMemoryError, with a message that says what is wrong.
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, MachineMemoryError)
    assert str(info.value)


# -- encode_state --------------------------------------------------------------------------


def test_encode_state_is_compact_utf8_json() -> None:
    text = encode_state({"a": [1, 2.5, None, True], "é": {"ü": "状态"}}, LIMIT)
    assert text == '{"a":[1,2.5,null,true],"é":{"ü":"状态"}}'


def test_encode_state_accepts_tuples_as_arrays() -> None:
    text = encode_state({"pair": (1, 2), "nested": [("a", ("b",))]}, LIMIT)
    assert json.loads(text) == {"pair": [1, 2], "nested": [["a", ["b"]]]}


def test_encode_state_accepts_dict_subclasses() -> None:
    assert encode_state(OrderedDict(b=1, a=2), LIMIT) == '{"b":1,"a":2}'


def test_encode_state_accepts_str_subclass_values() -> None:
    assert encode_state({"kind": Kind.ORDER, "s": LoudSubject("v")}, LIMIT) == (
        '{"kind":"order","s":"v"}'
    )


def test_encode_state_accepts_str_subclass_keys_by_value() -> None:
    assert encode_state({Kind.ORDER: 1, "n": {LoudSubject("k"): 2}}, LIMIT) == (
        '{"order":1,"n":{"k":2}}'
    )


def test_encode_state_empty_object() -> None:
    assert encode_state({}, LIMIT) == "{}"


@pytest.mark.parametrize(
    "data",
    [
        [],
        [{"a": 1}],
        "{}",
        None,
        1,
        MappingProxyType({"a": 1}),  # a mapping, but not a dict
    ],
)
def test_encode_state_rejects_non_objects(data: Any) -> None:
    with pytest.raises(InvalidState):
        encode_state(data, LIMIT)


@pytest.mark.parametrize(
    "data",
    [
        {"x": math.nan},
        {"x": math.inf},
        {"x": [-math.inf]},
        {"x": {1, 2}},
        {"x": b"bytes"},
        {"x": datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)},
        {"x": object()},
        {1: "int key"},
        {None: "None key"},
        {True: "bool key"},
        {1.5: "float key"},
        {"deep": {"er": {2: "int key at depth"}}},
        {"in": [{"list": [{3: "int key inside lists"}]}]},
        {"in": ({4: "int key inside a tuple"},)},
        {"lone": "\ud800"},
        {"\udc00": "lone surrogate in a key"},
    ],
    ids=lambda data: repr(data)[:40],
)
def test_encode_state_rejects_non_json(data: Any) -> None:
    with pytest.raises(InvalidState) as info:
        encode_state(data, LIMIT)
    assert isinstance(info.value, ValueError)


def test_encode_state_rejects_a_circular_dict() -> None:
    data: dict[str, Any] = {"a": 1}
    data["self"] = data
    with pytest.raises(InvalidState):
        encode_state(data, LIMIT)


def test_encode_state_rejects_a_circular_list() -> None:
    items: list[Any] = []
    items.append(items)
    with pytest.raises(InvalidState):
        encode_state({"items": items}, LIMIT)


def test_encode_state_accepts_a_shared_but_acyclic_value() -> None:
    shared = {"k": [1, 2]}
    assert encode_state({"a": shared, "b": shared}, LIMIT) == '{"a":{"k":[1,2]},"b":{"k":[1,2]}}'


def test_encode_state_moderate_nesting_round_trips() -> None:
    data = {"deep": nested_lists(200)}
    assert decode_state(encode_state(data, LIMIT)) == data


def test_encode_state_nesting_limit_is_exact() -> None:
    # The state object is level 1: MAX_STATE_DEPTH levels in all pass, one more does not.
    deepest = {"deep": nested_lists(MAX_STATE_DEPTH - 1)}
    assert decode_state(encode_state(deepest, LIMIT)) == deepest
    with pytest.raises(InvalidState, match="nested too deeply"):
        encode_state({"deep": nested_lists(MAX_STATE_DEPTH)}, LIMIT)


@pytest.mark.parametrize("depth", [10_000, 200_000])
def test_encode_state_rejects_too_deep_nesting_cleanly(depth: int) -> None:
    # Not a RecursionError escaping to the caller: a specific InvalidState.
    with pytest.raises(InvalidState, match="nested too deeply"):
        encode_state({"deep": nested_lists(depth)}, LIMIT)
    deep_dict: dict[str, Any] = {}
    for _ in range(depth):
        deep_dict = {"d": deep_dict}
    with pytest.raises(InvalidState, match="nested too deeply"):
        encode_state(deep_dict, LIMIT)


def test_encode_state_size_limit_is_inclusive() -> None:
    data = {"s": "x" * 100}
    size = len(encode_state(data, LIMIT))
    assert encode_state(data, size)
    with pytest.raises(InvalidState, match="MAX_STATE_BYTES"):
        encode_state(data, size - 1)


def test_encode_state_size_counts_utf8_bytes_not_characters() -> None:
    limit = 1000
    # "é" is one character but two UTF-8 bytes: 8 + 2 * 600 bytes, 8 + 600 characters.
    data = {"s": "é" * 600}
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    assert len(text) < limit < len(text.encode("utf-8"))
    with pytest.raises(InvalidState, match="1208 bytes"):
        encode_state(data, limit)
    # Four-byte characters count four each.
    rocket = {"s": "🚀" * 250}  # 8 + 1000 bytes, 258 characters
    with pytest.raises(InvalidState):
        encode_state(rocket, limit)
    assert encode_state(rocket, 1008)


def test_encode_state_escapes_count_as_encoded() -> None:
    # Control characters and quotes are escaped by JSON, and the escape is what is stored.
    data = {"s": '\x01"\\'}
    text = encode_state(data, LIMIT)
    assert text == '{"s":"\\u0001\\"\\\\"}'
    with pytest.raises(InvalidState):
        encode_state(data, len(text) - 1)


# -- decode_state --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "stored",
    [
        '{"a":[1,2],"é":"ü"}',
        '{"a":[1,2],"é":"ü"}'.encode(),
        bytearray('{"a":[1,2],"é":"ü"}'.encode()),
        memoryview('{"a":[1,2],"é":"ü"}'.encode()),
        {"a": [1, 2], "é": "ü"},  # drivers that decode JSON themselves (psycopg's jsonb)
    ],
    ids=["str", "bytes", "bytearray", "memoryview", "decoded"],
)
def test_decode_state_accepts_what_drivers_return(stored: Any) -> None:
    assert decode_state(stored) == {"a": [1, 2], "é": "ü"}


def test_decode_state_returns_a_fresh_copy_of_a_decoded_document() -> None:
    stored = {"a": [1, {"b": 2}]}
    result = decode_state(stored)
    assert result == stored
    result["a"][1]["b"] = 3
    result["a"].append(4)
    assert stored == {"a": [1, {"b": 2}]}


def test_decode_state_returns_fresh_objects_each_call() -> None:
    text = '{"a":{"b":[1]}}'
    first, second = decode_state(text), decode_state(text)
    assert first == second
    assert first is not second
    assert first["a"] is not second["a"]


@pytest.mark.parametrize("stored", ["[1,2]", '"text"', "1", "null", [1, 2], None])
def test_decode_state_rejects_non_objects(stored: Any) -> None:
    with pytest.raises(InvalidState):
        decode_state(stored)


# -- resolve_metadata ----------------------------------------------------------------------


DOCUMENT = {
    "executionStatus": "running",
    "parentSubject": "parent-1",
    "initiator": "orchestrator",
    "source": "com.example.orders",
    "subject": "m-1",
}


def test_resolve_metadata_from_the_document() -> None:
    assert resolve_metadata(DOCUMENT, None, "m-1") == (
        "running",
        "parent-1",
        "orchestrator",
        "com.example.orders",
    )


def test_resolve_metadata_nothing_known() -> None:
    assert resolve_metadata({"a": 1}, None, "m-1") == (None, None, None, None)
    assert resolve_metadata({}, {}, "m-1") == (None, None, None, None)


def test_resolve_metadata_ignores_non_str_document_values() -> None:
    data = {"executionStatus": 3, "parentSubject": None, "initiator": ["x"], "source": True}
    assert resolve_metadata(data, None, "m-1") == (None, None, None, None)


def test_resolve_metadata_cuts_long_document_values_to_the_columns() -> None:
    data = {
        "executionStatus": "s" * 1000,
        "parentSubject": "p" * 1000,
        "initiator": "i" * 1000,
        "source": "o" * 1000,
    }
    status, parent, initiator, source = resolve_metadata(data, None, "m-1")
    assert status == "s" * METADATA_LENGTHS["execution_status"]
    assert parent == "p" * METADATA_LENGTHS["parent_id"]
    assert initiator == "i" * METADATA_LENGTHS["initiator"]
    assert source == "o" * METADATA_LENGTHS["source"]


def test_resolve_metadata_explicit_mapping_overrides_the_document() -> None:
    metadata = {
        "subject": "m-1",
        "parent_subject": "parent-2",
        "initiator": "someone-else",
        "source": "com.example.other",
    }
    # executionStatus is not part of Arvo's metadata: it still comes from the document.
    assert resolve_metadata(DOCUMENT, metadata, "m-1") == (
        "running",
        "parent-2",
        "someone-else",
        "com.example.other",
    )


def test_resolve_metadata_partial_mapping_and_explicit_none() -> None:
    assert resolve_metadata(DOCUMENT, {"source": "s2", "parent_subject": None}, "m-1") == (
        "running",
        None,
        "orchestrator",
        "s2",
    )


def test_resolve_metadata_accepts_any_mapping() -> None:
    metadata = MappingProxyType({"subject": "m-1", "source": "s"})
    assert resolve_metadata({}, metadata, "m-1") == (None, None, None, "s")


@pytest.mark.parametrize(
    "metadata",
    [
        ["subject", "m-1"],
        "m-1",
        1,
        {"parentSubject": "camelCase is the document's spelling, not the metadata's"},
        {"execution_status": "not an Arvo metadata key"},
        {"subject": "another-id"},
        {"subject": 1},
        {"source": 1},
        {"initiator": b"bytes"},
        {"parent_subject": ["p"]},
        {"initiator": "i" * (METADATA_LENGTHS["initiator"] + 1)},
        {"source": "s" * (METADATA_LENGTHS["source"] + 1)},
        {"parent_subject": "p" * (METADATA_LENGTHS["parent_id"] + 1)},
    ],
    ids=lambda metadata: repr(metadata)[:40],
)
def test_resolve_metadata_rejects(metadata: Any) -> None:
    with pytest.raises(InvalidState):
        resolve_metadata({}, metadata, "m-1")


def test_resolve_metadata_subject_may_be_none_or_the_id() -> None:
    assert resolve_metadata({}, {"subject": None}, "m-1") == (None, None, None, None)
    assert resolve_metadata({}, {"subject": "m-1"}, "m-1") == (None, None, None, None)


def test_resolve_metadata_at_the_column_limit() -> None:
    initiator = "i" * METADATA_LENGTHS["initiator"]
    assert resolve_metadata({}, {"initiator": initiator}, "m-1")[2] == initiator


# -- json_equal ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("left", "right"),
    [
        (1, 1.0),
        (0, 0.0),
        (-0.0, 0),
        (None, None),
        ("a", "a"),
        (True, True),
        (False, False),
        ([], []),
        ({}, {}),
        ([1, 2], (1, 2)),
        ((1, (2, 3)), [1.0, [2, 3.0]]),
        ({"a": 1, "b": 2}, {"b": 2.0, "a": 1}),
        ({"a": [{"b": [1, {"c": None}]}]}, {"a": ({"b": (1.0, {"c": None})},)}),
        (Subject("a"), "a"),
        ("order", Kind.ORDER),
        ({"kind": Kind.ORDER}, {"kind": "order"}),
    ],
)
def test_json_equal_true(left: Any, right: Any) -> None:
    assert json_equal(left, right)
    assert json_equal(right, left)


@pytest.mark.parametrize(
    ("left", "right"),
    [
        (True, 1),
        (False, 0),
        (True, 1.0),
        (1, "1"),
        (None, 0),
        (None, False),
        ("", None),
        ([], {}),
        ([1], [1, 2]),
        ([1, 2], [2, 1]),
        (["a"], "a"),
        (["a"], {"a": 1}),
        ({"a": 1}, {"a": 1, "b": 2}),
        ({"a": 1}, {"b": 1}),
        ({"a": [1, {"b": True}]}, {"a": [1, {"b": 1}]}),
        ({"a": {"b": {"c": 1}}}, {"a": {"b": {"c": 2}}}),
        ([{"a": 1}], [{"a": "1"}]),
        ({"a": 1}, [("a", 1)]),
        # NaN is not JSON, so no stored state holds it: a prev_data that does is never equal.
        (float("nan"), 1.0),
        ({"x": 0.5}, {"x": float("nan")}),
    ],
)
def test_json_equal_false(left: Any, right: Any) -> None:
    assert not json_equal(left, right)
    assert not json_equal(right, left)


def test_json_equal_agrees_with_a_json_round_trip() -> None:
    data = {"n": 1, "f": 2.5, "t": (True, None), "nested": {"x": [1, "two", {"three": 3}]}}
    assert json_equal(data, json.loads(json.dumps(data)))


def test_encode_state_rejects_nul_but_not_a_literal_backslash_u0000() -> None:
    for bad in ({"a": "x\x00y"}, {"k\x00": 1}, {"a": ["\\\x00"]}):
        with pytest.raises(InvalidState, match="NUL"):
            encode_state(bad, LIMIT)
    assert encode_state({"a": "\\u0000"}, LIMIT) == '{"a":"\\\\u0000"}'


# -- the messages ----------------------------------------------------------------------------
# What a refusal says is part of the contract (docs/contract.md#bad-arguments): it names
# what is wrong and what to do. Each message is pinned whole, so a changed or dropped part
# of one is a failing test, not a silent change.


def _nan_refusal() -> str:
    try:
        json.dumps(math.nan, allow_nan=False)
    except ValueError as exc:
        return str(exc)
    raise AssertionError("json accepted NaN")


NAN_REFUSAL = _nan_refusal()


class Opaque:
    def __repr__(self) -> str:
        return "<opaque>"


@pytest.mark.parametrize(
    ("machine_id", "message"),
    [
        (1, "Machine ids must be str, not int; pass the Arvo subject as a string."),
        (None, "Machine ids must be str, not NoneType; pass the Arvo subject as a string."),
        ("", "Machine id must be a non-empty string."),
        ("x" * (MAX_ID_LENGTH + 1), "Machine id is 513 characters long; the limit is 512."),
        ("a\x00b", "Machine id must not contain NUL characters."),
        (
            "lone \ud800",
            "Machine id contains unpaired surrogates and cannot be stored as UTF-8.",
        ),
    ],
    ids=lambda value: repr(value)[:30],
)
def test_validate_id_says_what_is_wrong(machine_id: Any, message: str) -> None:
    with pytest.raises(InvalidMachineId) as info:
        validate_id(machine_id)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("owner", "message"),
    [
        ("", "owner must be a non-empty str of at most 255 characters; got ''."),
        (7, "owner must be a non-empty str of at most 255 characters; got 7."),
        (
            "o" * 256,
            "owner must be a non-empty str of at most 255 characters; got '" + "o" * 79 + ".",
        ),
        ("w\x00", "owner must not contain NUL characters."),
        ("w\udc00", "owner contains unpaired surrogates and cannot be stored as UTF-8."),
    ],
    ids=lambda value: repr(value)[:30],
)
def test_validate_owner_says_what_is_wrong(owner: Any, message: str) -> None:
    with pytest.raises(ValueError, match=r"^owner ") as info:
        validate_owner(owner)
    assert str(info.value) == message


def test_validate_owner_accepts_the_longest_owner_by_value() -> None:
    assert validate_owner("o" * 255) == "o" * 255
    assert validate_owner("o") == "o"
    assert type(validate_owner(Subject("w-1"))) is str


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "State must be a dict (a JSON object), not list."),
        (
            {1: "a"},
            "State keys must be str at every depth; found int key 1. Convert keys to "
            "strings before writing.",
        ),
        (
            {"a": [{None: 1}]},
            "State keys must be str at every depth; found NoneType key None. "
            "Convert keys to strings before writing.",
        ),
        (
            {"n": math.nan},
            # Python's own words in the middle (they differ between versions).
            f"State is not strict JSON ({NAN_REFUSAL}); NaN, Infinity and cycles are not allowed.",
        ),
        (
            {"s": {1, 2} and Opaque()},
            "State is not JSON-serialisable: Object of type Opaque is not JSON serializable.",
        ),
        (
            {"k": "a\x00"},
            "State contains a NUL character (\\u0000) in a string or key, which "
            "PostgreSQL cannot store; remove or replace it.",
        ),
        ({"k": "\ud800x"}, "State contains unpaired surrogates and cannot be stored as UTF-8."),
        (
            {"k": "x" * 20},
            "State is 28 bytes as compact JSON; the limit is 27 "
            "(MACHINE_MEMORY['MAX_STATE_BYTES']).",
        ),
        (
            nested_lists(300)[0] and {"deep": nested_lists(300)},
            "State is nested too deeply: more than 256 levels of objects and arrays. Flatten it.",
        ),
    ],
    ids=lambda value: repr(value)[:30],
)
def test_encode_state_says_what_is_wrong(data: Any, message: str) -> None:
    with pytest.raises(InvalidState) as info:
        encode_state(data, 27)
    assert str(info.value) == message


def test_decode_state_says_what_was_stored() -> None:
    with pytest.raises(InvalidState) as info:
        decode_state("[1]")
    assert str(info.value) == "Stored state is a list, not a JSON object."


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        (["subject"], "metadata must be a mapping, not list."),
        (
            {"executionStatus": "x", "zeta": 1},
            "Unknown metadata keys ['executionStatus', 'zeta']; allowed: subject, "
            "parent_subject, initiator, source.",
        ),
        (
            {"subject": "m-2"},
            "metadata['subject'] is 'm-2' but the machine id is 'm-1'; the subject is the "
            "machine id.",
        ),
        ({"source": 1}, "metadata['source'] must be a str or None."),
        (
            {"initiator": "i" * 256},
            "metadata['initiator'] is longer than 255 characters.",
        ),
        (
            {"parent_subject": "p\x00"},
            "metadata['parent_subject'] must not contain NUL characters.",
        ),
    ],
    ids=lambda value: repr(value)[:30],
)
def test_resolve_metadata_says_what_is_wrong(metadata: Any, message: str) -> None:
    with pytest.raises(InvalidState) as info:
        resolve_metadata({}, metadata, "m-1")
    assert str(info.value) == message

"""Request and response bodies of the REST API.

Request serializers only check the shape of the body; ``MachineMemory`` validates the
state and its metadata itself (docs/contract.md#states, docs/contract.md#metadata), so
the rules live in one place.

Fields named ``data``, ``source`` and ``errors`` carry ``type: ignore[assignment]``: the
stubs see them shadow ``Serializer.data`` / ``Field.source`` / ``Serializer.errors``, but
REST framework's metaclass moves declared fields off the class, so nothing is shadowed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from rest_framework import serializers

from machine_memory.validation import MAX_ID_LENGTH, METADATA_LENGTHS

# Longest lock the API grants, in seconds: a lock is held for one event's work, and an
# unbounded value would overflow the databases' interval arithmetic.
MAX_TTL = 86_400.0
MIN_TTL = 0.001
# Longest a POST locks/{id}/ may wait for a held lock, in seconds. Over HTTP a refusal is
# answered at once by default: a waiting request holds a server worker, and the client
# (or its broker, which redelivers) is the better place to wait.
MAX_LOCK_WAIT = 1.0
# Integers beyond this are refused before any float arithmetic: float(10**400) overflows.
MAX_EXACT_FLOAT = 2**53


class StrictSerializer(serializers.Serializer[Any]):
    """Refuses keys it does not know: ``{"state": {...}}`` is a typo, not an empty write."""

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, Mapping):
            unknown = sorted(set(data) - set(self.fields))
            if unknown:
                raise serializers.ValidationError({key: ["Unknown field."] for key in unknown})
        return super().to_internal_value(data)


def _text(max_length: int, help_text: str) -> serializers.CharField:
    # Metadata is stored as given: no trimming, and "" is a value, distinct from null.
    return serializers.CharField(
        required=False,
        allow_null=True,
        allow_blank=True,
        trim_whitespace=False,
        max_length=max_length,
        help_text=help_text,
    )


class MetadataSerializer(StrictSerializer):
    """Arvo's ``MachineMemoryMetadata``; each key absent: taken from the state document."""

    subject = _text(MAX_ID_LENGTH, "The machine id itself, if given.")
    parent_subject = _text(METADATA_LENGTHS["parent_id"], "The parent machine's id.")
    initiator = _text(METADATA_LENGTHS["initiator"], "Who started the workflow.")
    source = _text(METADATA_LENGTHS["source"], "The event source.")  # type: ignore[assignment]


class StateWriteSerializer(StrictSerializer):
    """The body of PUT states/{id}/."""

    data = serializers.DictField(  # type: ignore[assignment]
        help_text="The whole new state document, a JSON object."
    )
    metadata = MetadataSerializer(required=False)


class SecondsField(serializers.FloatField):
    """A JSON number of seconds: strings and booleans are refused, not coerced."""

    def to_internal_value(self, data: Any) -> float:
        if isinstance(data, bool) or not isinstance(data, int | float):
            self.fail("invalid")
        if isinstance(data, int) and abs(data) > MAX_EXACT_FLOAT:
            # A JSON integer can have thousands of digits; say what the range is.
            if data > 0:
                self.fail("max_value", max_value=self.max_value)
            self.fail("min_value", min_value=self.min_value)
        if not math.isfinite(data):
            self.fail("invalid")
        return float(super().to_internal_value(data))


class StrictBooleanField(serializers.BooleanField):
    """A JSON boolean: ``"yes"``, ``1`` and ``"true"`` are refused, not coerced."""

    def to_internal_value(self, data: Any) -> bool:
        if not isinstance(data, bool):
            self.fail("invalid", input=data)
        return data


class LockRequestSerializer(StrictSerializer):
    """The optional body of POST and PATCH locks/{id}/."""

    ttl = SecondsField(
        required=False,
        min_value=MIN_TTL,
        max_value=MAX_TTL,
        help_text="Seconds the lock lives unless extended; default MACHINE_MEMORY['LOCK_TTL'].",
    )


class LockAcquireSerializer(LockRequestSerializer):
    """The optional body of POST locks/{id}/."""

    wait = SecondsField(
        required=False,
        min_value=0.0,
        max_value=MAX_LOCK_WAIT,
        help_text="Seconds to keep trying while another owner holds the lock; default 0: "
        "a refusal is answered at once (409 lock_held).",
    )
    secret = serializers.RegexField(
        r"\A[A-Za-z0-9_-]{32,128}\Z",
        required=False,
        help_text="Your own random secret for this acquisition (32-128 of A-Z a-z 0-9 _ -), "
        "default: one the server makes. Sent again after a lost answer, it finds the lock it "
        "took: 201 with the same token, instead of a lock nobody can release.",
    )
    read = StrictBooleanField(
        required=False,
        help_text="true: the response's state carries the state and its ETag as they are "
        "once the lock is held (lock + read in one request).",
    )


OWNER_HELP = (
    "The holder: a worker's name, or for locks taken through this API "
    '"api:" + the SHA-256 of the lock token\'s secret half (never the token).'
)
TOKEN_HELP = "Fencing token: increases with every acquisition of the id."
CLOCK_HELP = "By the lock storage's clock."


class LockSummarySerializer(serializers.Serializer[Any]):
    owner = serializers.CharField(help_text=OWNER_HELP)
    token = serializers.IntegerField(help_text=TOKEN_HELP)
    acquired_at = serializers.DateTimeField(help_text=CLOCK_HELP)
    expires_at = serializers.DateTimeField(help_text=CLOCK_HELP)


class LockSerializer(serializers.Serializer[Any]):
    id = serializers.CharField(source="machine_id")
    owner = serializers.CharField(help_text=OWNER_HELP)
    token = serializers.IntegerField(help_text=TOKEN_HELP)
    acquired_at = serializers.DateTimeField(help_text=CLOCK_HELP)
    expires_at = serializers.DateTimeField(help_text=CLOCK_HELP)


class LockedStateSerializer(serializers.Serializer[Any]):
    data = serializers.DictField()  # type: ignore[assignment]
    version = serializers.IntegerField()
    etag = serializers.CharField(help_text='The version as an ETag, for If-Match: "3".')


class LockAcquiredSerializer(serializers.Serializer[Any]):
    id = serializers.CharField()
    lock_token = serializers.CharField(
        help_text="Send it as the Lock-Token header to extend, release and fence writes. "
        "The only proof of ownership: keep it secret."
    )
    owner = serializers.CharField()
    token = serializers.IntegerField(help_text="Fencing token of this acquisition.")
    acquired_at = serializers.DateTimeField(allow_null=True)
    expires_at = serializers.DateTimeField(
        allow_null=True, help_text="Null only if the lock expired before it could be read back."
    )
    state = LockedStateSerializer(
        required=False,
        allow_null=True,
        help_text='Only when the request asked for {"read": true}: the state once the lock '
        "was held, or null when there is none.",
    )

    def to_representation(self, instance: Any) -> Any:
        body = super().to_representation(instance)
        if "state" not in instance:  # not asked for: absent, which is not null (no state)
            body.pop("state", None)
        return body


class HeldLockSerializer(LockSummarySerializer):
    """The live lock of a state, passed in the serializer context by the view."""

    def get_attribute(self, instance: Any) -> Any:
        return self.context.get("lock")


class StateMetadataSerializer(serializers.Serializer[Any]):
    execution_status = serializers.CharField(allow_null=True)
    parent_id = serializers.CharField(allow_null=True)
    initiator = serializers.CharField(allow_null=True)
    source = serializers.CharField(allow_null=True)  # type: ignore[assignment]


class StateSummarySerializer(serializers.Serializer[Any]):
    id = serializers.CharField(source="machine_id")
    version = serializers.IntegerField(help_text="Also the ETag of GET states/{id}/.")
    metadata = StateMetadataSerializer(source="*")
    created_at = serializers.DateTimeField()
    updated_at = serializers.DateTimeField()


class StateSerializer(StateSummarySerializer):
    data = serializers.DictField(source="state")  # type: ignore[assignment]
    lock = HeldLockSerializer(source="*", allow_null=True, help_text="The live lock, if any.")


class StateWrittenSerializer(serializers.Serializer[Any]):
    id = serializers.CharField()
    version = serializers.IntegerField(help_text="The new version; also the ETag header.")


class ErrorSerializer(serializers.Serializer[Any]):
    code = serializers.CharField(help_text="Stable: branch on this.")
    detail = serializers.CharField(help_text="For people; may change.")
    errors = serializers.DictField(  # type: ignore[assignment]
        required=False, help_text="invalid_request only: per field."
    )

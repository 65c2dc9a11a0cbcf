from __future__ import annotations

from typing import TYPE_CHECKING, Any

from django.db import connections, models
from django.db.models.expressions import Func

from machine_memory.sql import dialect_for
from machine_memory.validation import MAX_ID_LENGTH, METADATA_LENGTHS

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper
    from django.db.models.sql.compiler import SQLCompiler, _AsSqlType


class MachineIdField(models.CharField):  # type: ignore[type-arg]
    """A machine id column that compares exactly (case, accents, trailing spaces).

    The collation comes from the vendor module: MariaDB's default collation folds case,
    accents and trailing spaces, which would let two different ids share one row.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("max_length", MAX_ID_LENGTH)
        super().__init__(*args, **kwargs)

    def db_type(self, connection: BaseDatabaseWrapper) -> str | None:
        return dialect_for(connection).id_db_type(self.max_length) or super().db_type(connection)

    def db_parameters(self, connection: BaseDatabaseWrapper) -> dict[str, Any]:
        params = super().db_parameters(connection)
        params["collation"] = self.db_collation or dialect_for(connection).id_collation(connection)
        return params


class StateField(models.JSONField):
    """The state document column, typed by the vendor module (see ``Dialect.state_db_type``)."""

    def db_type(self, connection: BaseDatabaseWrapper) -> str | None:
        return dialect_for(connection).state_db_type(connection) or super().db_type(connection)


class StorageNow(Func):
    """The storage's clock (never the application server's), as the vendor module spells it."""

    output_field = models.DateTimeField()

    def as_sql(  # type: ignore[override]
        self, compiler: SQLCompiler, connection: BaseDatabaseWrapper, **extra: Any
    ) -> _AsSqlType:
        # Fragments are written for Django cursors, where a literal % is spelled %%.
        return dialect_for(connection).now_sql, ()


class MachineStateQuerySet(models.QuerySet["MachineState"]):
    def with_status(self, status: str) -> MachineStateQuerySet:
        return self.filter(execution_status=status)

    def children_of(self, parent_id: str) -> MachineStateQuerySet:
        return self.filter(parent_id=parent_id)


class MachineState(models.Model):
    """One JSON state document per machine id, with a compare-and-set version."""

    machine_id = MachineIdField(primary_key=True)
    state = StateField()
    version = models.BigIntegerField(default=1)
    # Highest fencing token that wrote this row (Redis locks); a lower one is rejected.
    fence = models.BigIntegerField(default=0)
    # Metadata columns are NULL when neither the metadata nor the document says anything:
    # "unknown" is not the same as an empty string a caller may have sent.
    execution_status = models.CharField(  # noqa: DJ001
        max_length=METADATA_LENGTHS["execution_status"], null=True, blank=True, db_index=True
    )
    parent_id = MachineIdField(null=True, blank=True, db_index=True)
    initiator = models.CharField(  # noqa: DJ001
        max_length=METADATA_LENGTHS["initiator"], null=True, blank=True
    )
    source = models.CharField(  # noqa: DJ001
        max_length=METADATA_LENGTHS["source"], null=True, blank=True, db_index=True
    )
    created_at = models.DateTimeField()
    # Not indexed: it changes on every write, and an index on it would cost every write an
    # index update (SQLite rewrites it even for the same value). Age-based queries filter
    # by execution_status first.
    updated_at = models.DateTimeField()

    objects = MachineStateQuerySet.as_manager()

    class Meta:
        db_table = "machine_memory_state"
        verbose_name = "machine state"

    def __str__(self) -> str:
        return str(self.machine_id)


class MachineLockQuerySet(models.QuerySet["MachineLock"]):
    def live(self) -> MachineLockQuerySet:
        """Locks whose expiry is still ahead by the database's clock."""
        return self.filter(expires_at__gt=StorageNow())

    def expired(self) -> MachineLockQuerySet:
        """Locks whose expiry has passed by the database's clock (released ones included)."""
        return self.filter(expires_at__lte=StorageNow())

    def deletable(self) -> MachineLockQuerySet:
        """These locks, minus the one row that must never be deleted, if there is one.

        On databases without sequences (SQLite) the next token is derived from the highest
        token in the table, so that row is the fencing-token high-water mark.
        """
        if not dialect_for(connections[self.db]).token_high_water_row:
            return self
        top = self.model.objects.using(self.db).aggregate(top=models.Max("token"))["top"]
        return self.exclude(token=top) if top is not None else self

    def purgeable(self) -> MachineLockQuerySet:
        """Expired locks that can be deleted (the high-water mark excepted)."""
        return self.expired().deletable()


class MachineLock(models.Model):
    """The execution lock of one machine id: owner, fencing token and expiry."""

    machine_id = MachineIdField(primary_key=True)
    owner = models.CharField(max_length=255)
    token = models.BigIntegerField(db_index=True)
    acquired_at = models.DateTimeField()
    expires_at = models.DateTimeField(db_index=True)

    objects = MachineLockQuerySet.as_manager()

    class Meta:
        db_table = "machine_memory_lock"
        verbose_name = "machine lock"

    def __str__(self) -> str:
        return str(self.machine_id)

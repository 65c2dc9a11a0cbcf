from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from django.db import connections, models, transaction
from django.db.models.expressions import Func
from django.db.models.functions import Left

from machine_memory.sql import dialect_for
from machine_memory.validation import MAX_ID_LENGTH, METADATA_LENGTHS

if TYPE_CHECKING:
    from collections.abc import Sequence

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


class StorageTime(Func):
    """The storage's clock shifted by ``seconds`` (negative: that long ago)."""

    output_field = models.DateTimeField()

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = float(seconds)

    def as_sql(  # type: ignore[override]
        self, compiler: SQLCompiler, connection: BaseDatabaseWrapper, **extra: Any
    ) -> _AsSqlType:
        dialect = dialect_for(connection)
        return dialect.expires_sql(), (dialect.ttl_param(self.seconds),)


def _clock(older_than: float) -> Func:
    return StorageTime(-older_than) if older_than else StorageNow()


@dataclass(frozen=True, slots=True)
class Purged:
    """What a batched purge did."""

    deleted: int
    batches: int


_M = TypeVar("_M", bound=models.Model)

logger = logging.getLogger("machine_memory")


class BatchedQuerySet(models.QuerySet[_M]):
    """Deletes in primary-key batches, each DELETE re-applying this QuerySet's conditions."""

    def claims_rows(self) -> bool:
        """Whether a batch's keys are claimed with ``SELECT ... FOR UPDATE SKIP LOCKED``.

        Asked of Django's ``features`` of this QuerySet's database: PostgreSQL and MariaDB
        >= 10.6 can. SQLite has no row locks (Django ignores ``select_for_update`` there,
        and its writers are serialised anyway); a database with row locks but without
        SKIP LOCKED would make Django raise ``NotSupportedError``, and waiting for other
        transactions' row locks is exactly what a purge must not do, so neither claims.
        """
        features = connections[self.db].features
        return bool(features.has_select_for_update and features.has_select_for_update_skip_locked)

    def next_batch(self, after: Any, size: int, *, claim: bool = False) -> list[Any]:
        """The primary keys of the next ``size`` rows after ``after`` (None: the first).

        ``claim``: lock the rows for the rest of the current transaction and skip those
        that another transaction has locked (``select_for_update(skip_locked=True)``);
        only inside ``transaction.atomic()``, and only where ``claims_rows()``.
        """
        rows = self.order_by("pk")
        if after is not None:
            rows = rows.filter(pk__gt=after)
        if claim:
            rows = rows.select_for_update(skip_locked=True)
        return list(rows.values_list("pk", flat=True)[:size])

    def delete_in_batches(self, batch_size: int) -> Purged:
        """Delete these rows ``batch_size`` at a time.

        Each batch is one transaction (``transaction.atomic(using=self.db)``) where the
        database has row locks with SKIP LOCKED (``claims_rows()``): the batch's keys are
        selected with ``select_for_update(skip_locked=True)``, then deleted with every
        condition of this QuerySet repeated in the DELETE itself plus ``pk IN (keys)``,
        and the batch commits. A row that another transaction holds locked (a worker
        taking or releasing that lock, writing that state) is skipped, never waited for;
        and since keys only move forward, a skipped row is not tried again in this run:
        the next run purges it. While a batch is open, a worker that wants one of its
        rows waits for that batch's commit.

        Where rows cannot be claimed (SQLite) the keys are selected and deleted in two
        statements without a transaction around them (a SQLite transaction that reads and
        then writes fails at once when another writer committed in between), and the
        repeated conditions alone decide: a row that stopped matching in between (a lock
        taken again, a state written or locked since) is left alone.

        Keys only move forward, so rows that stay never make the loop select them again.
        """
        claim = self.claims_rows()
        deleted = batches = 0
        after = None
        while True:
            with transaction.atomic(using=self.db) if claim else nullcontext():
                keys = self.next_batch(after, batch_size, claim=claim)
                if not keys:
                    break
                batches += 1
                # Neither model has relations or delete signals: Django deletes with a
                # single DELETE ... WHERE <conditions> AND pk IN (...), without loading
                # the rows.
                count, _ = self.filter(pk__in=keys).delete()
            deleted += count
            logger.info(
                "%s batch %d: deleted %d of %d selected rows.",
                self.model._meta.db_table,
                batches,
                count,
                len(keys),
            )
            if len(keys) < batch_size:
                break
            after = keys[-1]
        return Purged(deleted, batches)


class MachineStateQuerySet(BatchedQuerySet["MachineState"]):
    def with_status(self, status: str) -> MachineStateQuerySet:
        return self.filter(execution_status=status)

    def children_of(self, parent_id: str) -> MachineStateQuerySet:
        return self.filter(parent_id=parent_id)

    def from_source(self, source: str) -> MachineStateQuerySet:
        return self.filter(source=source)

    def with_id_prefix(self, prefix: str) -> MachineStateQuerySet:
        """States whose id starts with ``prefix``, compared as exactly as ids are.

        Not ``startswith``: SQLite's LIKE folds ASCII case. The id's head compared with ``=``
        keeps the id column's exact collation on every database.
        """
        return self.alias(_id_head=Left("machine_id", len(prefix))).filter(_id_head=prefix)

    def summaries(self) -> MachineStateQuerySet:
        """Everything but the state document, for listings (a document may be a megabyte)."""
        return self.defer("state")

    def find(self, machine_id: str) -> MachineState | None:
        """The row of ``machine_id`` (document, version, metadata, timestamps), or None."""
        return self.filter(pk=machine_id).first()

    def roots(self) -> MachineStateQuerySet:
        """States that are no other machine's child."""
        return self.filter(parent_id__isnull=True)

    def updated_before(self, older_than: float) -> MachineStateQuerySet:
        """States last written at least ``older_than`` seconds ago by the database's clock."""
        return self.filter(updated_at__lte=_clock(older_than))

    def with_lock(self) -> MachineStateQuerySet:
        """Annotate each state with its lock row: ``lock_owner`` (None: no row) and
        ``lock_live``; two correlated subqueries, computed only for the rows fetched."""
        locks = MachineLock.objects.filter(machine_id=models.OuterRef("pk"))
        return self.annotate(
            lock_owner=models.Subquery(locks.values("owner")[:1]),
            lock_live=models.Exists(locks.live()),
        )

    # IN (subquery) rather than EXISTS: every database plans it from the (small, indexed)
    # lock side instead of probing the lock table once per state row.
    def with_live_lock(self) -> MachineStateQuerySet:
        return self.filter(pk__in=MachineLock.objects.live().values("machine_id"))

    def with_expired_lock(self) -> MachineStateQuerySet:
        return self.filter(pk__in=MachineLock.objects.expired().values("machine_id"))

    # NOT EXISTS rather than NOT IN: PostgreSQL runs NOT IN (subquery) as a hashed subplan
    # only while the subquery fits in work_mem, and otherwise rescans it for every row
    # (minutes with 300,000 lock rows); NOT EXISTS is an anti-join everywhere.
    def without_lock(self) -> MachineStateQuerySet:
        return self.exclude(
            models.Exists(MachineLock.objects.filter(machine_id=models.OuterRef("pk")))
        )

    def without_live_lock(self) -> MachineStateQuerySet:
        return self.exclude(
            models.Exists(MachineLock.objects.live().filter(machine_id=models.OuterRef("pk")))
        )

    def purgeable(
        self, statuses: Sequence[str] | None = None, older_than: float | None = None
    ) -> MachineStateQuerySet:
        """States with one of ``statuses`` and/or idle ``older_than`` seconds, never one whose
        lock is live (a worker is in the middle of its cycle)."""
        rows = self
        if statuses:
            rows = rows.filter(execution_status__in=list(statuses))
        if older_than is not None:
            rows = rows.updated_before(older_than)
        return rows.without_live_lock()

    def distinct_values(self, field: str, limit: int) -> list[str]:
        """Up to ``limit`` distinct non-null values of an indexed column, in order.

        One index seek per value ("loose index scan"): a SELECT DISTINCT would read the
        whole index of a large table on PostgreSQL and SQLite.
        """
        # >= "" rather than IS NOT NULL: a range that starts past the NULLs, which an
        # index keeps together (SQLite would otherwise walk every NULL entry first).
        ordered = self.filter(**{f"{field}__gte": ""}).order_by(field).values_list(field, flat=True)
        values: list[str] = []
        while len(values) < limit:
            step = ordered.filter(**{f"{field}__gt": values[-1]}) if values else ordered
            value = step.first()
            if value is None:
                break
            values.append(value)
        return values


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


class MachineLockQuerySet(BatchedQuerySet["MachineLock"]):
    def live(self) -> MachineLockQuerySet:
        """Locks whose expiry is still ahead by the database's clock."""
        return self.filter(expires_at__gt=StorageNow())

    def expired(self, older_than: float = 0.0) -> MachineLockQuerySet:
        """Locks whose expiry has passed by the database's clock (released ones included),
        at least ``older_than`` seconds ago."""
        return self.filter(expires_at__lte=_clock(older_than))

    def with_clock(self) -> MachineLockQuerySet:
        """Annotate ``db_now``, the database's clock, so "time left" needs no other query."""
        return self.annotate(db_now=StorageNow())

    def with_state(self) -> MachineLockQuerySet:
        """Annotate ``has_state``: whether the machine has a stored state (a lock is often
        taken before the first write). One correlated primary-key probe per row fetched."""
        states = MachineState.objects.filter(pk=models.OuterRef("pk"))
        return self.annotate(has_state=models.Exists(states))

    def deletable(self) -> MachineLockQuerySet:
        """These locks, minus the one row that must never be deleted, if there is one.

        On databases without sequences (SQLite) the next token is derived from the highest
        token in the table, so that row is the fencing-token high-water mark.
        """
        if not dialect_for(connections[self.db]).token_high_water_row:
            return self
        top = self.model.objects.using(self.db).aggregate(top=models.Max("token"))["top"]
        return self.exclude(token=top) if top is not None else self

    def purgeable(self, older_than: float = 0.0) -> MachineLockQuerySet:
        """Expired locks that can be deleted (the high-water mark excepted)."""
        return self.expired(older_than).deletable()

    def purge_expired(self, batch_size: int = 1000, older_than: float = 0.0) -> Purged:
        """Delete expired locks in batches; see ``BatchedQuerySet.delete_in_batches``.

        Each DELETE re-checks the expiry by the database's clock, so a lock taken again
        after its batch was selected survives; the token high-water row is always kept.
        """
        return self.purgeable(older_than).delete_in_batches(batch_size)


class MachineLock(models.Model):
    """The execution lock of one machine id: owner, fencing token and expiry."""

    machine_id = MachineIdField(primary_key=True)
    owner = models.CharField(max_length=255)
    # Not indexed here: PostgreSQL and MariaDB draw tokens from a sequence, and an index
    # would cost every lock and release an entry. SQLite, which derives the next token
    # from the highest one, gets its index from the vendor module (SQLiteDialect.install).
    token = models.BigIntegerField()
    acquired_at = models.DateTimeField()
    expires_at = models.DateTimeField(db_index=True)

    objects = MachineLockQuerySet.as_manager()

    class Meta:
        db_table = "machine_memory_lock"
        verbose_name = "machine lock"

    def __str__(self) -> str:
        return str(self.machine_id)

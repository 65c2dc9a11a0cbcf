"""``manage.py purge_expired_locks``: delete expired lock rows in batches."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from django.core.management.base import BaseCommand, CommandError
from django.db import DatabaseError

from machine_memory.conf import conf
from machine_memory.management.arguments import (
    add_database_argument,
    logging_for,
    positive_int,
    seconds,
)
from machine_memory.memory import MachineMemory
from machine_memory.models import MachineLock

if TYPE_CHECKING:
    from django.core.management.base import CommandParser


class Command(BaseCommand):
    help = (
        "Delete expired database locks in batches, one transaction per batch. Each DELETE "
        "re-checks the expiry by the database's clock, so a lock taken again meanwhile "
        "survives. On SQLite, where the next fencing token is the table's highest plus one, "
        "the row holding the highest token is kept. Where the database "
        "has SKIP LOCKED (PostgreSQL, MariaDB), a lock row that another transaction holds "
        "locked is skipped instead of waited for, and not retried in this run: the next "
        "run purges it."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--batch-size",
            type=positive_int,
            default=1000,
            metavar="N",
            help="Rows per DELETE. Default 1000.",
        )
        parser.add_argument(
            "--older-than",
            type=seconds,
            default=0.0,
            metavar="SECONDS",
            help="Only locks that expired at least this long ago (0 to 100 years). Default 0.",
        )
        parser.add_argument(
            "--dry-run", action="store_true", help="Count what would be deleted; delete nothing."
        )
        add_database_argument(parser)

    def handle(self, *args: Any, **options: Any) -> None:
        alias: str = options["database"] or conf.DATABASE
        older_than: float = options["older_than"]
        with logging_for(options["verbosity"], self.stderr):
            memory = MachineMemory(using=alias)
            if not memory.locks.supports_listing:
                self.stdout.write(
                    f"Locks live in {type(memory.locks).__name__} (LOCK_BACKEND "
                    f"{conf.LOCK_BACKEND!r}), which expires them itself: nothing to purge."
                )
                return
            locks = MachineLock.objects.using(alias)
            age = f" that expired at least {older_than:g} s ago" if older_than else ""
            try:
                if options["dry_run"]:
                    count = locks.purgeable(older_than).count()
                    self.stdout.write(
                        f"Would purge {count} expired lock(s){age} from database {alias!r} "
                        "(dry run: nothing deleted)."
                    )
                    return
                purged = locks.purge_expired(options["batch_size"], older_than)
            except DatabaseError as exc:
                raise CommandError(
                    f"Purging expired locks on database {alias!r} failed: {exc}"
                ) from exc
            self.stdout.write(
                f"Purged {purged.deleted} expired lock(s){age} from database {alias!r} in "
                f"{purged.batches} batch(es)."
            )

"""``manage.py purge_machine_states``: delete states by execution status and age, in batches."""

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
from machine_memory.models import MachineState

if TYPE_CHECKING:
    from django.core.management.base import CommandParser


class Command(BaseCommand):
    help = (
        "Delete machine states by execution status and/or age (time since their last write, "
        "by the database's clock), in batches, one transaction per batch. A state whose lock "
        "is live is never deleted. Where the database has SKIP LOCKED (PostgreSQL, MariaDB), "
        "a state row that another transaction holds locked (a write in progress) is skipped "
        "instead of waited for, and not retried in this run: the next run purges it."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--status",
            action="append",
            default=None,
            metavar="STATUS",
            help="Execution status to purge (repeat for several), e.g. --status done. "
            "Default: any status (then --older-than is required).",
        )
        parser.add_argument(
            "--older-than",
            type=seconds,
            default=None,
            metavar="SECONDS",
            help="Only states not written for at least this long (0 to 100 years). "
            "Default: any age (then --status is required).",
        )
        parser.add_argument(
            "--batch-size",
            type=positive_int,
            default=1000,
            metavar="N",
            help="Rows per DELETE. Default 1000.",
        )
        parser.add_argument(
            "--dry-run", action="store_true", help="Count what would be deleted; delete nothing."
        )
        add_database_argument(parser)

    def handle(self, *args: Any, **options: Any) -> None:
        alias: str = options["database"] or conf.DATABASE
        statuses: list[str] | None = options["status"]
        older_than: float | None = options["older_than"]
        if not statuses and older_than is None:
            # A usage error, like argparse's own: exit status 2.
            raise CommandError(
                "Say which states to purge: --status STATUS and/or --older-than SECONDS "
                "(to purge every state, pass --older-than 0).",
                returncode=2,
            )
        which = []
        if statuses:
            which.append(f"status {' or '.join(repr(s) for s in statuses)}")
        if older_than is not None:
            which.append(f"not written for {older_than:g} s")
        described = ", ".join(which)
        with logging_for(options["verbosity"], self.stderr):
            states = MachineState.objects.using(alias).purgeable(statuses, older_than)
            try:
                if options["dry_run"]:
                    count = states.count()
                    self.stdout.write(
                        f"Would purge {count} machine state(s) ({described}) from database "
                        f"{alias!r} (dry run: nothing deleted)."
                    )
                    return
                purged = states.delete_in_batches(options["batch_size"])
            except DatabaseError as exc:
                raise CommandError(
                    f"Purging machine states on database {alias!r} failed: {exc}"
                ) from exc
            self.stdout.write(
                f"Purged {purged.deleted} machine state(s) ({described}) from database "
                f"{alias!r} in {purged.batches} batch(es); states with a live lock were kept."
            )

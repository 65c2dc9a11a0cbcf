"""``manage.py machine_memory_inspect ID``: one machine's state, version, metadata and lock."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from django.core.management.base import BaseCommand, CommandError
from django.db import DatabaseError

from machine_memory.conf import conf
from machine_memory.exceptions import LockError
from machine_memory.management.arguments import (
    add_database_argument,
    logging_for,
    machine_id,
)
from machine_memory.memory import MachineMemory
from machine_memory.models import MachineLock, MachineState

if TYPE_CHECKING:
    import datetime

    from django.core.management.base import CommandParser


def iso(value: datetime.datetime | None) -> str | None:
    return None if value is None else value.isoformat()


class Command(BaseCommand):
    help = "Show one machine: its state document, version, metadata columns and lock."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("machine_id", type=machine_id, metavar="ID", help="The machine id.")
        parser.add_argument(
            "--json", action="store_true", help="Print one JSON object instead of text."
        )
        add_database_argument(parser)

    def handle(self, *args: Any, **options: Any) -> None:
        alias: str = options["database"] or conf.DATABASE
        key: str = options["machine_id"]
        with logging_for(options["verbosity"], self.stderr):
            try:
                state = MachineState.objects.using(alias).filter(pk=key).first()
                lock = self.lock(alias, key)
            except (DatabaseError, LockError) as exc:
                raise CommandError(f"Reading machine {key!r} failed: {exc}") from exc
        if state is None and lock is None:
            raise CommandError(f"Machine {key!r} has no state and no lock on database {alias!r}.")
        report: dict[str, Any] = {
            "machine_id": key,
            "version": None,
            "metadata": None,
            "created_at": None,
            "updated_at": None,
            "state": None,
            "lock": lock,
        }
        if state is not None:
            report.update(
                version=state.version,
                metadata={
                    "execution_status": state.execution_status,
                    "parent_id": state.parent_id,
                    "initiator": state.initiator,
                    "source": state.source,
                },
                created_at=iso(state.created_at),
                updated_at=iso(state.updated_at),
                state=state.state,
            )
        if options["json"]:
            self.stdout.write(json.dumps(report, ensure_ascii=False, sort_keys=True))
        else:
            self.stdout.write(self.text(report))

    def lock(self, alias: str, key: str) -> dict[str, Any] | None:
        """The lock row (backends with listable lock rows: live or expired), else the live lock."""
        memory = MachineMemory(using=alias)
        try:
            if memory.locks.supports_listing:
                row = MachineLock.objects.using(alias).with_clock().filter(pk=key).first()
                if row is None:
                    return None
                db_now: datetime.datetime = row.db_now  # type: ignore[attr-defined]
                left = (row.expires_at - db_now).total_seconds()
                return {
                    "status": "live" if left > 0 else "expired",
                    "owner": row.owner,
                    "token": row.token,
                    "acquired_at": iso(row.acquired_at),
                    "expires_at": iso(row.expires_at),
                    "seconds_left": round(max(left, 0.0), 3),
                }
            info = memory.lock_info(key)
        finally:
            memory.close()
        if info is None:
            return None
        return {
            "status": "live",
            "owner": info.owner,
            "token": info.token,
            "acquired_at": iso(info.acquired_at),
            "expires_at": iso(info.expires_at),
            "seconds_left": None,
        }

    def text(self, report: dict[str, Any]) -> str:
        lines = [f"machine   {report['machine_id']}"]
        if report["version"] is None:
            lines.append("state     none")
        else:
            metadata = report["metadata"]
            lines += [
                f"version   {report['version']}",
                f"status    {metadata['execution_status'] or '-'}",
                f"parent    {metadata['parent_id'] or '-'}",
                f"initiator {metadata['initiator'] or '-'}",
                f"source    {metadata['source'] or '-'}",
                f"created   {report['created_at']}",
                f"updated   {report['updated_at']}",
            ]
        lock = report["lock"]
        if lock is None:
            lines.append("lock      none")
        else:
            left = "" if lock["seconds_left"] in (None, 0) else f", {lock['seconds_left']} s left"
            lines.append(
                f"lock      {lock['status']}{left}: owner {lock['owner']}, token {lock['token']}, "
                f"acquired {lock['acquired_at']}, expires {lock['expires_at']}"
            )
        if report["version"] is not None:
            lines.append("state:")
            lines.append(json.dumps(report["state"], indent=2, ensure_ascii=False, sort_keys=True))
        return "\n".join(lines)

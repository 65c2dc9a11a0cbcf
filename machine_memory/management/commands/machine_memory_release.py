"""``manage.py machine_memory_release ID``: force-release a machine's lock, whoever holds it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from django.core.management.base import BaseCommand, CommandError

from machine_memory.conf import conf
from machine_memory.exceptions import LockError
from machine_memory.management.arguments import (
    add_database_argument,
    logging_for,
    machine_id,
)
from machine_memory.memory import MachineMemory

if TYPE_CHECKING:
    from django.core.management.base import CommandParser

    from machine_memory.locks.base import LockInfo


def holder(info: LockInfo) -> str:
    return f"{info.owner} (token {info.token}, acquired {info.acquired_at.isoformat()})"


class Command(BaseCommand):
    help = (
        "Release the live lock on one machine, whoever holds it (a worker that died, a stuck "
        "workflow). The holder's extend() then fails, and so do its writes once another "
        "worker takes the lock."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("machine_id", type=machine_id, metavar="ID", help="The machine id.")
        parser.add_argument(
            "--yes", "-y", action="store_true", help="Release without asking for confirmation."
        )
        add_database_argument(parser)

    def handle(self, *args: Any, **options: Any) -> None:
        alias: str = options["database"] or conf.DATABASE
        key: str = options["machine_id"]
        with logging_for(options["verbosity"], self.stderr):
            memory = MachineMemory(using=alias)
            try:
                self.release(memory, key, options["yes"])
            except LockError as exc:
                raise CommandError(str(exc)) from exc
            finally:
                memory.close()

    def release(self, memory: MachineMemory, key: str, confirmed: bool) -> None:
        if not memory.locks.supports_force_release:
            raise CommandError(
                f"The lock backend {type(memory.locks).__name__} cannot force-release locks: "
                "nothing was released."
            )
        if not confirmed:
            info = memory.lock_info(key)
            if info is None:
                self.stdout.write(f"Machine {key!r} has no live lock: nothing to release.")
                return
            try:
                answer = input(f"Release the lock on {key!r} held by {holder(info)}? [y/N] ")
            except EOFError:
                raise CommandError(
                    "No answer to the confirmation (no terminal?); pass --yes to release "
                    "without asking."
                ) from None
            if answer.strip().lower() not in ("y", "yes"):
                self.stdout.write("Cancelled: the lock was left alone.")
                return
        released = memory.force_unlock(key)
        if released is None:
            self.stdout.write(f"Machine {key!r} has no live lock: nothing to release.")
        else:
            self.stdout.write(f"Released the lock on {key!r} held by {holder(released)}.")

"""``manage.py demo``: several worker processes drive Arvo-style machines through the memory.

Every event is delivered once; a worker that is denied the lock, or loses a
compare-and-set, puts the event back on the queue. At the end every machine is read back
and compared with the events delivered to it: a missing event is a lost update.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import multiprocessing
import queue
import secrets
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError
from django.db import connections
from django.db.migrations.executor import MigrationExecutor

from workflows.worker import WorkerOptions, WorkerStats, run_worker
from workflows.workflow import Event, deliveries, verify

if TYPE_CHECKING:
    from collections.abc import Callable
    from multiprocessing.context import SpawnProcess
    from multiprocessing.queues import Queue

    from machine_memory.memory import MachineMemory

logger = logging.getLogger("workflows.demo")

# Locks live this long: a cycle takes milliseconds, and a worker that dies holding a lock
# blocks its machine for seconds rather than for the default two minutes.
DEMO_LOCK_TTL = 15.0
# Give up when the workers report nothing for this long (a worker hung on a database).
STALL_TIMEOUT = 60.0

VERBOSITY_LEVELS = {0: logging.ERROR, 1: logging.WARNING, 2: logging.INFO, 3: logging.DEBUG}


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type=`` for whole numbers >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


@dataclass(slots=True)
class Totals(WorkerStats):
    """The workers' counters added up, plus what the verification found."""

    lost_updates: int = 0
    inconsistent: int = 0

    def add(self, stats: dict[str, int]) -> None:
        for name, value in stats.items():
            setattr(self, name, getattr(self, name) + value)


class Command(BaseCommand):
    help = (
        "Run an Arvo-style workflow (lock, read, write, unlock) on many machines from several "
        "worker processes, then re-read every machine and fail if an update was lost."
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--machines",
            type=at_least(1),
            default=8,
            metavar="N",
            help="Machines (workflows). Default 8.",
        )
        parser.add_argument(
            "--events",
            type=at_least(1),
            default=5,
            metavar="N",
            help="Events per machine. Default 5.",
        )
        parser.add_argument(
            "--workers",
            type=at_least(1),
            default=4,
            metavar="N",
            help="Worker processes. Default 4.",
        )
        parser.add_argument(
            "--work-ms",
            type=at_least(0),
            default=10,
            metavar="MS",
            help="Milliseconds each event's handler works between read and write. Default 10.",
        )
        parser.add_argument(
            "--celery",
            action="store_true",
            help="Run the workflow through a Celery worker (machine_memory.contrib.celery) with "
            "--workers processes and Redis as the broker (DEMO_CELERY_BROKER_URL), instead of "
            "the demo's own worker processes. Needs the [celery] extra.",
        )
        parser.add_argument(
            "--no-lock",
            action="store_false",
            dest="use_lock",
            help="Skip lock()/unlock() and rely on write()'s compare-and-set alone: races show "
            "up as write conflicts instead of lock waits, and still lose nothing.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        verbosity: int = options["verbosity"]
        log_level = VERBOSITY_LEVELS.get(verbosity, logging.DEBUG)
        for name in ("machine_memory", "workflows"):
            logging.getLogger(name).setLevel(log_level)

        from machine_memory import MachineMemory

        memory = MachineMemory()  # the command's own, to read every machine back at the end
        migrate_if_needed(memory.using)

        if options["celery"] and not options["use_lock"]:
            raise CommandError("--celery runs every event under its lock: drop --no-lock.")
        machines, per_machine = options["machines"], options["events"]
        run = f"{datetime.datetime.now(datetime.UTC):%Y%m%dT%H%M%S}-{secrets.token_hex(2)}"
        parent = f"demo/{run}"
        events = deliveries(parent, machines, per_machine)
        if verbosity >= 1:
            guard = "locks + compare-and-set" if options["use_lock"] else "compare-and-set only"
            if options["celery"]:
                guard = "a Celery worker, session() per event"
            self.stdout.write(
                f"Run {parent}: {len(events)} events on {machines} machines, "
                f"{options['workers']} worker processes, {guard}, "
                f"database {describe_database(memory.using)}"
            )

        worker_options = WorkerOptions(
            settings_module=settings.SETTINGS_MODULE,
            use_lock=options["use_lock"],
            lock_ttl=DEMO_LOCK_TTL,
            log_level=log_level,
            work_seconds=options["work_ms"] / 1000,
        )
        if options["celery"]:
            from workflows.celery_run import run_celery_worker

            totals, elapsed = run_celery_worker(events, options["workers"], worker_options)
        else:
            totals, elapsed = run_workers(events, options["workers"], worker_options)

        delivered = Counter(event.machine_id for event in events)
        problems = check_machines(memory, delivered, totals)
        memory.close()
        self.report(totals, len(events), elapsed, verbosity)
        for problem in problems[:20]:
            self.stderr.write(problem)
        if totals.lost_updates or totals.inconsistent:
            raise CommandError(
                f"{totals.lost_updates} lost updates and {totals.inconsistent} inconsistent "
                f"machines in run {parent}: the memory let a write overwrite another. "
                "Please report this with the output above."
            )

    def report(self, totals: Totals, delivered: int, elapsed: float, verbosity: int) -> None:
        rate = totals.processed / elapsed if elapsed else 0.0
        if verbosity >= 1:
            rows = [
                ("events delivered", str(delivered)),
                ("events processed", str(totals.processed)),
                ("lock denials", str(totals.lock_denials)),
                ("retries (events requeued)", str(totals.retries)),
                ("write conflicts", str(totals.write_conflicts)),
                ("storage errors", str(totals.errors)),
                ("lost updates (verified)", str(totals.lost_updates)),
                ("inconsistent machines", str(totals.inconsistent)),
                ("elapsed", f"{elapsed:.2f} s"),
                ("throughput", f"{rate:.1f} events/s"),
            ]
            width = max(len(name) for name, _ in rows)
            self.stdout.write("")
            for name, value in rows:
                self.stdout.write(f"  {name:<{width}}  {value:>12}")
            self.stdout.write("")
        summary = (
            f"{totals.processed}/{delivered} events processed in {elapsed:.2f} s: "
            f"{totals.lost_updates} lost updates, {totals.lock_denials} lock denials, "
            f"{totals.retries} retries, {totals.write_conflicts} write conflicts."
        )
        ok = not (totals.lost_updates or totals.inconsistent)
        self.stdout.write(self.style.SUCCESS(summary) if ok else self.style.ERROR(summary))


def migrate_if_needed(alias: str) -> None:
    """Apply migrations when some are missing, so the demo runs on a fresh database."""
    executor = MigrationExecutor(connections[alias])
    if executor.migration_plan(executor.loader.graph.leaf_nodes()):
        logger.info("Applying migrations to database %r", alias)
        call_command("migrate", database=alias, interactive=False, verbosity=0)


def describe_database(alias: str) -> str:
    db = connections[alias].settings_dict
    where = f"{db['HOST'] or 'localhost'}:{db['PORT']}/" if db["HOST"] or db["PORT"] else ""
    return f"{connections[alias].vendor} {where}{db['NAME']}"


def run_workers(events: list[Event], workers: int, options: WorkerOptions) -> tuple[Totals, float]:
    """Run the events through ``workers`` processes; the counters and the seconds it took."""
    # "spawn" everywhere (it is the default on macOS and Windows only): a forked child would
    # inherit the parent's open database connection, which must never be shared.
    context = multiprocessing.get_context("spawn")
    tasks: Queue[Event | None] = context.Queue()
    results: Queue[tuple[Any, ...]] = context.Queue()
    processes = [
        context.Process(
            target=run_worker,
            args=(number, options, tasks, results),
            name=f"demo-worker-{number}",
        )
        for number in range(1, workers + 1)
    ]
    for process in processes:
        process.start()
    try:
        ready = 0
        while ready < workers:
            ready += receive(results, processes)[0] == "ready"
        # The clock starts once every worker is connected: start-up is not throughput.
        started = time.monotonic()
        for event in events:
            tasks.put(event)
        pending = {(event.machine_id, event.number) for event in events}
        while pending:
            message = receive(results, processes)
            if message[0] == "done":
                pending.discard((message[1], message[2]))
        elapsed = time.monotonic() - started
        for _ in processes:
            tasks.put(None)
        totals = Totals()
        for _ in processes:
            message = receive(results, processes)
            while message[0] != "stats":  # a late "done" for an event applied twice
                message = receive(results, processes)
            totals.add(message[2])
        for process in processes:
            process.join(timeout=10)
    finally:
        stop(processes)
    return totals, elapsed


def receive(results: Queue[tuple[Any, ...]], processes: list[SpawnProcess]) -> tuple[Any, ...]:
    """The next message from the workers; CommandError if one died or all went quiet."""
    deadline = time.monotonic() + STALL_TIMEOUT
    while True:
        try:
            return results.get(timeout=0.5)
        except queue.Empty:
            pass
        for process in processes:
            if process.exitcode not in (None, 0):
                raise CommandError(
                    f"Worker {process.name} exited with code {process.exitcode}; its "
                    "traceback is above. Is the database reachable and migrated?"
                )
        if time.monotonic() > deadline:
            raise CommandError(
                f"The workers reported nothing for {STALL_TIMEOUT:.0f} s; run with -v 3 to "
                "see what they are doing."
            )


def stop(processes: list[SpawnProcess]) -> None:
    """Terminate workers still running after an error, so the command never hangs."""
    for process in processes:
        if process.is_alive():
            process.terminate()
        process.join(timeout=5)


def check_machines(memory: MachineMemory, delivered: Counter[str], totals: Totals) -> list[str]:
    """Re-read every machine through the memory; count lost updates and other problems."""
    problems: list[str] = []
    for machine_id, count in delivered.items():
        verdict = verify(machine_id, memory.read(machine_id), count)
        totals.lost_updates += verdict.lost
        totals.inconsistent += bool(verdict.problems)
        problems.extend(verdict.problems)
    return problems

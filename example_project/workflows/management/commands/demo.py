"""``manage.py demo``: orders and their child workflows, driven by worker processes.

The command is the message broker (workflows.broker); worker processes run Arvo's cycle
per event (workflows.worker). They contend for the same workflows, one of them is killed
while it holds a lock and another is frozen past its lock's expiry. At the end every
workflow is re-read and checked against the events sent: none lost, none applied twice.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import random
import secrets
import sys
from typing import TYPE_CHECKING, Any

from django.apps import apps
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError
from django.db import connections
from django.db.migrations.executor import MigrationExecutor

from machine_memory.management.arguments import VERBOSITY_LEVELS, positive_int
from workflows.broker import Broker, Counts
from workflows.display import display_for
from workflows.worker import WorkerOptions
from workflows.workflow import Order, arrivals, plan_orders, verify

if TYPE_CHECKING:
    from machine_memory.memory import MachineMemory

logger = logging.getLogger("workflows.demo")

# The demo superuser that "where to look next" logs in with (demo_admin makes the same).
ADMIN_USER = ADMIN_PASSWORD = "admin"


def work_ms(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= value <= 10_000:
        raise argparse.ArgumentTypeError(f"must be 0 to 10000 milliseconds, got {value}")
    return value


def lock_ttl(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0.5 <= value <= 600:  # "nan" fails too
        raise argparse.ArgumentTypeError(f"must be 0.5 to 600 seconds, got {text}")
    return value


@dataclasses.dataclass(slots=True)
class Summary:
    """The run's outcome: what ``--json`` prints and the report shows."""

    run: str
    database: str
    mode: str  # "locks", "cas-only" or "celery"
    orders: int
    workflows: int
    events: int  # events the workflows had to apply
    workers: int
    counts: Counts
    lost: int = 0  # expected events missing from the states
    doubled: int = 0  # events applied more than once
    problems: list[str] = dataclasses.field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["passed"] = self.passed
        data["counts"]["elapsed"] = round(self.counts.elapsed, 3)
        return data


class Command(BaseCommand):
    help = (
        "Run orders through their payment, stock and shipping workflows from several worker "
        "processes that contend for them; kill one worker holding a lock and freeze another; "
        "then re-read every workflow and fail unless every event was applied exactly once."
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--database",
            default=None,
            metavar="ALIAS",
            help="Database alias. Default: MACHINE_MEMORY['DATABASE'].",
        )
        parser.add_argument(
            "--events",
            type=positive_int,
            default=300,
            metavar="N",
            help="About N events in all: orders (of 1 to 4 items, 14 to 20 events each with "
            "their child workflows) are added until there are. Default 300.",
        )
        parser.add_argument(
            "--workers",
            type=positive_int,
            default=4,
            metavar="N",
            help="Worker processes. Default 4.",
        )
        parser.add_argument(
            "--work-ms",
            type=work_ms,
            default=50,
            metavar="MS",
            help="Milliseconds each handler works between its read and its write, on average. "
            "Default 50.",
        )
        parser.add_argument(
            "--lock-ttl",
            type=lock_ttl,
            default=2.0,
            metavar="SECONDS",
            help="The workers' lock TTL: how long a killed worker's lock blocks its workflow. "
            "Default 2.",
        )
        parser.add_argument(
            "--no-faults",
            action="store_false",
            dest="faults",
            help="Kill no worker and freeze none: contention only.",
        )
        parser.add_argument(
            "--no-lock",
            action="store_false",
            dest="use_lock",
            help="Skip lock()/unlock() and rely on write()'s compare-and-set alone: races show "
            "up as write conflicts instead of lock denials, and still lose nothing.",
        )
        parser.add_argument(
            "--celery",
            action="store_true",
            help="Send the orders' own events (not their child workflows) to a Celery worker "
            "(machine_memory.contrib.celery) of --workers processes, Redis as the broker "
            "(DEMO_CELERY_BROKER_URL). Needs the [celery] extra.",
        )
        parser.add_argument(
            "--seed",
            type=int,
            default=None,
            help="Seed of the orders and their order, to repeat a run.",
        )
        parser.add_argument(
            "--json",
            action="store_true",
            help="Print the summary as JSON on stdout; the progress goes to stderr.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        verbosity: int = options["verbosity"]
        log_level = VERBOSITY_LEVELS.get(verbosity, logging.DEBUG)
        for name in ("machine_memory", "workflows"):
            logging.getLogger(name).setLevel(log_level)
        if options["celery"] and not options["use_lock"]:
            raise CommandError("--celery runs every event under its lock: drop --no-lock.")

        from machine_memory import MachineMemory
        from machine_memory.conf import conf

        alias = options["database"] or conf.DATABASE
        if alias not in connections:
            raise CommandError(
                f"Database {alias!r} is not in settings.DATABASES ({', '.join(connections)})."
            )
        migrate_if_needed(alias)
        # The command's own memory: it checks who holds a lock, and re-reads every workflow.
        memory = MachineMemory(using=alias)
        rng = random.Random(options["seed"])
        stamp = f"{datetime.datetime.now(datetime.UTC):%Y%m%dT%H%M%S}-{secrets.token_hex(2)}"
        run = f"demo/{stamp}"
        orders = plan_orders(run, options["events"], rng)
        placed = arrivals(orders, rng)
        if options["celery"]:
            expected = {o.machine_id: [e.key for e in o.placed()] for o in orders}
            mode = "celery"
        else:
            expected = {m: keys for o in orders for m, keys in o.expected().items()}
            mode = "locks" if options["use_lock"] else "cas-only"
        summary = Summary(
            run=run,
            database=describe_database(alias),
            mode=mode,
            orders=len(orders),
            workflows=len(expected),
            events=sum(len(keys) for keys in expected.values()),
            workers=options["workers"],
            counts=Counts(),
        )
        # With --json, stdout carries the JSON alone and the progress goes to stderr.
        stream = (
            (options.get("stderr") or sys.stderr) if options["json"] else self.raw_stdout(options)
        )
        display = display_for(stream, verbosity)
        worker_options = WorkerOptions(
            settings_module=settings.SETTINGS_MODULE,
            use_lock=options["use_lock"],
            lock_ttl=options["lock_ttl"],
            log_level=log_level,
            work_seconds=options["work_ms"] / 1000,
            database=alias,
            database_name=str(connections[alias].settings_dict["NAME"]),
        )
        display.start(self.header(summary, options))
        try:
            if options["celery"]:
                from workflows.celery_run import run_celery_worker

                events = [event for _, event in placed]
                summary.counts = run_celery_worker(events, options["workers"], worker_options)
            else:
                broker = Broker(
                    worker_options,
                    options["workers"],
                    memory,
                    display,
                    total=summary.events,
                    orders=len(orders),
                    faults=options["faults"],
                )
                summary.counts = broker.run(placed)
            check(memory, orders, expected, summary)
        finally:
            display.stop()
            memory.close()
        if options["json"]:
            self.stdout.write(json.dumps(summary.as_dict(), indent=2))
        elif verbosity >= 1:
            display.report(report_rows(summary), verdict(summary), summary.passed)
            if summary.passed:
                display.next_steps(self.next_steps(summary, alias))
        else:
            self.stdout.write(verdict(summary))
        if not summary.passed:
            for problem in summary.problems[:20]:
                self.stderr.write(problem)
            raise CommandError(
                f"Verification failed for run {run}: {summary.lost} events lost, "
                f"{summary.doubled} applied twice, {len(summary.problems)} problems (above). "
                "Please report this with the output above."
            )

    @staticmethod
    def raw_stdout(options: dict[str, Any]) -> Any:
        # The stream under self.stdout: Django's OutputWrapper adds a newline to every
        # write, which would break the live view's redrawing.
        return options.get("stdout") or sys.stdout

    @staticmethod
    def header(summary: Summary, options: dict[str, Any]) -> list[str]:
        if options["celery"]:
            how = "a Celery worker, session() per event"
        elif options["use_lock"]:
            how = f"locks with a {options['lock_ttl']:g} s TTL + compare-and-set"
        else:
            how = "compare-and-set only, no locks"
        if not options["faults"] or options["celery"]:
            faults = "no faults injected"
        elif options["use_lock"]:
            faults = "one worker killed (SIGKILL) holding a lock, one frozen (SIGSTOP) past its TTL"
        else:
            faults = "one worker killed (SIGKILL) in the middle of an event"
        if options["celery"]:
            what = f"{summary.orders} orders, {summary.events} events (the orders' own)"
        else:
            what = (
                f"{summary.orders} orders -> {summary.workflows} workflows (order, payment, "
                f"stock, shipping), {summary.events} events"
            )
        return [
            f"Run {summary.run} on {summary.database}",
            f"{what}, {summary.workers} worker processes, {how}; {faults}",
        ]

    def next_steps(self, summary: Summary, alias: str) -> list[str]:
        """Where to look next: the server to start, the admin with a login, the API."""
        python = os.path.relpath(sys.executable)
        python = python if not python.startswith("..") else "python"
        manage = "example_project/manage.py"
        env = " ".join(
            f"{name}={os.environ[name]}"
            for name in ("DATABASE_URL", "DEMO_SQLITE_PATH")
            if os.environ.get(name)
        )
        login = ensure_admin(alias)
        base = "http://127.0.0.1:8000"
        # The admin's search: an exact id (or parent), or a prefix ending in "*".
        prefix = f"{summary.run}/"
        first = f"{summary.run}/order-001"
        admin = f"{base}/admin/machine_memory"
        links = [
            (f"{admin}/machinestate/?q={prefix}*&roots=yes", "this run's orders"),
            (f"{admin}/machinestate/?q={first}", "an order and its child workflows"),
            (f"{admin}/machinelock/?q={prefix}*", "their locks"),
        ]
        width = max(len(url) for url, _ in links)
        lines = [
            "Where to look next: start the example project's server,",
            f"  {env + ' ' if env else ''}{python} {manage} runserver",
            f"and log in to the admin as {login}:",
            *(f"  {url:<{width}}  {what}" for url, what in links),
        ]
        if apps.is_installed("rest_framework"):
            lines += [
                "The REST API (Basic auth with the same login):",
                f"  curl -u {ADMIN_USER}:{ADMIN_PASSWORD} '{base}/api/machine-memory/states/"
                f"?prefix={prefix}'",
                f"  curl -u {ADMIN_USER}:{ADMIN_PASSWORD} '{base}/api/machine-memory/state/"
                f"?id={first}'",
            ]
        else:
            lines.append(
                "The REST API at /api/machine-memory/ needs the [drf] extra: "
                "pip install -e '.[drf]'"
            )
        return lines


def ensure_admin(alias: str) -> str:
    """Create the DEMO-ONLY superuser if there is none; how to log in."""
    if not apps.is_installed("django.contrib.auth"):
        return "a superuser of your own"
    from django.contrib.auth import get_user_model

    users = get_user_model()._default_manager.db_manager(alias)
    if users.filter(username=ADMIN_USER).exists():
        return (
            f"{ADMIN_USER!r} (it exists already; `manage.py demo_admin` resets its password to "
            f"{ADMIN_PASSWORD!r})"
        )
    users.create_superuser(ADMIN_USER, password=ADMIN_PASSWORD)
    return (
        f"{ADMIN_USER} / {ADMIN_PASSWORD} (a DEMO-ONLY superuser this run created: never on a "
        "database anyone else can reach)"
    )


def check(
    memory: MachineMemory, orders: list[Order], expected: dict[str, list[str]], summary: Summary
) -> None:
    """Re-read every workflow through the memory and verify it against the events sent."""
    states = {machine_id: memory.read(machine_id) for machine_id in expected}
    for order in orders:
        mine = {m: expected[m] for m in order.expected() if m in expected}
        summary.problems += verify(order, states, mine)
    for machine_id, keys in expected.items():
        applied = (states[machine_id] or {}).get("applied", [])
        summary.lost += sum(1 for key in keys if key not in applied)
        summary.doubled += len(applied) - len(set(applied))


def report_rows(summary: Summary) -> list[tuple[str, str, str]]:
    counts = summary.counts
    rate = counts.handled / counts.elapsed if counts.elapsed else 0.0
    return [
        (
            "events handled",
            f"{counts.handled}/{summary.events}",
            f"in {counts.deliveries} deliveries",
        ),
        ("lock denials", str(counts.lock_denials), "the workflow's lock was held: event put back"),
        ("redeliveries", str(counts.redeliveries), "events put back, delivered again later"),
        ("takeovers", str(counts.takeovers), "expired locks of a killed or frozen worker taken"),
        (
            "fenced writes",
            str(counts.fenced_writes),
            "LockLost: a stale lock holder's write refused",
        ),
        ("write conflicts", str(counts.write_conflicts), "compare-and-set lost to another write"),
        ("duplicates", str(counts.duplicates), "redelivered after landing: nothing written again"),
        ("storage errors", str(counts.storage_errors), "read, write or lock failed: put back"),
        (
            "workers",
            f"{counts.workers_started} started",
            f"{counts.workers_killed} killed, {counts.workers_frozen} frozen",
        ),
        ("elapsed", f"{counts.elapsed:.1f} s", f"{rate:.0f} events/s"),
    ]


def verdict(summary: Summary) -> str:
    if summary.passed:
        scope = (
            "every event applied exactly once, every workflow done, amounts and stock add up"
            if summary.mode != "celery"
            else "every event applied exactly once, amounts add up"
        )
        return (
            f"Verification PASSED: {summary.workflows} workflows of {summary.orders} orders "
            f"re-read from the database; {summary.events} events, 0 lost, 0 applied twice; "
            f"{scope}."
        )
    return (
        f"Verification FAILED: {summary.lost} events lost, {summary.doubled} applied twice, "
        f"{len(summary.problems)} problems in {summary.workflows} workflows."
    )


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

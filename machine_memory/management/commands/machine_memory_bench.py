"""``manage.py machine_memory_bench``: the Arvo cycle through MachineMemory vs the bare driver."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
import uuid
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any, TextIO

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError, connections

from machine_memory.bench import (
    OPERATIONS,
    BenchError,
    Timings,
    contended_cycles,
    gap_probe,
    interleaved,
    memory_cycles,
    new_prefix,
    raw_cycles,
    raw_session_cycles,
    run_in_processes,
    session_cycles,
    summary,
)
from machine_memory.bench.baseline import Tables, create_tables, drop_tables, fill, raw_cycle
from machine_memory.conf import conf
from machine_memory.exceptions import MachineMemoryError
from machine_memory.management.arguments import (
    add_database_argument,
    http_url,
    lock_backend,
    logging_for,
    non_negative_int,
    positive_int,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from machine_memory.memory import MachineMemory


# A run shorter than this shows no progress at all: a bar that flashes by helps nobody.
SHOW_AFTER = 2.0


class Progress:
    """rich's progress bar on a terminal (the ``[rich]`` extra); nothing without rich, or
    when the output is not a terminal.

    With a ``total``, it is drawn only when the bench reports progress, between cycles: no
    refresh thread competes with the cycles being timed. Without one (worker processes run
    the cycles and this process only waits) it is a spinner with the elapsed time.
    """

    def __init__(self, label: str, total: int | None, stream: TextIO | None) -> None:
        self.total = total
        self.started = time.monotonic()
        self.bar: Any = None
        if stream is None:
            return
        try:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
            )
            from rich.progress import Progress as Bar
        except ImportError:
            return
        console = Console(file=stream)
        if not console.is_terminal or console.is_dumb_terminal:
            return
        columns = (
            [TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
            if total is not None
            else [SpinnerColumn(), TextColumn(label), TimeElapsedColumn()]
        )
        self.bar = Bar(*columns, console=console, transient=True, auto_refresh=total is None)
        self.task = self.bar.add_task(label, total=total)
        self.shown = False
        if total is None:
            self.bar.start()
            self.shown = True

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __call__(self, done: int) -> None:
        if self.bar is None:
            return
        if not self.shown and time.monotonic() - self.started < SHOW_AFTER:
            return
        self.bar.update(self.task, completed=done)
        if not self.shown:
            self.bar.start()
            self.shown = True
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None and self.shown:
            self.bar.stop()
            self.shown = False


class Command(BaseCommand):
    help = (
        "Benchmark the Arvo cycle (lock -> read -> write -> unlock) through MachineMemory "
        "against the same statements on the bare database driver."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        add_database_argument(parser)
        parser.add_argument(
            "--lock-backend",
            type=lock_backend,
            default=None,
            help="database, redis, or the dotted path of a LockBackend subclass. "
            "Default: MACHINE_MEMORY['LOCK_BACKEND'].",
        )
        parser.add_argument(
            "--cycles", type=positive_int, default=5000, help="Cycles per run. Default 5000."
        )
        parser.add_argument(
            "--machines",
            type=positive_int,
            default=None,
            help="Machine ids per worker (default 1000), or shared ids with --contention "
            "(default 4).",
        )
        parser.add_argument(
            "--workers",
            type=positive_int,
            default=None,
            help="Worker processes (default 1), or HTTP client processes with --http (default 4).",
        )
        parser.add_argument(
            "--contention",
            action="store_true",
            help="All workers on the same few ids: throughput, denials, lost-update check.",
        )
        parser.add_argument(
            "--runs", type=positive_int, default=3, help="Runs; the median counts. Default 3."
        )
        parser.add_argument("--no-raw", action="store_true", help="Skip the bare-driver runs.")
        parser.add_argument(
            "--fill-states",
            type=non_negative_int,
            default=0,
            help="Filler state rows to add first. Default 0.",
        )
        parser.add_argument(
            "--fill-expired-locks",
            type=non_negative_int,
            default=0,
            help="Filler expired lock rows to add first. Default 0.",
        )
        parser.add_argument(
            "--http",
            metavar="URL",
            type=http_url,
            default=None,
            help="Also run the cycle over the REST API at URL (e.g. "
            "http://127.0.0.1:8000/api/machine-memory/) from --workers client processes, next "
            "to the in-process cycle of one worker. The server must use this database.",
        )
        parser.add_argument(
            "--token",
            default=None,
            help="With --http: a DRF token of a user the API admits (Authorization: Token).",
        )
        parser.add_argument(
            "--gap-probe",
            action="store_true",
            help="Also time the raw lock statement after 0, 20 and 100 µs of client-side work "
            "(how much this machine charges a statement that does not follow at once).",
        )
        parser.add_argument(
            "--raw-session",
            action="store_true",
            help="Also run the cycle on the bare driver in two round trips (lock + read, write "
            "+ unlock) into the baseline's tables: the least a cycle shaped like session() "
            "costs on this machine, with none of its guarantees.",
        )
        parser.add_argument(
            "--telemetry",
            choices=["off", "signals", "spans"],
            default="off",
            help="What listens while the cycles run (docs/telemetry.md): nothing; a receiver "
            "on every signal; or spans through the OpenTelemetry SDK (installed separately), "
            "batched and dropped. One worker only. Default off.",
        )
        parser.add_argument("--json", action="store_true", help="Print the result as JSON.")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["token"] is not None and options["http"] is None:
            raise CommandError("--token is for the API: give --http URL too.")
        for flag in ("gap_probe", "raw_session"):
            if options[flag] and (
                options["no_raw"] or options["contention"] or options["http"] is not None
            ):
                raise CommandError(
                    f"--{flag.replace('_', '-')} runs bare-driver statements: "
                    "no --no-raw, --contention or --http."
                )
        if options["telemetry"] != "off" and (
            (options["workers"] or 1) > 1 or options["contention"] or options["http"] is not None
        ):
            raise CommandError(
                "--telemetry listens in this process: one worker, no --contention or --http."
            )
        with logging_for(options["verbosity"], self.stderr), listening(options["telemetry"]):
            self.bench(options)

    def bench(self, options: dict[str, Any]) -> None:
        alias = options["database"] or conf.DATABASE
        from machine_memory.memory import MachineMemory
        from machine_memory.models import MachineLock, MachineState

        try:
            memory = MachineMemory(using=alias, lock_backend=options["lock_backend"])
        except (ImportError, TypeError, ValueError, MachineMemoryError) as exc:
            raise CommandError(
                f"Cannot use lock backend {options['lock_backend']!r}: {exc}"
            ) from exc
        prefix = new_prefix()
        try:
            connections[alias].ensure_connection()
        except DatabaseError as exc:
            # Not a missing migration: advising one would send the user the wrong way.
            raise CommandError(f"Cannot connect to database {alias!r}: {exc}") from exc
        try:
            if MachineState.objects.using(alias).filter(machine_id__startswith=prefix).exists():
                raise CommandError(f"Rows under {prefix!r} exist already; refusing to touch them.")
        except DatabaseError as exc:
            raise CommandError(
                f"Cannot read the machine memory tables on {alias!r} ({exc}); "
                "run `manage.py migrate machine_memory` first."
            ) from exc
        try:
            result = self.run(memory, prefix, options)
        except BenchError as exc:
            raise CommandError(str(exc)) from exc
        finally:
            self.cleanup(alias, prefix, MachineState, MachineLock)
            memory.close()
        if options["json"]:
            self.stdout.write(json.dumps(result, indent=2))
        else:
            self.report(result)
        if result.get("lost_updates"):
            raise CommandError(f"{result['lost_updates']} lost updates: the counts do not add up.")

    # -- running ------------------------------------------------------------------------

    def run(self, memory: MachineMemory, prefix: str, options: dict[str, Any]) -> dict[str, Any]:
        alias = memory.using
        connection = connections[alias]
        contention = options["contention"]
        if options["http"] is not None:
            return self.http(memory, prefix, options)
        workers = options["workers"] = options["workers"] or 1
        machines = options["machines"] or (4 if contention else 1000)
        cycles = options["cycles"]
        result: dict[str, Any] = {
            "database": alias,
            "vendor": connection.vendor,
            "lock_backend": type(memory.locks).__name__,
            "telemetry": options["telemetry"],
            "cycles": cycles,
            "workers": workers,
            "machines": machines,
            "contention": contention,
        }
        if options["fill_states"] or options["fill_expired_locks"]:
            result["fill"] = self.fill(memory, prefix, options)
        if contention:
            result.update(self.contention(memory, prefix, options, machines))
            return result
        memory_runs: list[Timings] = []
        session_runs: list[Timings] = []
        raw_runs: list[Timings] = []
        raw_session_runs: list[Timings] = []
        tables = None if options["no_raw"] else Tables.for_run(uuid.uuid4().hex[:12])
        if tables is not None:
            create_tables(connection, tables)
        try:
            for run in range(options["runs"]):
                kinds = {
                    "memory": self.ids(f"{prefix}r{run}", workers, machines),
                    "session": self.ids(f"{prefix}s{run}", workers, machines),
                }
                if tables is not None:
                    kinds["raw"] = self.ids(f"{prefix}raw{run}", workers, machines)
                if tables is not None and options["raw_session"]:
                    kinds["raw_session"] = self.ids(f"{prefix}rawsession{run}", workers, machines)
                if workers > 1:
                    timings = {}
                    for kind, ids in kinds.items():
                        label = f"run {run + 1}/{options['runs']}: {kind}, {workers} processes"
                        with self.progress(label, None, options):
                            timings[kind] = self.cycle_run(memory, ids, options, kind, tables)
                else:
                    timings = self.turns(memory, kinds, options, tables, run)
                memory_runs.append(timings["memory"])
                session_runs.append(timings["session"])
                if "raw" in timings:
                    raw_runs.append(timings["raw"])
                if "raw_session" in timings:
                    raw_session_runs.append(timings["raw_session"])
            if tables is not None and options["gap_probe"]:
                probe = raw_cycle(connection, tables)
                try:
                    result["gap_probe_us"] = gap_probe(
                        probe, self.ids(f"{prefix}gap", 1, machines), min(cycles, 2000)
                    )
                finally:
                    probe.close()
        finally:
            if tables is not None:
                drop_tables(connection, tables)
        result["memory"] = summary(memory_runs)
        result["session"] = summary(session_runs)
        if raw_runs:
            result["raw"] = summary(raw_runs)
            raw = result["raw"]["cycles_per_second"]
            result["ratio"] = round(result["memory"]["cycles_per_second"] / raw, 3)
            result["session_ratio"] = round(result["session"]["cycles_per_second"] / raw, 3)
        if raw_session_runs:
            result["raw_session"] = summary(raw_session_runs)
            result["raw_session_ratio"] = round(
                result["raw_session"]["cycles_per_second"] / result["raw"]["cycles_per_second"], 3
            )
        return result

    def http(self, memory: MachineMemory, prefix: str, options: dict[str, Any]) -> dict[str, Any]:
        """The cycle over the API from N processes, next to one in-process worker."""
        from machine_memory.bench.http import run_http_clients

        if options["contention"] or options["fill_states"] or options["fill_expired_locks"]:
            raise CommandError("--http runs distinct ids per client: no --contention or --fill-*.")
        clients = options["workers"] or 4
        machines = options["machines"] or 1000
        cycles = options["cycles"]
        if cycles % clients:
            raise CommandError(f"--cycles {cycles} does not split evenly over {clients} clients.")
        headers = {} if options["token"] is None else {"Authorization": f"Token {options['token']}"}
        memory_runs: list[Timings] = []
        http_runs: list[Timings] = []
        runs = options["runs"]
        for run in range(runs):
            label = f"run {run + 1}/{runs}: MachineMemory"
            with self.progress(label, cycles, options) as progress:
                memory_runs.append(
                    memory_cycles(
                        memory, self.ids(f"{prefix}r{run}", 1, machines), cycles, progress
                    )
                )
            ids = self.ids(f"{prefix}h{run}", clients, machines)
            per_client = [ids[c * machines : (c + 1) * machines] for c in range(clients)]
            label = f"run {run + 1}/{runs}: HTTP, {clients} client processes"
            with self.progress(label, None, options):
                timings = run_http_clients(options["http"], headers, per_client, cycles // clients)
            self.check_http_counts(memory, timings, options["http"])
            http_runs.append(timings)
        result: dict[str, Any] = {
            "database": memory.using,
            "vendor": connections[memory.using].vendor,
            "lock_backend": type(memory.locks).__name__,
            "cycles": cycles,
            "workers": 1,
            "machines": machines,
            "contention": False,
            "http_url": options["http"],
            "http_clients": clients,
            "memory": summary(memory_runs),
            "http": summary(http_runs),
        }
        result["http_ratio"] = round(
            result["http"]["cycles_per_second"] / result["memory"]["cycles_per_second"], 3
        )
        return result

    @staticmethod
    def check_http_counts(memory: MachineMemory, timings: Timings, url: str) -> None:
        """Every HTTP cycle the clients counted must show in the database this command
        measures."""
        expected = timings.increments
        stored = {machine_id: memory.read(machine_id) for machine_id in expected}
        if all(state is None for state in stored.values()):
            raise BenchError(
                f"The API at {url} stored its states in another database than "
                f"{memory.using!r}: point both at the same one."
            )
        wrong = [i for i, n in expected.items() if (stored[i] or {}).get("counter") != n]
        if wrong:
            raise BenchError(f"{len(wrong)} machine(s) over HTTP do not add up, e.g. {wrong[0]!r}.")

    @staticmethod
    def progress(label: str, total: int | None, options: dict[str, Any]) -> Progress:
        """A progress display on stderr; none with --json or -v 0."""
        quiet = options["json"] or options["verbosity"] < 1
        # The stream under self.stderr: Django's OutputWrapper ends every write with a
        # newline, which would break the bar's redrawing.
        return Progress(label, total, None if quiet else options.get("stderr") or sys.stderr)

    @staticmethod
    def ids(prefix: str, workers: int, machines: int) -> list[str]:
        return [f"{prefix}/w{w}/m{m}" for w in range(workers) for m in range(machines)]

    def cycle_run(
        self,
        memory: MachineMemory,
        ids: list[str],
        options: dict[str, Any],
        kind: str,
        tables: Tables | None,
    ) -> Timings:
        """One run of ``kind`` cycles ("memory": the four calls, "session": ``session()``,
        "raw": the bare driver into ``tables``, "raw_session": the same in two round trips)
        from --workers processes."""
        workers, cycles = options["workers"], options["cycles"]
        per_worker = len(ids) // workers
        return run_in_processes(
            [
                {
                    "kind": kind,
                    "database": memory.using,
                    "lock_backend": options["lock_backend"],
                    "ids": ids[w * per_worker : (w + 1) * per_worker],
                    "cycles": cycles // workers,
                    "tables": None if tables is None else dataclasses.asdict(tables),
                }
                for w in range(workers)
            ]
        )

    def turns(
        self,
        memory: MachineMemory,
        kinds: dict[str, list[str]],
        options: dict[str, Any],
        tables: Tables | None,
        run: int,
    ) -> dict[str, Timings]:
        """One run of every kind of cycle in this process, taking turns (``interleaved``)."""
        cycles = options["cycles"]
        memory_ids, session_ids = kinds["memory"], kinds["session"]
        runners: dict[str, Callable[[int, int], Timings]] = {
            "memory": lambda start, count: memory_cycles(memory, memory_ids, count, start=start),
            "session": lambda start, count: session_cycles(memory, session_ids, count, start=start),
        }
        cycle = None
        if tables is not None:
            cycle = raw_cycle(connections[memory.using], tables)
            raw, raw_ids = cycle, kinds["raw"]
            runners["raw"] = lambda start, count: raw_cycles(raw, raw_ids, count, start=start)
            if "raw_session" in kinds:
                two_trip_ids = kinds["raw_session"]
                runners["raw_session"] = lambda start, count: raw_session_cycles(
                    raw, two_trip_ids, count, start=start
                )
        label = f"run {run + 1}/{options['runs']}"
        try:
            with self.progress(label, cycles, options) as progress:
                return interleaved(runners, cycles, progress)
        finally:
            if cycle is not None:
                cycle.close()

    def contention(
        self, memory: MachineMemory, prefix: str, options: dict[str, Any], machines: int
    ) -> dict[str, Any]:
        from machine_memory.memory import MachineMemory

        workers, cycles = options["workers"], options["cycles"]
        runs = []
        lost = 0
        for run in range(options["runs"]):
            ids = [f"{prefix}c{run}/m{m}" for m in range(machines)]
            label = f"run {run + 1}/{options['runs']}: contention, {workers} processes"
            if workers > 1:
                with self.progress(label, None, options):
                    timings = run_in_processes(
                        [
                            {
                                "kind": "contention",
                                "database": memory.using,
                                "lock_backend": options["lock_backend"],
                                "ids": ids[w % machines :] + ids[: w % machines],
                                "cycles": cycles // workers,
                            }
                            for w in range(workers)
                        ]
                    )
            else:
                timings = contended_cycles(memory, ids, cycles)
            checker = MachineMemory(using=memory.using, lock_backend=options["lock_backend"])
            for machine_id in ids:
                state = checker.read(machine_id)
                stored = 0 if state is None else state["counter"]
                lost += abs(timings.increments[machine_id] - stored)
            runs.append(timings)
        return {"memory": summary(runs), "lost_updates": lost}

    def fill(self, memory: MachineMemory, prefix: str, options: dict[str, Any]) -> dict[str, Any]:
        connection = connections[memory.using]
        started = time.perf_counter()
        fill(connection, f"{prefix}fill/", options["fill_states"], options["fill_expired_locks"])
        seconds = time.perf_counter() - started
        if not options["json"]:
            self.stderr.write(
                f"Filled {options['fill_states']} state rows and {options['fill_expired_locks']} "
                f"expired lock rows in {seconds:.1f} s."
            )
        return {
            "states": options["fill_states"],
            "expired_locks": options["fill_expired_locks"],
            "seconds": round(seconds, 1),
        }

    def cleanup(self, alias: str, prefix: str, state_model: Any, lock_model: Any) -> None:
        # Only rows under this run's prefix; the lock row holding the highest token stays
        # (the fencing-token high-water mark, see MachineLockQuerySet.deletable).
        state_model.objects.using(alias).filter(machine_id__startswith=prefix).delete()
        lock_model.objects.using(alias).filter(machine_id__startswith=prefix).deletable().delete()

    # -- reporting ------------------------------------------------------------------------

    def report(self, result: dict[str, Any]) -> None:
        connection = connections[result["database"]]
        name = connection.settings_dict.get("NAME")
        mode = "contention on shared ids" if result["contention"] else "distinct ids per worker"
        self.stdout.write(
            f"machine_memory_bench: {result['vendor']} {result['database']!r} ({name}), "
            f"{result['lock_backend']}"
            + (
                ""
                if result.get("telemetry", "off") == "off"
                else f", telemetry: {result['telemetry']}"
            )
            + "\n"
            f"{result['cycles']} cycles per run, {result['workers']} worker(s), "
            f"{result['machines']} machine ids, {mode}, "
            f"median of {result['memory']['median_of']} runs"
        )
        if "fill" in result:
            fill = result["fill"]
            self.stdout.write(
                f"tables filled first with {fill['states']} state rows and "
                f"{fill['expired_locks']} expired lock rows"
            )
        if "http" in result:
            self.report_http(result)
            return
        self.stdout.write("\n" + _header(16, "cycles/s"))
        rows: list[tuple[str, dict[str, Any]]] = [("MachineMemory", result["memory"])]
        if "session" in result:
            rows.append(("session()", result["session"]))
        if "raw" in result:
            rows.append((f"raw {result['vendor']}", result["raw"]))
        if "raw_session" in result:
            rows.append(("raw session", result["raw_session"]))
        for label, data in rows:
            self.stdout.write(_row(label, 16, data))
        if "session" in result:
            self.stdout.write(
                "(session()"
                + (" and raw session" if "raw_session" in result else "")
                + ": lock = lock + read, write = write + release)"
            )
        if "ratio" in result:
            self.stdout.write(f"\nratio MachineMemory / raw: {result['ratio']:.2f}")
            self.stdout.write(f"ratio session() / raw: {result['session_ratio']:.2f}")
        if "raw_session_ratio" in result:
            self.stdout.write(
                f"ratio raw session / raw: {result['raw_session_ratio']:.2f} "
                "(two round trips, no tokens, fencing or checks)"
            )
        if "gap_probe_us" in result:
            probe = ", ".join(
                f"{us} µs after {gap} µs" for gap, us in result["gap_probe_us"].items()
            )
            self.stdout.write(f"raw lock p50 by client work before it: {probe}")
        if result["contention"]:
            data = result["memory"]
            self.stdout.write(
                f"\nlock denials {data['denials']}, write conflicts {data['conflicts']}, "
                f"lost updates {result['lost_updates']}"
            )

    def report_http(self, result: dict[str, Any]) -> None:
        self.stdout.write(
            f"over HTTP: {result['http_url']}, {result['http_clients']} client processes"
        )
        self.stdout.write("\n" + _header(28, "events/s"))
        rows = [
            ("MachineMemory, 1 worker", result["memory"]),
            (f"HTTP, {result['http_clients']} clients", result["http"]),
        ]
        for label, data in rows:
            self.stdout.write(_row(label, 28, data))
        self.stdout.write(
            f"\nratio HTTP / in-process: {result['http_ratio']:.2f} "
            "(HTTP: lock and read in one request)"
        )


def _header(width: int, unit: str) -> str:
    """The report's column titles, above ``_row`` lines with labels ``width`` wide."""
    return f"{'':<{width}}{unit:>10}" + "".join(f"{op + ' p50/p99 µs':>22}" for op in OPERATIONS)


def _row(label: str, width: int, data: dict[str, Any]) -> str:
    """One line of the report: throughput, then p50 / p99 per operation ("-": none)."""
    line = f"{label:<{width}}{data['cycles_per_second']:>10,.0f}"
    for op in OPERATIONS:
        latency = data["latency_us"].get(op)
        cell = f"{latency['p50']:.0f} / {latency['p99']:.0f}" if latency else "-"
        line += f"{cell:>22}"
    return line


@contextmanager
def listening(mode: str) -> Iterator[None]:
    """Make the telemetry of ``--telemetry`` listen for the run (docs/telemetry.md)."""
    from machine_memory import signals, telemetry

    with ExitStack() as stack:
        if mode == "signals":

            def receiver(sender: Any, **kwargs: Any) -> None:
                pass

            for signal in signals.ALL:
                signal.connect(receiver, weak=False)
                stack.callback(signal.disconnect, receiver)
        elif mode == "spans":
            try:
                from opentelemetry.sdk.trace import TracerProvider
                from opentelemetry.sdk.trace.export import (
                    BatchSpanProcessor,
                    SpanExporter,
                    SpanExportResult,
                )
            except ImportError as exc:
                raise CommandError(
                    "--telemetry spans needs the OpenTelemetry SDK: pip install opentelemetry-sdk"
                ) from exc

            class Dropped(SpanExporter):
                def export(self, spans: Any) -> SpanExportResult:
                    return SpanExportResult.SUCCESS

            provider = TracerProvider()
            provider.add_span_processor(BatchSpanProcessor(Dropped()))
            stack.callback(provider.shutdown)
            stack.enter_context(telemetry.tracing_with(provider.get_tracer("machine_memory")))
        yield

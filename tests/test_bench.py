"""``manage.py machine_memory_bench`` on every database: output, clean-up, workers, bad input.

Small numbers only: these tests prove the command works and leaves nothing behind, never
how fast anything is (no timing assertions, docs/contract.md).
"""

from __future__ import annotations

import json
import re
import sys
from io import StringIO
from typing import TYPE_CHECKING, Any

import pytest
from django.core.management import CommandError, call_command
from django.db import connections
from django.db.models import Max

from machine_memory import MachineMemory
from machine_memory.bench import OPERATIONS
from machine_memory.bench.baseline import Tables, create_tables, drop_tables, raw_cycle
from machine_memory.models import MachineLock, MachineState
from machine_memory.sql import dialect_for
from tests.support import new_id

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

BENCH_PREFIX = "machine-memory-bench/"
SMALL = ("--cycles", "60", "--machines", "10", "--runs", "1")


def bench(alias: str, *args: str) -> tuple[str, str]:
    """Run the command on ``alias``; its stdout and stderr."""
    out, err = StringIO(), StringIO()
    call_command("machine_memory_bench", "--database", alias, *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def bench_json(alias: str, *args: str) -> dict[str, Any]:
    out, err = bench(alias, *args, "--json")
    assert err == ""  # nothing but the JSON document, on stdout
    result: dict[str, Any] = json.loads(out)
    return result


def assert_table(out: str, vendor: str) -> None:
    """Both rows (a label, cycles/s, then p50 / p99 in µs per operation) and the ratio."""
    cells = r"\s+[\d,]+" + r"\s+\d+ / \d+" * len(OPERATIONS) + "$"
    assert re.search("^MachineMemory" + cells, out, re.MULTILINE), out
    assert re.search(f"^raw {vendor}" + cells, out, re.MULTILINE), out
    # session(): lock (+ read) and write (+ release) only.
    session = r"^session\(\)\s+[\d,]+\s+\d+ / \d+\s+-\s+\d+ / \d+\s+-$"
    assert re.search(session, out, re.MULTILINE), out
    assert re.search(r"^ratio MachineMemory / raw: \d+\.\d\d$", out, re.MULTILINE), out
    assert re.search(r"^ratio session\(\) / raw: \d+\.\d\d$", out, re.MULTILINE), out


def bench_lock_rows(alias: str) -> dict[str, tuple[int, str]]:
    """Lock rows under the bench's prefix: id -> (token, owner)."""
    rows = MachineLock.objects.using(alias).filter(machine_id__startswith=BENCH_PREFIX)
    return {row.machine_id: (row.token, row.owner) for row in rows}


@pytest.fixture
def left_behind(alias: str) -> Iterator[None]:
    """After the test's one bench run: what the clean-up guarantees, checked precisely.

    Every state row under the bench's prefix is gone. Of the lock rows a run made, none
    stays where tokens come from a sequence; on SQLite only the one holding the highest
    token in the table stays: the fencing-token high-water mark
    (``MachineLockQuerySet.deletable``), released. Nothing else takes locks in this test
    database meanwhile, so the run's last token is the table's highest and exactly one row
    stays — which also shows that worker processes locked in this database and no other.
    Each earlier run left its own such row; those are left alone.
    """
    before = bench_lock_rows(alias)
    yield
    assert not MachineState.objects.using(alias).filter(machine_id__startswith=BENCH_PREFIX)
    after = bench_lock_rows(alias)
    assert {key: after[key] for key in before} == before
    new = set(after) - set(before)
    if not dialect_for(connections[alias]).token_high_water_row:
        assert not new, sorted(new)  # tokens come from a sequence: nothing needs keeping
        return
    assert len(new) == 1, sorted(new)
    kept = MachineLock.objects.using(alias).get(machine_id=new.pop())
    assert kept.token == MachineLock.objects.using(alias).aggregate(top=Max("token"))["top"]
    assert not MachineLock.objects.using(alias).live().filter(pk=kept.pk).exists()


def assert_latencies(data: dict[str, Any]) -> None:
    assert data["cycles_per_second"] > 0
    assert set(data["latency_us"]) == set(OPERATIONS)
    for values in data["latency_us"].values():
        assert set(values) == {"p50", "p99"}
        assert 0 <= values["p50"] <= values["p99"]


@pytest.mark.usefixtures("left_behind")
def test_text_output_has_both_rows_and_the_ratio(alias: str) -> None:
    out, _ = bench(alias, *SMALL)
    vendor = connections[alias].vendor
    assert f"machine_memory_bench: {vendor} {alias!r}" in out
    assert "60 cycles per run, 1 worker(s), 10 machine ids, distinct ids per worker" in out
    assert_table(out, vendor)


@pytest.mark.usefixtures("left_behind")
def test_gap_probe(alias: str) -> None:
    result = bench_json(alias, *SMALL, "--gap-probe")
    probe = result["gap_probe_us"]
    assert set(probe) == {"0", "20", "100"}
    assert all(value > 0 for value in probe.values())


def test_gap_probe_text(alias: str) -> None:
    out, _ = bench(alias, *SMALL, "--gap-probe")
    assert re.search(r"^raw lock p50 by client work before it: [\d.]+ µs after 0 µs, ", out, re.M)


@pytest.mark.parametrize("flag", ["--gap-probe", "--raw-session"])
@pytest.mark.parametrize("other", [["--no-raw"], ["--contention"], ["--http", "http://x/"]])
def test_bare_driver_options_need_the_raw_cycle(alias: str, flag: str, other: list[str]) -> None:
    with pytest.raises(CommandError, match=f"{flag} runs bare-driver statements"):
        bench(alias, *SMALL, flag, *other)


@pytest.mark.usefixtures("left_behind")
def test_raw_session(alias: str) -> None:
    result = bench_json(alias, *SMALL, "--raw-session")
    two_trips = result["raw_session"]
    assert two_trips["cycles"] == 60 and two_trips["cycles_per_second"] > 0
    assert set(two_trips["latency_us"]) == {"lock", "write"}  # lock + read, write + unlock
    assert result["raw_session_ratio"] > 0


def test_raw_session_text(alias: str) -> None:
    out, _ = bench(alias, *SMALL, "--raw-session")
    assert re.search(r"^raw session\s+[\d,]+\s+\d+ / \d+\s+-\s+\d+ / \d+\s+-$", out, re.M), out
    assert re.search(r"^ratio raw session / raw: \d+\.\d\d \(two round trips", out, re.M), out


def test_raw_session_in_worker_processes(alias: str) -> None:
    result = bench_json(alias, *SMALL, "--raw-session", "--workers", "2")
    assert result["raw_session"]["cycles"] == 60


@pytest.mark.usefixtures("left_behind")
def test_json_output(alias: str) -> None:
    result = bench_json(alias, *SMALL)
    assert result["database"] == alias
    assert result["vendor"] == connections[alias].vendor
    assert (result["cycles"], result["machines"], result["workers"]) == (60, 10, 1)
    assert result["contention"] is False
    for kind in ("memory", "raw"):
        assert_latencies(result[kind])
        assert result[kind]["cycles"] == 60
        assert result[kind]["median_of"] == 1
        assert result[kind]["denials"] == result[kind]["conflicts"] == 0
    session = result["session"]
    assert session["cycles"] == 60 and session["cycles_per_second"] > 0
    assert set(session["latency_us"]) == {"lock", "write"}  # lock + read, write + release
    assert result["ratio"] > 0 and result["session_ratio"] > 0
    assert "raw_session" not in result  # only with --raw-session


@pytest.mark.usefixtures("left_behind")
def test_other_rows_are_untouched(alias: str) -> None:
    memory = MachineMemory(using=alias)
    ids = [new_id("bench-neighbour") for _ in range(3)]
    for number, machine_id in enumerate(ids):
        assert memory.lock(machine_id)
        memory.write(machine_id, {"n": number}, None)
        if number:  # one of them stays locked through the run
            assert memory.unlock(machine_id)
    states = {
        row.machine_id: (row.state, row.version, row.updated_at)
        for row in MachineState.objects.using(alias).filter(machine_id__in=ids)
    }
    locks = {
        row.machine_id: (row.owner, row.token, row.expires_at)
        for row in MachineLock.objects.using(alias).filter(machine_id__in=ids)
    }
    assert len(states) == len(locks) == 3

    bench(alias, *SMALL)

    assert {
        row.machine_id: (row.state, row.version, row.updated_at)
        for row in MachineState.objects.using(alias).filter(machine_id__in=ids)
    } == states
    assert {
        row.machine_id: (row.owner, row.token, row.expires_at)
        for row in MachineLock.objects.using(alias).filter(machine_id__in=ids)
    } == locks
    assert memory.lock_info(ids[0]) is not None
    assert memory.unlock(ids[0])
    memory.close()


@pytest.mark.usefixtures("left_behind")
def test_contention_in_worker_processes(alias: str) -> None:
    result = bench_json(
        alias, "--contention", "--workers", "2", "--cycles", "40", "--machines", "2", "--runs", "1"
    )
    assert result["contention"] is True
    assert result["workers"] == 2
    assert result["lost_updates"] == 0
    assert "raw" not in result
    data = result["memory"]
    assert data["cycles"] == 40  # 20 successful increments per worker
    assert data["denials"] >= 0
    assert data["conflicts"] == 0  # every write was made under the lock
    assert_latencies(data)


@pytest.mark.usefixtures("left_behind")
def test_contention_text_output(alias: str) -> None:
    out, _ = bench(alias, "--contention", "--cycles", "20", "--machines", "2", "--runs", "1")
    assert "contention on shared ids" in out
    assert "lost updates 0" in out


WORKERS = ("--workers", "2", "--cycles", "40", "--machines", "5", "--runs", "1")


@pytest.mark.usefixtures("left_behind")
def test_worker_processes_without_contention(alias: str) -> None:
    result = bench_json(alias, *WORKERS)
    assert result["workers"] == 2
    for kind in ("memory", "raw"):
        assert_latencies(result[kind])
        assert result[kind]["cycles"] == 40  # 20 per worker
    assert result["ratio"] > 0


@pytest.mark.usefixtures("left_behind")
def test_worker_processes_text_output(alias: str) -> None:
    out, _ = bench(alias, *WORKERS)
    assert "40 cycles per run, 2 worker(s), 5 machine ids, distinct ids per worker" in out
    assert_table(out, connections[alias].vendor)


class Terminal(StringIO):
    """An output that says it is a terminal, as a console's is."""

    def isatty(self) -> bool:
        return True


def bench_on_a_terminal(*args: str) -> tuple[str, str]:
    out, err = StringIO(), Terminal()
    call_command("machine_memory_bench", "--database", "default", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def test_progress_bar_on_a_terminal(db_access: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from machine_memory.management.commands import machine_memory_bench

    monkeypatch.setattr(machine_memory_bench, "SHOW_AFTER", 0.0)  # the run takes less
    out, err = bench_on_a_terminal(*SMALL)
    assert "run 1/1" in err and "60/60" in err, err  # rich's bar, on stderr
    assert "━" in err and "\x1b[" in err
    assert_table(out, "sqlite")  # the report itself is unchanged


def test_worker_processes_show_a_spinner_on_a_terminal(db_access: None) -> None:
    out, err = bench_on_a_terminal(*WORKERS, "--no-raw")
    assert "run 1/1: memory, 2 processes" in err, err
    assert "2 worker(s)" in out


def test_no_progress_without_rich(db_access: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from machine_memory.management.commands import machine_memory_bench

    monkeypatch.setattr(machine_memory_bench, "SHOW_AFTER", 0.0)
    monkeypatch.setitem(sys.modules, "rich.progress", None)  # import fails: not installed
    out, err = bench_on_a_terminal(*SMALL)
    assert err == ""
    assert_table(out, "sqlite")


def test_no_progress_when_not_a_terminal(db_access: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from machine_memory.management.commands import machine_memory_bench

    monkeypatch.setattr(machine_memory_bench, "SHOW_AFTER", 0.0)
    out, err = bench("default", *SMALL)
    assert err == ""  # a log file gets the report alone
    assert_table(out, "sqlite")


@pytest.mark.usefixtures("left_behind")
def test_fill_text_output(alias: str) -> None:
    out, err = bench(alias, *SMALL, "--fill-states", "20", "--fill-expired-locks", "5")
    assert "Filled 20 state rows and 5 expired lock rows" in err
    assert "tables filled first with 20 state rows and 5 expired lock rows" in out


@pytest.mark.usefixtures("left_behind")
def test_fill_rows_are_cleaned_up(alias: str) -> None:
    result = bench_json(alias, *SMALL, "--fill-states", "2000", "--fill-expired-locks", "500")
    assert result["fill"]["states"] == 2000
    assert result["fill"]["expired_locks"] == 500
    assert_latencies(result["memory"])


def test_unknown_database(db_access: None) -> None:
    with pytest.raises(CommandError, match=r"'nowhere' is not in settings\.DATABASES"):
        call_command("machine_memory_bench", "--database", "nowhere", stdout=StringIO())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--cycles", "0"), "argument --cycles: must be at least 1, got 0"),
        (("--workers", "-1"), "argument --workers: must be at least 1, got -1"),
        (("--runs", "two"), "argument --runs: 'two' is not a whole number"),
        (("--fill-states", "-5"), "argument --fill-states: must not be negative, got -5"),
    ],
)
def test_bad_arguments(db_access: None, args: tuple[str, ...], message: str) -> None:
    with pytest.raises(CommandError, match=message):
        call_command("machine_memory_bench", *args, stdout=StringIO(), stderr=StringIO())


def test_missing_tables(db_access: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A real database without the app's tables: an empty SQLite file.
    connection = connections["sqlite_down"]
    connection.close()
    monkeypatch.setitem(connection.settings_dict, "NAME", str(tmp_path / "empty.sqlite3"))
    try:
        with pytest.raises(CommandError, match=r"run `manage\.py migrate machine_memory` first"):
            call_command("machine_memory_bench", "--database", "sqlite_down", stdout=StringIO())
    finally:
        connection.close()


def test_unreachable_database(db_access: None) -> None:
    # A server that does not answer is not a missing migration.
    with pytest.raises(CommandError, match="Cannot connect to database 'postgres_down'") as caught:
        call_command("machine_memory_bench", "--database", "postgres_down", stdout=StringIO())
    assert "migrate" not in str(caught.value)


@pytest.mark.parametrize(
    "name", ["no.such.Backend", "nonsense", "machine_memory.models.MachineLock"]
)
def test_unusable_lock_backend_is_a_usage_error(db_access: None, name: str) -> None:
    with pytest.raises(CommandError, match="choose database, redis, or the dotted path"):
        call_command("machine_memory_bench", "--lock-backend", name, stdout=StringIO())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--token", "abc"], "give --http URL too"),
        (["--http", "ftp://127.0.0.1/api/"], r"is not an http\(s\) URL"),
        (["--http", "127.0.0.1:8000"], r"is not an http\(s\) URL"),
        (["--http", "http://127.0.0.1:9/api/", "--cycles", "5", "--workers", "2"], "evenly"),
    ],
)
def test_http_arguments_are_checked(alias: str, args: list[str], message: str) -> None:
    # Before any request is sent (port 9 would refuse it) and before anything is written.
    with pytest.raises(CommandError, match=message):
        bench(alias, "--runs", "1", *args)


# -- the baseline: what a user would write without the app ------------------------------------


def test_the_baseline_has_two_minimal_tables_of_its_own(alias: str) -> None:
    connection = connections[alias]
    tables = Tables.for_run(new_id("t").replace("-", "")[:14])
    create_tables(connection, tables)
    try:
        with connection.cursor() as cursor:
            for table, columns in [
                (tables.state, ["machine_id", "data", "version"]),
                (tables.lock, ["machine_id", "owner", "expires_at"]),
            ]:
                described = connection.introspection.get_table_description(cursor, table)
                assert [column.name for column in described] == columns
                # The primary key and nothing else: no index the app's tables have.
                # (MariaDB's JSON type brings a CHECK (json_valid(data)), not an index.)
                constraints = connection.introspection.get_constraints(cursor, table)
                keys = [
                    c["columns"]
                    for c in constraints.values()
                    if c["index"] or c["unique"] or c["primary_key"]
                ]
                assert keys == [["machine_id"]]
        cycle = raw_cycle(connection, tables)
        try:
            # The cycle's semantics, in the minimal tables.
            assert cycle.lock("m", "a", 30)
            assert not cycle.lock("m", "b", 30)  # live: denied
            assert cycle.read("m") is None
            assert cycle.write("m", '{"n": 1}', None)
            assert not cycle.write("m", '{"n": 1}', None)  # exists already
            row = cycle.read("m")
            assert row is not None and row[1] == 1
            assert cycle.write("m", '{"n": 2}', 1)
            assert not cycle.write("m", '{"n": 3}', 1)  # stale version
            assert not cycle.unlock("m", "b")
            assert cycle.unlock("m", "a")
            assert cycle.lock("m", "b", 30)
            # The same cycle in two round trips (--raw-session).
            assert cycle.take("m", "a", 30) == (False, None)  # b holds it
            assert cycle.take("n", "a", 30) == (True, None)
            assert not cycle.give("n", "a", '{"n": 1}', 1)  # no version 1: nothing happens
            assert cycle.take("n", "b", 30) == (False, None)  # so the lock stays a's
            assert cycle.give("n", "a", '{"n": 1}', None)  # created, and unlocked with it
            locked, row = cycle.take("n", "b", 30)
            assert locked and row is not None and row[1] == 1 and json.loads(row[0]) == {"n": 1}
            assert not cycle.give("n", "b", '{"n": 2}', None)  # exists already
            assert cycle.give("n", "b", '{"n": 2}', 1)
            row = cycle.read("n")
            assert row is not None and row[1] == 2
            assert cycle.lock("n", "c", 30)  # b's lock went with its write
        finally:
            cycle.close()
    finally:
        drop_tables(connection, tables)
    assert not baseline_leftovers(alias, tables.base)


def baseline_leftovers(alias: str, base: str = "mm_bench_") -> list[str]:
    """Tables, and MariaDB's procedures of the two-trip cycle, named like a bench run's."""
    connection = connections[alias]
    found = [t for t in connection.introspection.table_names() if t.startswith(base)]
    if connection.vendor == "mysql":
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT routine_name FROM information_schema.routines"
                " WHERE routine_schema = DATABASE() AND routine_name LIKE %s",
                (f"{base}%",),
            )
            found += [name for (name,) in cursor.fetchall()]
    return found


def test_a_bench_run_leaves_no_baseline_tables(alias: str) -> None:
    bench(alias, "--cycles", "20", "--machines", "5", "--runs", "1", "--raw-session")
    assert not baseline_leftovers(alias)


@pytest.mark.parametrize("mode", ["signals", "spans"])
def test_telemetry_listens_for_the_run_only(alias: str, mode: str) -> None:
    from machine_memory import signals, telemetry

    result = bench_json(
        alias, "--cycles", "40", "--machines", "4", "--runs", "1", "--telemetry", mode
    )
    assert result["telemetry"] == mode
    assert result["memory"]["cycles_per_second"] > 0
    # Nothing keeps listening after the run: the rest of the process is as quiet as before.
    assert not signals.listened
    assert telemetry._tracer is None
    assert telemetry._quiet()


def test_telemetry_needs_one_worker(db_access: None) -> None:
    with pytest.raises(CommandError, match="one worker"):
        call_command(
            "machine_memory_bench",
            "--database",
            "default",
            "--telemetry",
            "signals",
            "--workers",
            "2",
        )

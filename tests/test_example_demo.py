"""The example project's demo: its workflow, and the demo run for real.

The workflow's handlers are plain functions, checked here in one process. Then the demo
runs as it does for a user: worker processes, one of them killed while it holds a lock and
one frozen past its lock's TTL, on every database (in this process, with ``--json``, so the
counts come from its summary), and as ``manage.py demo`` in a subprocess on a fresh SQLite
file, the README's way.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from django.core.management import call_command

from machine_memory.models import MachineLock, MachineState

if TYPE_CHECKING:
    from workflows.workflow import Event

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = REPO_ROOT / "example_project"
if str(EXAMPLE) not in sys.path:
    # The example's apps (workflows) import as the example project itself imports them;
    # spawned worker processes inherit this path.
    sys.path.append(str(EXAMPLE))

from workflows import workflow  # noqa: E402 - needs the path above


def run_demo(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **(env or {})}
    # pytest-django exported tests.settings; the demo must pick its own settings, on SQLite.
    env.pop("DJANGO_SETTINGS_MODULE", None)
    env.pop("DATABASE_URL", None)
    env["DEMO_SQLITE_PATH"] = str(tmp_path / "demo.sqlite3")
    return subprocess.run(
        [sys.executable, str(EXAMPLE / "manage.py"), "demo", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def assert_plain(text: str) -> None:
    """Output for a log file: no terminal control codes, no redrawn lines."""
    assert "\x1b[" not in text and "\r" not in text, repr(text[:500])


# -- the workflow, in one process ----------------------------------------------------------


def run_workflow(orders: list[workflow.Order], seed: int) -> dict[str, dict[str, Any]]:
    """Every event of ``orders`` through the handlers in a random order, some delivered
    twice, as a broker without locks but with one worker would; the states at the end."""
    rng = random.Random(seed)
    states: dict[str, dict[str, Any]] = {}
    queue: list[Event] = [event for _, event in workflow.arrivals(orders, rng)]
    seen: set[str] = set()
    while queue:
        event = queue.pop(rng.randrange(len(queue)))
        if rng.random() < 0.2:
            queue.append(event)  # delivered again later, whether or not it lands now
        step = workflow.apply(states.get(event.machine_id), event, "test")
        if step.state is not None:
            states[event.machine_id] = step.state
        for emitted in step.emits:
            if emitted.id in seen:
                continue
            seen.add(emitted.id)
            if emitted.machine_id.startswith(workflow.SERVICE):
                queue += workflow.service_replies(emitted)
            else:
                queue.append(emitted)
    return states


@pytest.mark.parametrize("seed", range(5))
def test_the_workflow_ends_the_same_in_any_order_of_delivery(seed: int) -> None:
    orders = workflow.plan_orders("demo/t", 80, random.Random(seed))
    states = run_workflow(orders, seed)
    for order in orders:
        assert workflow.verify(order, dict(states), order.expected()) == []
        assert states[order.machine_id]["stage"] == "done"
        assert states[order.child("payment")]["parentSubject"] == order.machine_id
        assert states[order.machine_id]["parentSubject"] is None


def test_orders_add_up_to_the_events_asked_for() -> None:
    orders = workflow.plan_orders("demo/t", 300, random.Random(1))
    events = sum(len(keys) for order in orders for keys in order.expected().values())
    assert 300 <= events < 300 + 20
    # One to four items: 14 to 20 events per order with its three children.
    assert all(14 <= sum(map(len, o.expected().values())) <= 20 for o in orders)


def test_an_event_applied_already_changes_nothing_and_emits_the_same_events() -> None:
    order = workflow.plan_orders("demo/t", 1, random.Random(2))[0]
    state = None
    for event in order.placed():
        step = workflow.apply(state, event, "w1")
        state = step.state
    assert state is not None and state["stage"] == "paying"
    again = workflow.apply(state, order.placed()[-1], "w2")
    assert again.state is None
    assert [e.type for e in again.emits] == ["payment.requested", "stock.requested"]


def test_verify_names_lost_and_doubled_events() -> None:
    orders = workflow.plan_orders("demo/t", 1, random.Random(3))
    order = orders[0]
    states = run_workflow(orders, 3)
    stock = states[order.child("stock")]
    stock["applied"].remove("stock.requested")
    states[order.machine_id]["applied"].append("order.created")
    problems = workflow.verify(order, dict(states), order.expected())
    assert f"{order.child('stock')}: stock.requested applied 0 times" in problems
    assert f"{order.machine_id}: order.created applied 2 times" in problems


# -- the demo on every database, in this process ---------------------------------------------


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def demo(alias: str, *args: str, stdout: io.StringIO | None = None) -> tuple[str, str]:
    from workflows.management.commands.demo import Command

    out, err = stdout or io.StringIO(), io.StringIO()
    call_command(Command(), *args, database=alias, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


@pytest.mark.slow
def test_the_demo_on_every_database(alias: str) -> None:
    """The recommended call for a test that wants the demo's data: processes, the kill, the
    freeze, and every workflow verified; the states and lock rows stay for the admin."""
    out, err = demo(alias, "--events", "120", "--workers", "3", "--json")
    summary = json.loads(out)
    assert summary["passed"] is True, summary
    assert summary["lost"] == summary["doubled"] == 0
    counts = summary["counts"]
    assert counts["handled"] == summary["events"] >= 120
    # Contention: workers were denied locks and the events went back to the broker.
    assert counts["lock_denials"] > 0
    assert counts["redeliveries"] >= counts["lock_denials"]
    # The killed worker's lock and the frozen worker's lock were both taken over, and the
    # frozen worker's late write was refused by the fencing token.
    assert counts["workers_killed"] >= 1 and counts["workers_frozen"] == 1
    assert counts["takeovers"] == 2
    assert counts["fenced_writes"] == 1
    assert counts["workers_started"] == 3 + counts["workers_killed"]
    # What it printed meanwhile (stderr with --json) is plain text, line by line.
    assert_plain(err)
    assert re.search(
        r"^\[\s*\d+\.\d s\] killed demo-worker-\d \(SIGKILL\) between its read and its write, "
        "holding the lock on order-",
        err,
        re.M,
    )
    assert re.search(r"took over order-\d+\S* [\d.]+ s after demo-worker-\d was killed", err)
    assert re.search(r"write to order-\d+\S* was refused: LockLost", err)
    assert re.search(r"^\[\s*\d+\.\d s\] \d+/\d+ events \(100 %\)", err, re.M), err
    # The data stays: orders with their children, and the lock rows of every workflow.
    states = MachineState.objects.using(alias).with_id_prefix(f"{summary['run']}/")
    assert states.roots().count() == summary["orders"]
    assert states.count() == summary["workflows"] == 4 * summary["orders"]
    first = f"{summary['run']}/order-001"
    assert set(states.children_of(first).values_list("machine_id", flat=True)) == {
        f"{first}/{kind}" for kind in workflow.CHILDREN
    }
    assert set(states.values_list("execution_status", flat=True)) == {"done"}
    locks = MachineLock.objects.using(alias).filter(machine_id__startswith=summary["run"])
    assert locks.count() == summary["workflows"]


@pytest.mark.slow
def test_the_live_view_on_a_terminal(db_access: None) -> None:
    out, _ = demo("default", "--events", "40", "--workers", "2", "--no-faults", stdout=Terminal())
    assert "\x1b[" in out  # drawn in place, in colour
    assert "━" in out  # rich's progress bar
    assert "Verification PASSED" in out
    assert "http://127.0.0.1:8000/admin/machine_memory/machinestate/?q=demo/" in out


# -- manage.py demo, as the README runs it ----------------------------------------------------


@pytest.mark.slow
def test_manage_py_demo_on_a_fresh_sqlite_file(tmp_path: Path) -> None:
    result = run_demo(tmp_path, "--events", "150", "--workers", "3")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert_plain(result.stdout)
    lines = result.stdout.splitlines()
    assert re.match(r"Run demo/\d{8}T\d{6}-[0-9a-f]{4} on sqlite .*demo\.sqlite3$", lines[0])
    assert "killed demo-worker-" in result.stdout
    assert re.search(r"^\s+events handled\s+(\d+)/\1\s+in \d+ deliveries$", result.stdout, re.M)
    assert re.search(r"^\s+takeovers\s+2\s", result.stdout, re.M), output
    assert re.search(r"^Verification PASSED: \d+ workflows of \d+ orders", result.stdout, re.M)
    # Where to look next: the server, the admin with a login that works, the API.
    assert f"DEMO_SQLITE_PATH={tmp_path / 'demo.sqlite3'} " in result.stdout
    assert "example_project/manage.py runserver" in result.stdout
    assert "log in to the admin as admin / admin" in result.stdout
    assert "/admin/machine_memory/machinelock/?q=demo/" in result.stdout
    assert re.search(r"curl -u admin:admin 'http://127\.0\.0\.1:8000/api/machine-memory/", output)
    assert (tmp_path / "demo.sqlite3").exists()


@pytest.mark.slow
def test_manage_py_demo_without_locks(tmp_path: Path) -> None:
    result = run_demo(tmp_path, "--events", "80", "--no-lock", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout)
    assert summary["passed"] is True and summary["mode"] == "cas-only"
    counts = summary["counts"]
    assert counts["lock_denials"] == counts["takeovers"] == counts["fenced_writes"] == 0
    assert counts["write_conflicts"] > 0  # races lost to compare-and-set, and redelivered
    assert counts["workers_killed"] == 1 and counts["workers_frozen"] == 0
    assert_plain(result.stderr)


@pytest.mark.slow
def test_demo_through_a_celery_worker_loses_no_update(tmp_path: Path) -> None:
    import redis

    # A database of its own, so a run beside another (CI's two Django versions) does not
    # share its queue.
    broker = os.environ.get("MM_DEMO_BROKER_URL", "redis://127.0.0.1:6379/10")
    redis.Redis.from_url(broker).flushdb()
    result = run_demo(
        tmp_path,
        *("--celery", "--events", "40", "--workers", "3"),
        env={"DEMO_CELERY_BROKER_URL": broker},
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "a Celery worker, session() per event" in result.stdout, output
    assert re.search(r"^\s+events handled\s+(\d+)/\1\s", result.stdout, re.M), output
    assert "Verification PASSED" in result.stdout, output


def readme_demo_lines() -> dict[str, str]:
    """The README's commands that run the demo on PostgreSQL and MariaDB, by vendor."""
    readme = (REPO_ROOT / "README.md").read_text()
    block = readme.split("The demo on PostgreSQL or MariaDB instead", 1)[1]
    block = block.split("```sh\n", 1)[1].split("```", 1)[0]
    lines = [line for line in block.splitlines() if line.strip()]
    return {"postgres" if "postgres://" in line else "mariadb": line for line in lines}


@pytest.mark.slow
@pytest.mark.parametrize("vendor", ["postgres", "mariadb"])
def test_readme_demo_on_a_server_runs_as_written(vendor: str, tmp_path: Path) -> None:
    """The README's line, run by the shell as written, except for a database name of this
    run's own (dropped after) and this test's Python. Its pip step is left out: the test
    environment has the extras already, and reinstalling the running project is no test."""
    from tests.support import in_ci

    line = readme_demo_lines()[vendor]
    steps = line.split(" && ")
    assert steps[0].startswith(".venv/bin/pip install -q -e '.[")
    name = f"machine_memory_demo_{os.getpid()}_{tmp_path.name[-8:]}".replace("-", "_")
    command = " && ".join(steps[1:]).replace("machine_memory_demo", name)
    command = command.replace(".venv/bin/python", sys.executable)
    drop = {
        "postgres": ["psql", "-h", "127.0.0.1", "-U", "postgres", "-c"],
        "mariadb": ["mariadb", "-h", "127.0.0.1", "-u", "root", "-e"],
    }[vendor] + [f"DROP DATABASE IF EXISTS {name}"]
    env = {k: v for k, v in os.environ.items() if k not in {"DJANGO_SETTINGS_MODULE"}}
    try:
        result = subprocess.run(
            command,
            shell=True,
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
    finally:
        dropped = subprocess.run(drop, capture_output=True, text=True, check=False)
    output = result.stdout + result.stderr
    if result.returncode != 0 and "could not connect" in output.lower() and not in_ci():
        pytest.skip(f"{vendor} is not reachable: {output[-300:]}")
    assert result.returncode == 0, output
    assert re.search(r"^Verification PASSED: ", result.stdout, re.M), output
    assert re.search(r"^\s+takeovers\s+2\s", result.stdout, re.M), output
    assert dropped.returncode == 0, dropped.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workers", "0"], "--workers: must be at least 1, got 0"),
        (["--lock-ttl", "0.1"], "--lock-ttl: must be 0.5 to 600 seconds, got 0.1"),
        (["--work-ms", "x"], "--work-ms: 'x' is not a whole number"),
    ],
)
def test_demo_rejects_bad_arguments(tmp_path: Path, args: list[str], message: str) -> None:
    result = run_demo(tmp_path, *args)
    assert result.returncode == 2
    assert message in result.stderr


def load_settings_module() -> Any:
    spec = importlib.util.spec_from_file_location(
        "example_demo_settings", EXAMPLE / "demo_site" / "settings.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "postgres://postgres@127.0.0.1:5432/test",
            {
                "ENGINE": "django.db.backends.postgresql",
                "NAME": "test",
                "USER": "postgres",
                "PASSWORD": "",
                "HOST": "127.0.0.1",
                "PORT": "5432",
                "OPTIONS": {},
            },
        ),
        (
            "postgresql://u:p%40ss@db.example/app?sslmode=require&connect_timeout=5",
            {
                "ENGINE": "django.db.backends.postgresql",
                "NAME": "app",
                "USER": "u",
                "PASSWORD": "p@ss",
                "HOST": "db.example",
                "PORT": "",
                "OPTIONS": {"sslmode": "require", "connect_timeout": 5},
            },
        ),
        (
            "mysql://root@127.0.0.1:3306/test",
            {
                "ENGINE": "django.db.backends.mysql",
                "NAME": "test",
                "USER": "root",
                "PASSWORD": "",
                "HOST": "127.0.0.1",
                "PORT": "3306",
                "OPTIONS": {"charset": "utf8mb4"},
            },
        ),
        (
            "mariadb://app:secret@maria:3307/shop",
            {
                "ENGINE": "django.db.backends.mysql",
                "NAME": "shop",
                "USER": "app",
                "PASSWORD": "secret",
                "HOST": "maria",
                "PORT": "3307",
                "OPTIONS": {"charset": "utf8mb4"},
            },
        ),
    ],
)
def test_database_url(url: str, expected: dict[str, Any]) -> None:
    assert load_settings_module().database_from_url(url) == expected


@pytest.mark.parametrize(
    "url", ["sqlite:///x.sqlite3", "postgres://127.0.0.1:5432/", "mysql://h:port/db"]
)
def test_bad_database_url(url: str) -> None:
    from django.core.exceptions import ImproperlyConfigured

    with pytest.raises(ImproperlyConfigured):
        load_settings_module().database_from_url(url)

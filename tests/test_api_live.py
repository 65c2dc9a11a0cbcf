"""The REST API through a real HTTP server: the example project under gunicorn on 127.0.0.1.

One server per module, on a fresh SQLite file (``DEMO_SQLITE_PATH``), with a staff user
whose DRF token the clients send. Clients are separate OS processes speaking plain HTTP
with urllib, so nothing here shares memory, connections or Django with the server.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

import pytest
from django.conf import settings

from tests.support import in_ci, new_id

if TYPE_CHECKING:
    from collections.abc import Iterator
    from multiprocessing.queues import Queue
    from multiprocessing.synchronize import Barrier, Event

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = REPO_ROOT / "example_project"
API = "/api/machine-memory"
PROCESSES = 6
EVENTS_PER_PROCESS = 8
# Ids as Arvo makes them (base64 with / + =), and the characters URLs care about.
MACHINES = ["live/QmFz+ZTY0=/1", "live 50% é", "live/../日本", "live//"]

SETUP = """
from django.contrib.auth import get_user_model
from django.core.management import call_command
from rest_framework.authtoken.models import Token

call_command("migrate", verbosity=0)
User = get_user_model()
staff = User.objects.create_user("api-staff", is_staff=True)
plain = User.objects.create_user("api-plain", is_staff=False)
print("tokens:", Token.objects.create(user=staff).key, Token.objects.create(user=plain).key)
"""


@dataclass(frozen=True)
class Server:
    url: str
    token: str  # a staff user's
    plain_token: str  # a user without is_staff
    log: Path


def example_env(tmp_path: Path, database_url: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    # pytest-django exported tests.settings: the server must run the example's own.
    env.pop("DJANGO_SETTINGS_MODULE", None)
    env.pop("DATABASE_URL", None)
    if database_url is not None:
        env["DATABASE_URL"] = database_url
    env["DEMO_SQLITE_PATH"] = str(tmp_path / "api.sqlite3")
    env["PYTHONPATH"] = str(REPO_ROOT)
    return env


def manage(
    env: dict[str, str], *args: str, must_succeed: bool = True
) -> subprocess.CompletedProcess[str]:
    """``manage.py`` of the example project, in ``env``."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLE / "manage.py"), *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0 or not must_succeed, result.stderr
    return result


@contextlib.contextmanager
def serve(tmp_path: Path, *gunicorn_args: str, database_url: str | None = None) -> Iterator[Server]:
    """The example project under gunicorn, with two users' tokens.

    On a fresh SQLite file, or on the empty database ``database_url`` names.
    """
    env = example_env(tmp_path, database_url)
    setup = manage(env, "shell", "-c", SETUP)
    # The shell may print more (Django 5.2 announces its automatic imports).
    tokens = re.search(r"^tokens: (\w+) (\w+)$", setup.stdout, re.MULTILINE)
    assert tokens is not None, setup.stdout
    token, plain_token = tokens[1], tokens[2]
    log = tmp_path / "gunicorn.log"
    with log.open("w") as log_file:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "--chdir",
                str(EXAMPLE),
                # Port 0: the kernel picks a free port; gunicorn logs which.
                "--bind",
                "127.0.0.1:0",
                *gunicorn_args,
                # A valid id takes up to 6,144 bytes percent-encoded (512 four-byte
                # characters): above gunicorn's default request line of 4,094.
                "--limit-request-line",
                "8190",
                # Not the shared default in $HOME: runs in parallel must not collide.
                "--control-socket",
                str(tmp_path / "gunicorn.ctl"),
                "--access-logfile",
                "-",
                "--access-logformat",
                "%(s)s %(m)s %(U)s",
                "demo_site.wsgi:application",
            ],
            cwd=REPO_ROOT,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        url = wait_for_listening(process, log)
        yield Server(url, token, plain_token, log)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """The URL of an empty PostgreSQL database of this test's own."""
    import psycopg

    server = settings.DATABASES["postgres"]
    name = f"test_mm_typescript_{uuid.uuid4().hex[:12]}"
    admin = {"host": server["HOST"], "port": server["PORT"], "user": server["USER"]}
    try:
        connection = psycopg.connect(dbname=server["NAME"], autocommit=True, **admin)
    except psycopg.OperationalError as exc:
        if in_ci():
            pytest.fail(f"CI is set and PostgreSQL is down: {exc}")
        pytest.skip(f"PostgreSQL unreachable: {exc}")
    with connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgres://{server['USER']}@{server['HOST']}:{server['PORT']}/{name}"
    finally:
        with psycopg.connect(dbname=server["NAME"], autocommit=True, **admin) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serve(tmp_path_factory.mktemp("api_live"), "--workers", "4", "--threads", "4") as live:
        yield live


def wait_for_listening(process: subprocess.Popen[bytes], log: Path) -> str:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        match = re.search(r"Listening at: (http://127\.0\.0\.1:\d+)", log.read_text())
        if match:
            return match[1]
        if process.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"gunicorn did not start:\n{log.read_text()}")


# -- a plain HTTP client (also run in the worker processes) ------------------------------


def request(
    base: str,
    method: str,
    path: str,
    token: str | None,
    payload: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], Any]:
    data = None if payload is None else json.dumps(payload).encode()
    all_headers = {"Accept": "application/json", **(headers or {})}
    if data is not None:
        all_headers["Content-Type"] = "application/json"
    if token is not None:
        all_headers["Authorization"] = f"Token {token}"
    req = urllib.request.Request(base + path, data=data, method=method, headers=all_headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            status, response_headers, raw = response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        status, response_headers, raw = exc.code, dict(exc.headers), exc.read()
    return status, response_headers, json.loads(raw) if raw else None


def segment(machine_id: str) -> str:
    return quote(machine_id, safe="")


def arvo_worker(
    base: str,
    token: str,
    name: str,
    events: int,
    use_locks: bool,
    barrier: Barrier,
    results: Queue[dict[str, Any]],
) -> None:
    """Process events as an Arvo orchestrator does, over HTTP; report what it saw."""
    statuses: dict[str, int] = {}
    rng = random.Random(name)
    done = 0

    def call(method: str, path: str, **kwargs: Any) -> tuple[int, dict[str, str], Any]:
        status, headers, body = request(base, method, path, token, **kwargs)
        key = f"{method} {path.split('/')[3]} {status}"
        statuses[key] = statuses.get(key, 0) + 1
        return status, headers, body

    barrier.wait(timeout=60)
    started = time.monotonic()
    while done < events:
        machine_id = rng.choice(MACHINES)
        state_path = f"{API}/states/{segment(machine_id)}/"
        lock_headers: dict[str, str] = {}
        if use_locks:
            status, _, acquired = call("POST", f"{API}/locks/{segment(machine_id)}/", payload={})
            if status == 409:
                time.sleep(rng.uniform(0.005, 0.03))
                continue
            assert status == 201, acquired
            lock_headers = {"Lock-Token": acquired["lock_token"]}
        try:
            status, headers, state = call("GET", state_path)
            if status == 404:
                document: dict[str, Any] = {"total": 0, "by": {}}
                precondition = {"If-None-Match": "*"}
            else:
                assert status == 200, state
                document = state["data"]
                precondition = {"If-Match": headers["ETag"]}
            document["total"] += 1
            document["by"][name] = document["by"].get(name, 0) + 1
            status, _, written = call(
                "PUT",
                state_path,
                payload={"data": document},
                headers={**precondition, **lock_headers},
            )
            if status in (200, 201):
                done += 1
            else:
                # Only the compare-and-set may lose, and only without locks.
                assert not use_locks and status == 412, (status, written)
        finally:
            if use_locks:
                status, _, _ = call(
                    "DELETE", f"{API}/locks/{segment(machine_id)}/", headers=lock_headers
                )
                assert status == 204
    results.put(
        {
            "name": name,
            "pid": os.getpid(),
            "statuses": statuses,
            "seconds": time.monotonic() - started,
        }
    )


def run_workers(server: Server, prefix: str, use_locks: bool) -> list[dict[str, Any]]:
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(PROCESSES)
    results: Queue[dict[str, Any]] = context.Queue()
    processes = [
        context.Process(
            target=arvo_worker,
            args=(
                server.url,
                server.token,
                f"{prefix}{n}",
                EVENTS_PER_PROCESS,
                use_locks,
                barrier,
                results,
            ),
        )
        for n in range(PROCESSES)
    ]
    for process in processes:
        process.start()
    reports = [results.get(timeout=240) for _ in processes]
    for process in processes:
        process.join(timeout=30)
        assert process.exitcode == 0
    return reports


def count(reports: list[dict[str, Any]], pattern: str) -> int:
    return sum(
        number
        for report in reports
        for key, number in report["statuses"].items()
        if re.fullmatch(pattern, key)
    )


def final_states(server: Server) -> dict[str, Any]:
    states = {}
    for machine_id in MACHINES:
        status, headers, state = request(
            server.url, "GET", f"{API}/states/{segment(machine_id)}/", server.token
        )
        if status == 404:
            continue
        assert status == 200
        assert state["id"] == machine_id
        assert headers["ETag"] == f'"{state["version"]}"'
        states[machine_id] = state
    return states


def reset(server: Server) -> None:
    for machine_id in MACHINES:
        request(server.url, "DELETE", f"{API}/states/{segment(machine_id)}/", server.token)


@pytest.mark.parametrize("use_locks", [True, False], ids=["locks", "etags-only"])
def test_arvo_cycle_from_many_processes(server: Server, use_locks: bool) -> None:
    reset(server)
    started = time.monotonic()
    reports = run_workers(server, "locks-" if use_locks else "cas-", use_locks)
    elapsed = time.monotonic() - started
    assert len({report["pid"] for report in reports}) == PROCESSES >= 4

    states = final_states(server)
    events = PROCESSES * EVENTS_PER_PROCESS
    # Exact counts: every acknowledged write is in the final state, none twice.
    assert sum(state["data"]["total"] for state in states.values()) == events
    for state in states.values():
        assert sum(state["data"]["by"].values()) == state["data"]["total"]
        assert state["version"] == state["data"]["total"]
    for report in reports:
        by_worker = sum(state["data"]["by"].get(report["name"], 0) for state in states.values())
        assert by_worker == EVENTS_PER_PROCESS
    assert count(reports, r".* 5\d\d") == 0
    if use_locks:
        # Under the lock nothing races: no stale ETag, no lost lock.
        assert count(reports, r"PUT states 412") == count(reports, r"PUT states 409") == 0
    requests = sum(sum(report["statuses"].values()) for report in reports)
    print(
        f"\n{'locks' if use_locks else 'etags-only'}: {PROCESSES} processes, {events} events, "
        f"{requests} requests in {elapsed:.2f} s ({requests / elapsed:.0f} req/s); "
        f"lock denials {count(reports, r'POST locks 409')}, "
        f"stale ETags {count(reports, r'PUT states 412')}, 5xx 0"
    )


def test_ids_with_slashes_reach_the_server_intact(server: Server) -> None:
    # quote(id, safe="") arrives decoded once in PATH_INFO: "/" restored, "%41" left alone.
    # 512 three-byte characters make a 4.6 kB request line (see --limit-request-line).
    ids = ["a/b", "/", "//x//", "x%2Fy", "%41", "sp ace+=", "é/..", "tab\tnew\nline", "日" * 512]
    for machine_id in [*ids, "..", "."]:
        path = f"{API}/states/{segment(machine_id)}/"
        if machine_id in (".", ".."):
            path = f"{API}/states/{machine_id.replace('.', '%2E')}/"
        status, _, written = request(
            server.url, "PUT", path, server.token, {"data": {"id": machine_id}}
        )
        assert status == 201, written
        assert written["id"] == machine_id
        status, _, state = request(server.url, "GET", path, server.token)
        assert (status, state["id"], state["data"]) == (200, machine_id, {"id": machine_id})


def test_authentication_over_http(server: Server) -> None:
    status, headers, error = request(server.url, "GET", f"{API}/states/", None)
    assert (status, error["code"]) == (401, "not_authenticated")
    assert headers["WWW-Authenticate"] == "Token"
    status, _, error = request(server.url, "GET", f"{API}/states/", server.plain_token)
    assert (status, error["code"]) == (403, "permission_denied")
    status, _, error = request(server.url, "GET", f"{API}/states/", "not-a-token")
    assert (status, error["code"]) == (401, "authentication_failed")


class AssetLinks(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href") and value:
                self.links.append(value)


def test_swagger_ui_is_served_without_a_cdn(server: Server) -> None:
    with urllib.request.urlopen(f"{server.url}/api/docs/", timeout=30) as response:
        html = response.read().decode()
    parser = AssetLinks()
    parser.feed(html)
    assets = [link for link in parser.links if not link.startswith("#")]
    assert any(link.endswith("swagger-ui-bundle.js") for link in assets), assets
    for link in assets:
        assert link.startswith("/"), f"{link} is not served by this project"
        with urllib.request.urlopen(server.url + link, timeout=30) as response:
            assert response.status == 200, link
    assert "http://" not in html.replace(server.url, "") and "https://" not in html


def test_schemathesis_finds_no_server_error(server: Server, tmp_path: Path) -> None:
    cli = Path(sys.executable).parent / "schemathesis"
    checks = [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
    ]
    result = subprocess.run(
        [
            str(cli),
            "run",
            f"{server.url}/api/schema/",
            "--header",
            f"Authorization: Token {server.token}",
            "--checks",
            ",".join(checks),
            "--phases",
            "examples,coverage,fuzzing",
            "--max-examples",
            os.environ.get("MM_SCHEMATHESIS_EXAMPLES", "25"),
            # One worker: Python 3.11's ast.parse is not thread-safe, and Hypothesis
            # parses lambdas while it builds strategies.
            "--workers",
            "1",
            "--request-timeout",
            "20",
            "--generation-database",
            "none",
            "--no-color",
            "--report",
            "junit",
            "--report-junit-path",
            str(tmp_path / "schemathesis.xml"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    print("\n" + "\n".join(output.strip().splitlines()[-12:]))
    assert re.search(r"\d+ passed", output), output
    log = server.log.read_text()
    assert not re.search(r"^5\d\d ", log, re.MULTILINE), "the server answered 5xx"


def test_the_example_runs_on_plain_django(tmp_path: Path) -> None:
    # Without REST framework installed the example project leaves the API out, and runs.
    code = (
        "import sys; sys.modules['rest_framework'] = None; sys.path.insert(0, 'example_project')\n"
        "from django.core.management import execute_from_command_line\n"
        "execute_from_command_line(['manage.py', 'check'])\n"
        "from django.conf import settings\n"
        "from django.urls import get_resolver\n"
        "assert 'rest_framework' not in settings.INSTALLED_APPS\n"
        "assert not any('api/' in str(p.pattern) for p in get_resolver().url_patterns)\n"
    )
    env = {**example_env(tmp_path), "DJANGO_SETTINGS_MODULE": "demo_site.settings"}
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "no issues" in result.stdout


# -- a refused lock does not hold a server worker ------------------------------------------

SPINNERS = 4


def spin_on_lock(
    base: str, token: str, machine_id: str, ready: Event, stop: Event, results: Queue[Any]
) -> None:
    """Ask for a held lock again and again, as a client redelivering at once would."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    path = f"{API}/lock/?{urlencode({'id': machine_id})}"
    while not stop.is_set():
        started = time.monotonic()
        status, _, _ = request(base, "POST", path, token, {})
        latencies.append(time.monotonic() - started)
        statuses[status] = statuses.get(status, 0) + 1
        ready.set()
    results.put({"latencies": latencies, "statuses": statuses})


def test_a_client_spinning_on_a_held_lock_does_not_stall_other_clients(tmp_path: Path) -> None:
    # Fewer server threads than spinning clients: a refusal that slept on the server (lock()'s
    # retries: 0.05 + 0.1 + 0.2 s with the example's settings) would hold a thread each,
    # and every other call would queue behind them.
    with serve(tmp_path, "--workers", "1", "--threads", "2") as live:
        held_id = new_id("held")
        status, _, _ = request(
            live.url, "POST", f"{API}/locks/{segment(held_id)}/", live.token, {"ttl": 60}
        )
        assert status == 201
        other_id = new_id("other")
        other_path = f"{API}/states/{segment(other_id)}/"
        status, _, _ = request(
            live.url, "PUT", other_path, live.token, {"data": {"n": 0}}, {"If-None-Match": "*"}
        )
        assert status == 201

        context = multiprocessing.get_context("spawn")
        results: Queue[Any] = context.Queue()
        stop = context.Event()
        ready = [context.Event() for _ in range(SPINNERS)]
        spinners = [
            context.Process(
                target=spin_on_lock,
                args=(live.url, live.token, held_id, ready[n], stop, results),
            )
            for n in range(SPINNERS)
        ]
        for spinner in spinners:
            spinner.start()
        try:
            # Every spinner has had an answer: from here on they all compete.
            assert all(event.wait(timeout=60) for event in ready)
            others: list[float] = []
            spun = time.monotonic()
            for n in range(20):
                started = time.monotonic()
                status, headers, _ = request(live.url, "GET", other_path, live.token)
                assert status == 200
                status, _, _ = request(
                    live.url,
                    "PUT",
                    other_path,
                    live.token,
                    {"data": {"n": n + 1}},
                    {"If-Match": headers["ETag"]},
                )
                assert status == 200
                others.append(time.monotonic() - started)
            # At least a second of spinning, so the refusals can be counted.
            time.sleep(max(0.0, 1.0 - (time.monotonic() - spun)))
        finally:
            stop.set()
        reports = [results.get(timeout=60) for _ in spinners]
        seconds = time.monotonic() - spun
        for spinner in spinners:
            spinner.join(timeout=30)
            assert spinner.exitcode == 0

    refusals = [latency for report in reports for latency in report["latencies"]]
    # Only refusals: the holder kept its lock all along.
    assert all(set(report["statuses"]) == {409} for report in reports), reports
    # Refusals that slept 0.35 s each would come at most 3 a second from each spinner.
    assert len(refusals) > 6 * SPINNERS * seconds, (len(refusals), seconds)
    # A refusal is answered without sleeping: below the 0.35 s that the retries would
    # sleep. A median, so that one slow scheduling on a busy machine does not decide.
    assert statistics.median(refusals) < 0.2, statistics.median(refusals)
    # Another client's read + write went on meanwhile: with refusals that slept, each of
    # its two requests would wait for a thread behind the spinners (0.35 s or more).
    assert statistics.median(others) < 0.25, others


# -- machine_memory_bench --http ---------------------------------------------------------------


def bench_over_http(
    live: Server, env: dict[str, str], *more: str
) -> subprocess.CompletedProcess[str]:
    return manage(
        env,
        "machine_memory_bench",
        "--http",
        f"{live.url}{API}/",
        "--token",
        live.token,
        "--cycles",
        "120",
        "--machines",
        "7",
        "--runs",
        "1",
        *more,
        must_succeed=False,
    )


def test_bench_runs_the_cycle_over_http_next_to_the_in_process_one(server: Server) -> None:
    env = example_env(server.log.parent)  # the server's own database file
    result = bench_over_http(server, env, "--workers", "3", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["http_clients"] == 3
    # Every HTTP event was counted in the database (the command checks the states).
    assert report["http"]["cycles"] == 120
    assert report["memory"]["cycles"] == 120
    assert set(report["http"]["latency_us"]) == {"lock", "write", "unlock"}
    assert report["http_ratio"] == pytest.approx(
        report["http"]["cycles_per_second"] / report["memory"]["cycles_per_second"], abs=0.001
    )  # rounded to three places
    text = bench_over_http(server, env)
    assert text.returncode == 0, text.stderr
    assert "ratio HTTP / in-process" in text.stdout


def test_bench_over_http_refuses_a_server_on_another_database(
    server: Server, tmp_path: Path
) -> None:
    env = example_env(tmp_path)  # a database file of its own, not the server's
    manage(env, "migrate", "-v0")
    result = bench_over_http(server, env)
    assert result.returncode != 0
    assert "another database" in result.stderr


# -- persistent database connections ---------------------------------------------------------


def test_a_dropped_database_connection_is_replaced_before_the_next_request(
    postgres_url: str, tmp_path: Path
) -> None:
    # The example keeps connections (CONN_MAX_AGE) with CONN_HEALTH_CHECKS: when the server
    # drops one between requests, the next request gets a new one instead of a 503.
    import psycopg

    with serve(tmp_path, "--workers", "1", "--threads", "1", database_url=postgres_url) as live:
        machine_id = new_id("kept")
        path = f"{API}/states/{segment(machine_id)}/"
        status, _, _ = request(
            live.url, "PUT", path, live.token, {"data": {"n": 1}}, {"If-None-Match": "*"}
        )
        assert status == 201
        database = postgres_url.rsplit("/", 1)[1]
        server = settings.DATABASES["postgres"]
        with psycopg.connect(
            host=server["HOST"],
            port=server["PORT"],
            user=server["USER"],
            dbname=database,
            autocommit=True,
        ) as admin:
            ended = admin.execute(
                "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()) AS t"
            ).fetchone()
        assert ended is not None and ended[0] >= 1  # the worker's kept connection
        # A write has no retries of its own: only the health check can save it.
        status, _, written = request(
            live.url, "PUT", path, live.token, {"data": {"n": 2}}, {"If-Match": '"1"'}
        )
        assert status == 200, written


# -- the docs' walkthrough, run as written ---------------------------------------------------


def test_the_rest_walkthrough_runs_as_written(tmp_path: Path) -> None:
    """docs/rest-api.md's curl walkthrough, by bash, against the example project: it gets
    its own API token and lock token. Only the server's address and this test's Python (the
    one with Django) are put in. Every step must work for the last one to find version 3 and
    delete the state."""
    text = (REPO_ROOT / "docs" / "rest-api.md").read_text()
    script = text.split("A walk through them with curl", 1)[1]
    script = script.split("```sh\n", 1)[1].split("```", 1)[0]
    assert "API=http://127.0.0.1:8000/api/machine-memory" in script
    with serve(tmp_path, "--workers", "1", "--threads", "4") as live:
        script = script.replace("http://127.0.0.1:8000", live.url)
        script = script.replace(
            "python3 example_project/manage.py", f"{sys.executable} example_project/manage.py"
        )
        env = example_env(tmp_path)
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        output = result.stdout + result.stderr
        assert result.returncode == 0, output
        compact = output.replace(" ", "")
        # Create, compare-and-set, then the lock holder's overwrite: versions 1, 2 and 3.
        for version in (1, 2, 3):
            assert f'"version":{version}' in compact, output
        assert "order/42" in output  # the listing
        status, _, _ = request(
            live.url, "GET", "/api/machine-memory/state/?id=order/42", live.token
        )
        assert status == 404, output  # the walkthrough's last step deleted version 3

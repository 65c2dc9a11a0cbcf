"""The example project, run as a user runs it: ``manage.py demo`` in a subprocess.

No database fixtures: the demo gets a fresh SQLite file of its own (``DEMO_SQLITE_PATH``),
migrates it, and spawns real worker processes against it.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = REPO_ROOT / "example_project"


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


@pytest.mark.slow
@pytest.mark.parametrize("mode", [[], ["--no-lock"]], ids=["locks", "cas-only"])
def test_demo_loses_no_update(tmp_path: Path, mode: list[str]) -> None:
    result = run_demo(tmp_path, "--machines", "3", "--events", "3", "--workers", "4", *mode)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert re.search(r"^\s*lost updates \(verified\)\s+0$", result.stdout, re.MULTILINE), output
    assert "9/9 events processed" in result.stdout, output
    assert " 0 lost updates," in result.stdout.splitlines()[-1], output
    assert (tmp_path / "demo.sqlite3").exists()


@pytest.mark.slow
def test_demo_through_a_celery_worker_loses_no_update(tmp_path: Path) -> None:
    import redis

    broker = "redis://127.0.0.1:6379/10"
    redis.Redis.from_url(broker).flushdb()
    result = run_demo(
        tmp_path,
        *("--celery", "--machines", "3", "--events", "4", "--workers", "3"),
        env={"DEMO_CELERY_BROKER_URL": broker},
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "a Celery worker, session() per event" in result.stdout, output
    assert re.search(r"^\s*lost updates \(verified\)\s+0$", result.stdout, re.MULTILINE), output
    assert "12/12 events processed" in result.stdout, output


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
    assert re.search(r"^\s*lost updates \(verified\)\s+0$", result.stdout, re.MULTILINE), output
    assert dropped.returncode == 0, dropped.stderr


def test_demo_rejects_bad_arguments(tmp_path: Path) -> None:
    result = run_demo(tmp_path, "--workers", "0")
    assert result.returncode == 2
    assert "--workers: must be at least 1, got 0" in result.stderr


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

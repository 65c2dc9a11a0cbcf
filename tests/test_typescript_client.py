"""The TypeScript client (clients/typescript) against the real API, with Node's test runner.

The example project runs under gunicorn on a PostgreSQL database made for this run and
dropped after it; ``npm ci``, ``tsc`` and ``node --test`` then run the client's own tests
(several node processes contending on the same ids among them) against it, in a copy of
the client made for the test: two runs at once (CI runs the suite under two Django
versions side by side) would otherwise both rebuild clients/typescript/node_modules.
Without Node the test is skipped, except under CI, where that is a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import TYPE_CHECKING

import pytest

from tests.support import in_ci
from tests.test_api_live import API, REPO_ROOT, postgres_url, serve

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.slow

__all__ = ["postgres_url"]  # the fixture, from the live API tests

CLIENT = REPO_ROOT / "clients" / "typescript"


def node_tools() -> tuple[str, str]:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        reason = "Node.js and npm are needed for the TypeScript client's tests"
        if in_ci():
            pytest.fail(f"CI is set: {reason}.")
        pytest.skip(reason)
    return node, npm


def run(
    command: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 300
) -> str:
    result = subprocess.run(
        command,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{output}"
    return output


def test_the_typescript_client_passes_its_tests_against_the_api(
    postgres_url: str, tmp_path: Path
) -> None:
    _, npm = node_tools()
    client = tmp_path / "typescript"
    shutil.copytree(CLIENT, client, ignore=shutil.ignore_patterns("node_modules", "dist"))
    run([npm, "ci", "--no-audit", "--no-fund"], client)
    run([npm, "run", "build"], client)
    # Keep-alive longer than Node's fetch keeps an idle connection (4 s): shorter, and a
    # request racing the server's close fails (docs/rest-api.md#serving-the-api).
    args = ["--workers", "2", "--threads", "8", "--keep-alive", "30"]
    with serve(tmp_path, *args, database_url=postgres_url) as live:
        env = {**os.environ, "MM_API_URL": f"{live.url}{API}/", "MM_API_TOKEN": live.token}
        output = run([npm, "test"], client, env=env, timeout=600)
    print("\n" + "\n".join(output.strip().splitlines()[-10:]))
    # Node's runner closes with its counts: something ran, and nothing failed.
    assert "# fail 0" in output, output
    assert "# pass 0" not in output, output

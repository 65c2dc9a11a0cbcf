"""``manage.py demo --celery``: the events through a real Celery worker (workflows.tasks).

The command starts ``celery worker`` in a subprocess on a queue of its own, sends every
order's own events to it (created, items added, submitted: ``machine_task`` has no way to
emit the events that start the child workflows after its write), and waits until every
order has applied its events. What the broker did (redeliveries of events whose lock was
held, events dropped on a lost lock) is read from the worker's log.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from django.core.management.base import CommandError

if TYPE_CHECKING:
    from workflows.broker import Counts
    from workflows.worker import WorkerOptions
    from workflows.workflow import Event

EXAMPLE_DIR = Path(__file__).resolve().parent.parent
# Give up when no machine moved on for this long.
STALL_TIMEOUT = 60.0


def run_celery_worker(events: list[Event], workers: int, options: WorkerOptions) -> Counts:
    """Handle ``events`` with a Celery worker of ``workers`` processes; what happened."""
    from workflows.broker import Counts

    try:
        from workflows.tasks import apply_event
    except ImportError as exc:
        raise CommandError(
            f"--celery needs Celery ({exc}): pip install -e '.[celery]' (and a Redis server)."
        ) from exc
    queue = f"demo-{os.getpid()}-{time.monotonic_ns()}"
    with tempfile.TemporaryDirectory(prefix="machine-memory-demo-") as directory:
        log = Path(directory) / "worker.log"
        worker = start(queue, workers, options, log)
        try:
            started = time.monotonic()
            for event in events:
                body = {**event.as_dict(), "work_seconds": options.work_seconds}
                apply_event.apply_async((body,), queue=queue)
            processed = wait_for(events, worker, log)
            elapsed = time.monotonic() - started
        finally:
            stop(worker)
        output = log.read_text(errors="replace")
    retries = output.count("retry: Retry in")
    return Counts(
        handled=processed,
        deliveries=processed + retries,
        lock_denials=retries,
        redeliveries=retries,
        fenced_writes=output.count("Dropped an event"),
        workers_started=workers,
        elapsed=elapsed,
    )


def start(queue: str, workers: int, options: WorkerOptions, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": options.settings_module}
    command = [
        sys.executable,
        "-m",
        "celery",
        "--app",
        "workflows.tasks",
        "worker",
        "--pool",
        "prefork",
        "--concurrency",
        str(workers),
        "--queues",
        queue,
        "--hostname",
        f"{queue}@%h",
        "--loglevel",
        "INFO",
        "--without-mingle",
        "--without-gossip",
        "--without-heartbeat",
    ]
    with log.open("wb") as out:
        return subprocess.Popen(
            command, cwd=EXAMPLE_DIR, env=env, stdout=out, stderr=subprocess.STDOUT
        )


def wait_for(events: list[Event], worker: subprocess.Popen[bytes], log: Path) -> int:
    """Poll the orders until each has applied its events; the events applied."""
    from machine_memory import MachineMemory

    memory = MachineMemory()
    expected = Counter(event.machine_id for event in events)
    counted: dict[str, int] = dict.fromkeys(expected, 0)
    moved = time.monotonic()
    try:
        while any(counted[m] < n for m, n in expected.items()):
            if worker.poll() is not None:
                raise CommandError(
                    f"The Celery worker exited with code {worker.returncode}:\n"
                    + log.read_text(errors="replace")[-3000:]
                )
            for machine_id, total in expected.items():
                if counted[machine_id] < total:
                    state = memory.read(machine_id)
                    now = 0 if state is None else len(state["applied"])
                    if now != counted[machine_id]:
                        counted[machine_id], moved = now, time.monotonic()
            if time.monotonic() - moved > STALL_TIMEOUT:
                raise CommandError(
                    f"No machine moved on for {STALL_TIMEOUT:.0f} s; the worker's log ends:\n"
                    + log.read_text(errors="replace")[-3000:]
                )
            time.sleep(0.05)
    finally:
        memory.close()
    return sum(counted.values())


def stop(worker: subprocess.Popen[bytes]) -> None:
    """A warm shutdown (running tasks finish), then a kill if it takes too long."""
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()

"""A worker process of the demo: takes events off a shared queue and runs the Arvo cycle.

Started with the "spawn" start method, so a worker shares nothing with the command
process but the two queues: it sets Django up itself and opens its own connection through
its own ``MachineMemory``, as separate service instances would.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import random
import socket
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from machine_memory.exceptions import (
    LockError,
    LockLost,
    ReadError,
    WriteConflict,
    WriteError,
)
from workflows.workflow import Event, next_state

if TYPE_CHECKING:
    from multiprocessing.queues import Queue

    from machine_memory.memory import MachineMemory

logger = logging.getLogger("workflows.worker")

# A redelivered event waits a little, as a broker's redelivery delay would, so the worker
# that holds the machine's lock has time to finish; the jitter keeps retries apart.
REDELIVERY_DELAY = (0.005, 0.025)


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    settings_module: str
    use_lock: bool
    lock_ttl: float
    log_level: int
    work_seconds: float  # time the handler "works" between read and write


@dataclass(slots=True)
class WorkerStats:
    processed: int = 0
    lock_denials: int = 0  # lock() returned False (after the memory's own quick retries)
    write_conflicts: int = 0  # WriteConflict, LockLost included
    errors: int = 0  # ReadError, WriteError, LockError: storage failures, nothing changed
    retries: int = 0  # events put back on the queue, whatever the reason


def handle(memory: MachineMemory, event: Event, stats: WorkerStats, options: WorkerOptions) -> bool:
    """One delivery of ``event``: True once applied, False when it must be redelivered.

    The order of calls is Arvo's: lock, read, compute, write(new, prev), unlock in a
    finally; no unlock when lock() was denied or failed.
    """
    machine_id = event.machine_id
    if options.use_lock:
        try:
            if not memory.lock(machine_id):
                stats.lock_denials += 1
                logger.info("Lock on %s denied; event %d goes back", machine_id, event.number)
                return False
        except LockError as exc:
            stats.errors += 1
            logger.warning("lock(%s) failed: %s", machine_id, exc)
            return False
    try:
        prev = memory.read(machine_id)
        # Stands for the handler's own work (calling services, emitting events): the time a
        # real orchestrator holds the lock, and the window in which another worker could
        # write the same machine if nothing stopped it.
        time.sleep(options.work_seconds)
        memory.write(machine_id, next_state(prev, event, memory.owner), prev)
    except LockLost as exc:
        # Our lock expired and another worker took it: the fence refused our write.
        stats.write_conflicts += 1
        logger.warning("%s", exc)
        return False
    except WriteConflict as exc:
        stats.write_conflicts += 1
        logger.info("%s", exc)
        return False
    except (ReadError, WriteError) as exc:
        stats.errors += 1
        logger.warning("%s", exc)
        return False
    finally:
        if options.use_lock:
            memory.unlock(machine_id)
    stats.processed += 1
    logger.debug("%s applied event %d", machine_id, event.number)
    return True


def next_event(tasks: Queue[Event | None]) -> Event | None:
    """The next event; None when the command says stop, or is gone."""
    parent = multiprocessing.parent_process()
    while True:
        # A command killed without a chance to send None must not leave workers behind,
        # still working through its queue.
        if parent is not None and not parent.is_alive():
            return None
        try:
            return tasks.get(timeout=1.0)
        except queue.Empty:
            pass


def run_worker(
    number: int,
    options: WorkerOptions,
    tasks: Queue[Event | None],
    results: Queue[tuple[Any, ...]],
) -> None:
    """Process entry point: handle events until the command sends ``None``."""
    os.environ["DJANGO_SETTINGS_MODULE"] = options.settings_module
    import django

    django.setup()
    for name in ("machine_memory", "workflows"):
        logging.getLogger(name).setLevel(options.log_level)

    from django.db import connections

    from machine_memory import MachineMemory

    # An owner name that says which worker holds a lock, for the admin's lock list.
    owner = f"demo-worker-{number}@{socket.gethostname()}:{os.getpid()}"
    memory = MachineMemory(lock_ttl=options.lock_ttl, owner=owner)
    # Connect before reporting ready, so the command's clock does not time start-up.
    connections[memory.using].ensure_connection()
    results.put(("ready", number))

    stats = WorkerStats()
    try:
        while (event := next_event(tasks)) is not None:
            if handle(memory, event, stats, options):
                results.put(("done", event.machine_id, event.number))
            else:
                stats.retries += 1
                time.sleep(random.uniform(*REDELIVERY_DELAY))
                tasks.put(event)
    finally:
        memory.close()
        connections.close_all()
    results.put(("stats", number, asdict(stats)))

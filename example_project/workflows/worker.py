"""A worker process of the demo: handles the events the broker hands it, one at a time.

Started with the "spawn" start method, so a worker shares nothing with the command
process but its two pipes: it sets Django up itself and opens its own connection through
its own ``MachineMemory``, as separate service instances would. Pipes rather than one
shared queue: a worker killed in the middle of a ``Queue.put`` could leave the queue's lock
held and every other worker stuck; a pipe of its own dies with it.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from machine_memory.exceptions import (
    LockError,
    LockLost,
    ReadError,
    WriteConflict,
    WriteError,
    WriteOutcomeUnknown,
)
from workflows.workflow import Event, apply

if TYPE_CHECKING:
    from collections.abc import Callable
    from multiprocessing.connection import Connection

    from machine_memory.memory import MachineMemory

logger = logging.getLogger("workflows.worker")


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    settings_module: str
    use_lock: bool
    lock_ttl: float
    log_level: int
    work_seconds: float  # time the handler "works" between read and write, on average
    database: str = "default"  # the alias
    # The alias's NAME as the command sees it, which need not be what the settings say in a
    # fresh process (a test run's test database).
    database_name: str = ""


# What a worker says back for each event: ("ack", outcome, emitted events as dicts) or
# ("nack", reason, detail). Outcomes: "applied", "duplicate" (it had landed already).
# Reasons: "denied" (lock held), "conflict" (WriteConflict), "fenced" (LockLost),
# "error" (ReadError, WriteError, LockError, WriteOutcomeUnknown).
Reply = tuple[Any, ...]


def handle(
    memory: MachineMemory,
    event: Event,
    options: WorkerOptions,
    working: Callable[[int | None, bool], None],
) -> Reply:
    """One delivery of ``event``: Arvo's cycle, lock, read, compute, write(new, prev), and
    unlock in a finally (no unlock when lock() was denied or failed). ``working(token,
    writes)`` is called between the read and the handler's work."""
    machine_id = event.machine_id
    if options.use_lock:
        try:
            if not memory.lock(machine_id):
                logger.info("Lock on %s denied; %s goes back", machine_id, event.key)
                return ("nack", "denied", "")
        except LockError as exc:
            logger.warning("lock(%s) failed: %s", machine_id, exc)
            return ("nack", "error", str(exc))
    try:
        prev = memory.read(machine_id)
        step = apply(prev, event, memory.owner)
        working(memory.held_token(machine_id), step.state is not None)
        if step.state is not None:
            # Stands for the handler's own work (calling services): the time a real worker
            # holds the lock, and the window in which another could write the same machine.
            time.sleep(options.work_seconds * random.uniform(0.5, 1.5))
            memory.write(machine_id, step.state, prev)
    except LockLost as exc:
        # Our lock expired and another worker took it: the fence refused our write. INFO:
        # the broker reports it (a WARNING here would tear through the live view).
        logger.info("%s", exc)
        return ("nack", "fenced", str(exc))
    except WriteConflict as exc:
        logger.info("%s", exc)
        return ("nack", "conflict", str(exc))
    except (ReadError, WriteError, WriteOutcomeUnknown) as exc:
        # WriteOutcomeUnknown too: the redelivery finds the event in "applied" if it landed.
        logger.warning("%s", exc)
        return ("nack", "error", str(exc))
    finally:
        if options.use_lock:
            memory.unlock(machine_id)
    logger.debug("%s applied %s", machine_id, event.key)
    outcome = "applied" if step.state is not None else "duplicate"
    return ("ack", outcome, [emitted.as_dict() for emitted in step.emits])


def run_worker(number: int, options: WorkerOptions, inbox: Connection, outbox: Connection) -> None:
    """Process entry point: handle events until the broker sends ``None`` or goes away."""
    os.environ["DJANGO_SETTINGS_MODULE"] = options.settings_module
    import django

    django.setup()
    for name in ("machine_memory", "workflows"):
        logging.getLogger(name).setLevel(options.log_level)

    from django.db import connections

    from machine_memory import MachineMemory

    if options.database_name:
        connections[options.database].settings_dict["NAME"] = options.database_name
    # An owner name that says which worker holds a lock, for the admin's lock list.
    owner = f"demo-worker-{number}@{socket.gethostname()}:{os.getpid()}"
    # No retries inside lock(): a denied event goes back to the broker, which redelivers it
    # later, and the worker takes the next event meanwhile.
    memory = MachineMemory(
        using=options.database, lock_ttl=options.lock_ttl, owner=owner, lock_retries=0
    )
    # Connect before reporting ready, so the command's clock does not time start-up.
    connections[memory.using].ensure_connection()
    outbox.send(("ready", owner, os.getpid()))
    try:
        while True:
            try:
                event: Event | None = inbox.recv()
            except EOFError:  # the command is gone
                break
            if event is None:
                break

            def working(token: int | None, writes: bool, event_id: str = event.id) -> None:
                outbox.send(("working", event_id, token, writes))

            outbox.send((*handle(memory, event, options, working), event.id))
    finally:
        memory.close()
        connections.close_all()

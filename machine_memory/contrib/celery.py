"""Celery tasks that run one Arvo cycle per event: ``machine_task`` (docs/workers.md).

::

    from machine_memory.contrib.celery import machine_task

    @machine_task(app, key="workflow_id")
    def handle(state: dict | None, event: dict) -> dict | None:
        ...  # the new state, or None to leave the state as it is

    handle.delay({"workflow_id": "order-42", "type": "paid"})

Each run takes the machine's lock and reads its state in one round trip
(``MachineMemory.session``), calls the handler, and writes the new state and releases the
lock in one more. What each outcome does with the event:

- the lock is held by another worker: the task is retried (redelivered) after a short,
  jittered countdown that grows with each retry;
- ``LockLost`` (the lock expired and another worker took it over): the event is dropped
  and logged; nothing was written;
- ``WriteConflict`` (someone wrote without the lock): retried, on a fresh read;
- ``ReadError``, ``LockError``, ``WriteError`` (storage failed; nothing was written):
  retried;
- ``WriteOutcomeUnknown`` (the connection died and the write may have landed): the state is
  read again; if it holds what the handler returned, the event is done, otherwise it is
  retried, and the handler then runs again on the state as it is.
"""

from __future__ import annotations

import functools
import logging
import random
from typing import TYPE_CHECKING, Any

from machine_memory.exceptions import (
    LockError,
    LockLost,
    LockNotAcquired,
    ReadError,
    WriteConflict,
    WriteError,
    WriteOutcomeUnknown,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from celery import Celery, Task

    from machine_memory.memory import MachineMemory

    Handler = Callable[[dict[str, Any] | None, Any], dict[str, Any] | None]

logger = logging.getLogger("machine_memory.celery")

# The countdown before the n-th retry: RETRY_BACKOFF * 2**n seconds, at most RETRY_CAP,
# scaled by a random factor in [0.5, 1.5) so that workers denied together come back apart.
RETRY_BACKOFF = 0.05
RETRY_CAP = 5.0
MAX_RETRIES = 50

# What run_cycle() reports, as the task's result.
WRITTEN, UNCHANGED, DROPPED = "written", "unchanged", "dropped"


class Redeliver(Exception):
    """The event must be handled again later; the cause says why."""


def countdown(retries: int, backoff: float = RETRY_BACKOFF, cap: float = RETRY_CAP) -> float:
    """Seconds to wait before retry number ``retries`` (0 for the first)."""
    base: float = min(cap, backoff * 2 ** min(retries, 30))
    return base * random.uniform(0.5, 1.5)


def run_cycle(
    memory: MachineMemory,
    machine_id: str,
    event: Any,
    handler: Handler,
    *,
    ttl: float | None = None,
    metadata: dict[str, Any] | None = None,
) -> str:
    """One event's cycle: lock + read, ``handler(state, event)``, write + release.

    Returns ``WRITTEN``, ``UNCHANGED`` (the handler returned None) or ``DROPPED``
    (``LockLost``); raises ``Redeliver`` when the event must be handled again. Framework
    independent: ``machine_task`` and the ``django.tasks`` wrapper are built on it.
    """
    try:
        with memory.session(machine_id, ttl) as s:
            new = handler(s.state, event)
            if new is None:
                return UNCHANGED
            try:
                s.write(new, metadata)
            except WriteOutcomeUnknown as unknown:
                if _stored(memory, machine_id, new):
                    logger.info("Write to %r landed although its connection failed.", machine_id)
                    return WRITTEN
                raise Redeliver(
                    f"Writing {machine_id!r} may not have landed ({unknown}); handling the "
                    "event again on the state as it is."
                ) from unknown
    except LockNotAcquired as exc:
        raise Redeliver(f"Machine {machine_id!r} is locked by another worker.") from exc
    except LockLost:
        logger.warning(
            "Dropped an event for %r: the lock expired and another worker took it over "
            "before the write; nothing was written.",
            machine_id,
        )
        return DROPPED
    except (WriteConflict, ReadError, LockError, WriteError) as exc:
        raise Redeliver(f"Handling the event for {machine_id!r} failed: {exc}") from exc
    return WRITTEN


def _stored(memory: MachineMemory, machine_id: str, new: dict[str, Any]) -> bool:
    try:
        return memory.read(machine_id) == new
    except ReadError:
        return False


def machine_task(
    app: Celery,
    *,
    key: str | Callable[[Any], str],
    memory: Callable[[], MachineMemory] | None = None,
    ttl: float | None = None,
    max_retries: int = MAX_RETRIES,
    retry_backoff: float = RETRY_BACKOFF,
    **task_options: Any,
) -> Callable[[Handler], Task[Any, str]]:
    """Decorate ``handler(state, event) -> new state | None`` into a Celery task of ``app``.

    ``key``: the event's item holding the machine id, or a function of the event that
    returns it. ``memory``: makes the ``MachineMemory`` for each run (default:
    ``MachineMemory()`` from settings). ``ttl``: the lock's TTL (default LOCK_TTL); keep
    it above the handler's longest run. Other keyword arguments go to ``app.task``; by
    default tasks are acknowledged late (``acks_late``, ``reject_on_worker_lost``), so an
    event whose worker died is delivered again.
    """
    machine_id_of = key if callable(key) else _item(key)
    options = {"acks_late": True, "reject_on_worker_lost": True, **task_options}

    def decorate(handler: Handler) -> Task[Any, str]:
        def run(task: Task[Any, str], event: Any) -> str:
            from machine_memory.memory import MachineMemory

            machine_id = machine_id_of(event)
            mem = MachineMemory() if memory is None else memory()
            try:
                return run_cycle(mem, machine_id, event, handler, ttl=ttl)
            except Redeliver as exc:
                retries = task.request.retries
                logger.debug("Redelivering an event for %r: %s", machine_id, exc)
                raise task.retry(
                    exc=exc,
                    countdown=countdown(retries, retry_backoff),
                    max_retries=max_retries,
                ) from exc
            finally:
                mem.close()

        functools.update_wrapper(run, handler)
        # Through Any: celery-types' overloads of task() cannot take options passed on
        # as **kwargs.
        make_task: Any = app.task
        task: Task[Any, str] = make_task(bind=True, **options)(run)
        return task

    return decorate


def _item(name: str) -> Callable[[Any], str]:
    def machine_id_of(event: Any) -> str:
        try:
            value = event[name]
        except (KeyError, TypeError, IndexError) as exc:
            raise ValueError(f"The event has no {name!r} to take the machine id from.") from exc
        if not isinstance(value, str):
            raise ValueError(f"The event's {name!r} must be a string; got {type(value).__name__}.")
        return value

    return machine_id_of

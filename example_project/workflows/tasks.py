"""The demo's workflow as a Celery task (``manage.py demo --celery``).

A Celery worker started on this module (``celery --app workflows.tasks worker``) sets
Django up with the example's settings and handles each event with
``machine_memory.contrib.celery.machine_task``: lock + read, the order's handler
(``workflow.apply``), write + release, and the broker redelivers what the lock refused.
Redis is the broker (``DEMO_CELERY_BROKER_URL``, default database 2 of the local Redis).
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "demo_site.settings")
django.setup()

from celery import Celery  # noqa: E402 - after django.setup(), as Django wants

from machine_memory import MachineMemory  # noqa: E402
from machine_memory.contrib.celery import machine_task  # noqa: E402
from workflows.workflow import Event, apply  # noqa: E402

BROKER_URL = os.environ.get("DEMO_CELERY_BROKER_URL", "redis://127.0.0.1:6379/2")
# As in the demo's own workers: a worker that dies holding a lock blocks its machine for
# seconds, not for the default two minutes.
LOCK_TTL = 15.0

app = Celery("workflows", broker=BROKER_URL)
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    # One event at a time per worker process: a prefetched event would wait behind the
    # one being handled while another process could take it.
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


def owner() -> str:
    return f"celery-{os.getpid()}@{socket.gethostname()}"


@machine_task(app, key="machine_id", memory=lambda: MachineMemory(lock_ttl=LOCK_TTL, owner=owner()))
def apply_event(state: dict[str, Any] | None, event: dict[str, Any]) -> dict[str, Any] | None:
    """The order's handler: the next state after ``event`` (None: applied already)."""
    time.sleep(event.get("work_seconds", 0.0))  # the handler's own work, under the lock
    return apply(state, Event.from_dict(event), owner()).state

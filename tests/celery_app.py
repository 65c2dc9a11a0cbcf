"""The Celery app that tests/test_celery.py starts a real worker on.

The worker imports this module: it sets Django up with the test settings and points the
alias the test names at the test database the test run made (``MM_CELERY_DATABASE`` and
``MM_CELERY_DATABASE_NAME``). Imported by the test process itself, it changes nothing.
"""

from __future__ import annotations

import os
import time
from typing import Any

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
django.setup()

from celery import Celery  # noqa: E402 - after django.setup(), as Django wants
from django.conf import settings  # noqa: E402
from django.db import connections  # noqa: E402

from machine_memory import MachineMemory  # noqa: E402
from machine_memory.contrib.celery import machine_task  # noqa: E402

BROKER_URL = os.environ.get("MM_CELERY_BROKER_URL", "redis://127.0.0.1:6379/11")
ALIAS = os.environ.get("MM_CELERY_DATABASE", "default")
if os.environ.get("MM_CELERY_DATABASE_NAME"):
    for entry in (settings.DATABASES[ALIAS], connections[ALIAS].settings_dict):
        entry["NAME"] = os.environ["MM_CELERY_DATABASE_NAME"]

app = Celery("machine_memory_tests", broker=BROKER_URL)
app.conf.update(
    task_default_queue=os.environ.get("MM_CELERY_QUEUE", "machine-memory-tests"),
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@machine_task(app, key="machine", memory=lambda: MachineMemory(using=ALIAS, lock_retries=0))
def count_event(state: dict[str, Any] | None, event: dict[str, Any]) -> dict[str, Any]:
    """Count the event and remember its number, holding the lock for ``work`` seconds."""
    state = state or {"count": 0, "events": []}
    time.sleep(event.get("work", 0))
    return {"count": state["count"] + 1, "events": [*state["events"], event["n"]]}

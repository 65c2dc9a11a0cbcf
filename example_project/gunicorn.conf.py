"""gunicorn settings for serving the example project's REST API the fast way.

    cd example_project && gunicorn demo_site.wsgi

(gunicorn reads ./gunicorn.conf.py by itself.) Why each value: docs/rest-api.md#serving-the-api.
"""

from __future__ import annotations

import os

bind = os.environ.get("GUNICORN_BIND", "127.0.0.1:8000")
# Threads keep HTTP connections alive between requests; gunicorn's sync workers close
# every connection after one response, so each request would pay a new TCP handshake.
worker_class = "gthread"
workers = int(os.environ.get("GUNICORN_WORKERS", "2"))
threads = int(os.environ.get("GUNICORN_THREADS", "8"))
# Seconds an idle client connection stays open: longer than a worker's pause between events.
keepalive = 30
# A 512-character id takes up to 6,144 bytes percent-encoded: above the default 4,094.
limit_request_line = 8190

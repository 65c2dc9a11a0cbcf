"""The Arvo cycle over the REST API, for ``machine_memory_bench --http URL``.

Each client process keeps one HTTP/1.1 connection alive and runs the cycle the TypeScript
client runs (clients/typescript): ``POST lock/?id=`` with ``{"read": true}`` (lock and
read in one request), ``PUT state/?id=`` with the ``Lock-Token`` (``If-Match`` the ETag it
got, or no precondition for a new machine: the holder's create-or-overwrite), then
``DELETE lock/?id=``. Three requests an event; the "read" column stays empty.
"""

from __future__ import annotations

import http.client
import json
import time
from typing import Any
from urllib.parse import urlencode, urlsplit

from machine_memory.bench import BenchError, Timings, document, run_in_processes


class ApiClient:
    """One keep-alive connection to the API at ``base_url``: an http(s) URL ending in ``/``,
    as the command's ``--http`` (``arguments.http_url``) makes it."""

    def __init__(self, base_url: str, headers: dict[str, str], timeout: float = 10.0) -> None:
        parts = urlsplit(base_url)
        assert parts.hostname, base_url  # http_url() refused URLs without one
        connection_class = (
            http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        )
        self.connection = connection_class(parts.hostname, parts.port, timeout=timeout)
        self.path = parts.path
        self.headers = {"Content-Type": "application/json", "Accept": "application/json"}
        self.headers.update(headers)

    def request(
        self,
        method: str,
        resource: str,
        machine_id: str,
        payload: Any = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], Any]:
        url = f"{self.path}{resource}/?{urlencode({'id': machine_id})}"
        body = None if payload is None else json.dumps(payload)
        self.connection.request(method, url, body, {**self.headers, **(headers or {})})
        response = self.connection.getresponse()
        raw = response.read()
        return response.status, dict(response.getheaders()), json.loads(raw) if raw else None

    def close(self) -> None:
        self.connection.close()


def _expect(status: int, wanted: int, what: str, body: Any) -> None:
    if status != wanted:
        raise BenchError(f"{what}: HTTP {status} (wanted {wanted}): {body}")


def http_cycles(client: ApiClient, ids: list[str], cycles: int) -> Timings:
    """The Arvo cycle over HTTP, each id in turn; every lock must be granted."""
    timings = Timings()
    lock, write, unlock = (timings.samples[op] for op in ("lock", "write", "unlock"))
    clock = time.perf_counter_ns
    started = time.perf_counter()
    for number in range(cycles):
        machine_id = ids[number % len(ids)]
        t0 = clock()
        status, _, acquired = client.request("POST", "lock", machine_id, {"read": True})
        _expect(status, 201, f"lock {machine_id!r}", acquired)
        t1 = clock()
        held = {"Lock-Token": acquired["lock_token"]}
        state = acquired["state"]
        counter = 1 if state is None else state["data"]["counter"] + 1
        if state is not None:
            held["If-Match"] = state["etag"]
        payload = {"data": document(machine_id, counter)}
        status, _, written = client.request("PUT", "state", machine_id, payload, held)
        _expect(status, 201 if state is None else 200, f"write {machine_id!r}", written)
        t2 = clock()
        status, _, released = client.request("DELETE", "lock", machine_id, None, held)
        _expect(status, 204, f"unlock {machine_id!r}", released)
        t3 = clock()
        lock.append(t1 - t0)
        write.append(t2 - t1)
        unlock.append(t3 - t2)
        timings.increments[machine_id] += 1
    timings.elapsed = time.perf_counter() - started
    timings.cycles = cycles
    return timings


def _client_process(job: dict[str, Any]) -> Timings:
    client = ApiClient(job["url"], job["headers"])
    try:
        # One request first, so that connecting is not part of the timed run.
        client.request("GET", "lock", job["ids"][0])
        job["start"].wait()
        return http_cycles(client, job["ids"], job["cycles"])
    finally:
        client.close()


def run_http_clients(
    url: str, headers: dict[str, str], ids: list[list[str]], cycles: int
) -> Timings:
    """One client process per id list, started together; merged timings."""
    jobs = [{"url": url, "headers": headers, "ids": chunk, "cycles": cycles} for chunk in ids]
    return run_in_processes(jobs, _client_process)

"""The demo's message broker: hands events to worker processes and injects the faults.

It behaves as a broker with late acknowledgement does: one event in flight per worker; an
event is done when its worker acknowledges it; a refused event (lock denied, write refused)
is redelivered after a jittered, growing delay; the event of a worker that died is
redelivered too, and so is an event not acknowledged within a deadline (SQS's visibility
timeout, Pub/Sub's acknowledgement deadline). Events emitted by a handler are enqueued
with its acknowledgement, once per id (a redelivered event emits its events again). Calls
to services are answered by ``service_replies``.

The faults: one worker is killed (SIGKILL) while it holds a machine's lock, and a
replacement is started, as a supervisor would; the lock expires and another worker takes
the machine over. Later one worker is frozen (SIGSTOP) while it holds a lock; its event is
redelivered once its deadline has passed, and another worker takes the machine over. Then
the frozen worker resumes (SIGCONT), and its write is refused by the fencing token
(``LockLost``).
"""

from __future__ import annotations

import contextlib
import heapq
import multiprocessing
import os
import random
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import TYPE_CHECKING, Any, Protocol

from django.core.management.base import CommandError

from workflows.worker import run_worker
from workflows.workflow import SERVICE, Event, service_replies

if TYPE_CHECKING:
    from multiprocessing.connection import Connection
    from multiprocessing.context import SpawnProcess

    from machine_memory.memory import MachineMemory
    from workflows.worker import WorkerOptions

# Give up when the workers report nothing for this long (a worker hung on a database).
STALL_TIMEOUT = 60.0
# A worker that is not ready this long after it was started is not going to be.
START_TIMEOUT = 120.0
# The delay before redelivery number n: REDELIVERY_BASE * 2**n, at most REDELIVERY_CAP,
# ±50 % (the jitter keeps the redeliveries of one machine's events apart). The base is about
# one handler's work: sooner, the lock is most likely still held.
REDELIVERY_BASE = 0.04
REDELIVERY_CAP = 1.0
# How far into the run (events handled) the kill and the freeze happen.
KILL_AT, FREEZE_AT = 0.2, 0.4
# An event not acknowledged this long after its lock's TTL is delivered again.
ACK_GRACE = 1.0
# A kill that missed the lock (the worker was between cycles) is tried again, this often.
KILL_ATTEMPTS = 3
FREEZE_SIGNALS = hasattr(signal, "SIGSTOP")  # POSIX only


@dataclass(slots=True)
class Counts:
    """What happened during a run; the demo's summary."""

    handled: int = 0  # distinct events applied
    deliveries: int = 0  # events handed to a worker, redeliveries included
    lock_denials: int = 0
    redeliveries: int = 0  # events put back: denied, refused, failed, or orphaned by a kill
    write_conflicts: int = 0  # WriteConflict other than LockLost
    fenced_writes: int = 0  # LockLost: a stale lock holder's write refused
    takeovers: int = 0  # locks of a killed or frozen worker taken over once expired
    duplicates: int = 0  # redelivered events that had landed already (nothing written)
    storage_errors: int = 0
    workers_started: int = 0
    workers_killed: int = 0
    workers_frozen: int = 0
    orders_done: int = 0
    elapsed: float = 0.0


@dataclass(slots=True)
class Worker:
    number: int
    process: SpawnProcess
    inbox: Connection  # the broker writes events
    outbox: Connection  # the broker reads replies
    owner: str = ""
    pid: int = 0
    state: str = "starting"  # idle, busy, frozen, killed, stopped
    event: Event | None = None
    delivered_at: float = 0.0
    overdue: bool = False  # its event was delivered again, to another worker
    handled: int = 0

    @property
    def name(self) -> str:
        return f"demo-worker-{self.number}"


@dataclass(slots=True)
class Victim:
    """A worker the broker killed or froze while it held the lock on ``machine_id``."""

    worker: Worker
    machine_id: str
    token: int | None
    how: str  # "killed" or "frozen"
    since: float = field(default_factory=time.monotonic)


class Display(Protocol):
    def update(self, broker: Broker) -> None: ...

    def note(self, text: str) -> None: ...


def short(machine_id: str) -> str:
    """``demo/<run>/order-004/stock`` as ``order-004/stock``."""
    return "/".join(machine_id.split("/")[2:]) or machine_id


class Broker:
    def __init__(
        self,
        options: WorkerOptions,
        workers: int,
        memory: MachineMemory,
        display: Display,
        total: int,
        orders: int,
        faults: bool,
    ) -> None:
        self.options, self.memory, self.display = options, memory, display
        self.total, self.orders, self.faults = total, orders, faults
        self.counts = Counts()
        self.context = multiprocessing.get_context("spawn")
        self.workers: list[Worker] = []
        self.initial_workers = workers
        self.ready: deque[Event] = deque()
        self.delayed: list[tuple[float, int, Event]] = []  # (due, sequence, event), a heap
        self.sequence = 0
        self.known: set[str] = set()  # every event id ever enqueued
        self.done: set[str] = set()  # event ids acknowledged
        self.attempts: dict[str, int] = {}
        self.victims: dict[str, Victim] = {}  # by machine id, until taken over
        self.kills = 0
        self.kill_hit = False  # a kill landed while its worker held a lock (or: no locks)
        self.frozen_once = False
        self.started = time.monotonic()
        self.last_reply = time.monotonic()

    # -- workers -------------------------------------------------------------------------

    def start_worker(self) -> Worker:
        number = self.counts.workers_started + 1
        inbox_reader, inbox = self.context.Pipe(duplex=False)
        outbox, outbox_writer = self.context.Pipe(duplex=False)
        # "spawn" everywhere (the default on macOS and Windows only): a forked child would
        # inherit the parent's open database connection, which must never be shared.
        process = self.context.Process(
            target=run_worker,
            args=(number, self.options, inbox_reader, outbox_writer),
            name=f"demo-worker-{number}",
            daemon=True,
        )
        process.start()
        # The child has its own copies now; the broker must not keep the ends it does not
        # use, or it would never see EOF when the child dies.
        inbox_reader.close()
        outbox_writer.close()
        worker = Worker(number, process, inbox, outbox)
        self.workers.append(worker)
        self.counts.workers_started += 1
        return worker

    def live(self) -> list[Worker]:
        return [w for w in self.workers if w.state not in ("killed", "stopped")]

    # -- the run -------------------------------------------------------------------------

    def run(self, arrivals: list[tuple[float, Event]]) -> Counts:
        """Deliver every event, ``arrivals`` (seconds from the start, event) first."""
        try:
            for _ in range(self.initial_workers):
                self.start_worker()
            deadline = time.monotonic() + START_TIMEOUT
            while any(w.state == "starting" for w in self.workers):
                self.poll(0.1)
                if time.monotonic() > deadline:
                    raise CommandError("The workers did not start; their tracebacks are above.")
            self.display.note(f"{len(self.workers)} workers ready")
            # The clock starts once every worker is connected: start-up is not throughput.
            self.started = self.last_reply = time.monotonic()
            for at, event in arrivals:
                self.known.add(event.id)
                self.later(event, at)
            shown = 0.0
            while len(self.done) < self.total:
                self.release_due()
                self.dispatch()
                self.poll(0.02)
                self.redeliver_overdue()
                self.resume_overdue()
                if time.monotonic() - shown >= 0.1:
                    self.counts.elapsed = time.monotonic() - self.started
                    self.display.update(self)
                    shown = time.monotonic()
                if time.monotonic() - self.last_reply > STALL_TIMEOUT:
                    raise CommandError(
                        f"The workers reported nothing for {STALL_TIMEOUT:.0f} s; run with "
                        "-v 3 to see what they are doing."
                    )
            self.counts.elapsed = time.monotonic() - self.started
            self.display.update(self)
        finally:
            self.stop()
        return self.counts

    def stop(self) -> None:
        """Stop every worker; terminate those that do not stop, so the command never hangs."""
        for worker in self.workers:
            if worker.state == "frozen":
                self.signal(worker, "SIGCONT")
            if worker.state not in ("killed", "stopped"):
                with contextlib.suppress(OSError):  # its pipe broke: it is gone already
                    worker.inbox.send(None)
        for worker in self.workers:
            worker.process.join(timeout=10)
            if worker.process.is_alive():
                worker.process.terminate()
                worker.process.join(timeout=5)
            if worker.state != "killed":
                worker.state = "stopped"
            worker.inbox.close()
            worker.outbox.close()

    # -- queueing ------------------------------------------------------------------------

    def enqueue(self, event: Event) -> None:
        """Enqueue a new event, once per id; a service call is answered at once."""
        if event.id in self.known:
            return
        self.known.add(event.id)
        if event.machine_id.startswith(SERVICE):
            for reply in service_replies(event):
                self.enqueue(reply)
        else:
            self.ready.append(event)

    def redeliver(self, event: Event) -> None:
        attempt = self.attempts.get(event.id, 0)
        self.attempts[event.id] = attempt + 1
        delay = min(REDELIVERY_CAP, REDELIVERY_BASE * 2**attempt) * random.uniform(0.5, 1.5)
        self.later(event, delay)
        self.counts.redeliveries += 1

    def later(self, event: Event, delay: float) -> None:
        self.sequence += 1
        heapq.heappush(self.delayed, (time.monotonic() + delay, self.sequence, event))

    def release_due(self) -> None:
        now = time.monotonic()
        while self.delayed and self.delayed[0][0] <= now:
            self.ready.append(heapq.heappop(self.delayed)[2])

    def dispatch(self) -> None:
        for worker in self.workers:
            while self.ready and self.ready[0].id in self.done:
                self.ready.popleft()  # a copy of an event acknowledged meanwhile
            if not self.ready:
                return
            if worker.state == "idle":
                event = self.ready.popleft()
                worker.state, worker.event = "busy", event
                worker.delivered_at, worker.overdue = time.monotonic(), False
                worker.inbox.send(event)
                self.counts.deliveries += 1

    def redeliver_overdue(self) -> None:
        deadline = time.monotonic() - self.options.lock_ttl - ACK_GRACE
        for worker in self.workers:
            event = worker.event
            if event is None or worker.overdue or worker.delivered_at > deadline:
                continue
            if worker.state in ("busy", "frozen") and event.id not in self.done:
                worker.overdue = True
                self.redeliver(event)
                self.display.note(
                    f"{event.key} of {short(event.machine_id)} was not acknowledged by "
                    f"{worker.name} in time: delivered again"
                )

    # -- replies -------------------------------------------------------------------------

    def poll(self, timeout: float) -> None:
        listening = {w.outbox: w for w in self.workers if w.state not in ("killed", "stopped")}
        for connection in wait(list(listening), timeout):
            worker = listening[connection]  # type: ignore[index]
            try:
                message = worker.outbox.recv()
            except (EOFError, OSError):
                self.died(worker)
                continue
            self.last_reply = time.monotonic()
            self.receive(worker, message)

    def died(self, worker: Worker) -> None:
        if worker.state == "killed":
            return
        worker.process.join(timeout=5)
        raise CommandError(
            f"Worker {worker.name} exited with code {worker.process.exitcode}; its traceback "
            "is above. Is the database reachable and migrated?"
        )

    def receive(self, worker: Worker, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "ready":
            worker.owner, worker.pid = message[1], message[2]
            if worker.state == "starting":
                worker.state = "idle"
            if self.counts.workers_started > self.initial_workers:
                self.display.note(f"{worker.name} ready")
            return
        event = worker.event
        assert event is not None, message
        if kind == "working":
            self.working(worker, event, message[2], message[3])
            return
        if worker.state == "busy":
            worker.state = "idle"
        worker.event = None
        if kind == "ack":
            self.acknowledged(worker, event, message[1], message[2])
        else:
            self.refused(worker, event, message[1])

    def acknowledged(
        self, worker: Worker, event: Event, outcome: str, emits: list[dict[str, Any]]
    ) -> None:
        if outcome == "duplicate":
            self.counts.duplicates += 1
            self.display.note(
                f"{worker.name} got {event.key} of {short(event.machine_id)} again: it had "
                "landed already, nothing written, its events emitted again"
            )
        if event.id not in self.done:
            self.done.add(event.id)
            self.counts.handled += 1
            worker.handled += 1
            if event.type == "shipping.completed":
                self.counts.orders_done += 1
        for emitted in emits:
            self.enqueue(Event.from_dict(emitted))

    def refused(self, worker: Worker, event: Event, reason: str) -> None:
        if reason == "denied":
            self.counts.lock_denials += 1
        elif reason == "fenced":
            self.counts.fenced_writes += 1
            self.display.note(
                f"{worker.name}'s write to {short(event.machine_id)} was refused: LockLost, "
                "the lock it held was taken over (fencing)"
            )
        elif reason == "conflict":
            self.counts.write_conflicts += 1
        else:
            self.counts.storage_errors += 1
        if event.id not in self.done:  # else another delivery of it was acknowledged
            self.redeliver(event)

    # -- faults --------------------------------------------------------------------------

    def working(self, worker: Worker, event: Event, token: int | None, writes: bool) -> None:
        """``worker`` holds the lock on ``event``'s machine (or, without locks, has begun),
        has read it, and is about to work on it (and then write, if ``writes``)."""
        machine_id = event.machine_id
        if token is not None and machine_id in self.victims:
            victim = self.victims.pop(machine_id)
            self.counts.takeovers += 1
            self.display.note(
                f"{worker.name} took over {short(machine_id)} "
                f"{time.monotonic() - victim.since:.1f} s after {victim.worker.name} was "
                f"{victim.how}: its lock had expired (fencing token {victim.token} -> {token})"
            )
            if victim.how == "frozen":
                self.resume(victim.worker, "its lock has been taken over")
            return
        # A fault lands in the handler's work, between the read and the write.
        if not self.faults or not writes or machine_id in self.victims:
            return
        progress = len(self.done) / self.total
        if not self.kill_hit and self.kills < KILL_ATTEMPTS:
            if progress >= KILL_AT:
                self.kill(worker, event, token)
        elif (
            # The freeze is about locks: without them there is no lock to take over.
            FREEZE_SIGNALS
            and self.options.use_lock
            and not self.frozen_once
            and progress >= FREEZE_AT
            and len(self.live()) > 1
        ):
            self.freeze(worker, event, token)

    def kill(self, worker: Worker, event: Event, token: int | None) -> None:
        self.kills += 1
        worker.process.kill()  # SIGKILL: no finally, no unlock, no goodbye
        worker.process.join(timeout=5)
        worker.state, worker.event = "killed", None
        self.counts.workers_killed += 1
        holder = self.memory.lock_info(event.machine_id) if token is not None else None
        if holder is not None and holder.owner == worker.owner:
            self.kill_hit = True
            self.victims[event.machine_id] = Victim(worker, event.machine_id, token, "killed")
            self.display.note(
                f"killed {worker.name} (SIGKILL) between its read and its write, holding the "
                f"lock on {short(event.machine_id)} (token {token}, "
                f"{self.options.lock_ttl:g} s TTL); "
                f"{event.key} goes back to the queue and waits for the lock to expire"
            )
        else:
            self.kill_hit = token is None  # without locks, any kill will do
            self.display.note(
                f"killed {worker.name} (SIGKILL) while it handled {short(event.machine_id)}; "
                f"{event.key} goes back to the queue"
            )
        self.redeliver(event)
        replacement = self.start_worker()
        self.display.note(f"started {replacement.name} in its place, as a supervisor would")

    def freeze(self, worker: Worker, event: Event, token: int | None) -> None:
        self.signal(worker, "SIGSTOP")
        holder = self.memory.lock_info(event.machine_id)
        if holder is None or holder.owner != worker.owner:
            self.signal(worker, "SIGCONT")  # too late: it released the lock already
            return
        self.frozen_once = True
        worker.state = "frozen"
        self.counts.workers_frozen += 1
        self.victims[event.machine_id] = Victim(worker, event.machine_id, token, "frozen")
        self.display.note(
            f"froze {worker.name} (SIGSTOP, as a long GC pause would) between its read and its "
            f"write, holding the lock on {short(event.machine_id)} (token {token})"
        )

    def resume(self, worker: Worker, why: str) -> None:
        self.signal(worker, "SIGCONT")
        worker.state = "busy"
        self.display.note(f"resumed {worker.name} (SIGCONT): {why}")

    def resume_overdue(self) -> None:
        """A frozen worker whose machine nobody took over resumes after a while anyway
        (another worker's event whose handler takes longer than the TTL, say)."""
        for machine_id, victim in list(self.victims.items()):
            overdue = time.monotonic() - victim.since > 3 * self.options.lock_ttl + 2
            if victim.how == "frozen" and overdue:
                del self.victims[machine_id]
                self.resume(victim.worker, "nobody took its machine over")

    @staticmethod
    def signal(worker: Worker, name: str) -> None:
        with contextlib.suppress(ProcessLookupError):  # it exited meanwhile
            os.kill(worker.pid, getattr(signal, name))

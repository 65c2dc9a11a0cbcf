"""Network faults injected for real, at the moment that matters, through a loopback proxy.

Every test here drives the public API over real TCP to the real servers, through
``tests/faultproxy.py``: connections cut before a statement reaches the server, while it
waits for a row lock (with the server's side kept open, so the server does not notice),
after the server committed but before the reply arrived, stalled, and reconnections
refused. What each test proves is the contract (docs/contract.md#when-the-connection-dies):
a raised ``WriteError`` means nothing was stored, now or later; a normal return means the
write is stored; ``WriteOutcomeUnknown`` is raised only where the outcome cannot be decided.
After each outcome the stored state is watched for a while from another connection, so a
statement that lands late (from a server session that was still running it) is caught.

SQLite and Redis cannot leave a statement running elsewhere; the tests at the end prove
that their failures store nothing too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import random
import re
import socket
import sqlite3
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import pytest
from django.db import InterfaceError, OperationalError, connections, transaction
from redis.exceptions import RedisError

from machine_memory import MachineMemory
from machine_memory.exceptions import (
    LockError,
    LockLost,
    ReadError,
    WriteConflict,
    WriteError,
    WriteOutcomeUnknown,
)
from machine_memory.locks.redis import RedisLockBackend
from tests.faultproxy import FaultProxy, ProxyError
from tests.support import (
    ALIVE,
    BACKEND_ID,
    WAITING_FOR_A_ROW_LOCK,
    machine_memory_warnings,
    new_id,
)
from tests.test_redis import stored_fence
from tests.workers import ThreadRun

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from tests.conftest import ProxiedDatabase

T = TypeVar("T")

# -- what the servers call things -------------------------------------------------------------

# How often to look. InnoDB refreshes what INNODB_TRX shows only when nobody has read it for
# 0.1 s (trx_i_s_cache: every read postpones the refresh), so faster polling reads the same
# stale rows for ever.
ROW_LOCK_POLL = {"postgres": 0.005, "mariadb": 0.15}
# A session that is connected and not running anything.
IDLE = {
    "postgres": "SELECT 1 FROM pg_stat_activity WHERE pid = %s AND state = 'idle'",
    "mariadb": "SELECT 1 FROM information_schema.PROCESSLIST WHERE ID = %s AND COMMAND = 'Sleep'",
}

# The statements on the wire (plain SQL: the PostgreSQL proxy alias prepares nothing).
UPDATE_STATE = b"UPDATE machine_memory_state"
CREATE_STATE = {
    "postgres": b"INSERT INTO machine_memory_state",
    "mariadb": b"INSERT IGNORE INTO machine_memory_state",
}
DELETE_STATE = b"DELETE FROM machine_memory_state"
READ_STATE = b"FROM machine_memory_state"
# Only the read of a state (READ_STATE also finds a DELETE).
LOAD_STATE = b"source FROM machine_memory_state WHERE machine_id"
# The lock statement that commits an acquisition of an id never locked before, and of one
# whose lock was released (MariaDB first tries a takeover UPDATE, then an INSERT IGNORE).
ACQUIRE_FIRST = {
    "postgres": b"INSERT INTO machine_memory_lock",
    "mariadb": b"INSERT IGNORE INTO machine_memory_lock",
}
ACQUIRE_AGAIN = {
    "postgres": b"INSERT INTO machine_memory_lock",
    "mariadb": b"UPDATE machine_memory_lock SET owner",
}
# unlock() and extend() send one statement on the lock table (and nothing else).
LOCK_TABLE = b"machine_memory_lock"
# Redis: scripts go as EVALSHA, the fence check as one MGET.
EVALSHA = b"EVALSHA"
MGET = b"MGET"

TRANSIENT = (OperationalError, InterfaceError)
# How long a reported outcome is watched for a statement that lands late.
WATCH = 0.25
POLL = 0.005


def vendor(database: ProxiedDatabase) -> str:
    return database.real


def wait_until(
    predicate: Callable[[], bool], what: str, timeout: float = 10, interval: float = POLL
) -> None:
    """Poll ``predicate`` until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def backend_id(alias: str) -> int:
    """The server's id of this thread's session on ``alias`` (the one the memory uses here)."""
    vendor_name = "postgres" if connections[alias].vendor == "postgresql" else "mariadb"
    with connections[alias].cursor() as cursor:
        cursor.execute(BACKEND_ID[vendor_name])
        return int(cursor.fetchone()[0])


class Observer:
    """One thread of its own that looks at the servers on long-lived connections.

    The main thread may be inside a transaction (holding a row lock), and the memory under
    test uses its own thread's connections; the observer's connections to the real aliases
    are neither, and they stay open between looks (a new connection per poll would cost
    more than the poll).
    """

    def __init__(self) -> None:
        self._jobs: queue.Queue[tuple[Callable[[], Any], queue.Queue[tuple[bool, Any]]] | None]
        self._jobs = queue.Queue()
        self._thread = threading.Thread(target=self._serve, name="observer", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            while (job := self._jobs.get()) is not None:
                fn, reply = job
                try:
                    reply.put((True, fn()))
                except BaseException as exc:
                    # A broken connection (a server that ended it) must not stick.
                    connections.close_all()
                    reply.put((False, exc))
        finally:
            connections.close_all()

    def __call__(self, fn: Callable[[], T]) -> T:
        reply: queue.Queue[tuple[bool, Any]] = queue.Queue(maxsize=1)
        self._jobs.put((fn, reply))
        ok, value = reply.get(timeout=60)
        if not ok:
            raise value
        return value  # type: ignore[no-any-return]

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(10)


_observer: list[Observer] = []


def observe(fn: Callable[[], T]) -> T:
    """Run ``fn`` on the observer thread (its own connections) and return its result."""
    if not _observer:
        _observer.append(Observer())
    return _observer[0](fn)


@pytest.fixture(autouse=True, scope="module")
def _close_observer() -> Iterator[None]:
    yield
    while _observer:
        _observer.pop().close()


def server_says(real: str, sql: str, session: int) -> bool:
    """Ask the server (on the observer's connection to the real alias) about a session."""

    def ask() -> bool:
        with connections[real].cursor() as cursor:
            cursor.execute(sql, [session])
            return cursor.fetchone() is not None

    return observe(ask)


def session_alive(real: str, session: int) -> bool:
    return server_says(real, ALIVE[real], session)


def read_real(alias: str, mid: str) -> dict[str, Any] | None:
    """The stored state, read on the observer's connection."""
    return observe(lambda: MachineMemory(using=alias).read(mid))


def assert_stays(alias: str, mid: str, expected: dict[str, Any] | None, watch: bool = True) -> None:
    """The stored state is ``expected`` now and (``watch``) for the next WATCH seconds."""
    deadline = time.monotonic() + (WATCH if watch else 0)

    def look() -> None:
        memory = MachineMemory(using=alias)
        while True:
            assert memory.read(mid) == expected
            if time.monotonic() >= deadline:
                return
            time.sleep(POLL)

    observe(look)


def assert_nothing_stored(exc: BaseException | None, mid: str) -> WriteError:
    """A write failure that promises nothing was stored: a plain WriteError, cause chained,
    and a message that says so in so many words (the driver's between them)."""
    assert isinstance(exc, WriteError), f"expected WriteError, got {exc!r}"
    assert not isinstance(exc, WriteConflict), exc
    assert isinstance(exc.__cause__, TRANSIENT), repr(exc.__cause__)
    cause = exc.__cause__
    assert str(exc) in {
        f"Writing machine {mid!r} failed: {cause}. Nothing was stored.",
        f"Could not overwrite machine {mid!r}: {cause}. Nothing was stored.",
        f"Could not delete machine {mid!r}: {cause}. Nothing was stored.",
    }, str(exc)
    return exc


def assert_unknown(exc: BaseException | None, mid: str, why: str) -> WriteOutcomeUnknown:
    """A write whose outcome could not be settled: it says why, and that the caller must read
    the state before retrying (docs/contract.md#when-the-connection-dies)."""
    assert isinstance(exc, WriteOutcomeUnknown), f"expected WriteOutcomeUnknown: {exc!r}"
    assert isinstance(exc.__cause__, TRANSIENT), repr(exc.__cause__)
    assert exc.id == mid
    failed = re.escape(f"Writing machine {mid!r} failed: {exc.__cause__}")
    reasons = {
        "unchecked": r", and whether it was stored could not be checked: .+",
        "session": re.escape(
            ", and whether it was stored cannot be told (the server session that ran it could "
            "not be confirmed ended)"
        ),
        "moved": re.escape(", and whether it was stored cannot be told (the state has moved on ")
        + r"to version \d+\)",
        "gone": re.escape(
            ", and whether it was stored cannot be told (there is no state now: never created, "
            "or deleted since)"
        ),
    }
    pattern = failed + reasons[why] + re.escape(". Read the state before you retry.")
    assert re.fullmatch(pattern, str(exc), re.DOTALL), str(exc)
    return exc


def assert_reported_as_not_landed(exc: BaseException | None, kind: str, mid: str) -> None:
    """The outcome of a call that did not land, as the settled check must report it.

    A create leaves no row either way, and no row also looks like a create that landed and
    was deleted since: unknown (docs/contract.md#when-the-connection-dies, step 4). Anything
    else still shows the version it started from: WriteError, nothing stored.
    """
    if kind == "create":
        assert_unknown(exc, mid, "gone")
    else:
        assert_nothing_stored(exc, mid)


def attempt(fn: Callable[[], Any]) -> BaseException | None:
    """Run ``fn``; the exception it raised, or None."""
    try:
        fn()
    except Exception as exc:
        return exc
    return None


def redis_locks(alias: str, cache: str) -> RedisLockBackend:
    return RedisLockBackend(database=alias, cache=cache)


def make_memory(database: ProxiedDatabase, locks: str, **options: Any) -> MachineMemory:
    """A memory on the proxy alias; ``locks``: "none" / "database" (held) / "redis" (held)."""
    if locks == "redis":
        return MachineMemory(
            using=database.alias,
            lock_backend=redis_locks(database.alias, "redis_faults"),
            **options,
        )
    return MachineMemory(using=database.alias, **options)


@pytest.fixture
def locks(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    if name == "redis":
        request.getfixturevalue("redis_faults")
    return name


LOCKS = pytest.mark.parametrize("locks", ["none", "database", "redis"], indirect=True)


# -- the proxy itself, against a trivial echo server ----------------------------------------------


class EchoServer:
    """A threaded TCP echo server that records what it received and its open connections."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.received = bytearray()
        self.open = 0
        self.closed = 0
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self.open += 1
                self._conns.append(conn)
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        try:
            while data := conn.recv(65536):
                with self._lock:
                    self.received += data
                conn.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self.open -= 1
                self.closed += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()
        with self._lock:
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                conn.close()


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture
def proxy(echo: EchoServer) -> Iterator[FaultProxy]:
    fault_proxy = FaultProxy("127.0.0.1", echo.port, name="echo")
    yield fault_proxy
    fault_proxy.close()


# Client sockets of the self-tests, closed after each test.
_CLIENTS: list[socket.socket] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _CLIENTS:
        _CLIENTS.pop().close()


def client(proxy: FaultProxy) -> socket.socket:
    sock = socket.create_connection((proxy.host, proxy.port), timeout=5)
    _CLIENTS.append(sock)
    return sock


def roundtrip(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def assert_reset(sock: socket.socket) -> None:
    """The peer reset the connection (RST), as opposed to any data or a clean close."""
    sock.settimeout(5)
    try:
        data = sock.recv(100)
        # A reset that arrives after a send shows on the next call.
        sock.sendall(b"?")
        data += sock.recv(100)
    except ConnectionResetError:
        return
    raise AssertionError(f"the connection was not reset (got {data!r})")


def is_dead(sock: socket.socket) -> bool:
    """Nothing comes back any more: the connection was reset or closed."""
    sock.settimeout(5)
    try:
        sock.sendall(b"z")
        return sock.recv(10) == b""
    except OSError:
        return True


def assert_turned_away(proxy: FaultProxy) -> None:
    """A new connection is reset at once (during connect() or on first use)."""
    try:
        sock = client(proxy)
    except ConnectionResetError:
        return
    with sock:
        assert_reset(sock)


def nothing_arrives(sock: socket.socket, within: float = 0.2) -> bool:
    sock.settimeout(within)
    try:
        sock.recv(100)
    except TimeoutError:
        return True
    return False


def test_proxy_forwards_both_ways_and_counts(proxy: FaultProxy, echo: EchoServer) -> None:
    sock = client(proxy)
    assert roundtrip(sock, b"hello") == b"hello"
    assert roundtrip(sock, b"x" * 200_000) == b"x" * 200_000
    assert proxy.accepted == 1 and proxy.refused == 0
    assert proxy.bytes_up == proxy.bytes_down == 200_005
    assert proxy.open_links == 1 and echo.open == 1
    sock.close()
    wait_until(lambda: echo.open == 0 and proxy.open_links == 0, "the close to pass through")


def test_proxy_refuses_then_accepts(proxy: FaultProxy, echo: EchoServer) -> None:
    proxy.refuse()
    assert_turned_away(proxy)
    assert proxy.refused == 1 and echo.open == 0
    proxy.accept()
    assert roundtrip(client(proxy), b"ok") == b"ok"
    assert (proxy.accepted, proxy.refused) == (2, 1)


def test_proxy_stall_holds_both_directions_until_resumed(
    proxy: FaultProxy, echo: EchoServer
) -> None:
    sock = client(proxy)
    assert roundtrip(sock, b"a") == b"a"
    proxy.stall()
    sock.sendall(b"b")
    wait_until(lambda: proxy.bytes_in == 2, "the stalled bytes to reach the proxy")
    assert nothing_arrives(sock)
    assert bytes(echo.received) == b"a"  # not forwarded
    proxy.resume()
    sock.settimeout(5)
    assert sock.recv(10) == b"b"
    # A reply that is already on its way back is held as well.
    proxy.stall()
    sock.sendall(b"c")
    assert nothing_arrives(sock)
    proxy.resume()
    sock.settimeout(5)
    assert sock.recv(10) == b"c"


@pytest.mark.parametrize("keep_upstream", [False, True])
def test_proxy_cut_resets_clients(proxy: FaultProxy, echo: EchoServer, keep_upstream: bool) -> None:
    socks = [client(proxy) for _ in range(2)]
    for sock in socks:
        assert roundtrip(sock, b"hi") == b"hi"
    assert proxy.cut(keep_upstream=keep_upstream) == 2
    for sock in socks:
        assert_reset(sock)
    if keep_upstream:
        # The server's side stays open: the server does not learn of the cut.
        assert echo.open == 2 and proxy.kept_upstreams == 2
        assert len(proxy.upstream_ports(kept=True)) == 2
        assert proxy.release_upstreams() == 2
    wait_until(lambda: echo.open == 0, "the server's side to close")
    assert proxy.kept_upstreams == 0
    # Later connections are not affected.
    assert roundtrip(client(proxy), b"next") == b"next"


def test_proxy_cut_before_does_not_forward(proxy: FaultProxy, echo: EchoServer) -> None:
    sock = client(proxy)
    assert roundtrip(sock, b"one") == b"one"
    trigger = proxy.cut_before(b"SECRET")
    sock.sendall(b"xx SECRET yy")
    assert_reset(sock)
    assert trigger.fired.is_set() and trigger.count == 1
    assert bytes(echo.received) == b"one"
    # One-shot: the next one passes.
    assert roundtrip(client(proxy), b"SECRET") == b"SECRET"


def test_proxy_cut_after_reply_forwards_and_drops_the_reply(
    proxy: FaultProxy, echo: EchoServer
) -> None:
    sock = client(proxy)
    trigger = proxy.cut_after_reply(b"COMMIT", then="refuse")
    sock.sendall(b"COMMIT")
    assert_reset(sock)
    assert trigger.fired.is_set()
    assert bytes(echo.received) == b"COMMIT"  # the server got it ...
    assert proxy.bytes_down == 0 and proxy.discarded == 6  # ... the client never heard back
    # then="refuse": the reconnect is refused in the same instant.
    assert_turned_away(proxy)
    assert proxy.refused == 1


def test_proxy_hold_reply_until_resumed(proxy: FaultProxy, echo: EchoServer) -> None:
    sock = client(proxy)
    trigger = proxy.hold_reply(b"ping")
    sock.sendall(b"ping")
    assert trigger.wait(5)
    assert nothing_arrives(sock)
    assert bytes(echo.received) == b"ping"
    proxy.resume()
    sock.settimeout(5)
    assert sock.recv(10) == b"ping"


def test_proxy_watch_counts_forwarded_requests_across_reads(
    proxy: FaultProxy, echo: EchoServer
) -> None:
    watch = proxy.watch(b"NEEDLE")
    sock = client(proxy)
    assert roundtrip(sock, b"hay NEE") == b"hay NEE"
    assert watch.count == 0
    assert roundtrip(sock, b"DLE hay NEEDLE") == b"DLE hay NEEDLE"  # split, then whole
    assert watch.wait(5) and watch.count == 2


def test_proxy_close_ends_everything_and_raises_its_own_errors(echo: EchoServer) -> None:
    proxy = FaultProxy("127.0.0.1", echo.port, name="closing")
    socks = [client(proxy) for _ in range(3)]
    for sock in socks:
        assert roundtrip(sock, b"z") == b"z"
    proxy.cut(keep_upstream=True)
    live = client(proxy)
    assert roundtrip(live, b"z") == b"z"
    # A control that fails raises in the caller.
    with pytest.raises(ZeroDivisionError):
        proxy.call(lambda: 1 // 0)
    proxy.close()
    wait_until(lambda: echo.open == 0, "every server connection to close")
    assert is_dead(live)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((proxy.host, proxy.port), timeout=1)
    # An unexpected error inside the loop is not swallowed.
    broken = FaultProxy("127.0.0.1", echo.port, name="broken")

    async def fail() -> None:
        raise RuntimeError("inside the proxy")

    broken.call(lambda: broken._spawn(fail()))
    wait_until(lambda: bool(broken.errors), "the error to be recorded")
    with pytest.raises(ProxyError, match="inside the proxy"):
        broken.close()


def test_proxy_reports_an_unreachable_upstream() -> None:
    with socket.create_server(("127.0.0.1", 0)) as placeholder:
        port = placeholder.getsockname()[1]
    proxy = FaultProxy("127.0.0.1", port, name="nowhere")
    try:
        assert_turned_away(proxy)
        wait_until(lambda: proxy.upstream_failures == 1, "the failed upstream connect")
    finally:
        proxy.close()


# -- state writes on PostgreSQL and MariaDB -------------------------------------------------------


@dataclass
class Operation:
    """One state-changing call, set up on a fresh id: what is stored before and after it."""

    kind: str
    statement: bytes
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    run: Callable[[], None]
    # What a redelivered event would do next, from the outcome (to show it works).
    follow_up: Callable[[], None]


def prepare(
    memory: MachineMemory, database: ProxiedDatabase | None, mid: str, kind: str
) -> Operation:
    """Store the starting state through ``memory`` and build the call under test.

    ``database`` None: no proxy (SQLite); the statement pattern then does not matter.
    """
    data = {"n": 1}
    if kind == "create":
        return Operation(
            kind,
            b"INSERT" if database is None else CREATE_STATE[vendor(database)],
            None,
            data,
            lambda: memory.write(mid, data, None),
            lambda: memory.write(mid, {"n": 2}, data),
        )
    memory.write(mid, {"n": 0}, None)
    prev = memory.read(mid)
    assert prev == {"n": 0}
    if kind == "update":
        return Operation(
            kind,
            UPDATE_STATE,
            {"n": 0},
            data,
            lambda: memory.write(mid, data, prev),
            lambda: memory.write(mid, {"n": 2}, data),
        )
    if kind == "delete":
        run = lambda: memory.delete(mid, prev)  # noqa: E731
    else:
        assert kind == "cleanup" and memory.cleanup_mode == "delete"
        run = lambda: memory.cleanup(mid, prev, None)  # noqa: E731
    return Operation(
        kind, DELETE_STATE, {"n": 0}, None, run, lambda: memory.write(mid, {"n": 2}, None)
    )


def memory_for(database: ProxiedDatabase, locks: str, kind: str, mid: str) -> MachineMemory:
    """A memory on the proxy alias, holding the lock on ``mid`` unless ``locks`` is "none"."""
    options: dict[str, Any] = {"lock_retries": 0}
    if kind == "cleanup":
        options["cleanup"] = "delete"
    memory = make_memory(database, locks, **options)
    if locks != "none":
        assert memory.lock(mid)
    return memory


def finish(memory: MachineMemory, mid: str, locks: str) -> None:
    if locks != "none":
        assert memory.unlock(mid)
    memory.close()


KIND_NAMES = ["create", "update", "delete", "cleanup"]
KINDS = pytest.mark.parametrize("kind", KIND_NAMES)


@pytest.mark.parametrize(
    ("kind", "locks", "keep_upstream"),
    [
        *[(kind, locks, True) for kind in KIND_NAMES for locks in ("none", "database", "redis")],
        *[(kind, "none", False) for kind in KIND_NAMES],
    ],
    ids=lambda value: {True: "server-kept", False: "both-sides"}.get(value, value),
    indirect=["locks"],
)
def test_cut_before_the_statement_reaches_the_server_stores_nothing(
    proxied: ProxiedDatabase, mid: str, kind: str, locks: str, keep_upstream: bool
) -> None:
    memory = memory_for(proxied, locks, kind, mid)
    op = prepare(memory, proxied, mid, kind)
    session = backend_id(proxied.alias)
    trigger = proxied.proxy.cut_before(op.statement, keep_upstream=keep_upstream)
    outcome = attempt(op.run)
    assert trigger.count == 1
    assert_reported_as_not_landed(outcome, kind, mid)
    # The memory ended its old server session before it looked (and it stays ended).
    assert not session_alive(proxied.real, session)
    assert_stays(proxied.real, mid, op.before)
    # The redelivered event goes through.
    if kind == "cleanup" and locks != "none":
        assert memory.lock(mid)  # cleanup released the lock even though the delete failed
    op.run()
    assert read_real(proxied.real, mid) == op.after
    if kind != "cleanup":
        finish(memory, mid, locks)


@KINDS
@LOCKS
def test_committed_statement_whose_reply_was_lost_returns_normally(
    proxied: ProxiedDatabase, mid: str, kind: str, locks: str, caplog: pytest.LogCaptureFixture
) -> None:
    memory = memory_for(proxied, locks, kind, mid)
    op = prepare(memory, proxied, mid, kind)
    session = backend_id(proxied.alias)
    sent = proxied.proxy.watch(op.statement)
    trigger = proxied.proxy.cut_after_reply(op.statement, keep_upstream=True)
    with caplog.at_level(logging.INFO, logger="machine_memory"):
        op.run()  # found out on a fresh connection that it landed
    said = [r.getMessage() for r in caplog.records if r.name.startswith("machine_memory")]
    assert said == [f"Write to {mid!r} landed although its connection failed."]
    assert trigger.count == 1
    assert sent.count == 1  # not sent a second time
    assert not session_alive(proxied.real, session)
    assert_stays(proxied.real, mid, op.after, watch=False)
    if kind == "cleanup":
        assert MachineMemory(using=proxied.real).lock_info(mid) is None  # and unlocked
    else:
        # The outcome is known: what the call stored is the current version for the next.
        op.follow_up()
        assert read_real(proxied.real, mid) == {"n": 2}
        finish(memory, mid, locks)


@contextlib.contextmanager
def row_locked(real: str, mid: str, kind: str) -> Iterator[None]:
    """Hold the row that ``kind`` will change under a row lock, in a transaction on ``real``.

    create: an uncommitted row of our own with that id, rolled back at the end (so a create
    still waiting on the server would go through then); otherwise ``SELECT … FOR UPDATE`` on
    the stored row, committed unchanged at the end (so a waiting update or delete would
    then run).
    """
    from machine_memory.models import MachineState

    with transaction.atomic(using=real):
        if kind == "create":
            MachineMemory(using=real).write(mid, {"blocker": True}, None)
        else:
            MachineState.objects.using(real).select_for_update().get(machine_id=mid)
        yield
        if kind == "create":
            transaction.set_rollback(True, using=real)


def wait_for_the_row_lock_wait(real: str, session: list[int], run: ThreadRun[Any]) -> None:
    """Poll until the server shows ``session`` waiting for a row lock; fail at once, with the
    call's outcome, if the call on the wire ended before that."""
    started = time.monotonic()

    def waiting() -> bool:
        if not run.thread.is_alive():
            raise AssertionError(
                f"the call ended after {time.monotonic() - started:.2f} s, before its session "
                f"was seen waiting for the row lock: {run.result(timeout=1)!r}"
            )
        return bool(session) and server_says(real, WAITING_FOR_A_ROW_LOCK[real], session[0])

    wait_until(waiting, "the statement to wait for the row lock", interval=ROW_LOCK_POLL[real])


@pytest.mark.parametrize("kind", ["create", "update", "delete"])
@LOCKS
def test_cut_while_the_statement_waits_for_a_row_lock_never_lands(
    proxied: ProxiedDatabase, mid: str, kind: str, locks: str
) -> None:
    """The core bug: a server that did not notice the cut would run the statement later."""
    memory = memory_for(proxied, locks, kind, mid)
    op = prepare(memory, proxied, mid, kind)
    # Only the writer's connection goes through the proxy from here on.
    connections[proxied.alias].close()
    wait_until(lambda: proxied.proxy.open_links == 0, "the set-up connection to close")
    sessions: list[int] = []

    def on_the_wire() -> BaseException | None:
        sessions.append(backend_id(proxied.alias))  # the session this thread's memory uses
        return attempt(op.run)

    with row_locked(proxied.real, mid, kind):
        sent = proxied.proxy.watch(op.statement)
        run = ThreadRun(on_the_wire)
        assert sent.wait(10)
        wait_for_the_row_lock_wait(proxied.real, sessions, run)
        assert proxied.proxy.cut(keep_upstream=True) == 1
        outcome = run.result(timeout=20)
        # Reported while the row lock is still held: the statement cannot have run yet.
        assert_reported_as_not_landed(outcome, kind, mid)
        assert not session_alive(proxied.real, sessions[0])
    # The row lock is gone: a session still waiting would run its statement now.
    assert_stays(proxied.real, mid, None if kind == "create" else op.before)
    if locks != "none":
        assert memory.unlock(mid)


@pytest.mark.parametrize("kind", ["create", "update"])
def test_write_whose_reply_stalls_is_settled_as_stored(
    proxied: ProxiedDatabase, mid: str, kind: str
) -> None:
    """The server committed; its reply hangs in the network until the connection fails."""
    memory = MachineMemory(using=proxied.alias)
    op = prepare(memory, proxied, mid, kind)
    session = backend_id(proxied.alias)
    held = proxied.proxy.hold_reply(op.statement)

    def network_gives_up() -> None:
        assert held.wait(10)
        if proxied.real == "postgres":
            # libpq has no read timeout: the stall lasts until the network gives up (a cut).
            wait_until(lambda: server_says("postgres", IDLE["postgres"], session), "the commit")
            assert proxied.proxy.cut(keep_upstream=True) == 1
        # MariaDB: the alias's read_timeout (2 s) turns the stall into an error by itself.

    helper = ThreadRun(network_gives_up)
    started = time.monotonic()
    op.run()
    helper.result(timeout=20)
    assert time.monotonic() - started < 10
    assert not session_alive(proxied.real, session)
    assert_stays(proxied.real, mid, op.after, watch=False)
    op.follow_up()
    assert read_real(proxied.real, mid) == {"n": 2}


def test_write_stalled_before_the_server_then_cut_stores_nothing(
    proxied: ProxiedDatabase, mid: str
) -> None:
    memory = MachineMemory(using=proxied.alias)
    op = prepare(memory, proxied, mid, "update")
    session = backend_id(proxied.alias)
    proxied.proxy.stall()
    received = proxied.proxy.bytes_in

    def network_gives_up() -> None:
        wait_until(lambda: proxied.proxy.bytes_in > received, "the statement to reach the proxy")
        assert proxied.proxy.cut(keep_upstream=True) == 1  # its bytes are dropped
        proxied.proxy.resume()

    helper = ThreadRun(network_gives_up)
    outcome = attempt(op.run)
    helper.result(timeout=20)
    assert_nothing_stored(outcome, mid)
    assert not session_alive(proxied.real, session)
    assert_stays(proxied.real, mid, op.before)


@KINDS
@pytest.mark.parametrize("landed", [True, False], ids=["landed", "not-landed"])
def test_outcome_that_cannot_be_checked_is_unknown_not_write_error(
    proxied: ProxiedDatabase, mid: str, kind: str, landed: bool
) -> None:
    """The connection breaks and the database then refuses every new connection."""
    memory = memory_for(proxied, "none", kind, mid)
    op = prepare(memory, proxied, mid, kind)
    if landed:
        proxied.proxy.cut_after_reply(op.statement, keep_upstream=True, then="refuse")
    else:
        proxied.proxy.cut_before(op.statement, keep_upstream=True, then="refuse")
    outcome = attempt(op.run)
    assert_unknown(outcome, mid, "unchecked")
    assert not isinstance(outcome, WriteError)  # it does not promise "nothing stored"
    proxied.proxy.accept()
    # What really happened: when it landed, a WriteError would have been a lie.
    stored = read_real(proxied.real, mid)
    assert stored == (op.after if landed else op.before)
    assert memory.read(mid) == stored


def while_the_check_stalls(
    proxied: ProxiedDatabase, run: Callable[[], Any], meanwhile: Callable[[MachineMemory], None]
) -> BaseException | None:
    """Run ``run``, whose fault was armed with ``then="stall"``: when the memory reconnects
    to look whether its write landed, that connection hangs while ``meanwhile`` acts as
    another worker on the real database, and then goes on. What ``run`` raised, or None."""
    connected = proxied.proxy.accepted

    def other_worker() -> None:
        wait_until(lambda: proxied.proxy.accepted > connected, "the memory's reconnect")
        meanwhile(MachineMemory(using=proxied.real))
        proxied.proxy.resume()

    helper = ThreadRun(other_worker)
    outcome = attempt(run)
    helper.result(timeout=20)
    return outcome


def test_write_overwritten_before_it_could_be_checked_is_unknown(
    proxied: ProxiedDatabase, mid: str
) -> None:
    """Our write landed, its reply was lost, and another writer wrote on top before the check:
    the row no longer tells whether ours was ever stored."""
    memory = MachineMemory(using=proxied.alias)
    op = prepare(memory, proxied, mid, "update")
    # The reconnect for the check hangs (stalled) while another worker writes.
    proxied.proxy.cut_after_reply(op.statement, keep_upstream=True, then="stall")

    def overwrite(other: MachineMemory) -> None:
        landed = other.read(mid)
        assert landed == {"n": 1}
        other.write(mid, {"n": 2}, landed)

    outcome = while_the_check_stalls(proxied, op.run, overwrite)
    assert_unknown(outcome, mid, "moved")
    assert read_real(proxied.real, mid) == {"n": 2}


def test_create_deleted_before_it_could_be_checked_is_unknown(
    proxied: ProxiedDatabase, mid: str
) -> None:
    """Our create landed, its reply was lost, and another worker deleted the state before the
    check: the row is absent, as if ours had never landed. A WriteError would say "nothing
    was stored", which is false; the row no longer tells, so the outcome is unknown."""
    memory = MachineMemory(using=proxied.alias)
    op = prepare(memory, proxied, mid, "create")
    assert memory.read(mid) is None  # connected
    proxied.proxy.cut_after_reply(op.statement, keep_upstream=True, then="stall")

    def delete_it(other: MachineMemory) -> None:
        assert other.read(mid) == {"n": 1}  # ours landed
        other.delete(mid)

    outcome = while_the_check_stalls(proxied, op.run, delete_it)
    assert_unknown(outcome, mid, "gone")


def test_delete_that_landed_before_the_state_was_made_again_is_unknown(
    proxied: ProxiedDatabase, mid: str
) -> None:
    """Our delete of version 2 landed, its reply was lost, and another worker created the
    state anew (version 1) before the check. A row at another version than ours could be
    either story (ours landed and the state was made again, or ours did not and the state
    moved on): the outcome is unknown, never "nothing was deleted"."""
    memory = MachineMemory(using=proxied.alias)
    memory.write(mid, {"n": 0}, None)
    memory.write(mid, {"n": 1}, memory.read(mid))
    prev = memory.read(mid)
    proxied.proxy.cut_after_reply(DELETE_STATE, keep_upstream=True, then="stall")

    def make_it_again(other: MachineMemory) -> None:
        assert other.read(mid) is None  # ours landed
        other.write(mid, {"n": 9}, None)

    outcome = while_the_check_stalls(proxied, lambda: memory.delete(mid, prev), make_it_again)
    assert_unknown(outcome, mid, "moved")
    assert read_real(proxied.real, mid) == {"n": 9}


def test_equal_write_by_another_worker_is_taken_as_ours(proxied: ProxiedDatabase, mid: str) -> None:
    """Two workers write the same new state from the same version (the same event delivered
    twice computes the same state). Ours is cut before it reaches the server and theirs
    lands before our check. The row cannot tell the two apart, and the contract takes it as
    ours (docs/contract.md#when-the-connection-dies, step 3): both are told they succeeded,
    although "exactly one of two writers starting from the same version succeeds" holds
    everywhere else."""
    memory = MachineMemory(using=proxied.alias)
    op = prepare(memory, proxied, mid, "update")
    sent = proxied.proxy.watch(op.statement)
    proxied.proxy.cut_before(op.statement, keep_upstream=True, then="stall")

    def write_the_same(other: MachineMemory) -> None:
        prev = other.read(mid)
        assert prev == {"n": 0}  # ours did not land
        other.write(mid, {"n": 1}, prev)  # theirs, with the same content

    # Returns normally: taken as ours.
    assert while_the_check_stalls(proxied, op.run, write_the_same) is None
    assert sent.count == 0  # our statement never reached the server
    assert read_real(proxied.real, mid) == {"n": 1}
    op.follow_up()  # and the version memo agrees with what is stored
    assert read_real(proxied.real, mid) == {"n": 2}


def test_write_inside_atomic_fails_at_once_and_never_lands(
    proxied: ProxiedDatabase, mid: str, caplog: pytest.LogCaptureFixture
) -> None:
    memory = MachineMemory(using=proxied.alias)
    op = prepare(memory, proxied, mid, "update")
    trigger = proxied.proxy.cut_after_reply(UPDATE_STATE, keep_upstream=True)
    connected = proxied.proxy.accepted
    reconnects: list[int] = []

    def in_a_transaction() -> None:
        with transaction.atomic(using=proxied.alias):
            try:
                op.run()
            finally:
                reconnects.append(proxied.proxy.accepted - connected)

    session = backend_id(proxied.alias)
    with pytest.raises(WriteError) as raised:
        in_a_transaction()
    assert trigger.count == 1
    # No settling (the transaction died with the connection and can never commit), but one
    # connection of its own ended the dead session, which would otherwise hold the row
    # lock of its uncommitted update until the server noticed the client was gone.
    assert reconnects == [1]
    assert_nothing_stored(raised.value, mid)
    assert not session_alive(proxied.real, session)
    # Ended as it should be: nothing to warn about.
    assert not [r for r in caplog.records if r.name.startswith("machine_memory")]
    assert_stays(proxied.real, mid, op.before)
    op.run()  # the redelivered event goes through: no row lock left behind
    assert read_real(proxied.real, mid) == op.after


def test_write_is_sent_once_never_retried(proxied: ProxiedDatabase, mid: str) -> None:
    memory = MachineMemory(using=proxied.alias)
    op = prepare(memory, proxied, mid, "update")
    trigger = proxied.proxy.cut_before(UPDATE_STATE, times=None)
    assert_nothing_stored(attempt(op.run), mid)
    assert trigger.count == 1
    proxied.proxy.disarm()
    assert_stays(proxied.real, mid, op.before)


# -- overwrite: read the version and write, under the row's lock, in one transaction ------------

SELECT_FOR_UPDATE = b"FOR UPDATE"
COMMIT = b"COMMIT"


def test_overwrite_whose_commit_reply_was_lost_returns_the_new_version(
    proxied: ProxiedDatabase, mid: str
) -> None:
    memory = MachineMemory(using=proxied.alias)
    memory.write(mid, {"n": 0}, None)
    session = backend_id(proxied.alias)
    trigger = proxied.proxy.cut_after_reply(COMMIT, keep_upstream=True)
    assert memory.overwrite(mid, {"n": 1}) == 2
    assert trigger.count == 1
    assert not session_alive(proxied.real, session)
    assert_stays(proxied.real, mid, {"n": 1}, watch=False)


def test_overwrite_cut_before_its_update_stores_nothing(proxied: ProxiedDatabase, mid: str) -> None:
    """The row is locked and read, then the connection breaks before the UPDATE: the
    transaction was never asked to commit, so nothing can land."""
    memory = MachineMemory(using=proxied.alias)
    memory.write(mid, {"n": 0}, None)
    trigger = proxied.proxy.cut_before(UPDATE_STATE, keep_upstream=True)
    assert_nothing_stored(attempt(lambda: memory.overwrite(mid, {"n": 1})), mid)
    assert trigger.count == 1
    assert_stays(proxied.real, mid, {"n": 0})
    proxied.proxy.release_upstreams()  # whatever the memory did about the old session
    assert memory.overwrite(mid, {"n": 1}) == 2  # the redelivered event


def test_delete_whose_reply_was_lost_forgets_the_state_it_deleted(
    proxied: ProxiedDatabase, mid: str
) -> None:
    """Settled as landed, the delete is done: the object it was given stands for no version
    any more (version_of(), the REST API's ETags), as after a delete whose reply came."""
    memory = MachineMemory(using=proxied.alias)
    memory.write(mid, {"n": 0}, None)
    prev = memory.read(mid)
    assert memory.version_of(mid, prev) == 1
    trigger = proxied.proxy.cut_after_reply(DELETE_STATE, keep_upstream=True)
    memory.delete(mid, prev)
    assert trigger.count == 1
    assert memory.version_of(mid, prev) is None
    assert read_real(proxied.real, mid) is None


def row_locked_change(memory: MachineMemory, mid: str, operation: str) -> Callable[[], Any]:
    """Store ``{"n": 0}``; the call that changes it under the row's lock (``operation``:
    overwrite to ``{"n": 1}``, or delete), without prev_data."""
    memory.write(mid, {"n": 0}, None)
    if operation == "overwrite":
        return lambda: memory.overwrite(mid, {"n": 1})
    return lambda: memory.delete(mid)


@pytest.mark.parametrize("operation", ["overwrite", "delete"])
@pytest.mark.parametrize("where", ["before", "after-reply"])
def test_row_locked_change_whose_commit_was_cut_is_settled(
    proxied: ProxiedDatabase, mid: str, operation: str, where: str
) -> None:
    """overwrite() and delete() without prev_data commit their change under the row's lock.
    The COMMIT is cut before the server gets it (nothing stored: a WriteError), or its reply
    is lost (settled on a fresh connection: the change landed, the call returns)."""
    memory = MachineMemory(using=proxied.alias)
    change = row_locked_change(memory, mid, operation)
    if where == "before":
        trigger = proxied.proxy.cut_before(b"COMMIT")
        assert_nothing_stored(attempt(change), mid)
        after: dict[str, Any] | None = {"n": 0}
    else:
        trigger = proxied.proxy.cut_after_reply(b"COMMIT", keep_upstream=True)
        change()
        after = {"n": 1} if operation == "overwrite" else None
    assert trigger.count == 1
    assert read_real(proxied.real, mid) == after


@pytest.mark.parametrize("change", ["write", "delete"])
def test_rejected_change_whose_cause_cannot_be_looked_up(
    proxied: ProxiedDatabase, mid: str, change: str
) -> None:
    """A stale change matched nothing; the look that tells a conflict from a takeover then
    fails (the server refuses every connection). Not a WriteConflict the caller would act
    on: a WriteError, and the change was not made."""
    memory = MachineMemory(using=proxied.alias)
    memory.write(mid, {"n": 0}, None)
    stale = memory.read(mid)
    MachineMemory(using=proxied.real).write(mid, {"n": 1}, {"n": 0})
    stale_change: Callable[[], None] = (
        (lambda: memory.write(mid, {"n": 2}, stale))
        if change == "write"
        else (lambda: memory.delete(mid, stale))
    )
    looked = proxied.proxy.cut_before(LOAD_STATE, then="refuse")
    with pytest.raises(WriteError) as raised:
        stale_change()
    assert looked.count == 1
    assert type(raised.value) is WriteError
    cause = raised.value.__cause__
    assert isinstance(cause, TRANSIENT)
    assert str(raised.value) == (
        f"Writing machine {mid!r} was rejected: {cause}"
        if change == "write"
        else f"Deleting machine {mid!r} failed: {cause}"
    )
    proxied.proxy.accept()
    assert read_real(proxied.real, mid) == {"n": 1}


def test_row_locked_change_whose_session_cannot_be_ended_warns(
    proxied: ProxiedDatabase, mid: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The overwrite's connection is cut before its change and the server then refuses
    every connection, so its old session cannot be ended: nothing was stored (the
    transaction never asked to commit), and the log says the session may linger."""
    memory = MachineMemory(using=proxied.alias)
    memory.write(mid, {"n": 0}, None)
    proxied.proxy.cut_before(UPDATE_STATE, then="refuse")
    with caplog.at_level(logging.WARNING, logger="machine_memory"):
        failure = assert_nothing_stored(attempt(lambda: memory.overwrite(mid, {"n": 1})), mid)
    [warning] = machine_memory_warnings(caplog)
    cause = warning.args[0] if isinstance(warning.args, tuple) else None
    assert isinstance(cause, TRANSIENT) and cause is not failure.__cause__
    assert warning.getMessage() == f"Could not end a failed statement's server session: {cause}"
    proxied.proxy.accept()
    assert_stays(proxied.real, mid, {"n": 0}, watch=False)
    assert memory.overwrite(mid, {"n": 1}) == 2  # the redelivered event


@pytest.mark.parametrize("proxied", ["postgres"], indirect=True)
def test_row_locked_change_behind_a_declared_pooler_warns(
    proxied: ProxiedDatabase, mid: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Behind a pooler the memory may not end the cut session (it may be somebody else's):
    nothing was stored all the same, and the log says the session was not ended."""
    settings_dict = connections[proxied.alias].settings_dict
    settings_dict["DISABLE_SERVER_SIDE_CURSORS"] = True
    try:
        memory = MachineMemory(using=proxied.alias)
        memory.write(mid, {"n": 0}, None)
        proxied.proxy.cut_before(UPDATE_STATE)
        with caplog.at_level(logging.WARNING, logger="machine_memory"):
            assert_nothing_stored(attempt(lambda: memory.overwrite(mid, {"n": 1})), mid)
        assert [r.getMessage() for r in machine_memory_warnings(caplog)] == [
            "A failed statement's server session could not be ended."
        ]
        assert_stays(proxied.real, mid, {"n": 0}, watch=False)
    finally:
        del settings_dict["DISABLE_SERVER_SIDE_CURSORS"]
        connections[proxied.alias].close()


@pytest.mark.parametrize("operation", ["overwrite", "delete"])
@pytest.mark.parametrize("where", ["row-lock-wait", "before-change"])
def test_row_locked_change_cut_leaves_the_row_usable(
    proxied: ProxiedDatabase, mid: str, operation: str, where: str
) -> None:
    """overwrite() and delete() without prev_data lock the row (SELECT ... FOR UPDATE) in a
    transaction. Cut while that waits for the row lock, or after it got the lock but before
    the change: nothing can land, but a server session that did not notice the cut holds the
    row lock in its open transaction until the server notices the dead client (hours, with
    default keepalives), and every later write to the id would hang. The memory must end
    that session."""
    memory = MachineMemory(using=proxied.alias)
    run_operation = row_locked_change(memory, mid, operation)
    if where == "before-change":
        change = UPDATE_STATE if operation == "overwrite" else DELETE_STATE
        proxied.proxy.cut_before(change, keep_upstream=True)
        assert_nothing_stored(attempt(run_operation), mid)
    else:
        connections[proxied.alias].close()
        wait_until(lambda: proxied.proxy.open_links == 0, "the set-up connection to close")
        sessions: list[int] = []

        def on_the_wire() -> BaseException | None:
            sessions.append(backend_id(proxied.alias))
            return attempt(run_operation)

        with row_locked(proxied.real, mid, "update"):
            sent = proxied.proxy.watch(SELECT_FOR_UPDATE)
            run = ThreadRun(on_the_wire)
            assert sent.wait(10)
            wait_for_the_row_lock_wait(proxied.real, sessions, run)
            assert proxied.proxy.cut(keep_upstream=True) == 1
            assert_nothing_stored(run.result(timeout=20), mid)
    assert_stays(proxied.real, mid, {"n": 0})
    # Another worker's write to the id goes through: no dead session holds the row.
    other = ThreadRun(lambda: MachineMemory(using=proxied.real).write(mid, {"n": 5}, {"n": 0}))
    try:
        other.result(timeout=5)
    except queue.Empty:
        raise AssertionError(
            f"a write to the id hangs: the cut {operation}'s server session holds the row lock"
        ) from None
    finally:
        proxied.proxy.release_upstreams()  # lets a hanging write finish before teardown
        other.thread.join(60)
    assert read_real(proxied.real, mid) == {"n": 5}


# -- read -----------------------------------------------------------------------------------------


def test_read_after_a_cut_retries_on_a_fresh_connection(proxied: ProxiedDatabase, mid: str) -> None:
    memory = MachineMemory(using=proxied.alias)
    memory.write(mid, {"n": 1}, None)
    connected = proxied.proxy.accepted
    assert proxied.proxy.cut() == 1
    assert memory.read(mid) == {"n": 1}
    assert proxied.proxy.accepted == connected + 1  # one fresh connection


def test_read_whose_reply_was_lost_is_retried(proxied: ProxiedDatabase, mid: str) -> None:
    memory = MachineMemory(using=proxied.alias)
    memory.write(mid, {"n": 1}, None)
    connected = proxied.proxy.accepted
    sent = proxied.proxy.watch(READ_STATE)
    trigger = proxied.proxy.cut_after_reply(READ_STATE, keep_upstream=True)
    assert memory.read(mid) == {"n": 1}
    assert trigger.count == 1 and sent.count == 2
    assert proxied.proxy.accepted == connected + 1


@pytest.mark.parametrize("asynchronous", [False, True], ids=["read", "aread"])
def test_read_gives_up_within_a_second_with_read_error(
    proxied: ProxiedDatabase, mid: str, asynchronous: bool
) -> None:
    memory = MachineMemory(using=proxied.alias)
    memory.write(mid, {"n": 1}, None)
    assert (memory.read_retries, memory.read_backoff) == (2, 0.1)
    proxied.proxy.refuse()
    proxied.proxy.cut()
    read: Callable[[], Any] = (
        (lambda: asyncio.run(memory.aread(mid))) if asynchronous else (lambda: memory.read(mid))
    )
    started = time.monotonic()
    with pytest.raises(ReadError) as raised:
        read()
    elapsed = time.monotonic() - started
    assert elapsed < 1.0
    assert isinstance(raised.value.__cause__, TRANSIENT)
    if asynchronous:
        # aread runs on asgiref's thread, whose connection may be older than this proxy.
        assert proxied.proxy.refused >= memory.read_retries
    else:
        # The cut connection, then a fresh connection per retry, each refused.
        assert proxied.proxy.refused == memory.read_retries
        assert elapsed >= 0.1 + 0.2  # the backoff was waited
    proxied.proxy.accept()
    assert memory.read(mid) == {"n": 1}


# -- lock, unlock, extend ------------------------------------------------------------------------


@pytest.mark.parametrize("again", [False, True], ids=["first-use", "after-unlock"])
def test_lock_whose_reply_was_lost_is_adopted(
    proxied: ProxiedDatabase, mid: str, again: bool
) -> None:
    memory = MachineMemory(using=proxied.alias, lock_retries=0)
    other = MachineMemory(using=proxied.real, lock_retries=0)
    if again:
        assert other.lock(mid) and other.unlock(mid)
    assert memory.read(mid) is None  # connected
    statement = (ACQUIRE_AGAIN if again else ACQUIRE_FIRST)[vendor(proxied)]
    sent = proxied.proxy.watch(statement)
    trigger = proxied.proxy.cut_after_reply(statement, keep_upstream=True)
    assert memory.lock(mid) is True
    assert trigger.count == 1
    assert sent.count == 1  # adopted, not acquired a second time
    info = other.lock_info(mid)
    assert info is not None and info.owner == memory.owner
    assert memory.holds(mid) and memory.held_token(mid) == info.token
    assert other.lock(mid) is False  # exactly one holder
    assert memory.unlock(mid) is True
    assert other.lock(mid) is True and other.unlock(mid)


def test_relock_whose_reply_was_lost_is_still_a_denial(proxied: ProxiedDatabase, mid: str) -> None:
    memory = MachineMemory(using=proxied.alias, lock_retries=0)
    assert memory.lock(mid)
    token = memory.held_token(mid)
    trigger = proxied.proxy.cut_after_reply(LOCK_TABLE, keep_upstream=True)
    assert memory.lock(mid) is False  # not reentrant, also when the reply was lost
    assert trigger.count == 1
    assert memory.holds(mid) and memory.held_token(mid) == token
    info = MachineMemory(using=proxied.real).lock_info(mid)
    assert info is not None and (info.owner, info.token) == (memory.owner, token)
    assert memory.unlock(mid)


def test_lock_cut_before_it_reached_the_server_is_retried(
    proxied: ProxiedDatabase, mid: str
) -> None:
    memory = MachineMemory(using=proxied.alias, lock_retries=0)
    assert memory.read(mid) is None
    connected = proxied.proxy.accepted
    trigger = proxied.proxy.cut_before(ACQUIRE_FIRST[vendor(proxied)])
    assert memory.lock(mid) is True
    assert trigger.count == 1
    assert proxied.proxy.accepted == connected + 1
    info = MachineMemory(using=proxied.real).lock_info(mid)
    assert info is not None and info.owner == memory.owner
    assert memory.unlock(mid)


def test_lock_cut_after_a_lock_inside_atomic_ends_the_session_it_ran_on(
    proxied: ProxiedDatabase, mid: str
) -> None:
    """A lock taken inside atomic() ran on a side connection, which stays open. A later lock
    outside any transaction runs on the alias's own connection; when that one is cut, its
    server session is the one to end, not the idle side connection's."""
    memory = MachineMemory(using=proxied.alias, lock_retries=0)
    with transaction.atomic(using=proxied.alias):
        assert memory.lock(f"{mid}-a") and memory.unlock(f"{mid}-a")
    assert memory.read(mid) is None  # connected
    session = backend_id(proxied.alias)
    trigger = proxied.proxy.cut_before(ACQUIRE_FIRST[vendor(proxied)], keep_upstream=True)
    assert memory.lock(mid) is True
    assert trigger.count == 1
    assert not session_alive(proxied.real, session)
    assert memory.unlock(mid)
    memory.close()


@pytest.mark.parametrize("landed", [False, True], ids=["not-landed", "landed"])
def test_lock_that_cannot_reach_storage_raises_lock_error_not_false(
    proxied: ProxiedDatabase, mid: str, landed: bool
) -> None:
    memory = MachineMemory(using=proxied.alias, lock_retries=0, lock_ttl=2)
    assert memory.read(mid) is None
    statement = ACQUIRE_FIRST[vendor(proxied)]
    if landed:
        proxied.proxy.cut_after_reply(statement, keep_upstream=True, then="refuse")
    else:
        proxied.proxy.cut_before(statement, then="refuse")
    with pytest.raises(LockError) as raised:
        memory.lock(mid)
    assert isinstance(raised.value.__cause__, TRANSIENT)
    assert not memory.holds(mid)
    proxied.proxy.accept()
    info = MachineMemory(using=proxied.real).lock_info(mid)
    if landed:
        # Its release was refused as well: the lock is left to expire (best effort). The
        # test ends it rather than leave it to the tests that follow.
        assert info is not None and info.owner == memory.owner
        released = MachineMemory(using=proxied.real).force_unlock(mid)
        assert released is not None and (released.owner, released.token) == (info.owner, info.token)
    else:
        assert info is None


@pytest.mark.parametrize("where", ["before", "after-reply"])
def test_unlock_cut_is_retried_and_releases(
    proxied: ProxiedDatabase, mid: str, where: str, caplog: pytest.LogCaptureFixture
) -> None:
    memory = MachineMemory(using=proxied.alias)
    assert memory.lock(mid)
    if where == "before":
        trigger = proxied.proxy.cut_before(LOCK_TABLE)
    else:
        trigger = proxied.proxy.cut_after_reply(LOCK_TABLE, keep_upstream=True)
    with caplog.at_level(logging.WARNING, logger="machine_memory"):
        assert memory.unlock(mid) is True
    assert trigger.count == 1
    assert not memory.holds(mid)
    assert MachineMemory(using=proxied.real).lock_info(mid) is None
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_unlock_that_cannot_reach_storage_returns_false_and_warns(
    proxied: ProxiedDatabase, mid: str, caplog: pytest.LogCaptureFixture
) -> None:
    memory = MachineMemory(using=proxied.alias)
    assert memory.lock(mid)
    proxied.proxy.cut_before(LOCK_TABLE, then="refuse")
    with caplog.at_level(logging.WARNING, logger="machine_memory"):
        assert memory.unlock(mid) is False  # never raises
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    cause = warning.args[-1] if isinstance(warning.args, tuple) else None
    assert isinstance(cause, TRANSIENT)
    assert (
        warning.getMessage() == f"Unlocking machine {mid!r} failed; leaving it to expire: {cause}"
    )
    proxied.proxy.accept()
    info = MachineMemory(using=proxied.real).lock_info(mid)
    assert info is not None and info.owner == memory.owner  # left to expire by its TTL
    assert MachineMemory(using=proxied.real).force_unlock(mid) is not None


def test_extend_cut_is_retried_once_on_a_fresh_connection(
    proxied: ProxiedDatabase, mid: str
) -> None:
    memory = MachineMemory(using=proxied.alias)
    other = MachineMemory(using=proxied.real)
    assert memory.lock(mid, ttl=60)
    before = other.lock_info(mid)
    trigger = proxied.proxy.cut_before(LOCK_TABLE)
    assert memory.extend(mid, ttl=600) is True
    assert trigger.count == 1
    after = other.lock_info(mid)
    assert before is not None and after is not None
    assert after.token == before.token and after.expires_at > before.expires_at
    assert memory.unlock(mid)


def test_extend_failing_twice_raises_lock_error(proxied: ProxiedDatabase, mid: str) -> None:
    memory = MachineMemory(using=proxied.alias)
    assert memory.lock(mid)
    trigger = proxied.proxy.cut_before(LOCK_TABLE, times=None)
    with pytest.raises(LockError) as raised:
        memory.extend(mid, ttl=600)
    assert isinstance(raised.value.__cause__, TRANSIENT)
    assert trigger.count == 2  # the attempt and one retry on a fresh connection
    proxied.proxy.disarm()
    assert memory.unlock(mid)


@pytest.mark.parametrize("proxied", ["postgres"], indirect=True)
def test_declared_pooler_leaves_an_unsettled_write_unknown(
    proxied: ProxiedDatabase, mid: str
) -> None:
    """Behind a pooler (DISABLE_SERVER_SIDE_CURSORS, Django's PostgreSQL pooler hint) the
    session id names no server session the memory may end: a write that did not visibly
    land is unknown, not a WriteError."""
    settings_dict = connections[proxied.alias].settings_dict
    settings_dict["DISABLE_SERVER_SIDE_CURSORS"] = True
    try:
        memory = MachineMemory(using=proxied.alias)
        op = prepare(memory, proxied, mid, "update")
        session = backend_id(proxied.alias)
        proxied.proxy.cut_before(op.statement, keep_upstream=True)
        outcome = attempt(op.run)
        assert_unknown(outcome, mid, "session")
        assert session_alive(proxied.real, session)  # not ended: it may be somebody else's
        assert_stays(proxied.real, mid, op.before)
    finally:
        del settings_dict["DISABLE_SERVER_SIDE_CURSORS"]
        connections[proxied.alias].close()


# -- Redis locks: the failures decided after a Redis fault --------------------------------------


def redis_memory(alias: str, cache: str = "redis_proxy", **options: Any) -> MachineMemory:
    return MachineMemory(using=alias, lock_backend=redis_locks(alias, cache), **options)


def warm_up(memory: MachineMemory) -> None:
    """Load the Lua scripts into Redis, so that the next EVALSHA is the only command sent."""
    probe = new_id("warm-up")
    assert memory.lock(probe) and memory.extend(probe) and memory.unlock(probe)


def test_redis_acquire_whose_reply_was_lost_is_adopted(
    alias: str, redis_proxy: FaultProxy, mid: str
) -> None:
    memory = redis_memory(alias, lock_retries=0)
    other = redis_memory(alias, "redis_faults", lock_retries=0)
    warm_up(memory)
    trigger = redis_proxy.cut_after_reply(EVALSHA, keep_upstream=True)
    assert memory.lock(mid) is True
    assert trigger.count == 1
    info = other.lock_info(mid)
    assert info is not None and info.owner == memory.owner
    assert memory.held_token(mid) == info.token
    assert other.lock(mid) is False  # exactly one holder
    assert memory.unlock(mid) is True
    assert other.lock_info(mid) is None


def test_redis_acquire_cut_before_it_reached_redis_is_retried(
    alias: str, redis_proxy: FaultProxy, mid: str
) -> None:
    memory = redis_memory(alias, lock_retries=0)
    warm_up(memory)
    connected = redis_proxy.accepted
    trigger = redis_proxy.cut_before(EVALSHA)
    assert memory.lock(mid) is True
    assert trigger.count == 1
    assert redis_proxy.accepted == connected + 1
    info = redis_memory(alias, "redis_faults").lock_info(mid)
    assert info is not None and info.owner == memory.owner
    assert memory.unlock(mid)


@pytest.mark.parametrize("kind", ["update", "delete"])
def test_redis_fence_check_cut_raises_write_error_before_the_database(
    proxied: ProxiedDatabase, redis_proxy: FaultProxy, mid: str, kind: str
) -> None:
    memory = redis_memory(proxied.alias)
    op = prepare(memory, proxied, mid, kind)
    assert memory.lock(mid)
    reached_the_database = proxied.proxy.watch(op.statement)
    fence = redis_proxy.cut_before(MGET, times=None)
    outcome = attempt(op.run)
    assert isinstance(outcome, WriteError) and not isinstance(outcome, WriteConflict)
    assert isinstance(outcome.__cause__, RedisError), repr(outcome.__cause__)
    assert fence.count >= 1
    assert reached_the_database.count == 0  # refused before the statement was sent
    assert_stays(proxied.real, mid, op.before)
    redis_proxy.disarm()
    op.run()  # the redelivered event
    assert read_real(proxied.real, mid) == op.after
    assert memory.unlock(mid)


@pytest.mark.parametrize("kind", ["update", "delete"])
def test_redis_fence_check_cut_once_is_asked_again_as_the_same_holder(
    alias: str, redis_proxy: FaultProxy, mid: str, kind: str
) -> None:
    """One cut MGET: the check is asked again on a fresh connection, for the same owner
    and token, and the change goes through fenced with that token."""
    memory = redis_memory(alias)
    op = prepare(memory, None, mid, kind)
    assert memory.lock(mid)
    token = memory.held_token(mid)
    fence = redis_proxy.cut_before(MGET)
    op.run()
    assert fence.count == 1
    assert read_real(alias, mid) == op.after
    if kind == "update":
        assert stored_fence(alias, mid) == token
    assert memory.unlock(mid)


def test_redis_fence_check_cut_stores_nothing_on_any_database(
    alias: str, redis_proxy: FaultProxy, mid: str
) -> None:
    memory = redis_memory(alias)
    op = prepare(memory, None, mid, "update")
    assert memory.lock(mid)
    redis_proxy.cut_before(MGET, times=None)
    outcome = attempt(op.run)
    assert isinstance(outcome, WriteError) and not isinstance(outcome, WriteConflict)
    assert_stays(alias, mid, op.before)
    redis_proxy.disarm()
    assert memory.unlock(mid)


@pytest.mark.parametrize("where", ["before", "after-reply"])
def test_redis_unlock_cut_is_retried_and_releases(
    alias: str, redis_proxy: FaultProxy, mid: str, where: str, caplog: pytest.LogCaptureFixture
) -> None:
    memory = redis_memory(alias)
    warm_up(memory)
    assert memory.lock(mid)
    if where == "before":
        trigger = redis_proxy.cut_before(EVALSHA)
    else:
        trigger = redis_proxy.cut_after_reply(EVALSHA, keep_upstream=True)
    with caplog.at_level(logging.WARNING, logger="machine_memory"):
        assert memory.unlock(mid) is True
    assert trigger.count == 1
    assert redis_memory(alias, "redis_faults").lock_info(mid) is None
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_redis_unlock_that_cannot_reach_redis_returns_false_and_warns(
    alias: str, redis_proxy: FaultProxy, mid: str, caplog: pytest.LogCaptureFixture
) -> None:
    memory = redis_memory(alias)
    warm_up(memory)
    assert memory.lock(mid)
    redis_proxy.cut_before(EVALSHA, then="refuse")
    with caplog.at_level(logging.WARNING, logger="machine_memory"):
        assert memory.unlock(mid) is False  # never raises
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    cause = warning.args[-1] if isinstance(warning.args, tuple) else None
    assert isinstance(cause, RedisError)
    assert (
        warning.getMessage() == f"Unlocking machine {mid!r} failed; leaving it to expire: {cause}"
    )
    redis_proxy.accept()
    other = redis_memory(alias, "redis_faults")
    info = other.lock_info(mid)
    assert info is not None and info.owner == memory.owner  # left to expire
    assert other.force_unlock(mid) is not None


def test_redis_extend_cut_is_retried_once(alias: str, redis_proxy: FaultProxy, mid: str) -> None:
    memory = redis_memory(alias)
    other = redis_memory(alias, "redis_faults")
    warm_up(memory)
    assert memory.lock(mid, ttl=60)
    before = other.lock_info(mid)
    trigger = redis_proxy.cut_before(EVALSHA)
    assert memory.extend(mid, ttl=600) is True
    assert trigger.count == 1
    after = other.lock_info(mid)
    assert before is not None and after is not None
    assert after.token == before.token and after.expires_at > before.expires_at
    assert memory.unlock(mid)


# -- SQLite: a failed statement has finished inside the process --------------------------------


@contextlib.contextmanager
def sqlite_writer_elsewhere() -> Iterator[sqlite3.Connection]:
    """Another connection to the SQLite test database holding its write lock (BEGIN
    IMMEDIATE) until the block ends, then committing."""
    path = connections["default"].settings_dict["NAME"]
    blocker = sqlite3.connect(path, isolation_level=None, timeout=5)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        yield blocker
        blocker.execute("COMMIT")
    finally:
        blocker.close()


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_sqlite_write_blocked_by_another_writer_stores_nothing(
    sqlite_short: str, mid: str, kind: str
) -> None:
    memory = MachineMemory(using=sqlite_short, cleanup="delete")
    op = prepare(memory, None, mid, kind)
    with sqlite_writer_elsewhere():
        started = time.monotonic()
        outcome = attempt(op.run)
        assert time.monotonic() - started < 5
        failure = assert_nothing_stored(outcome, mid)
        assert "locked" in str(failure.__cause__)
        assert_stays("default", mid, op.before, watch=False)
    # The other writer committed: nothing of the failed call shows up, then or later.
    assert_stays("default", mid, op.before)
    op.run()  # the redelivered event
    assert read_real("default", mid) == op.after


def test_sqlite_lock_blocked_by_another_writer_raises_lock_error(
    sqlite_short: str, mid: str
) -> None:
    memory = MachineMemory(using=sqlite_short, lock_retries=0)
    assert memory.read(mid) is None  # connected before the other writer starts
    with sqlite_writer_elsewhere(), pytest.raises(LockError):
        memory.lock(mid)
    assert not memory.holds(mid)
    assert MachineMemory(using="default").lock_info(mid) is None
    assert memory.lock(mid) and memory.unlock(mid)


# -- a randomized soak: the Arvo cycle from 4 threads while faults strike at random ------------

SOAK_SECONDS = float(os.environ.get("MM_SOAK_SECONDS", "6"))
SOAK_WORKERS = 4
SOAK_IDS = 3
# Locks outlive every stall the controller makes, yet a lock whose unlock failed blocks its
# id only briefly.
SOAK_TTL = 2.0
SOAK_PATTERNS = [UPDATE_STATE, READ_STATE, LOCK_TABLE, EVALSHA, MGET]


@dataclass
class Hold:
    """One worker's hold of a lock: lock() called at ``asked``, returned True at ``got``,
    unlock() called at ``released`` (monotonic clock)."""

    mid: str
    owner: str
    asked: float
    got: float
    released: float


@dataclass
class SoakRecord:
    """Everything the workers saw, shared (appends and Counter updates under ``lock``)."""

    lock: threading.Lock
    outcomes: Counter[str]
    writes: list[tuple[str, str, str]]  # (machine id, tag, outcome)
    holds: list[Hold]
    unexpected: list[str]

    def count(self, key: str) -> None:
        with self.lock:
            self.outcomes[key] += 1


def soak_worker(
    index: int, make: Callable[[], MachineMemory], ids: list[str], until: float, log: SoakRecord
) -> None:
    rng = random.Random(index)
    memory = make()
    seq = 0
    try:
        while time.monotonic() < until:
            mid = rng.choice(ids)
            asked = time.monotonic()
            try:
                if not memory.lock(mid):
                    log.count("lock denied")
                    time.sleep(0.002)  # pacing: another worker has this id
                    continue
            except LockError:
                log.count("lock LockError")
                continue
            got = time.monotonic()
            log.count("lock ok")
            try:
                try:
                    state = memory.read(mid)
                except ReadError:
                    log.count("read ReadError")
                    continue
                assert state is not None
                seq += 1
                tag = f"{index}.{seq}"
                new = {"count": state["count"] + 1, "log": [*state["log"], tag]}
                try:
                    memory.write(mid, new, state)
                    outcome = "ok"
                except WriteOutcomeUnknown:
                    outcome = "WriteOutcomeUnknown"
                except LockLost:
                    outcome = "LockLost"
                except WriteConflict:
                    outcome = "WriteConflict"
                except WriteError:
                    outcome = "WriteError"
                with log.lock:
                    log.writes.append((mid, tag, outcome))
                    log.outcomes[f"write {outcome}"] += 1
            finally:
                released = time.monotonic()
                if not memory.unlock(mid):
                    log.count("unlock False")
                with log.lock:
                    log.holds.append(Hold(mid, memory.owner, asked, got, released))
    except BaseException as exc:
        with log.lock:
            log.unexpected.append(f"worker {index}: {exc!r}")
    finally:
        memory.close()
        connections.close_all()


def fault_controller(
    proxies: list[FaultProxy],
    rng: random.Random,
    stop: threading.Event,
    faults: Counter[str],
    triggers: list[Any],
) -> None:
    """Strike every 20-120 ms with a random fault on a random proxy."""
    kinds = [
        "cut",
        "cut keep_upstream",
        "stall",
        "refuse",
        "cut_before",
        "cut_after_reply",
        "cut_after_reply then refuse",
    ]
    while not stop.wait(rng.uniform(0.02, 0.1)):
        proxy = rng.choice(proxies)
        kind = rng.choice(kinds)
        keep = rng.random() < 0.5
        pattern = rng.choice(SOAK_PATTERNS)
        if kind == "cut":
            proxy.cut()
        elif kind == "cut keep_upstream":
            proxy.cut(keep_upstream=True)
        elif kind in ("stall", "refuse"):
            getattr(proxy, kind)()
            stop.wait(rng.uniform(0.05, 0.3))
            proxy.resume() if kind == "stall" else proxy.accept()
        elif kind == "cut_before":
            triggers.append(proxy.cut_before(pattern, keep_upstream=keep))
        elif kind == "cut_after_reply":
            triggers.append(proxy.cut_after_reply(pattern, keep_upstream=keep))
        else:
            # A reply lost and the server unreachable right after: the case for
            # WriteOutcomeUnknown when it strikes a write.
            trigger = proxy.cut_after_reply(pattern, keep_upstream=keep, then="refuse")
            triggers.append(trigger)
            if trigger.fired.wait(0.3):
                stop.wait(rng.uniform(0.05, 0.2))
            proxy.disarm(trigger)
            proxy.accept()
        faults[kind] += 1
        # Servers notice a vanished client some time (keepalive) after the cut.
        proxy.release_upstreams(older_than=1.0)


def overlapping_holds(holds: list[Hold]) -> list[str]:
    """Pairs of different owners whose certain hold times of one id overlap.

    A hold is certain from ``got`` (lock() returned True) until unlock() was called, but no
    longer than the TTL counted from ``asked`` (the acquisition happened after that).
    """
    problems = []
    by_id: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
    for hold in holds:
        end = min(hold.released, hold.asked + SOAK_TTL - 0.05)
        by_id[hold.mid].append((hold.got, end, hold.owner))
    for mid, spans in by_id.items():
        spans.sort()
        latest: tuple[float, float, str] | None = None
        for span in spans:
            if latest is not None and span[0] < latest[1] and span[2] != latest[2]:
                problems.append(f"{mid}: {span[2]} held it while {latest[2]} still did")
            if latest is None or span[1] > latest[1]:
                latest = span
    return problems


def run_soak(
    name: str,
    real: str,
    make: Callable[[], MachineMemory],
    proxies: list[FaultProxy],
    summary_file: Any,
) -> None:
    seed = random.randrange(1 << 32)
    ids = [new_id(f"soak-{name}") for _ in range(SOAK_IDS)]
    setup = MachineMemory(using=real)
    for mid in ids:
        setup.write(mid, {"count": 0, "log": []}, None)
    log = SoakRecord(threading.Lock(), Counter(), [], [], [])
    faults: Counter[str] = Counter()
    triggers: list[Any] = []
    stop = threading.Event()
    until = time.monotonic() + SOAK_SECONDS
    controller = ThreadRun(fault_controller, proxies, random.Random(seed), stop, faults, triggers)
    workers = [
        threading.Thread(target=soak_worker, args=(i, make, ids, until, log), daemon=True)
        for i in range(SOAK_WORKERS)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(SOAK_SECONDS + 60)
    stop.set()
    controller.result(timeout=30)
    assert not any(worker.is_alive() for worker in workers), "a worker hung"
    for proxy in proxies:
        proxy.pass_through()
        proxy.release_upstreams()
    # A worker whose release a fault refused left its lock to expire (best effort, as
    # documented): end those, so that the tests that follow find no live lock.
    cleaner = make()
    for mid in ids:
        cleaner.force_unlock(mid)
    cleaner.close()
    assert not log.unexpected, log.unexpected

    # What is stored now (and stays so: nothing lands late).
    final = {mid: read_real(real, mid) for mid in ids}
    for mid in ids:
        assert_stays(real, mid, final[mid])
    landed: set[str] = set()
    for state in final.values():
        assert state is not None and state["count"] == len(state["log"])
        assert len(set(state["log"])) == len(state["log"]), "an increment landed twice"
        landed.update(state["log"])
    outcomes = Counter(outcome for _, _, outcome in log.writes)
    lost = [tag for _, tag, outcome in log.writes if outcome == "ok" and tag not in landed]
    misreported = [
        (tag, outcome)
        for _, tag, outcome in log.writes
        if outcome not in ("ok", "WriteOutcomeUnknown") and tag in landed
    ]
    unknown_landed = sum(
        1 for _, tag, outcome in log.writes if outcome == "WriteOutcomeUnknown" and tag in landed
    )
    overlaps = overlapping_holds(log.holds)
    total = sum(state["count"] for state in final.values() if state is not None)
    fired = Counter(
        ("cut_after_reply then refuse" if t.then else t.kind) for t in triggers if t.count
    )
    fault_text = ", ".join(
        f"{kind}={count}" + (f" ({fired[kind]} fired)" if kind.startswith("cut_") else "")
        for kind, count in sorted(faults.items())
    )
    summary = (
        f"soak[{name}] {SOAK_SECONDS:g} s, {SOAK_WORKERS} threads x {SOAK_IDS} ids, seed {seed}: "
        f"faults: {fault_text}; outcomes: "
        + ", ".join(f"{key}={value}" for key, value in sorted(log.outcomes.items()))
        + f"; final count {total} = ok {outcomes['ok']} + landed unknown {unknown_landed}"
        f" (of {outcomes['WriteOutcomeUnknown']}); lost updates {len(lost)},"
        f" misreported {len(misreported)}, overlapping holders {len(overlaps)}"
    )
    print(summary)
    summary_file.write(summary + "\n")
    summary_file.flush()
    assert not lost, f"writes reported stored but absent: {lost}"
    assert not misreported, f"writes reported failed that landed: {misreported}"
    assert not overlaps, overlaps
    assert outcomes["ok"] <= total <= outcomes["ok"] + outcomes["WriteOutcomeUnknown"]
    assert total == outcomes["ok"] + unknown_landed
    # The soak did something: writes went through and faults struck.
    assert outcomes["ok"] > 20 and sum(faults.values()) > 20


@pytest.fixture(scope="module")
def soak_summary(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    path = tmp_path_factory.getbasetemp() / "soak-summary.txt"
    with path.open("a") as summary_file:
        yield summary_file
    print(f"soak summary: {path}")


@pytest.mark.slow
def test_soak_under_random_faults(proxied: ProxiedDatabase, soak_summary: Any) -> None:
    def make() -> MachineMemory:
        return MachineMemory(using=proxied.alias, lock_retries=0, lock_ttl=SOAK_TTL)

    run_soak(proxied.real, proxied.real, make, [proxied.proxy], soak_summary)


@pytest.mark.slow
@pytest.mark.parametrize("proxied", ["postgres"], indirect=True)
def test_soak_with_redis_locks_under_random_faults(
    proxied: ProxiedDatabase, redis_proxy: FaultProxy, soak_summary: Any
) -> None:
    def make() -> MachineMemory:
        return MachineMemory(
            using=proxied.alias,
            lock_backend=redis_locks(proxied.alias, "redis_proxy"),
            lock_retries=0,
            lock_ttl=SOAK_TTL,
        )

    run_soak("postgres+redis", proxied.real, make, [proxied.proxy, redis_proxy], soak_summary)

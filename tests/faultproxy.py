"""A loopback TCP proxy that injects network faults for real (stdlib only).

``FaultProxy(host, port)`` listens on 127.0.0.1 (port 0: the OS picks one, see ``.port``)
and forwards every connection to ``host:port``. It runs an asyncio event loop on a daemon
thread of its own; every control below is thread-safe and synchronous: when it returns, the
proxy is in the new mode (connections cut, triggers armed).

Faults:

- ``refuse()`` / ``accept()``: new connections are reset at once (``refused`` counts them).
- ``stall()`` / ``resume()``: nothing is forwarded in either direction; sockets stay open.
- ``cut(keep_upstream=False)``: reset every client connection (RST). With
  ``keep_upstream=True`` the server side stays open and whatever the server sends is
  discarded: a server that never notices its client vanished (the session may go on and
  commit a statement it is still running).
- one-shot triggers on client-to-server data containing a pattern:
  ``cut_before(pattern)`` (the data is not forwarded; that connection is cut),
  ``cut_after_reply(pattern)`` (forwarded; the server's reply is dropped and the connection
  cut: "committed, reply lost"), ``hold_reply(pattern)`` (the reply is held back until
  ``resume()`` or a cut: a server that answers into a black hole). ``then="refuse"`` or
  ``then="stall"`` switches the proxy into that mode in the same instant the trigger fires,
  so that the client's reconnect is already affected.
- ``watch(pattern)``: counts occurrences of ``pattern`` in requests once forwarded, with an
  event to wait on; ``watch(pattern, replies=True)`` counts them in the server's replies.

Counters: ``accepted``, ``refused``, ``requests`` (client-to-server reads forwarded),
``bytes_in`` (client to server, received),
``bytes_up`` (client to server, forwarded),
``bytes_down`` (server to client, forwarded), ``discarded`` (server bytes dropped).

Anything unexpected inside the event loop is recorded and raised by ``check()`` and
``close()``, so a broken proxy fails the test instead of passing it silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable

T = TypeVar("T")

# The longest pattern a trigger may look for: the stream's tail kept per connection, so that
# a pattern split across two reads is still found.
MAX_PATTERN = 256
CHUNK = 65536
CONTROL_TIMEOUT = 10.0

Then = Literal["refuse", "stall"] | None


class ProxyError(AssertionError):
    """The proxy itself failed (not the fault it was asked to inject)."""


@dataclass
class Watch:
    """Occurrences of ``pattern`` forwarded to the server (or, ``replies``, to the client)."""

    pattern: bytes
    replies: bool = False
    count: int = 0
    event: threading.Event = field(default_factory=threading.Event)

    def wait(self, timeout: float = CONTROL_TIMEOUT) -> bool:
        return self.event.wait(timeout)


@dataclass(eq=False)
class Trigger:
    """An armed fault; ``count`` is how often it fired, ``fired`` is set the first time."""

    kind: Literal["cut_before", "cut_after_reply", "hold_reply"]
    pattern: bytes
    remaining: int | None  # None: every time
    keep_upstream: bool
    then: Then
    fired: threading.Event = field(default_factory=threading.Event)
    count: int = 0

    def wait(self, timeout: float = CONTROL_TIMEOUT) -> bool:
        return self.fired.wait(timeout)


@dataclass(eq=False)
class _Link:
    """One client connection and its upstream connection."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    up_task: asyncio.Task[None] | None = None
    down_task: asyncio.Task[None] | None = None
    cut: bool = False
    cut_at: float = 0.0  # the loop's clock
    # Triggers waiting for the server's reply to a request they matched.
    reply_triggers: list[Trigger] = field(default_factory=list)
    holding: bool = False
    tail: bytes = b""
    reply_tail: bytes = b""


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close a connection with RST (SO_LINGER 0), not a FIN."""
    transport = writer.transport
    if transport.is_closing():
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def _fresh(pattern: bytes, tail: bytes, data: bytes) -> int:
    """Occurrences of ``pattern`` that end inside ``data`` (which follows ``tail``)."""
    head = tail[-(len(pattern) - 1) :] if len(pattern) > 1 else b""
    return (head + data).count(pattern)


class FaultProxy:
    def __init__(self, upstream_host: str, upstream_port: int, name: str = "proxy") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.name = name
        self.accepted = 0
        self.refused = 0
        self.requests = 0
        self.upstream_failures = 0
        self.bytes_in = 0  # client to server, received (forwarded or not)
        self.bytes_up = 0
        self.bytes_down = 0
        self.discarded = 0
        self._errors: list[BaseException | str] = []
        self._refusing = False
        self._stalled = False
        self._triggers: list[Trigger] = []
        self._watches: list[Watch] = []
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._loop.set_exception_handler(self._loop_exception)
        self._changed = asyncio.Event()
        started: list[BaseException | int] = []
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(started, ready), name=f"faultproxy-{name}", daemon=True
        )
        self._thread.start()
        if not ready.wait(CONTROL_TIMEOUT):
            raise ProxyError(f"{name}: the proxy's event loop did not start")
        if isinstance(started[0], BaseException):
            raise ProxyError(f"{name}: could not listen") from started[0]
        self.host = "127.0.0.1"
        self.port: int = started[0]

    def __repr__(self) -> str:
        return (
            f"<FaultProxy {self.name} 127.0.0.1:{self.port} -> {self.upstream[0]}:"
            f"{self.upstream[1]} accepted={self.accepted} refused={self.refused}>"
        )

    # -- the event loop ------------------------------------------------------------------

    def _run(self, started: list[BaseException | int], ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._server = self._loop.run_until_complete(
                asyncio.start_server(self._serve, "127.0.0.1", 0)
            )
        except BaseException as exc:
            started.append(exc)
            ready.set()
            self._loop.close()
            return
        started.append(self._server.sockets[0].getsockname()[1])
        ready.set()
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, ConnectionError | BrokenPipeError):
            return  # a peer that went away: the very faults this proxy makes
        self._errors.append(exc if exc is not None else str(context.get("message")))

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._errors.append(task.exception())  # type: ignore[arg-type]

    def _notify(self) -> None:
        """Wake every pump so it looks at the modes again."""
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _serve(self, reader: asyncio.StreamReader, client: asyncio.StreamWriter) -> None:
        # asyncio runs this in a task that close() must not cancel (its done-callback would
        # choke on the cancellation): hand the work to a task of our own and return.
        self.accepted += 1
        if self._refusing or self._closed:
            self.refused += 1
            _reset(client)
            return
        self._spawn(self._connect(reader, client))

    async def _connect(self, reader: asyncio.StreamReader, client: asyncio.StreamWriter) -> None:
        try:
            up_reader, upstream = await asyncio.open_connection(*self.upstream)
        except OSError:
            self.upstream_failures += 1
            _reset(client)
            return
        except asyncio.CancelledError:
            _reset(client)
            raise
        if self._closed or self._refusing:
            _reset(client)
            _reset(upstream)
            return
        link = _Link(client=client, upstream=upstream)
        self._links.add(link)
        link.up_task = self._spawn(self._pump_up(link, reader))
        link.down_task = self._spawn(self._pump_down(link, up_reader))

    async def _gate(self, link: _Link, reply: bool) -> bool:
        """Wait until data may flow on ``link``; False once the link is cut."""
        while True:
            if link.cut:
                return False
            if not self._stalled and not (reply and link.holding):
                return True
            changed = self._changed
            await changed.wait()

    def _match(self, kinds: tuple[str, ...], link: _Link, data: bytes) -> Trigger | None:
        for trigger in self._triggers:
            if trigger.kind in kinds and _fresh(trigger.pattern, link.tail, data):
                trigger.count += 1
                if trigger.remaining is not None:
                    trigger.remaining -= 1
                    if trigger.remaining <= 0:
                        self._triggers.remove(trigger)
                return trigger
        return None

    def _fire(self, trigger: Trigger) -> None:
        if trigger.then == "refuse":
            self._refusing = True
        elif trigger.then == "stall":
            self._stalled = True
        trigger.fired.set()
        self._notify()

    async def _pump_up(self, link: _Link, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    break
                self.bytes_in += len(data)
                if not await self._gate(link, reply=False):
                    return
                cut = self._match(("cut_before",), link, data)
                if cut is not None:
                    self._cut_link(link, cut.keep_upstream)
                    self._fire(cut)
                    return
                waiting = self._match(("cut_after_reply", "hold_reply"), link, data)
                if waiting is not None:
                    link.reply_triggers.append(waiting)
                # Counted before the write: the server (and then the client) may see it at once.
                self.bytes_up += len(data)
                self.requests += 1
                for watch in self._watches:
                    if watch.replies:
                        continue
                    found = _fresh(watch.pattern, link.tail, data)
                    if found:
                        watch.count += found
                        watch.event.set()
                link.tail = (link.tail + data)[-MAX_PATTERN:]
                link.upstream.write(data)
                await link.upstream.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            if not link.cut:
                # The client went away (or the server's side broke): pass that on.
                self._close_link(link)

    async def _pump_down(self, link: _Link, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    break
                if link.cut:
                    self.discarded += len(data)
                    continue
                if link.reply_triggers:
                    trigger = link.reply_triggers.pop(0)
                    if trigger.kind == "cut_after_reply":
                        self.discarded += len(data)
                        self._cut_link(link, trigger.keep_upstream)
                        self._fire(trigger)
                        if trigger.keep_upstream:
                            continue
                        return
                    link.holding = True
                    self._fire(trigger)
                if not await self._gate(link, reply=True):
                    self.discarded += len(data)
                    continue
                self.bytes_down += len(data)
                for watch in self._watches:
                    if watch.replies:
                        watch.count += _fresh(watch.pattern, link.reply_tail, data)
                        watch.event.set()
                link.reply_tail = (link.reply_tail + data)[-MAX_PATTERN:]
                link.client.write(data)
                await link.client.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            if not link.cut:
                self._close_link(link)
            else:
                _reset(link.upstream)
            self._links.discard(link)

    def _cut_link(self, link: _Link, keep_upstream: bool) -> None:
        link.cut = True
        link.cut_at = self._loop.time()
        _reset(link.client)
        current = asyncio.current_task()
        if link.up_task is not None and link.up_task is not current:
            link.up_task.cancel()
        if not keep_upstream:
            _reset(link.upstream)
            if link.down_task is not None and link.down_task is not current:
                link.down_task.cancel()
        self._notify()

    def _close_link(self, link: _Link) -> None:
        """A graceful end: one side closed, so close the other (FIN)."""
        link.cut = True
        for writer in (link.client, link.upstream):
            if not writer.transport.is_closing():
                writer.close()
        for task in (link.up_task, link.down_task):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
        self._links.discard(link)
        self._notify()

    # -- thread-safe controls ------------------------------------------------------------

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the proxy's loop and return its result (its exception is raised here)."""
        if self._closed:
            raise ProxyError(f"{self.name}: the proxy is closed")

        async def run() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(CONTROL_TIMEOUT)

    def pass_through(self) -> None:
        """Forward everything again: accept, resume, no triggers armed."""

        def reset() -> None:
            self._refusing = False
            self._stalled = False
            self._triggers.clear()
            for link in self._links:
                link.holding = False
                link.reply_triggers.clear()
            self._notify()

        self.call(reset)

    def refuse(self) -> None:
        self.call(lambda: setattr(self, "_refusing", True))

    def accept(self) -> None:
        self.call(lambda: setattr(self, "_refusing", False))

    def stall(self) -> None:
        def stall() -> None:
            self._stalled = True
            self._notify()

        self.call(stall)

    def resume(self) -> None:
        """Forward again, including replies held by ``hold_reply``."""

        def resume() -> None:
            self._stalled = False
            for link in self._links:
                link.holding = False
            self._notify()

        self.call(resume)

    def cut(self, keep_upstream: bool = False) -> int:
        """Reset every client connection now; the number of connections cut."""

        def cut() -> int:
            live = [link for link in self._links if not link.cut]
            for link in live:
                self._cut_link(link, keep_upstream)
            return len(live)

        return self.call(cut)

    def _arm(
        self,
        kind: Literal["cut_before", "cut_after_reply", "hold_reply"],
        pattern: bytes,
        times: int | None,
        keep_upstream: bool,
        then: Then,
    ) -> Trigger:
        if not isinstance(pattern, bytes) or not 0 < len(pattern) <= MAX_PATTERN:
            raise ValueError(f"pattern must be 1 to {MAX_PATTERN} bytes")
        if times is not None and times < 1:
            raise ValueError("times must be at least 1, or None for every time")
        trigger = Trigger(kind, pattern, times, keep_upstream, then)
        self.call(lambda: self._triggers.append(trigger))
        return trigger

    def cut_before(
        self,
        pattern: bytes,
        *,
        times: int | None = 1,
        keep_upstream: bool = False,
        then: Then = None,
    ) -> Trigger:
        """Client data containing ``pattern`` is not forwarded; its connection is cut."""
        return self._arm("cut_before", pattern, times, keep_upstream, then)

    def cut_after_reply(
        self,
        pattern: bytes,
        *,
        times: int | None = 1,
        keep_upstream: bool = False,
        then: Then = None,
    ) -> Trigger:
        """Forward the request containing ``pattern``; drop the reply and cut the client."""
        return self._arm("cut_after_reply", pattern, times, keep_upstream, then)

    def hold_reply(self, pattern: bytes, *, times: int | None = 1) -> Trigger:
        """Forward the request containing ``pattern``; hold its reply until resume() or a cut."""
        return self._arm("hold_reply", pattern, times, False, None)

    def disarm(self, trigger: Trigger | None = None) -> None:
        """Remove ``trigger`` if it has not fired yet; None: every armed trigger."""

        def disarm() -> None:
            if trigger is None:
                self._triggers.clear()
            elif trigger in self._triggers:
                self._triggers.remove(trigger)

        self.call(disarm)

    def watch(self, pattern: bytes, *, replies: bool = False) -> Watch:
        """Count ``pattern`` in what is forwarded to the server (``replies``: to the client)."""
        if not isinstance(pattern, bytes) or not 0 < len(pattern) <= MAX_PATTERN:
            raise ValueError(f"pattern must be 1 to {MAX_PATTERN} bytes")
        watch = Watch(pattern, replies)
        self.call(lambda: self._watches.append(watch))
        return watch

    @property
    def open_links(self) -> int:
        """Client connections currently forwarded (not cut)."""
        return self.call(lambda: sum(1 for link in self._links if not link.cut))

    @property
    def kept_upstreams(self) -> int:
        """Server connections kept open after their client was cut (keep_upstream=True)."""
        return self.call(lambda: sum(1 for link in self._links if link.cut))

    def upstream_ports(self, kept: bool | None = None) -> list[int]:
        """Local ports of the proxy's server connections: how the server names its clients.

        ``kept`` True: only those whose client was cut; False: only live ones; None: all.
        """

        def ports() -> list[int]:
            found = []
            for link in self._links:
                if kept is not None and link.cut != kept:
                    continue
                name = link.upstream.get_extra_info("sockname")
                if name is not None:
                    found.append(int(name[1]))
            return found

        return self.call(ports)

    def release_upstreams(self, older_than: float = 0.0) -> int:
        """Close (FIN) server connections kept after a cut at least ``older_than`` seconds ago.

        The number closed: as if the server had at last noticed (TCP keepalive).
        """

        def release() -> int:
            now = self._loop.time()
            kept = [link for link in self._links if link.cut and now - link.cut_at >= older_than]
            for link in kept:
                if not link.upstream.transport.is_closing():
                    link.upstream.close()
                if link.down_task is not None:
                    link.down_task.cancel()
                self._links.discard(link)
            return len(kept)

        return self.call(release)

    @property
    def errors(self) -> list[BaseException | str]:
        return list(self._errors)

    def check(self) -> None:
        """Raise ProxyError if anything unexpected happened inside the proxy."""
        if self._errors:
            raise ProxyError(f"{self.name}: the proxy failed: {self._errors!r}")

    def close(self) -> None:
        """Close the listener and every connection, stop the loop; raise the proxy's errors."""
        if self._closed:
            return

        async def shutdown() -> None:
            self._closed = True
            self._server.close()
            for link in list(self._links):
                _reset(link.client)
                _reset(link.upstream)
            tasks = [task for task in self._tasks if task is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._links.clear()
            await self._server.wait_closed()
            # Let transports finish closing (connection_lost) before the loop stops.
            await asyncio.sleep(0)

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(CONTROL_TIMEOUT)
        finally:
            self._closed = True
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(CONTROL_TIMEOUT)
        if self._thread.is_alive():
            raise ProxyError(f"{self.name}: the proxy's thread did not stop")
        self.check()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

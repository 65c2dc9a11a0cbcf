"""What the demo shows while it runs: a live view on a terminal, plain lines elsewhere.

The live view is drawn with rich (the ``[rich]`` extra) when the output is a terminal;
without rich, or when the output is a file or a pipe (CI logs, tests), the same
information comes as plain lines: each incident as it happens and the progress every 10 %.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, TextIO

from workflows.broker import short

if TYPE_CHECKING:
    from workflows.broker import Broker, Counts, Worker

try:
    from rich.console import Console, Group
    from rich.live import Live
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text
except ImportError:  # pragma: no cover - the [rich] extra is optional
    Console = None  # type: ignore[assignment,misc]


def counters(counts: Counts) -> list[tuple[str, int]]:
    """The running counters, in the order both views show them."""
    return [
        ("lock denials", counts.lock_denials),
        ("redeliveries", counts.redeliveries),
        ("takeovers", counts.takeovers),
        ("fenced writes", counts.fenced_writes),
        ("write conflicts", counts.write_conflicts),
    ]


def alive(broker: Broker) -> str:
    live = broker.live()
    frozen = sum(w.state == "frozen" for w in live)
    return f"{len(live) - frozen} running" + (f", {frozen} frozen" if frozen else "")


class PlainDisplay:
    """Plain lines: the incidents as they happen, and the progress every 10 %."""

    def __init__(self, out: TextIO, verbosity: int) -> None:
        self.out, self.verbosity = out, verbosity
        self.started = time.monotonic()
        self.shown = 0  # tenths of the run reported so far

    def line(self, text: str) -> None:
        if self.verbosity >= 1:
            self.out.write(text + "\n")
            self.out.flush()

    def start(self, header: list[str]) -> None:
        for text in header:
            self.line(text)
        self.started = time.monotonic()

    def note(self, text: str) -> None:
        self.line(f"[{time.monotonic() - self.started:5.1f} s] {text}")

    def update(self, broker: Broker) -> None:
        counts = broker.counts
        tenths = 10 * counts.handled // broker.total
        if tenths <= self.shown:
            return
        self.shown = tenths
        values = ", ".join(f"{name} {value}" for name, value in counters(counts))
        self.note(
            f"{counts.handled}/{broker.total} events ({100 * counts.handled // broker.total} %), "
            f"{counts.orders_done}/{broker.orders} orders done; {values}; "
            f"workers {alive(broker)}"
        )

    def stop(self) -> None:
        pass

    def report(self, rows: list[tuple[str, str, str]], verdict: str, ok: bool) -> None:
        width = max(len(name) for name, _, _ in rows)
        value_width = max(len(value) for _, value, _ in rows)
        self.out.write("\n")
        for name, value, meaning in rows:
            self.out.write(f"  {name:<{width}}  {value:>{value_width}}  {meaning}".rstrip() + "\n")
        self.out.write(f"\n{verdict}\n")

    def next_steps(self, lines: list[str]) -> None:
        self.out.write("\n" + "\n".join(lines) + "\n")


class LiveDisplay(PlainDisplay):
    """rich's live view: a progress bar, the counters and each worker, redrawn in place;
    the incidents scroll above it."""

    def __init__(self, out: TextIO, verbosity: int) -> None:
        super().__init__(out, verbosity)
        self.console = Console(file=out, highlight=False)
        self.live: Live | None = None

    def start(self, header: list[str]) -> None:
        for text in header:
            self.console.print(text, soft_wrap=True)
        self.started = time.monotonic()
        # No refresh thread: the broker's loop redraws, ten times a second.
        self.live = Live(console=self.console, auto_refresh=False, transient=True)
        self.live.start()

    def note(self, text: str) -> None:
        when = f"{time.monotonic() - self.started:5.1f} s "
        self.console.print(Text.assemble((when, "dim"), text), soft_wrap=True)

    def update(self, broker: Broker) -> None:
        if self.live is not None:
            self.live.update(self.render(broker), refresh=True)

    def render(self, broker: Broker) -> Group:
        counts = broker.counts
        bar = Table.grid(padding=(0, 1))
        bar.add_row(
            ProgressBar(total=broker.total, completed=counts.handled, width=40),
            Text(f"{counts.handled}/{broker.total} events", style="bold"),
            Text(f"{counts.orders_done}/{broker.orders} orders done"),
            Text(f"{time.monotonic() - self.started:.1f} s", style="dim"),
        )
        grid = Table.grid(padding=(0, 2))
        grid.add_row(
            Text.assemble("workers ", (alive(broker), "bold")),
            *(Text.assemble((str(value), "bold"), f" {name}") for name, value in counters(counts)),
        )
        workers = Table(box=None, padding=(0, 2), show_header=True, header_style="dim")
        workers.add_column("worker")
        workers.add_column("doing")
        workers.add_column("handled", justify="right")
        for worker in broker.workers:
            workers.add_row(worker.name, doing(worker), str(worker.handled))
        return Group(bar, grid, workers)

    def stop(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None

    def report(self, rows: list[tuple[str, str, str]], verdict: str, ok: bool) -> None:
        table = Table(box=None, padding=(0, 2), show_header=False)
        table.add_column()
        table.add_column(justify="right", style="bold")
        table.add_column(style="dim")
        for row in rows:
            table.add_row(*row)
        self.console.print()
        self.console.print(table)
        self.console.print()
        style = "bold green" if ok else "bold red"
        self.console.print(Text(verdict, style=style), soft_wrap=True)

    def next_steps(self, lines: list[str]) -> None:
        self.console.print()
        for text in lines:
            # Soft wrap: the terminal folds a long URL, rich would cut it into two lines.
            self.console.print(Text(text), soft_wrap=True)


def doing(worker: Worker) -> Text:
    """What a worker does, for the live view's table."""
    if worker.state in ("killed", "frozen"):
        style = "red" if worker.state == "killed" else "yellow"
        held = f", holding {short(worker.event.machine_id)}" if worker.event else ""
        return Text(f"{worker.state}{held}", style=style)
    if worker.state == "busy" and worker.event is not None:
        return Text(f"{short(worker.event.machine_id)}  {worker.event.key}")
    return Text(worker.state, style="dim")


def display_for(out: TextIO, verbosity: int) -> PlainDisplay:
    """The live view on a terminal when rich is installed, plain lines otherwise."""
    if Console is not None and verbosity >= 1:
        console = Console(file=out)
        if console.is_terminal and not console.is_dumb_terminal:
            return LiveDisplay(out, verbosity)
    return PlainDisplay(out, verbosity)

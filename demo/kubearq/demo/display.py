"""The demo's terminal view: a rich Live screen at a terminal, plain lines (the same content) anywhere else."""

from __future__ import annotations

import io
import sys
import time
from typing import Protocol, TextIO, cast

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from kubearq.demo.state import ConnectionView, DemoState, QueueView, ReplicaView, ScrapeView, TickView, clock

TIMELINE_SHOWN = 9
STATUS_EVERY = 5.0
"""Seconds between the plain view's status lines."""
MARKS = {"leader": ("● leader", "bold green"), "standby": ("○ standby", "cyan"), "starting": ("… starting", "yellow"),
         "killed": ("✗ SIGKILLed", "bold red"), "stopped": ("stopped", "dim")}


class View(Protocol):
    def start(self, state: DemoState) -> None: ...
    def update(self, state: DemoState) -> None: ...
    def event(self, state: DemoState, moment: float, text: str) -> None: ...
    def stop(self) -> None: ...
    def console(self) -> Console: ...


class Output(io.TextIOBase):
    """The demo's stdout, gone quiet instead of raising once the terminal is gone (closed, SIGHUP) or the pipe is
    closed: the demo must still stop everything it started."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._gone = False

    def write(self, text: str) -> int:
        if not self._gone:
            try:
                self._stream.write(text)
            except OSError:
                self._gone = True
        return len(text)

    def flush(self) -> None:
        if not self._gone:
            try:
                self._stream.flush()
            except OSError:
                self._gone = True

    def isatty(self) -> bool:
        return self._stream.isatty()

    def fileno(self) -> int:
        return self._stream.fileno()


def open_view(stream: TextIO | None = None, *, force_plain: bool = False) -> View:
    """A live view when `stream` is a terminal, else plain lines."""
    out = cast(TextIO, Output(stream or sys.stdout))
    if not force_plain and out.isatty():
        return LiveView(Console(file=out))
    return PlainView(Console(file=out, force_terminal=False, no_color=True, width=200, soft_wrap=True))


class LiveView:
    """Redrawn in place on every update: bars, the queue, the replicas, the ticks, the latest events."""

    def __init__(self, console: Console) -> None:
        self._console = console
        self._live: Live | None = None

    def console(self) -> Console:
        return self._console

    def start(self, state: DemoState) -> None:
        self._live = Live(render(state), console=self._console, auto_refresh=False, transient=False,
                          redirect_stdout=False, redirect_stderr=False)
        self._live.start(refresh=True)

    def update(self, state: DemoState) -> None:
        if self._live is not None:
            self._live.update(render(state), refresh=True)

    def event(self, state: DemoState, moment: float, text: str) -> None:
        self.update(state)

    def stop(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None


class PlainView:
    """One line per event as it happens, and a status line (the bars' content) every few seconds."""

    def __init__(self, console: Console, *, status_lines: bool = True) -> None:
        self._console = console
        self._status_lines = status_lines
        self._last_status = 0.0

    def console(self) -> Console:
        return self._console

    def start(self, state: DemoState) -> None:
        self._console.print(f"{state.title}")

    def update(self, state: DemoState) -> None:
        now = time.time()
        if not self._status_lines or now - self._last_status < STATUS_EVERY or state.scrape is None:
            return
        self._last_status = now
        self._console.print(f"[{clock(now)}] {status_line(state)}", highlight=False, markup=False)

    def event(self, state: DemoState, moment: float, text: str) -> None:
        self._console.print(f"[{clock(moment)}] {text}", highlight=False, markup=False)

    def stop(self) -> None:
        pass


def status_line(state: DemoState) -> str:
    """The live view's figures in one line."""
    parts = []
    if state.scrape is not None:
        parts.append(scrape_line(state.scrape, state.pages_per_minute))
    parts.append(queue_line(state.queue))
    parts.append(f"leader {state.holder or '(none)'}")
    return " | ".join(parts)


def scrape_line(scrape: ScrapeView, rate: float | None) -> str:
    pages = scrape.pages
    return (f"scrape {scrape.name}: {scrape.phase} {pages.finished}/{pages.total} pages (failed {pages.failed}, "
            f"deferred {pages.deferred}), {_rate(rate)} pages/min (limit {scrape.rate_limit}/min)")


def queue_line(queue: QueueView) -> str:
    return (f"queue {queue.name}: ready {_count(queue.ready)}, running {_count(queue.running)}, "
            f"deferred {_count(queue.deferred)}")


def tick_enqueued_line(tick: TickView) -> str:
    late = f"{tick.lateness:+.1f} s" if tick.lateness is not None else "at an unknown time"
    by = f" by {tick.enqueued_by}" if tick.enqueued_by else ""
    return f"tick {clock(tick.scheduled)} enqueued {late}{by}: job {tick.job_id}"


def tick_outcome_line(tick: TickView) -> str:
    ran = f" on {tick.ran_on}" if tick.ran_on else ""
    counted = f" ({tick.events_counted} events stored so far)" if tick.events_counted is not None else ""
    return f"tick {clock(tick.scheduled)} {tick.outcome}{ran}{counted}"


def connection_line(connection: ConnectionView) -> str:
    if connection.status == "error" and connection.error:
        return f"connection {connection.name}: sync failed: {connection.error}"
    what = "its 90-day backfill" if connection.last_was_backfill else "realtime: today so far"
    synced = clock(connection.last_synced) if connection.last_synced else "?"
    return (f"connection {connection.name} synced at {synced} ({what}): {connection.rows} rows in metric_snapshots "
            f"({connection.quarter_hour_rows} of 15 minutes, {connection.hourly_rows} hourly)")


def render(state: DemoState) -> RenderableType:
    minutes, seconds = divmod(int(state.elapsed), 60)
    header = Text.assemble((state.title, "bold"), f"  {minutes:02d}:{seconds:02d}  ", (state.stage, "italic"))
    about = Text(f"Kubernetes API: {state.api}\n{state.lease_note}", style="dim")
    parts: list[RenderableType] = [Panel(about, title=header, title_align="left", border_style="blue")]
    parts.append(_scrape_table(state))
    parts.append(Text.assemble(("Queue ", "bold"), queue_line(state.queue).removeprefix("queue ")))
    parts.append(_replicas_table(state.replicas))
    if (failover := _failover_line(state)) is not None:
        parts.append(failover)
    parts.append(_ticks_table(state))
    parts.append(_sync_table(state))
    timeline = Table.grid(padding=(0, 1))
    timeline.add_column(style="dim", no_wrap=True)
    timeline.add_column()
    for moment, text in state.timeline[-TIMELINE_SHOWN:]:
        timeline.add_row(clock(moment), text)
    parts.append(Panel(timeline, title="What happened", title_align="left", border_style="dim"))
    return Group(*parts)


def _scrape_table(state: DemoState) -> RenderableType:
    scrape = state.scrape
    if scrape is None:
        return Text.assemble(("ScrapeRequest ", "bold"), ("not created yet", "dim"))
    pages = scrape.pages
    table = Table.grid(padding=(0, 2))
    for _ in range(4):
        table.add_column(no_wrap=True)
    bar = ProgressBar(total=max(pages.total, 1), completed=pages.finished, width=50,
                      complete_style="green" if not pages.failed else "yellow", finished_style="green")
    phase_style = {"Succeeded": "bold green", "PartiallySucceeded": "bold yellow", "Failed": "bold red"}.get(
        scrape.phase, "cyan")
    table.add_row(Text(f"ScrapeRequest {scrape.name}", style="bold"), Text(scrape.phase, style=phase_style), bar,
                  Text(f"{pages.finished}/{pages.total} pages"))
    details = Text.assemble(
        f"  listing {scrape.listing.finished}/{scrape.listing.total}  detail {scrape.detail.finished}/"
        f"{scrape.detail.total}  ", ("failed ", "red"), str(pages.failed), "  ", ("deferred ", "yellow"),
        str(pages.deferred), f"  {_rate(state.pages_per_minute)} pages/min against a rate limit of "
        f"{scrape.rate_limit}/min")
    lines: list[RenderableType] = [table, details]
    if state.failover is not None and state.failover.took_over_at is None:
        lines.append(Text("  status paused: no leader writes it until the standby takes the Lease", style="yellow"))
    return Group(*lines)


def _failover_line(state: DemoState) -> RenderableType | None:
    failover = state.failover
    if failover is None:
        if state.planned_kill is None:
            return None
        return Text(f"Failover: the leader will be SIGKILLed at {clock(state.planned_kill)}", style="dim")
    if failover.seconds is None:
        return Text(f"Failover: {failover.killed} SIGKILLed at {clock(failover.killed_at)}; no leader for "
                    f"{time.time() - failover.killed_at:.1f} s — the Lease stays {failover.killed}'s until it expires",
                    style="bold yellow")
    return Text(f"Failover: {failover.killed} SIGKILLed at {clock(failover.killed_at)}; {failover.new_leader} took the "
                f"Lease {failover.seconds:.1f} s later", style="bold green")


def _replicas_table(replicas: list[ReplicaView]) -> RenderableType:
    table = Table(box=None, padding=(0, 2), show_edge=False, header_style="bold")
    for heading in ("Operators", "", "pid", "Workers", "", "pid", "jobs done"):
        table.add_column(heading, no_wrap=True)
    operators = [replica for replica in replicas if replica.role == "operator"]
    workers = [replica for replica in replicas if replica.role == "worker"]
    for index in range(max(len(operators), len(workers))):
        row: list[RenderableType] = []
        for group in (operators, workers):
            if index < len(group):
                replica = group[index]
                mark, style = MARKS[replica.state]
                if replica.role == "worker" and replica.state == "standby":
                    mark, style = "running", "green"
                row += [replica.name, Text(mark, style=style), str(replica.pid or "-")]
            else:
                row += ["", "", ""]
        jobs = workers[index].jobs_done if index < len(workers) else None
        row.append(_count(jobs))
        table.add_row(*row)
    return table


def _ticks_table(state: DemoState) -> RenderableType:
    table = Table(box=None, padding=(0, 2), show_edge=False, header_style="bold", title_justify="left")
    for heading in ("Tick (* * * * *)", "job id", "enqueued", "by", "outcome", "ran on"):
        table.add_column(heading, no_wrap=True)
    for tick in state.ticks[-6:]:
        late = f"{tick.lateness:+.1f} s" if tick.lateness is not None else "-"
        style = "green" if tick.outcome == "Succeeded" else "red" if tick.outcome in ("Failed", "Aborted") else ""
        ran = f"{tick.ran_on} ({tick.events_counted} events so far)" if tick.ran_on else ""
        table.add_row(clock(tick.scheduled), tick.job_id, late, tick.enqueued_by or "?", Text(tick.outcome, style), ran)
    upcoming = []
    if state.next_tick is not None:
        upcoming.append(f"next tick {clock(state.next_tick)}")
    if not state.ticks:
        table.add_row(Text("no tick yet", style="dim"), "", "", "", "", "")
    return Group(table, Text("  ".join(upcoming), style="dim")) if upcoming else table


def _sync_table(state: DemoState) -> RenderableType:
    latest = [f"{name} {clock(runs[-1].scheduled)} {runs[-1].outcome}"
              for name, runs in state.sync_ticks.items() if runs]
    heading = Text.assemble(("Sync ", "bold"), ("  ".join(latest) if latest else "no tick of the sync yet", "dim"))
    table = Table(box=None, padding=(0, 2), show_edge=False, header_style="bold")
    for title in ("Connection", "provider", "time zone", "status", "last synced", "syncs", "15-min rows",
                  "hourly rows"):
        table.add_column(title, no_wrap=True, justify="right" if title.endswith(("rows", "syncs")) else "left")
    for connection in state.connections:
        style = {"error": "red", "syncing": "cyan"}.get(connection.status, "green" if connection.syncs else "")
        last = clock(connection.last_synced) if connection.last_synced else "never"
        if connection.last_was_backfill:
            last += " (backfill)"
        table.add_row(connection.name, connection.provider, connection.time_zone, Text(connection.status, style),
                      last, str(connection.syncs), str(connection.quarter_hour_rows), str(connection.hourly_rows))
    return Group(heading, table)


def _rate(rate: float | None) -> str:
    return f"{rate:.0f}" if rate is not None else "-"


def _count(value: int | None) -> str:
    return "-" if value is None else str(value)

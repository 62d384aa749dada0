"""Runs the report's steps one after another, each in a process of its own under a time limit, showing progress.

A step that fails or outlives its limit becomes a row saying so (with its log), never the end of the report.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from bench.report import Row, duration
from bench.suite import Step

if TYPE_CHECKING:
    from rich.status import Status

REPO = Path(__file__).resolve().parent.parent
# After its limit a step has this long to stop on its own (it reports what it has at its deadline), then
# SIGINT (asyncio.run cancels it, so it stops what it started), then SIGKILL for its whole process group.
GRACE_S = 120.0
INTERRUPT_S = 30.0
POLL_S = 0.5


@dataclass
class Outcome:
    step: Step
    rows: list[Row]
    elapsed_s: float
    failure: str | None = None
    notes: list[str] = field(default_factory=list)


class Progress(Protocol):
    def planned(self, steps: list[Step], header: list[str]) -> None: ...
    def started(self, index: int, total: int, step: Step) -> None: ...
    def note(self, step: Step, elapsed_s: float, text: str) -> None: ...
    def finished(self, index: int, total: int, outcome: Outcome) -> None: ...


def summary(outcome: Outcome) -> str:
    """The step's figures in one line: each row's ratio (or figure) and verdict."""
    if outcome.failure and not outcome.rows:
        return f"FAILED: {outcome.failure}"
    parts = []
    for row in outcome.rows:
        figure = row.ratio or row.kubearq or row.note
        verdict = f" ({row.target}: {row.verdict})" if row.verdict else ""
        parts.append(f"{figure}{verdict}")
    text = "; ".join(parts)
    return f"{text}; FAILED: {outcome.failure}" if outcome.failure else text


class PlainProgress:
    """One line as each step starts and one as it finishes (for logs and pipes)."""

    def planned(self, steps: list[Step], header: list[str]) -> None:
        for line in header:
            print(line, flush=True)

    def started(self, index: int, total: int, step: Step) -> None:
        if step.run is not None:
            print(f"[{index}/{total}] {step.title}: started (about {duration(step.estimate_s)})", flush=True)

    def note(self, step: Step, elapsed_s: float, text: str) -> None:
        pass

    def finished(self, index: int, total: int, outcome: Outcome) -> None:
        if outcome.step.run is None:
            print(f"[{index}/{total}] {outcome.step.title}: skipped: {outcome.step.skipped}", flush=True)
            return
        print(f"[{index}/{total}] {outcome.step.title}: done in {duration(outcome.elapsed_s)}: {summary(outcome)}",
              flush=True)


class RichProgress(PlainProgress):
    """The same lines at a terminal, with a spinner showing the running steps' time and latest news."""

    def __init__(self) -> None:
        from rich.console import Console

        self._console = Console()
        self._status: Status | None = None
        self._running: dict[str, str] = {}  # step key -> its status text

    def planned(self, steps: list[Step], header: list[str]) -> None:
        for line in header:
            self._console.print(line, highlight=False, markup=False)

    def _show(self) -> None:
        text = " | ".join(self._running.values())
        if not text and self._status is not None:
            self._status.stop()
            self._status = None
        elif text and self._status is None:
            self._status = self._console.status(text)
            self._status.start()
        elif self._status is not None:
            self._status.update(text)

    def started(self, index: int, total: int, step: Step) -> None:
        from rich.markup import escape

        if step.run is not None:
            self._console.print(f"[bold][{index}/{total}][/bold] {escape(step.title)}: started (about "
                                f"{duration(step.estimate_s)})", highlight=False)
            self._running[step.key] = escape(f"{step.title}: 0 s")
            self._show()

    def note(self, step: Step, elapsed_s: float, text: str) -> None:
        from rich.markup import escape

        self._running[step.key] = escape(f"{step.title}: {duration(elapsed_s)} of about "
                                         f"{duration(step.estimate_s)}" + (f", {text.strip()}" if text else ""))
        self._show()

    def finished(self, index: int, total: int, outcome: Outcome) -> None:
        from rich.markup import escape

        self._running.pop(outcome.step.key, None)
        self._show()
        title = escape(outcome.step.title)
        if outcome.step.run is None:
            self._console.print(f"[bold][{index}/{total}][/bold] {title}: [dim]skipped: "
                                f"{escape(outcome.step.skipped)}[/dim]", highlight=False)
            return
        style = "red" if outcome.failure else "green"
        self._console.print(f"[bold][{index}/{total}][/bold] {title}: [{style}]done in "
                            f"{duration(outcome.elapsed_s)}[/{style}]: {escape(summary(outcome))}", highlight=False)


def progress_for(stream_is_tty: bool) -> Progress:
    if stream_is_tty:
        try:
            return RichProgress()
        except ImportError:  # rich comes with the demo extra; plain lines do as well
            pass
    return PlainProgress()


def read_results(path: Path) -> tuple[list[Row], list[str]]:
    """The latest rows and every progress note a step wrote so far."""
    rows: list[Row] = []
    notes: list[str] = []
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return rows, notes
    for line in lines:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:  # a line being written as we read
            continue
        if "rows" in entry:
            rows = [Row.from_json(row) for row in entry["rows"]]
        elif "progress" in entry:
            notes.append(str(entry["progress"]))
    return rows, notes


def last_error(log: Path) -> str:
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    return lines[-1] if lines else "(empty log)"


@contextlib.contextmanager
def stopped_on_exit(process: asyncio.subprocess.Process) -> Iterator[None]:
    """If the report itself is interrupted, the running step's process group goes too."""
    try:
        yield
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)


async def run_step(step: Step, *, quick: bool, redis_url: str, postgres_dsn: str, work_dir: Path,
                   progress: Progress) -> Outcome:
    """Run one step in its own process (and process group) and collect its rows."""
    if step.run is None:
        return Outcome(step, [Row(step.title[:1].upper() + step.title[1:], note=step.skipped)], 0.0)
    results, log = work_dir / f"{step.key}.jsonl", work_dir / f"{step.key}.log"
    started = time.time()
    deadline = started + step.time_limit_s
    command = [sys.executable, "-m", "bench.suite", step.key, "--redis-url", redis_url, "--postgres-dsn",
               postgres_dsn, "--results", str(results), "--deadline", f"{deadline:.3f}"]
    if quick:
        command.append("--quick")
    with log.open("wb") as sink:
        process = await asyncio.create_subprocess_exec(*command, cwd=REPO, stdin=subprocess.DEVNULL, stdout=sink,
                                                       stderr=subprocess.STDOUT, start_new_session=True)
    failure = None
    interrupted_at: float | None = None
    with stopped_on_exit(process):
        while True:
            try:
                await asyncio.wait_for(process.wait(), POLL_S)
                break
            except TimeoutError:
                pass
            _, notes = read_results(results)
            progress.note(step, time.time() - started, notes[-1] if notes else "")
            now = time.time()
            grace = min(GRACE_S, step.time_limit_s / 2)
            if interrupted_at is None and now > deadline + grace:
                failure = f"stopped at its time limit ({step.time_limit_s:.0f} s + {grace:.0f} s); log: {log}"
                process.send_signal(signal.SIGINT)
                interrupted_at = now
            elif interrupted_at is not None and now > interrupted_at + INTERRUPT_S:
                os.killpg(process.pid, signal.SIGKILL)
                await process.wait()
                break
    elapsed = time.time() - started
    rows, notes = read_results(results)
    if failure is None and process.returncode != 0:
        failure = f"{last_error(log)} (exit code {process.returncode}; log: {log})"
    if not rows:
        rows = [Row(step.title[:1].upper() + step.title[1:], note=f"failed: {failure}")]
    return Outcome(step, rows, elapsed, failure, notes)


async def run_all(steps: list[Step], *, quick: bool, redis_url: str, postgres_dsn: str, work_dir: Path,
                  progress: Progress) -> list[Outcome]:
    """Run the steps one after another (each has the cores to itself, and flushes the Redis it is given)."""
    outcomes = []
    for index, step in enumerate(steps, start=1):
        progress.started(index, len(steps), step)
        outcome = await run_step(step, quick=quick, redis_url=redis_url, postgres_dsn=postgres_dsn,
                                 work_dir=work_dir, progress=progress)
        progress.finished(index, len(steps), outcome)
        outcomes.append(outcome)
    return outcomes

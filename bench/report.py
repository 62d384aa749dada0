"""The benchmark report: one row per figure beside its anchor, the machine it ran on, and bench/RESULTS.md.

A row's ratio always reads "times better than the anchor" (the anchor's time over kubearq's, or kubearq's
rate over the anchor's), so > 1 means kubearq is ahead; a row without an anchor or a ratio says why in its note.
"""

from __future__ import annotations

import os
import platform
import re
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
COLUMNS = ("Benchmark", "kubearq", "Anchor (same run)", "Ratio", "Target", "Note")


@dataclass(frozen=True)
class Row:
    """One line of the table. Cells are text (a row crosses a process boundary as JSON)."""

    benchmark: str
    kubearq: str = ""
    anchor: str = ""
    ratio: str = ""
    target: str = ""
    verdict: str = ""  # "met", "missed" or "" (no target, or nothing measured)
    note: str = ""

    @property
    def complete(self) -> bool:
        """A figure and an anchor, or a note saying why one is missing."""
        return bool(self.kubearq and self.anchor) or bool(self.note)

    def cells(self) -> tuple[str, ...]:
        target = f"{self.target}: {self.verdict}" if self.target and self.verdict else self.target
        return (self.benchmark, self.kubearq, self.anchor, self.ratio, target, self.note)

    def to_json(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, str]) -> Row:
        return cls(**data)


def seconds(value: float) -> str:
    """A duration the way a person reads it: 0.204 s, 3.41 s, 24.6 s, 310 s."""
    if value < 1:
        return f"{value:.3f} s"
    if value < 10:
        return f"{value:.2f} s"
    if value < 100:
        return f"{value:.1f} s"
    return f"{value:,.0f} s"


def duration(value_s: float) -> str:
    """A run's length: 41 s, 3 min 10 s, 1 h 02 min."""
    if value_s < 90:
        return f"{value_s:.0f} s"
    minutes, secs = divmod(round(value_s), 60)
    return f"{minutes} min {secs:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def milliseconds(value_s: float) -> str:
    value = value_s * 1000
    return f"{value:.2f} ms" if value < 10 else f"{value:,.1f} ms" if value < 100 else f"{value:,.0f} ms"


def rate(value: float, unit: str) -> str:
    return f"{value:,.0f} {unit}" if value >= 100 else f"{value:,.1f} {unit}"


def ratio(value: float) -> str:
    return f"{value:.2f}x" if value < 10 else f"{value:.1f}x"


def at_least(value: float, target: float) -> str:
    return "met" if value >= target else "missed"


def at_most(value: float, target: float) -> str:
    return "met" if value <= target else "missed"


@dataclass(frozen=True)
class Machine:
    """What the figures depend on besides the code."""

    cores: int
    cpu: str
    machine: str  # what `uname -m` says
    kernel: str
    python: str
    redis: str
    postgres: str
    arq: str
    scrapy: str
    load_at_start: float

    def describe(self) -> str:
        return (f"{self.cores} cores ({self.cpu}), `uname -m` {self.machine}, Linux {self.kernel}; Python "
                f"{self.python}, Redis {self.redis}, PostgreSQL {self.postgres}, ARQ {self.arq}, Scrapy "
                f"{self.scrapy}; load average {self.load_at_start:.2f} at the start (the cores are shared with "
                "other work)")


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown CPU"
    found = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return found[1].strip() if found else platform.processor() or "unknown CPU"


def _version(distribution: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return "not installed"


async def machine(redis_url: str, postgres_dsn: str) -> Machine:
    """The machine, and the versions of the Redis and PostgreSQL servers the run uses (asked, not guessed)."""
    # Imported here: spawned children of a step re-import bench.suite, and with it this module.
    import asyncpg
    from redis.asyncio import Redis

    redis = Redis.from_url(redis_url)
    try:
        redis_version = str((await redis.info("server"))["redis_version"])
    finally:
        await redis.aclose()
    connection = await asyncpg.connect(postgres_dsn)
    try:
        postgres_version = str(await connection.fetchval("SHOW server_version"))
    finally:
        await connection.close()
    uname = os.uname()
    return Machine(cores=os.cpu_count() or 1, cpu=_cpu_model(), machine=uname.machine, kernel=uname.release,
                   python=platform.python_version(), redis=redis_version, postgres=postgres_version,
                   arq=_version("arq"), scrapy=_version("scrapy"), load_at_start=os.getloadavg()[0])


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(cell) for cell in row.cells()) + " |" for row in rows]
    return "\n".join(lines)


def parse_markdown_table(text: str) -> list[dict[str, str]]:
    """The rows of the first table in `text`, by column name (what a reader, or a test, sees)."""
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    if not lines:
        return []
    header = [cell.strip() for cell in lines[0].strip("|").split(" | ")]
    rows = []
    for line in lines[1:]:
        cells = [cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\) \| ", line.strip()[2:-2])]
        rows.append(dict(zip(header, cells, strict=True)))
    return rows


@dataclass(frozen=True)
class Report:
    rows: list[Row]
    machine: Machine
    started: datetime
    elapsed_s: float
    quick: bool
    command: str
    failures: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        kind = ("a smoke run at small sizes (`--quick`): figures are not comparable with the targets' sizes"
                if self.quick else "the full run")
        parts = [
            "# Benchmark results",
            "",
            f"`{self.command}` on {self.started.astimezone(UTC):%Y-%m-%d %H:%M} UTC, {kind}; it took "
            f"{duration(self.elapsed_s)}.",
            "",
            f"Machine: {self.machine.describe()}.",
            "",
            "Each kubearq figure is measured beside its anchor in the same run (the cores are shared, so only a "
            "ratio from one run means much). A ratio reads \"times better than the anchor\": > 1x means kubearq "
            "is faster, or does more per second.",
            "",
            markdown_table(self.rows),
            "",
        ]
        if self.failures:
            parts += ["Failed:", "", *(f"- {failure}" for failure in self.failures), ""]
        parts += [METHOD, ""]
        return "\n".join(parts)


METHOD = """## How each is measured

- **Bulk enqueue** (`bench/bulk_enqueue.py`): the same listing jobs (ids, JSON payloads, built inside the timing)
  put on a private redis-server by kubearq's `enqueue_many` (one Lua script per 500 jobs, tallied as the operator
  does) and by ARQ's `enqueue_job`, one after another and all at once with `asyncio.gather`; median of the rounds.
  The ceiling is `redis-benchmark` sending bare `ZADD`s from one client in pipelines of 500 (no payload, no
  duplicate check: no enqueue can beat it).
- **No-op jobs/s** (`bench/worker_throughput.py`): the same queue of no-op jobs drained by `kubearq worker`'s
  runtime, by a bare ARQ worker with the same settings (poll delay, read limit, max_jobs, JSON) and by one with
  ARQ's defaults; rounds alternate, medians shown.
- **Scrape** (`bench/scrape_vs_scrapy.py`): a local site in its own process (listing pages linking 49 detail
  pages with JSON-LD each); kubearq's built-in jobs store into PostgreSQL, Scrapy keeps items in memory; same
  concurrency (16), robots.txt obeyed by both.
- **Scheduler** (`bench/scheduler_lag.py`): the whole operator (`run_operator`) against the API emulator in its
  own process, N SyncSchedules every minute, started 10 s before a tick (the cold start), then one steady minute;
  a lag is the enqueue time in the job's ARQ payload minus its tick; the ideal is 0. Peak RSS is the operator
  process's high-water mark (operator plus the small bench client that creates and lists the schedules).
- **/metrics** (`bench/metrics_scrape.py`): a real Redis filled with ARQ-shaped jobs over 10 queues (running at
  the head with an in-progress mark, ready, deferred); one refresh of the operator's queue stats
  (`QueueStatsRefresher`, what the operator runs every 10 s) and one GET of `/metrics` from its `ProbeServer`,
  Redis commands counted with `INFO commandstats` before and after. The same at a tenth of the jobs shows whether
  the cost grows with jobs or with queues.
- **Re-run after SIGKILL** (`bench/rerun_delay.py`): two `kubearq worker` processes; the one running a long job
  is SIGKILLed; the delay is until the job starts again on the other. ARQ's figure is read, not waited for: the
  expiry of the in-progress key a bare ARQ worker (defaults) set for its job, read with `PTTL` right after that
  worker was SIGKILLed; its job cannot run again before the key expires.
- **Sync** (`bench/sync.py`): compaction of 15-minute snapshots into hours (a transaction per connection-day,
  removing the quarter hours) against one plain `INSERT ... SELECT ... GROUP BY` that only inserts; the fan-out
  of N connections into one sync job each, on the tick after the first."""


def destination(*, quick: bool, only: list[str] | None, output: Path | None) -> Path | None:
    """Where the report goes: `--output` when given, else RESULTS for a full run of every step, else nowhere
    (a quick or partial run must not replace the full run's figures)."""
    if output is not None:
        return output
    return RESULTS if not quick and not only else None


def write(report: Report, path: Path) -> None:
    path.write_text(report.markdown())

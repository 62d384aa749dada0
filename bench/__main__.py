"""Every benchmark, one table: each kubearq figure beside its anchor measured in the same run, and the ratio.

    .venv/bin/python -m bench            # the full run (about 50 min here), written to bench/RESULTS.md
    .venv/bin/python -m bench --quick    # a smoke run at small sizes in under a minute; writes nothing
    .venv/bin/python -m bench --quick --output /tmp/quick.md
    .venv/bin/python -m bench --only scrape-1000 sync   # some steps (written only with --output)

One private redis-server and one PostgreSQL serve every step; each step runs in a process of its own under a
time limit (bench/runner.py). Exit code 1 when a step failed (its row says how), else 0 (targets missed are
figures, not failures).
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from bench import report, runner
from bench.suite import Step, plan

from kubearq.demo.services import PostgresServer, RedisServer

SETUP_S = 5.0  # starting redis-server and PostgreSQL (initdb), reading the machine


def header(steps: list[Step], quick: bool, machine: report.Machine) -> list[str]:
    running = [step for step in steps if step.run is not None]
    total = SETUP_S + sum(step.estimate_s for step in running)
    kind = "smoke run at small sizes (--quick)" if quick else "full run"
    count = f"{len(running)} benchmark{'s' if len(running) != 1 else ''}"
    lines = [f"kubearq benchmark report, {kind}: {count}, about {report.duration(total)} "
             "(estimates from the last run on a 2-core machine)",
             f"machine: {machine.describe()}"]
    width = max(len(step.title) for step in steps)
    for step in steps:
        estimate = f"about {report.duration(step.estimate_s)}" if step.run is not None else "skipped"
        lines.append(f"  {step.title:<{width}}  {estimate}")
    return lines


def show_table(rows: list[report.Row], tty: bool) -> None:
    if tty:
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            pass
        else:
            table = Table(*report.COLUMNS, show_lines=True)
            for row in rows:
                table.add_row(*row.cells())
            Console().print(table)
            return
    print(report.markdown_table(rows))


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small sizes, under a minute; writes nothing unless "
                                                             "--output is given")
    parser.add_argument("--output", type=Path, help="write the report here (default: bench/RESULTS.md for the "
                                                    "full run of every step, nothing otherwise)")
    keys = [step.key for step in plan(False)] + [step.key for step in plan(True)]
    parser.add_argument("--only", nargs="+", metavar="STEP", choices=sorted(set(keys)),
                        help=f"run only these steps: {', '.join(dict.fromkeys(keys))}")
    options = parser.parse_args()
    steps = [step for step in plan(options.quick) if not options.only or step.key in options.only]
    if not steps:
        parser.error(f"none of {options.only} is a step of the {'quick' if options.quick else 'full'} run")
    output = report.destination(quick=options.quick, only=options.only, output=options.output)
    tty = sys.stdout.isatty()
    progress = runner.progress_for(tty)
    command = " ".join(["python -m bench", shlex.join(sys.argv[1:])]).strip()
    started_at, started = datetime.now(UTC), time.perf_counter()
    work_dir = Path(tempfile.mkdtemp(prefix="kubearq-bench-"))
    with RedisServer() as redis, PostgresServer() as postgres:
        machine = asyncio.run(report.machine(redis.url, postgres.dsn()))
        progress.planned(steps, [*header(steps, options.quick, machine), f"step logs: {work_dir}"])
        outcomes = asyncio.run(runner.run_all(steps, quick=options.quick, redis_url=redis.url,
                                              postgres_dsn=postgres.dsn(), work_dir=work_dir, progress=progress))
    rows = [row for outcome in outcomes for row in outcome.rows]
    failures = [f"{outcome.step.title}: {outcome.failure}" for outcome in outcomes if outcome.failure]
    result = report.Report(rows, machine, started_at, time.perf_counter() - started, options.quick, command,
                           failures)
    show_table(rows, tty)
    print(f"took {report.duration(result.elapsed_s)}", flush=True)
    if output is not None:
        report.write(result, output)
        print(f"written to {output}", flush=True)
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())

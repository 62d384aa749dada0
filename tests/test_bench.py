"""`python -m bench --quick`: every benchmark at smoke sizes in under a minute, one table, nothing written unasked."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from bench.report import COLUMNS, RESULTS, destination, parse_markdown_table

REPO = Path(__file__).resolve().parent.parent
# --quick takes 20-40 s here (under a minute on a busy machine); the bound is only there to fail with the output
# rather than at pytest's timeout. Its speed is not asserted: timing belongs to the benchmarks, not to tests.
QUICK_TIMEOUT_SECONDS = 110
# Every benchmark of the report has at least one row (its figures, or why it did not run).
BENCHMARKS = ("Bulk enqueue", "No-op jobs/s", "Scrape", "Scheduler", "/metrics", "Re-run of a job", "Sync compaction",
              "Sync fan-out")


def fingerprint(path: Path) -> tuple[str, int] | None:
    if not path.exists():
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


@dataclass(frozen=True)
class QuickRun:
    completed: subprocess.CompletedProcess[str]
    seconds: float
    rows: list[dict[str, str]]
    results_before: tuple[str, int] | None

    def explain(self) -> str:
        return (f"exit code {self.completed.returncode} after {self.seconds:.0f} s\n{self.completed.stdout}\n"
                f"{self.completed.stderr}")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> QuickRun:
    output = tmp_path_factory.mktemp("bench") / "quick.md"
    before = fingerprint(RESULTS)
    started = time.monotonic()
    completed = subprocess.run([sys.executable, "-m", "bench", "--quick", "--output", str(output)], cwd=REPO,
                               capture_output=True, text=True, timeout=QUICK_TIMEOUT_SECONDS, check=False)
    seconds = time.monotonic() - started
    rows = parse_markdown_table(output.read_text()) if output.exists() else []
    return QuickRun(completed, seconds, rows, before)


def test_quick_run_succeeds(quick_run: QuickRun) -> None:
    assert quick_run.completed.returncode == 0, quick_run.explain()


def test_every_row_has_a_figure_and_an_anchor_or_says_why_not(quick_run: QuickRun) -> None:
    assert quick_run.rows, quick_run.explain()
    assert all(set(row) == set(COLUMNS) for row in quick_run.rows)
    incomplete = [row for row in quick_run.rows
                  if not (row["kubearq"] and row["Anchor (same run)"]) and not row["Note"]]
    assert incomplete == []


def test_every_benchmark_has_a_row(quick_run: QuickRun) -> None:
    names = [row["Benchmark"] for row in quick_run.rows]
    missing = [benchmark for benchmark in BENCHMARKS if not any(name.startswith(benchmark) for name in names)]
    assert missing == [], names


def test_quick_run_leaves_the_results_file_alone(quick_run: QuickRun) -> None:
    assert fingerprint(RESULTS) == quick_run.results_before


def test_results_are_written_by_a_full_run_of_every_step_or_where_asked(tmp_path: Path) -> None:
    elsewhere = tmp_path / "results.md"

    assert destination(quick=False, only=None, output=None) == RESULTS
    assert destination(quick=True, only=None, output=None) is None
    assert destination(quick=False, only=["sync"], output=None) is None
    assert destination(quick=True, only=None, output=elsewhere) == elsewhere

"""`python -m kubearq.demo` (`scripts/demo`): the whole product on embedded defaults, shown working live.

Exit codes: 0 the demo ran and showed what it says, 1 something failed (said what, and where the logs are),
2 bad usage, 130 stopped by Ctrl-C (143: SIGTERM, 129: SIGHUP) — everything it started is stopped in every
case. With --keep-running, Ctrl-C after the summary is the expected end: 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from collections.abc import Sequence
from pathlib import Path

import asyncpg
import httpx
from redis.exceptions import RedisError
from rich.console import Console
from rich.panel import Panel
from rich.text import Text

from kubearq.demo.display import PlainView, View, open_view
from kubearq.demo.processes import ServiceError
from kubearq.demo.scenario import Demo, DemoError, Running
from kubearq.demo.stack import StackError
from kubearq.demo.summary import Summary, summarize
from kubearq.operator.kube import ApiError
from kubearq.operator.login import NoKubernetesCredentials
from kubearq.worker.storage import StorageError
from kubearq.worker.sync.admin import AdminError

EXPECTED_FAILURES = (DemoError, StackError, ServiceError, NoKubernetesCredentials, ApiError, OSError, httpx.HTTPError,
                     RedisError, asyncpg.PostgresError, StorageError, AdminError)
"""What a broken machine, cluster or kubearq makes the demo fail with: said in one line."""
STOPPED_CODES = {"SIGHUP": 129, "SIGINT": 130, "SIGTERM": 143}
STOP_SIGNALS = (signal.SIGHUP, signal.SIGINT, signal.SIGTERM)
"""Ctrl-C, `kill`, and the terminal closing (SIGHUP) all stop what the demo started before it exits."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubearq demo",
        description="Run kubearq on embedded defaults: private Redis and PostgreSQL, a local event website and ad "
                    "platform, the Kubernetes API (the cluster of $KUBECONFIG, else an emulator in this process), two "
                    "operator replicas and two workers. Scrapes the site under a rate limit while schedules tick "
                    "every minute (a digest, the sync of three ad-platform connections, compaction), SIGKILLs the "
                    "leading operator, and shows the standby take over. About 1.5 minutes.")
    parser.add_argument("--short", action="store_true",
                        help="a smaller site and an earlier failover: about 30 s (a tick shows only when a minute "
                             "boundary falls in it)")
    parser.add_argument("--keep-running", action="store_true",
                        help="leave everything up after the summary and print how to reach it; Ctrl-C stops it")
    parser.add_argument("--logs", type=Path, metavar="DIR",
                        help="the folder for every log and the kubeconfig (default: a new one under the temp dir)")
    parser.add_argument("--plain", action="store_true",
                        help="plain lines instead of the live view, as when the output is not a terminal")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    view = open_view(force_plain=args.plain)
    try:
        return asyncio.run(_run(args, view))
    except KeyboardInterrupt:  # Ctrl-C before the demo's own handler was in place: nothing was started yet
        return STOPPED_CODES["SIGINT"]


async def _run(args: argparse.Namespace, view: View) -> int:
    demo = Demo(view, short=args.short, logs=args.logs)
    console = view.console()
    main_task = asyncio.current_task()
    assert main_task is not None
    stopped_by: list[str] = []
    loop = asyncio.get_running_loop()

    def stop(name: str) -> None:
        if stopped_by or demo.stopping:
            return  # already stopping: let it finish
        stopped_by.append(name)
        demo.emit(f"{name}: stopping everything the demo started")
        main_task.cancel()

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop, sig.name)
    summary: Summary | None = None

    async def story(running: Running) -> None:
        nonlocal summary
        await demo.scenario(running)
        summary = await summarize(demo, running)
        view.stop()
        print_summary(console, summary)
        if args.keep_running and summary.ok:
            print_access(console, demo, running, await running.cluster.kubectl_target())
            demo.view = PlainView(console, status_lines=False)  # what happens next, one line each
            with contextlib.suppress(asyncio.CancelledError):
                await demo.keep_watching(running)  # until Ctrl-C: the end a user asked for
            main_task.uncancel()
        console.print("Stopping everything the demo started…")

    view.start(demo.state)
    try:
        await demo.run(story)
    except asyncio.CancelledError:
        if not stopped_by:
            raise
        view.stop()
        console.print(f"Stopped ({stopped_by[0]}): everything the demo started is stopped. Logs: {demo.folder}")
        return STOPPED_CODES[stopped_by[0]]
    except EXPECTED_FAILURES as error:
        view.stop()
        console.print(Text(f"demo failed: {error}", style="bold red"))
        console.print(f"Everything it started is stopped. Logs: {demo.folder} ({_log_names(demo)})")
        return 1
    except Exception:  # a bug of the demo's own: its traceback, and still where the logs are
        view.stop()
        console.print_exception()
        console.print(f"demo failed. Everything it started is stopped. Logs: {demo.folder} ({_log_names(demo)})")
        return 1
    finally:
        view.stop()
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)
    assert summary is not None
    if not summary.ok:
        console.print(Text("demo failed: " + "; ".join(summary.problems), style="bold red"))
        console.print(f"Logs: {demo.folder} ({_log_names(demo)})")
        return 1
    console.print("Everything the demo started is stopped.")
    return 0


def print_summary(console: Console, summary: Summary) -> None:
    body = Text("\n".join(summary.lines))
    if console.is_terminal:
        console.print(Panel(body, title="Summary", title_align="left", border_style="green" if summary.ok else "red"))
    else:
        console.print("Summary", highlight=False)
        for line in summary.lines:
            console.print(f"  {line}", highlight=False, markup=False)


def print_access(console: Console, demo: Demo, running: Running, kubectl_target: str) -> None:
    cluster = running.cluster
    namespace = "-A" if cluster.emulated else f"-n {cluster.namespace}"
    lines = [
        "kubearq is still running; Ctrl-C stops it all.",
        f"  kubeconfig     {cluster.kubeconfig}",
        f"  kubectl        kubectl --kubeconfig {cluster.kubeconfig} get {kubectl_target} {namespace}",
        f"                 kubectl --kubeconfig {cluster.kubeconfig} get lease kubearq-operator -n {cluster.namespace}",
    ]
    for process in demo.stack.processes.values():
        lead = " (leader)" if process.name == demo.state.holder else ""
        lines.append(f"  {process.name:<14} {process.metrics_url}{lead}")
    lines += [
        f"  Redis          {running.redis_url}",
        f"  PostgreSQL     {running.database_url}",
        f"  event website  {running.site.listing_urls[0]}",
        f"  ad platform    {running.ad_platform.base_url}",
        f"  connections    DATABASE_URL={running.database_url} kubearq connections list",
        f"  logs           {demo.folder}",
    ]
    for line in lines:
        console.print(line, highlight=False, markup=False)


def _log_names(demo: Demo) -> str:
    demo.stack.copy_service_logs()
    return ", ".join(sorted(path.name for path in demo.folder.glob("*.log"))) or "none yet"

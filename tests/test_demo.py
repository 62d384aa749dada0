"""The demo (`scripts/demo`, `python -m kubearq.demo`): its timeline decisions and its website, then whole runs —
piped (plain lines), in a real terminal (tmux), and failing — each leaving nothing running."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import pytest
import yaml
from protego import Protego

from kubearq.demo.plan import (
    audit_sync,
    audit_ticks,
    failover_tick,
    minute_boundaries,
    pages_per_minute,
    scrape_rate,
    ticks_due,
)
from kubearq.demo.processes import children, pid_gone
from kubearq.demo.resources import compaction_schedule, realtime_sync_schedule, scrape_request, sync_schedule
from kubearq.demo.site import EventSite, SiteLayout
from kubearq.demo.syncing import ADVERTISERS, backfilled_quarter_hours, connection_options
from kubearq.worker.scrape.extract import extract_json_ld
from kubearq.worker.sync.admin import check_new_connection
from tests.crd_rules import REPO

SHORT_RUN_TIMEOUT = 120.0
T = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)


# The timeline, decided without running anything.


def test_the_ticks_of_every_minute_are_the_whole_minutes_after_a_moment() -> None:
    assert minute_boundaries(T + timedelta(seconds=5), T + timedelta(minutes=2)) == [
        T + timedelta(minutes=1), T + timedelta(minutes=2)]
    assert minute_boundaries(T, T) == []  # a schedule created on the minute first fires on the next one


def test_the_leader_is_killed_before_the_latest_minute_that_fits_the_budget() -> None:
    # kill 3 s before the tick, no sooner than 12:00:20; the tick plus 12 s over by 12:02:15
    tick = failover_tick(T + timedelta(seconds=20), T + timedelta(minutes=2, seconds=15))
    assert tick == T + timedelta(minutes=2)
    # 12:02 + 12 s would end after 12:02:05: only 12:01 fits
    assert failover_tick(T + timedelta(seconds=20), T + timedelta(minutes=2, seconds=5)) == T + timedelta(minutes=1)


def test_no_minute_fits_a_budget_shorter_than_the_wait_for_one() -> None:
    assert failover_tick(T + timedelta(seconds=10), T + timedelta(seconds=40)) is None
    # no kill before 12:00:58: 12:01 would be 2 s after it, not the 3 s the gap needs
    assert failover_tick(T + timedelta(seconds=58), T + timedelta(minutes=2, seconds=12)) == T + timedelta(minutes=2)


def test_the_rate_limit_spreads_the_pages_over_the_time_in_tens() -> None:
    assert scrape_rate(126, 60) == 130
    assert scrape_rate(18, 18) == 60
    assert scrape_rate(10, 600) == 30  # never slower than 30/min
    assert scrape_rate(10_000, 1) == 600


def test_pages_per_minute_are_counted_over_the_last_ten_seconds() -> None:
    samples = [(0.0, 0), (5.0, 50), (10.0, 60), (20.0, 80)]
    assert pages_per_minute(samples) == pytest.approx(120)  # 20 pages from t=10 to t=20
    assert pages_per_minute(samples[:1]) is None


def test_the_tick_audit_names_ticks_lost_doubled_or_unexpected() -> None:
    exact = audit_ticks(["a", "b"], ["a", "b"], ["b", "a"])
    assert exact.exact
    assert exact.verdict().startswith("2 tick(s) due, each enqueued once and run once")
    wrong = audit_ticks(["a", "b"], ["a", "c"], ["a", "a", "c"])
    assert (wrong.lost, wrong.doubled, wrong.unexpected) == (("b",), ("a",), ("c",))
    assert not wrong.exact


def test_the_demo_resources_are_the_examples_adapted_to_the_local_site() -> None:
    example = yaml.safe_load((REPO / "manifests/examples/scraperequest-events.yaml").read_text())
    demo = scrape_request(["http://127.0.0.1:8000/calendar?page=1"], 120)
    for kept in ("links", "extract"):
        assert demo["spec"][kept] == example["spec"][kept]  # type: ignore[index]
    assert demo["spec"]["retry"]["maxTries"] == example["spec"]["retry"]["maxTries"]  # type: ignore[index]
    assert demo["spec"]["fetch"] == {"allowPrivateNetworks": True}  # type: ignore[index]
    schedule = yaml.safe_load((REPO / "manifests/examples/syncschedule-realtime.yaml").read_text())
    minutely = sync_schedule("kubearq-demo")["spec"]
    assert minutely["schedule"] == "* * * * *"  # type: ignore[index]
    for kept in ("timeZone", "concurrencyPolicy"):
        assert minutely[kept] == schedule["spec"][kept]  # type: ignore[index]


def test_a_tick_counts_as_due_once_settled_or_once_the_status_lists_it() -> None:
    created = T + timedelta(seconds=30)
    settled = timedelta(seconds=3)
    assert ticks_due(created, T + timedelta(minutes=2, seconds=2), [], settled=settled) == [T + timedelta(minutes=1)]
    listed = [T + timedelta(minutes=2)]
    assert ticks_due(created, T + timedelta(minutes=2, seconds=1), listed, settled=settled) == [
        T + timedelta(minutes=1), T + timedelta(minutes=2)]


def test_the_sync_audit_wants_every_connection_synced_after_the_first_tick() -> None:
    tick = T + timedelta(minutes=1)
    synced = audit_sync(tick, {"acme": tick + timedelta(seconds=4), "globex": tick + timedelta(seconds=5)})
    assert synced.ok
    assert synced.verdict() == "each of the 2 connections synced after the 12:01:00 tick, no sync job failed"
    late = audit_sync(tick, {"acme": tick + timedelta(seconds=4), "globex": None, "initech": T},
                      ["1 sync_connection job(s) failed (kubearq_worker_jobs_failed_total)"])
    assert late.unsynced == ("globex", "initech")
    assert not late.ok
    assert late.verdict() == ("sync wrong — not synced after the 12:01:00 tick: globex, initech; 1 sync_connection "
                              "job(s) failed (kubearq_worker_jobs_failed_total)")


def test_without_a_tick_the_sync_audit_says_so_instead_of_failing() -> None:
    audit = audit_sync(None, {"acme": None, "globex": None})
    assert audit.ok
    assert audit.verdict().startswith("no tick of the sync fell due in this run")
    assert not audit_sync(None, {"acme": None}, ["SyncSchedule sync-realtime's 12:01:00 run Failed"]).ok


def test_the_demo_connections_pass_the_checks_of_kubearq_connections_add() -> None:
    for advertiser in ADVERTISERS:
        options = connection_options(advertiser, "http://127.0.0.1:8001")
        del options["name"]
        check_new_connection(**options)  # raises AdminError naming the option that is wrong


def test_every_backfilled_day_of_the_demo_accounts_is_96_quarter_hours_of_whole_hours() -> None:
    # whole-hour offsets without daylight saving: a day is 96 quarter hours, every hour compaction rolls up is whole
    for advertiser in ADVERTISERS:
        zone = ZoneInfo(advertiser.time_zone)
        offsets = {datetime(2026, month, 1, tzinfo=zone).utcoffset() or timedelta(0) for month in (1, 7)}
        assert len(offsets) == 1, advertiser
        assert offsets.pop() % timedelta(hours=1) == timedelta(0), advertiser
    assert backfilled_quarter_hours(ADVERTISERS) == (2 + 4 + 1) * 90 * 96 == 60480


def test_the_demo_sync_schedules_are_the_examples_every_minute() -> None:
    for made, example in ((realtime_sync_schedule(), "syncschedule-realtime.yaml"),
                          (compaction_schedule(), "syncschedule-compaction.yaml")):
        wanted = yaml.safe_load((REPO / "manifests/examples" / example).read_text())
        spec = made["spec"]
        assert made["metadata"] == wanted["metadata"]
        assert spec["schedule"] == "* * * * *"  # type: ignore[index]
        assert "jitterSeconds" not in spec  # type: ignore[operator]
        for kept in ("timeZone", "concurrencyPolicy"):
            assert spec[kept] == wanted["spec"][kept]  # type: ignore[index]
        assert spec["job"] == wanted["spec"]["job"]  # type: ignore[index]


async def test_the_event_site_serves_events_of_every_json_ld_shape_a_404_a_503_and_robots_rules() -> None:
    layout = SiteLayout(listing_pages=2, per_page=8)
    async with EventSite(layout) as site, httpx.AsyncClient() as client:
        listing = await client.get(site.listing_urls[1])
        assert listing.status_code == 200
        assert len(re.findall(r'<a class="event-card" href="/events/\d+-', listing.text)) == layout.per_page
        found = {}
        for event in site.extractable:
            page = await client.get(site.url(event))
            if event is site.flaky:
                assert page.status_code == 503  # the first try only
                page = await client.get(site.url(event))
            assert page.status_code == 200, event
            items = extract_json_ld(page.text, ["Event"]).items
            assert len(items) == 1, event
            found[event.shape] = items[0]["@type"]
        assert set(found) == {"object", "graph", "array", "type-list", "two-blocks"}
        assert isinstance(found["type-list"], list)
        assert (await client.get(site.url(site.missing))).status_code == 404
        robots = Protego.parse((await client.get(f"{site.base_url}/robots.txt")).text)
        assert not robots.can_fetch(site.url(site.disallowed), "kubearq")
        assert robots.can_fetch(site.url(site.events[0]), "kubearq")


# Whole runs.


def demo_command(folder: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "kubearq.demo", "--short", "--logs", str(folder), *args]


def ports_in(output: str) -> list[int]:
    """The Redis, PostgreSQL and website ports the demo said it started."""
    return [int(port) for port in re.findall(r"(?:redis://|postgresql://postgres@|http://)127\.0\.0\.1:(\d+)", output)]


def processes_of(folder: Path, ports: Iterable[int]) -> list[int]:
    """Pids the demo started and left: run in its folder (operators, workers) or serving its ports (the servers)."""
    marks = [mark for port in set(ports) for mark in (f"127.0.0.1:{port}", f"port={port}")]
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if state != "Z" and (cwd == str(folder) or any(mark in command for mark in marks)):
            found.append(int(entry.name))
    return found


def descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        for child in children(todo.pop()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pids: Iterable[int]) -> set[int]:
    return {pid for pid in pids if not pid_gone(pid)}


def kill_leftovers(folder: Path, ports: Iterable[int]) -> None:
    """A last resort after a failed test: SIGKILL what the demo started, each by its pid."""
    for pid in processes_of(folder, ports):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def demo_process(folder: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[str]]:
    """The demo with its output piped; stopped with Ctrl-C (then killed, with what it left) if still running."""
    process = subprocess.Popen(demo_command(folder, *args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, cwd=folder.parent, env=env or dict(os.environ))
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.communicate(timeout=40)
            except subprocess.TimeoutExpired:
                process.kill()
                process.communicate()
        kill_leftovers(folder, [])


@pytest.mark.timeout(SHORT_RUN_TIMEOUT + 30)
def test_a_short_run_piped_prints_plain_lines_and_a_true_summary_and_leaves_nothing_running(tmp_path: Path) -> None:
    folder = tmp_path / "logs"
    with demo_process(folder) as process:
        output, _ = process.communicate(timeout=SHORT_RUN_TIMEOUT)
        ports = ports_in(output)
    assert process.returncode == 0, output
    assert "\x1b[" not in output  # not a terminal: no escape sequences, no bars
    # the live view's figures, as lines
    assert re.search(r"scrape city-events: Running \d+/\d+ pages \(failed \d+, deferred \d+\), \d+ pages/min "
                     r"\(limit \d+/min\) \| queue arq:queue: ready \d+, running \d+, deferred \d+ \| leader "
                     r"operator-[ab]", output), output
    summary = output[output.index("\nSummary\n"):]
    assert "Items extracted: 14 events stored in PostgreSQL (table scrape_items), of 14 extractable" in summary
    # (on the cluster of $KUBECONFIG the namespace gets a random suffix)
    assert re.search(r"ScrapeRequest kubearq-demo(-[0-9a-f]{6})?/city-events: PartiallySucceeded", summary), summary
    assert "Failed URLs (2, table scrape_failures):" in summary
    assert re.search(r"/events/1004-late-laughs \(detail page, 1 try\): .*answered HTTP 404", summary)
    assert re.search(r"/events/1007-natural-wine-tasting \(detail page, 1 try\): .*robots\.txt disallows it", summary)
    assert re.search(r"Jobs run: \d+ \(scrape_detail 16, (sync_connection 3, )?scrape_listing 2", summary), summary
    assert re.search(r"Ticks fired: [01]", summary)
    assert re.search(r"none doubled, none lost|no tick fell due in this run", summary)
    synced = re.search(r"Connections synced: ([03]) of 3 \(table connections", summary)
    assert synced is not None, summary
    if synced[1] == "0":  # no minute boundary fell in the run
        assert "Sync ticks fired: sync-realtime none; compact-snapshots none" in summary
        assert "Metric rows stored: 0 in metric_snapshots (0 of 15 minutes, 0 hourly): 0 quarter hours of 7 ads" \
            in summary
        assert "Sync jobs run: 0, 0 failed" in summary
        assert "no tick of the sync fell due in this run (ticks come at minute boundaries)" in summary
    else:  # one boundary at most: the connections' first syncs, their 90-day backfills
        # The compaction schedule is created a moment after the realtime one: a minute boundary between the two
        # (rare) leaves it no tick due in the run, which the summary audits (a lost tick fails the demo).
        compacted = re.search(r"Sync ticks fired: sync-realtime [\d:]+ by operator-[ab] [+-][\d.]+ s Succeeded; "
                              r"compact-snapshots (none|[\d:]+ by operator-[ab] [+-][\d.]+ s Succeeded)", summary)
        assert compacted is not None, summary
        assert re.search(r"acme \(1 sync, the last at [\d:]+: its backfill\), globex \(1 sync, .*its backfill\), "
                         r"initech \(1 sync, .*its backfill\)", summary), summary
        # compaction may have rolled some up already: 4 quarter hours to an hourly row, none lost
        assert re.search(r"Metric rows stored: \d+ in metric_snapshots \(\d+ of 15 minutes, \d+ hourly\): 60480 "
                         r"quarter hours of 7 ads", summary), summary
        if compacted[1] == "none":
            assert "Sync jobs run: 4 (sync_connections 1, sync_connection 3), 0 failed" in summary
        else:
            assert "Sync jobs run: 5 (sync_connections 1, sync_connection 3, compact_snapshots 1), 0 failed" in summary
        assert re.search(r"each of the 3 connections synced after the [\d:]+ tick, no sync job failed", summary)
    secrets_dir = re.search(r"tokens in SYNC_SECRETS_DIR (\S+)", output)
    assert secrets_dir is not None
    assert not Path(secrets_dir[1]).exists()  # the tokens go with the demo
    failover = re.search(r"Failover: (operator-[ab]) SIGKILLed at [\d:]+; (operator-[ab]) took the Lease "
                         r"(\d+\.\d) s later", summary)
    assert failover is not None, summary
    assert failover[1] != failover[2]
    assert 4 <= float(failover[3]) <= 15  # LEASE_DURATION 6 s after the last renewal it saw
    wall = re.search(r"Wall time: (\d+) s", summary)
    assert wall is not None
    assert int(wall[1]) < 60
    assert output.rstrip().endswith("Everything the demo started is stopped.")
    assert {"operator-a.log", "operator-b.log", "worker-1.log", "worker-2.log", "redis.log", "postgres.log"} <= {
        path.name for path in folder.iterdir()}
    assert len(ports) >= 3
    assert processes_of(folder, ports) == []


@pytest.mark.timeout(SHORT_RUN_TIMEOUT + 30)
def test_in_a_terminal_the_demo_draws_bars_and_ctrl_c_stops_everything(tmp_path: Path) -> None:
    tmux = shutil.which("tmux")
    if tmux is None:
        pytest.skip("tmux is not installed (scripts/test installs it: apt-get install tmux)")
    folder = tmp_path / "logs"
    server = tmp_path / "tmux.sock"  # a tmux server of the test's own, not the user's; its socket goes with tmp_path

    # Without COLUMNS and LINES: GNU readline (loaded by pytest) sets them to 80x24 in the C environment, which
    # children inherit (an xdist worker in its os.environ too), and rich obeys COLUMNS over the terminal's size.
    env = {name: value for name, value in os.environ.items() if name not in ("COLUMNS", "LINES")}

    def run_tmux(*args: str) -> str:
        return subprocess.run([tmux, "-S", str(server), *args], capture_output=True, text=True, check=True,
                              timeout=10, env=env).stdout

    command = " ".join(shlex.quote(part) for part in demo_command(folder)) + f"; echo $? > {tmp_path}/exit-code"
    screen, started = "", set[int]()
    try:
        run_tmux("new-session", "-d", "-s", "demo", "-x", "160", "-y", "50", command)
        run_tmux("set-option", "-t", "demo", "remain-on-exit", "on")
        shell = int(run_tmux("display-message", "-p", "-t", "demo", "#{pane_pid}"))
        deadline = time.monotonic() + 60
        bars = re.compile(r"ScrapeRequest city-events +Running +━+[━╺╸ ]* +([1-9]\d*)/(\d+) pages")
        while not bars.search(screen):
            assert time.monotonic() < deadline, f"no progress bar on the screen:\n{screen}"
            time.sleep(0.5)
            screen = run_tmux("capture-pane", "-p", "-t", "demo")
        started = descendants(shell)  # the demo, its servers, operators and workers
        assert re.search(r"\d+ pages/min against a rate limit of \d+/min", screen), screen
        assert re.search(r"Queue arq:queue: ready \d+, running \d+, deferred \d+", screen), screen
        assert re.search(r"operator-[ab] +● leader", screen), screen
        assert "Lease timings shortened for the demo: LEASE_DURATION=6 s" in screen
        run_tmux("send-keys", "-t", "demo", "C-c")  # Ctrl-C, as a person at the terminal would
        exit_code = tmp_path / "exit-code"
        while not exit_code.exists():
            assert time.monotonic() < deadline + 40, f"the demo did not stop on Ctrl-C:\n{screen}"
            time.sleep(0.5)
        screen = run_tmux("capture-pane", "-p", "-t", "demo")
        assert exit_code.read_text().strip() == "130", screen
        assert "Stopped (SIGINT): everything the demo started is stopped." in screen
    finally:
        with contextlib.suppress(subprocess.SubprocessError):
            run_tmux("kill-server")  # SIGHUP to a demo still running: it stops what it started
        deadline = time.monotonic() + 40
        while alive(started) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = alive(started) | set(processes_of(folder, []))
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert started
    assert left == set()


def test_a_demo_that_cannot_start_says_what_failed_and_where_the_logs_are(tmp_path: Path) -> None:
    folder = tmp_path / "logs"
    env = {**os.environ, "PATH": str(tmp_path / "empty")}  # no redis-server to be found
    with demo_process(folder, env=env) as process:
        output, _ = process.communicate(timeout=60)
    assert process.returncode == 1, output
    assert "demo failed: Redis did not start: redis-server not found; install it: apt-get install redis-server" \
        in output
    assert f"Everything it started is stopped. Logs: {folder}" in output
    assert processes_of(folder, ports_in(output)) == []

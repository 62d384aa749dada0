"""The `kubearq` command line as a user meets it: every message says what to fix, exit codes a script can trust."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from kubearq.cli import update_settings_reference
from kubearq.demo.services import free_port
from tests.crd_rules import REPO

SCHEDULE = "apiVersion: kubearq.dev/v1alpha1\nkind: SyncSchedule\nmetadata: {name: realtime}\n"


def kubearq(*args: str, env: dict[str, str] | None = None, stdin: str | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kubearq.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, input=stdin, env={**os.environ, **(env or {})})


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


def test_version() -> None:
    result = kubearq("--version")
    assert (result.returncode, result.stdout) == (0, "kubearq 0.1.0\n")


@pytest.mark.parametrize(("role", "flag", "text"), [
    ("worker", "--max-jobs MAX_JOBS", "Jobs run at once by this process. ($MAX_JOBS; default: `16`)"),
    ("worker", "--redis-url REDIS_URL", "($REDIS_URL; default: `redis://localhost:6379/0`)"),
    ("operator", "--namespace NAMESPACE", "Watch only these namespaces, comma-separated (default: all namespaces). "
                                          "($NAMESPACE; default: unset)"),
    ("operator", "--log-format LOG_FORMAT", "`text`: plain lines for a person at a terminal. ($LOG_FORMAT; default: "
                                            "`json`)"),
])
def test_every_setting_has_a_flag_saying_its_meaning_and_default(role: str, flag: str, text: str) -> None:
    result = kubearq(role, "--help")
    help_text = " ".join(result.stdout.split())
    assert result.returncode == 0
    assert flag in help_text
    assert text in help_text


def test_secrets_are_no_flags() -> None:
    help_text = kubearq("worker", "--help").stdout
    assert "--database-url" not in help_text
    assert "--firecrawl-api-key" not in help_text


def test_readme_settings_tables_are_what_the_models_generate() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert update_settings_reference(readme) == readme, "regenerate with `kubearq crds --readme README.md`"


# --- validate --------------------------------------------------------------------------------------------


def test_validate_says_what_it_checked(tmp_path: Path) -> None:
    good = write(tmp_path, "good.yaml", SCHEDULE + "spec: {schedule: '*/15 * * * *', job: {function: sync}}\n---\n"
                 "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: pages}\n")
    result = kubearq("validate", str(good))
    assert (result.returncode, result.stdout, result.stderr) == (
        0, "1 document OK: syncschedule/realtime; skipped 1 other object(s): ConfigMap/pages\n", "")


def test_validate_a_folder_takes_every_yaml_file_in_it() -> None:
    result = kubearq("validate", "manifests/examples")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("6 documents OK: ")


def test_validate_refuses_unknown_fields_with_a_did_you_mean(tmp_path: Path) -> None:
    bad = write(tmp_path, "typo.yaml", SCHEDULE + "spec:\n  schedule: '@daily'\n  timezone: Europe/Berlin\n"
                "  job: {function: sync}\n  foo: 1\n")
    result = kubearq("validate", str(bad))
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.splitlines() == [
        f"{bad}: syncschedule/realtime: spec.timezone: unknown field; did you mean `timeZone`?",
        f"{bad}: syncschedule/realtime: spec.foo: unknown field",
        "1 of 1 document(s) invalid",
    ]


def test_validate_lists_every_problem_of_a_document_with_its_value(tmp_path: Path) -> None:
    bad = write(tmp_path, "bad.yaml", "apiVersion: kubearq.dev/v1alpha1\nkind: ScrapeRequest\nmetadata: {name: ev}\n"
                "spec:\n  urls: [ftp://events.example/]\n  rateLimit: {requestPerMinute: 5, burst: 0}\n"
                "  retry: {maxTries: many}\n---\n" + SCHEDULE + "spec: {schedule: '* * * * *', job: {}, "
                "concurrencyPolicy: forbid}\n")
    result = kubearq("validate", str(bad))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"{bad}: scraperequest/ev: spec.rateLimit.requestPerMinute: unknown field; did you mean `requestsPerMinute`?",
        f"{bad}: scraperequest/ev: spec.rateLimit.burst: 0 is less than the minimum, 1",
        f"{bad}: scraperequest/ev: spec.retry.maxTries: 'many' is not an integer",
        f"{bad}: scraperequest/ev: spec.urls[0]: 'ftp://events.example/' is not an http(s) URL; use a URL like "
        "'https://example.com/events'",
        f"{bad}: syncschedule/realtime: spec.job.function: required — the name of a function your workers serve "
        "(registered in their `functions`)",
        f"{bad}: syncschedule/realtime: spec.concurrencyPolicy: 'forbid' is not one of Allow, Forbid, Replace",
        "2 of 2 document(s) invalid",
    ]


@pytest.mark.parametrize(("text", "message"), [
    ("apiVersion: kubearq.dev/v1\nkind: SyncSchedule\nmetadata: {name: x}\nspec: {schedule: '@daily', "
     "job: {function: f}}\n",
     "syncschedule/x: apiVersion: 'kubearq.dev/v1' is not served; SyncSchedule is served as kubearq.dev/v1alpha1"),
    ("apiVersion: kubearq.dev/v1alpha1\nkind: SyncSchedule\nspec: {schedule: '@daily', job: {function: f}}\n",
     "syncschedule (document 1): metadata.name: required — the resource's name (lower-case letters, digits, '-' "
     "and '.')"),
    ("apiVersion: kubearq.dev/v1alpha1\nkind: SyncSchedule\nmetadata: {name: Nightly_Sync}\n"
     "spec: {schedule: '@daily', job: {function: f}}\n",
     "syncschedule/Nightly_Sync: metadata.name: 'Nightly_Sync' is not a valid name: lower-case letters, digits, '-' "
     "and '.', starting and ending with a letter or digit, at most 253 characters"),
    ("apiVersion: kubearq.dev/v1alpha1\nkind: SyncSchedul\nmetadata: {name: x}\n",
     "syncschedul/x: kind: 'SyncSchedul' is not a kind kubearq serves; did you mean `SyncSchedule`? (SyncSchedule, "
     "ScrapeRequest, QueuePolicy)"),
    (SCHEDULE, "syncschedule/realtime: spec: required — what the SyncSchedule should do"),
])
def test_validate_checks_the_document_around_the_spec(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, "doc.yaml", text)
    result = kubearq("validate", str(path))
    assert result.returncode == 1
    assert result.stderr.splitlines()[0] == f"{path}: {message}"


@pytest.mark.parametrize(("text", "message"), [
    ("", "no documents (the file is empty)"),
    ("kind: SyncSchedule\nspec: [unclosed\n", "not valid YAML at line 3, column 1: expected ',' or ']', but got "
                                             "'<stream end>'"),
    ("apiVersion: v1\nkind: ConfigMap\n", "no SyncSchedule or ScrapeRequest in it (kubearq.dev/v1alpha1)"),
])
def test_validate_a_file_it_cannot_use_is_one_line(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, "file.yaml", text)
    result = kubearq("validate", str(path))
    assert (result.returncode, result.stderr) == (1, f"{path}: {message}\n")


def test_validate_a_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    result = kubearq("validate", str(tmp_path / "nope.yaml"))
    assert (result.returncode, result.stderr) == (2, f"{tmp_path / 'nope.yaml'}: no such file or folder\n")


def test_validate_reads_standard_input_and_speaks_json() -> None:
    text = SCHEDULE + "spec: {schedule: '@daily', timezone: UTC, job: {function: f}}\n"
    result = kubearq("validate", "-o", "json", "-", stdin=text)
    assert result.returncode == 1
    assert json.loads(result.stdout) == {
        "valid": False, "skipped": [], "errors": [],
        "documents": [{"file": "-", "index": 1, "kind": "SyncSchedule", "name": "realtime", "valid": False,
                       "problems": [{"field": "spec.timezone", "message": "unknown field; did you mean `timeZone`?"}]}],
    }


# --- starting the roles ----------------------------------------------------------------------------------


def last_json_line(text: str) -> dict[str, object]:
    lines = [line for line in text.splitlines() if line.startswith("{")]
    assert lines, text
    line: dict[str, object] = json.loads(lines[-1])
    return line


def test_operator_refuses_a_bad_redis_url_at_start_in_the_log_format() -> None:
    result = kubearq("operator", env={"REDIS_URL": "http://x", "KUBECONFIG": "/nonexistent"})
    assert result.returncode == 2
    line = last_json_line(result.stderr)
    assert (line["level"], line["message"]) == (
        "ERROR", "kubearq operator: REDIS_URL: REDIS_URL must start with redis://, rediss:// (TLS) or unix://, not "
                 "'http://x'")


def test_a_bad_setting_is_named_as_the_user_set_it(tmp_path: Path) -> None:
    result = kubearq("worker", "--max-jobs", "0", env={"LOG_FORMAT": "text"})
    assert result.returncode == 2
    assert result.stderr.rstrip().endswith(
        "ERROR kubearq.cli: kubearq worker: MAX_JOBS: Input should be greater than or equal to 1 (got '0')")


@pytest.mark.parametrize(("content", "message"), [
    ("apiVersion: v1\nclusters: [\n", "the kubeconfig {path} is not valid YAML at line 3, column 1: expected the "
                                      "node content, but found '<stream end>'"),
    ("just a string\n", "the kubeconfig {path} is not a kubeconfig: a YAML mapping with clusters, users, contexts "
                        "and current-context, not a str"),
])
def test_a_malformed_kubeconfig_is_one_line_naming_the_file(tmp_path: Path, content: str, message: str) -> None:
    path = write(tmp_path, "kubeconfig", content)
    result = kubearq("operator", env={"KUBECONFIG": str(path), "LOG_FORMAT": "text"})
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.rstrip().endswith(f"kubearq operator: {message.format(path=path)}")


def test_a_worker_without_functions_says_how_to_get_some(redis_url: str) -> None:
    result = kubearq("worker", env={"REDIS_URL": redis_url, "LOG_FORMAT": "text", "HTTP_PORT": "0",
                                    "DATABASE_URL": ""})
    assert result.returncode == 2
    assert result.stderr.rstrip().endswith(
        "kubearq worker: no functions to serve: set DATABASE_URL to serve the built-in scrape jobs, or give "
        "--settings module:WorkerSettings")


def test_a_second_worker_on_the_same_http_port_is_one_line_naming_it(redis_url: str) -> None:
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        result = kubearq("worker", "--settings", "tests.worker_jobs:WorkerSettings", "--http-host", "127.0.0.1",
                         "--http-port", str(port), env={"REDIS_URL": redis_url, "LOG_FORMAT": "text",
                                                        "PYTHONPATH": str(REPO)})
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, result.stderr
    assert errors[0].endswith(
        f"kubearq worker: HTTP_PORT {port} is already in use on 127.0.0.1 (another kubearq operator or worker on "
        "this host?): set HTTP_PORT to a free port, or 0 for any free port")
    assert "Traceback" not in result.stderr


def test_the_worker_logs_a_final_stopped_line(redis_url: str) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "kubearq.cli", "worker", "--settings", "tests.worker_jobs:WorkerSettings"],
        cwd=REPO, env={**os.environ, "REDIS_URL": redis_url, "HTTP_PORT": "0", "LOG_FORMAT": "text",
                       "PYTHONPATH": str(REPO)},
        stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    for line in process.stderr:
        if "probes and metrics on port" in line:
            break
    process.terminate()
    with process.stderr:
        rest = process.stderr.read()
    assert process.wait(timeout=30) == 0
    assert re.search(r"INFO kubearq.cli: kubearq worker stopped$", rest.rstrip()), rest


def test_lease_timings_that_do_not_nest_are_refused_naming_them() -> None:
    result = kubearq("operator", env={"LEASE_DURATION": "5", "LEASE_RENEW_DEADLINE": "6", "LOG_FORMAT": "text",
                                      "KUBECONFIG": "/nonexistent"})
    assert result.returncode == 2
    assert result.stderr.rstrip().endswith(
        "kubearq operator: settings: LEASE_DURATION (5) > LEASE_RENEW_DEADLINE (6.0) > 1.2 x LEASE_RETRY_PERIOD (2.0) "
        "must hold: the leader gives up before a standby may take over, and renews several times before it gives up")

"""`kubearq connections add|list|get|disable`: the connections table without SQL, every input checked first."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.crd_rules import REPO

WORKSPACE = "00000000-0000-4000-8000-000000000001"
CONFIG = json.dumps({"entitiesUrl": "https://ads.example/v1/entities",
                     "metricsUrl": "https://ads.example/v1/metrics?start={start}&end={end}",
                     "metrics": {"values": {"spend": {"path": "spend"}}}})


def connections(*args: str, dsn: str | None) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if key != "DATABASE_URL"}
    if dsn is not None:
        env["DATABASE_URL"] = dsn
    return subprocess.run([sys.executable, "-m", "kubearq.cli", "connections", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


def add(dsn: str, *extra: str, name: str = "Acme Ads") -> subprocess.CompletedProcess[str]:
    return connections("add", "--workspace", WORKSPACE, "--provider", "http-json", "--name", name,
                       "--config", CONFIG, "--credentials", "ads/acme", "--time-zone", "Europe/Berlin", *extra,
                       dsn=dsn)


def test_add_list_get_and_disable_a_connection(postgres_dsn: str) -> None:
    added = add(postgres_dsn)
    connection_id = added.stdout.split()[1]
    listed = connections("list", dsn=postgres_dsn)
    shown = connections("get", connection_id, "-o", "json", dsn=postgres_dsn)
    disabled = connections("disable", connection_id, dsn=postgres_dsn)
    after = connections("list", dsn=postgres_dsn)
    everything = connections("list", "--all", "-o", "json", dsn=postgres_dsn)

    assert (added.returncode, added.stdout) == (
        0, f"connection {connection_id} added (http-json, 'Acme Ads'); its first sync backfills 90 days\n")
    assert listed.stdout.splitlines()[0].split() == ["ID", "NAME", "PROVIDER", "ACTIVE", "STATUS", "LAST", "SYNC",
                                                     "ERROR"]
    assert listed.stdout.splitlines()[1].split() == [connection_id, "Acme", "Ads", "http-json", "yes", "idle",
                                                     "never"]
    record = json.loads(shown.stdout)
    assert {key: record[key] for key in ("id", "provider", "displayName", "credentialsRef", "timeZone", "active",
                                         "syncStatus", "backfilledAt")} == {
        "id": connection_id, "provider": "http-json", "displayName": "Acme Ads", "credentialsRef": "ads/acme",
        "timeZone": "Europe/Berlin", "active": True, "syncStatus": "idle", "backfilledAt": None}
    assert (disabled.returncode, disabled.stdout) == (0, f"connection {connection_id} disabled\n")
    assert len(after.stdout.splitlines()) == 1  # the header alone
    assert [c["active"] for c in json.loads(everything.stdout)] == [False]


@pytest.mark.parametrize(("extra", "message"), [
    (("--provider", "tiktok-ads"), "--provider 'tiktok-ads' is not one of http-json, meta-ads"),
    (("--config", "{not json"), "--config is not JSON: Expecting property name enclosed in double quotes: line 1 "
                                "column 2 (char 1)"),
    (("--config", "{}"), "--config: invalid http-json connection config: config.entitiesUrl: Field required; "
                         "config.metricsUrl: Field required; config.metrics: Field required"),
    (("--credentials", "../etc/passwd"), "--credentials '../etc/passwd' is not a credentials reference: write "
                                         "<secret name>/<key>, the Secret key the workers have mounted under "
                                         "SYNC_SECRETS_DIR"),
    (("--time-zone", "Mars/Olympus"), "--time-zone 'Mars/Olympus' is not an IANA time zone, e.g. Europe/Berlin"),
    (("--workspace", "acme"), "--workspace 'acme' is not a UUID"),
])
def test_add_refuses_bad_input_naming_it(postgres_dsn: str, extra: tuple[str, ...], message: str) -> None:
    result = add(postgres_dsn, *extra)
    assert (result.returncode, result.stderr) == (2, f"kubearq connections add: {message}\n")


def test_an_unknown_connection_is_not_found(postgres_dsn: str) -> None:
    missing = "00000000-0000-4000-8000-00000000dead"
    shown = connections("get", missing, dsn=postgres_dsn)
    disabled = connections("disable", "not-a-uuid", dsn=postgres_dsn)
    assert (shown.returncode, shown.stderr) == (3, f"kubearq connections get: no connection {missing}\n")
    assert (disabled.returncode, disabled.stderr) == (
        2, "kubearq connections disable: 'not-a-uuid' is not a connection id (a UUID; `kubearq connections list` "
           "shows them)\n")


def test_without_database_url_it_says_what_to_set() -> None:
    result = connections("list", dsn=None)
    assert (result.returncode, result.stderr) == (
        2, "kubearq connections: set DATABASE_URL to the workers' PostgreSQL (postgresql://user@host/db)\n")

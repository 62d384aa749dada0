"""A private Prometheus server (Debian's `prometheus`) on loopback, scraping the test's own targets, and its
HTTP query API: what an HPA's prometheus-adapter or a KEDA ScaledObject would ask."""

from __future__ import annotations

import json
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from kubearq.demo.processes import LOOPBACK, Service, ServiceError

PROMETHEUS_START_TIMEOUT = 30.0


@dataclass(frozen=True)
class Target:
    """One scrape target: `host:port` serving /metrics, with the labels Prometheus gives its series."""

    address: str
    labels: Mapping[str, str]


@dataclass(frozen=True)
class Sample:
    labels: dict[str, str]
    value: float


class PrometheusServer(Service):
    """`prometheus` with one scrape job over static targets, its TSDB in a temp dir."""

    _name = "prometheus"

    def __init__(self, targets: Sequence[Target], *, scrape_interval: str = "1s", port: int | None = None) -> None:
        binary = shutil.which("prometheus") or ("/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None)
        if binary is None:
            raise ServiceError("prometheus not found; install it: apt-get install prometheus")
        self._binary = binary
        self._targets = list(targets)
        self._scrape_interval = scrape_interval
        super().__init__(port, Path(tempfile.mkdtemp(prefix="kubearq-prometheus-")))

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def _command(self) -> list[str]:
        config = self._dir / "prometheus.yml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": self._scrape_interval, "scrape_timeout": self._scrape_interval,
                       "evaluation_interval": self._scrape_interval},
            "scrape_configs": [{
                "job_name": "kubearq-operator",
                "static_configs": [{"targets": [target.address], "labels": dict(target.labels)}
                                   for target in self._targets],
            }],
        }))
        return [self._binary, f"--config.file={config}", f"--storage.tsdb.path={self._dir / 'data'}",
                f"--web.listen-address={LOOPBACK}:{self._port}", "--storage.tsdb.retention.time=1h",
                "--log.level=warn"]

    def _timeout(self) -> float:
        return PROMETHEUS_START_TIMEOUT

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:  # noqa: S310 - loopback
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def query(self, expression: str) -> list[Sample]:
        """Evaluate an instant query now, as the adapter and KEDA do; raises on a query Prometheus refuses."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
        try:
            with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - loopback
                body = json.load(response)
        except urllib.error.HTTPError as error:
            raise ServiceError(f"prometheus refused {expression!r}: {error.read().decode(errors='replace')}") from error
        if body["status"] != "success":
            raise ServiceError(f"prometheus refused {expression!r}: {body}")
        data = body["data"]
        if data["resultType"] != "vector":
            raise ServiceError(f"{expression!r} is a {data['resultType']}, not an instant vector")
        return [Sample(dict(item["metric"]), float(item["value"][1])) for item in data["result"]]

    def targets_up(self) -> dict[str, str]:
        """Each target's scrape health (`up`, `down`, `unknown`), by address."""
        with urllib.request.urlopen(f"{self.url}/api/v1/targets", timeout=10) as response:  # noqa: S310 - loopback
            body = json.load(response)
        return {target["labels"]["instance"]: target["health"] for target in body["data"]["activeTargets"]}

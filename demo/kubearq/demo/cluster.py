"""The demo's Kubernetes API: the cluster of `$KUBECONFIG` when it is set, else the API emulator served from the
demo's own process; with the project's CRDs applied and a namespace for the demo's resources."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import httpx
import kopf
import yaml

from kubearq.demo.emulator import running_emulator
from kubearq.operator import kube
from kubearq.operator.context import SCRAPE_REQUESTS, SYNC_SCHEDULES
from kubearq.operator.crds import RESOURCES, custom_resource_definition
from kubearq.operator.login import default_connection, kubeconfig_paths
from kubearq.operator.resources import GROUP, VERSION

CRDS = kube.Resource("apiextensions.k8s.io", "v1", "customresourcedefinitions")
NAMESPACES = kube.Resource("", "v1", "namespaces")
API_TIMEOUT = 10.0
ESTABLISH_TIMEOUT = 30.0
EMULATED_NAMESPACE = "kubearq-demo"


@dataclass
class DemoCluster:
    """Where the demo's resources live and how to reach them."""

    api: kube.KubeApi
    connection: kopf.ConnectionInfo
    kubeconfig: Path
    server: str
    emulated: bool
    namespace: str

    @property
    def description(self) -> str:
        if self.emulated:
            return f"the API emulator in this process ({self.server})"
        return f"the cluster of $KUBECONFIG ({self.server})"

    async def install_crds(self) -> None:
        """Create the CRDs (or update older ones) and wait until the API serves them."""
        crds = [custom_resource_definition(resource) for resource in RESOURCES]
        for crd in crds:
            name = str(crd["metadata"]["name"])  # type: ignore[index]
            try:
                await self.api.create(CRDS, crd, timeout=API_TIMEOUT)
            except kube.ConflictError:  # a cluster that had kubearq already: bring its CRDs up to date
                current = await self.api.get(CRDS, name, timeout=API_TIMEOUT)
                if current.get("spec") != crd["spec"]:
                    version = current.get("metadata", {}).get("resourceVersion", "")
                    metadata = {**crd["metadata"], "resourceVersion": version}  # type: ignore[dict-item]
                    await self.api.replace(CRDS, name, {**crd, "metadata": metadata}, timeout=API_TIMEOUT)
        for crd in crds:
            name = str(crd["metadata"]["name"])  # type: ignore[index]

            async def established(name: str = name) -> bool:
                return _established(await self.api.get(CRDS, name, timeout=API_TIMEOUT))

            await poll_until(established, within=ESTABLISH_TIMEOUT, what=f"CRD {name} established")

    async def create_namespace(self) -> None:
        with contextlib.suppress(kube.ConflictError):
            await self.api.create(NAMESPACES, {"metadata": {"name": self.namespace}}, timeout=API_TIMEOUT)

    async def create(self, resource: kube.Resource, body: Mapping[str, object]) -> kube.KubeObject:
        return await self.api.create(resource, body, namespace=self.namespace, timeout=API_TIMEOUT)

    async def get(self, resource: kube.Resource, name: str) -> kube.KubeObject | None:
        try:
            return await self.api.get(resource, name, namespace=self.namespace, timeout=API_TIMEOUT)
        except kube.NotFoundError:
            return None

    async def kubectl_target(self) -> str:
        """What `kubectl get` should name to list the demo's resources: the `kubearq` category, unless the API's
        discovery lists subresources in that category too (the emulator does: kubectl then fails on
        `scraperequests/status`), when the two plural names."""
        verify = self.connection.as_ssl_context() if self.server.startswith("https:") else True
        try:
            async with httpx.AsyncClient(base_url=self.server, headers=self.connection.as_http_headers(),
                                         verify=verify, timeout=API_TIMEOUT) as client:
                response = await client.get(f"/apis/{GROUP}/{VERSION}")
                response.raise_for_status()
        except httpx.HTTPError:
            return "kubearq"
        entries = cast(list[dict[str, Any]], response.json().get("resources") or [])
        if any("/" in str(entry.get("name")) and entry.get("categories") for entry in entries):
            return ",".join(sorted(str(entry["name"]) for entry in entries if "/" not in str(entry.get("name"))))
        return "kubearq"

    async def clean_up(self, names: Sequence[tuple[str, str]], *, within: float = 20.0) -> None:
        """On a real cluster: delete the demo's resources, as (kind, name) (the running leader removes the
        ScrapeRequest's finalizer), then its namespace. The emulator goes away with the demo, and all it holds."""
        if self.emulated:
            return
        resources = {"ScrapeRequest": SCRAPE_REQUESTS, "SyncSchedule": SYNC_SCHEDULES}
        for kind, name in names:
            with contextlib.suppress(kube.NotFoundError):
                await self.api.delete(resources[kind], name, namespace=self.namespace, timeout=API_TIMEOUT)
        for kind, name in names:

            async def gone(kind: str = kind, name: str = name) -> bool:
                return await self.get(resources[kind], name) is None

            with contextlib.suppress(TimeoutError):
                await poll_until(gone, within=within, what=f"{kind} {name} deleted")
        with contextlib.suppress(kube.NotFoundError):
            await self.api.delete(NAMESPACES, self.namespace, timeout=API_TIMEOUT)


@contextlib.asynccontextmanager
async def connected_cluster(folder: Path) -> AsyncIterator[DemoCluster]:
    """The cluster of `$KUBECONFIG`, else an emulator served until the context ends."""
    if os.environ.get("KUBECONFIG"):
        connection = default_connection()
        namespace = f"kubearq-demo-{secrets.token_hex(3)}"  # never collides with a namespace a cluster holds
        kubeconfig = kubeconfig_paths()[0]
        async with kube.KubeApi(connection) as api:
            yield DemoCluster(api, connection, kubeconfig, connection.server, emulated=False, namespace=namespace)
        return
    # No token: kubectl sends no bearer token over plain HTTP (the emulator serves no TLS), and `kubectl get
    # kubearq` is how a user looks at the demo. The emulator listens on loopback only.
    async with running_emulator(token=None) as (_, server):
        kubeconfig = write_kubeconfig(folder / "kubeconfig", server=server, namespace=EMULATED_NAMESPACE)
        connection = kopf.ConnectionInfo(server=server, default_namespace=EMULATED_NAMESPACE)
        async with kube.KubeApi(connection) as api:
            yield DemoCluster(api, connection, kubeconfig, server, emulated=True, namespace=EMULATED_NAMESPACE)


def write_kubeconfig(path: Path, *, server: str, namespace: str) -> Path:
    """A kubeconfig for the emulator: for the operators, and for `kubectl --kubeconfig`."""
    document: dict[str, Any] = {
        "apiVersion": "v1", "kind": "Config", "current-context": "kubearq-demo",
        "clusters": [{"name": "kubearq-demo", "cluster": {"server": server}}],
        "users": [{"name": "kubearq-demo", "user": {}}],
        "contexts": [{"name": "kubearq-demo", "context": {
            "cluster": "kubearq-demo", "user": "kubearq-demo", "namespace": namespace}}],
    }
    path.write_text(yaml.safe_dump(document))
    return path


async def poll_until(probe: Callable[[], Awaitable[bool]], *, within: float, what: str,
                     interval: float = 0.1) -> None:
    """Return once `probe()` is true; TimeoutError naming `what` after `within` seconds."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        if await probe():
            return
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"{what}: not after {within:.0f} s")
        await asyncio.sleep(interval)


def _established(crd: kube.KubeObject) -> bool:
    conditions = crd.get("status", {}).get("conditions")
    return isinstance(conditions, list) and any(
        isinstance(c, dict) and c.get("type") == "Established" and c.get("status") == "True" for c in conditions)

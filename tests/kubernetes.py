"""The Kubernetes API under test, behind the one fixture `k8s`: the emulator, a real kube-apiserver of the
session's own, or the cluster of `$KUBECONFIG`.

- `--kubernetes=emulator` (the default): `kubearq.demo.emulator`, in the test's own event loop.
- `--kubernetes=kube-apiserver`: etcd + kube-apiserver (+ kube-controller-manager) started once per session
  from `KUBEBUILDER_ASSETS` (`tests/controlplane.py`); without such a folder these tests skip and say why.
- `KUBECONFIG` set (and the default mode): that cluster, as it is.

Every test gets a namespace of its own and the project's CRDs. Tests marked `cluster` need a real API server
(RBAC, tokens, fairness) and skip on the emulator; `require_emulator()` skips a test on a real one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import pathlib
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal, TypeVar

import httpx
import kopf
import pytest
import yaml

from kubearq.demo.emulator import ApiServerEmulator, running_emulator
from kubearq.operator import kube
from tests.controlplane import ASSETS_ENV, ControlPlane, assets_folder, kubeconfig

logger = logging.getLogger(__name__)

ApiKind = Literal["emulator", "kube-apiserver", "kubeconfig"]
CRDS = kube.Resource("apiextensions.k8s.io", "v1", "customresourcedefinitions")
NAMESPACES = kube.Resource("", "v1", "namespaces")
SERVICE_ACCOUNTS = kube.Resource("", "v1", "serviceaccounts")
CLUSTER_ROLES = kube.Resource("rbac.authorization.k8s.io", "v1", "clusterroles")
CLUSTER_ROLE_BINDINGS = kube.Resource("rbac.authorization.k8s.io", "v1", "clusterrolebindings")
PROJECT_CRDS_DIR = pathlib.Path(__file__).parent.parent / "crds"
API_TIMEOUT = 30.0  # seconds for one request of the fixture's own
NO_ASSETS = (f"no real kube-apiserver: {ASSETS_ENV} does not name a folder with etcd and kube-apiserver "
             "(`eval \"$(../shared/k8s/install)\"` unpacks one here; `setup-envtest use` fetches one elsewhere)")
NEEDS_REAL_API = ("needs a real kube-apiserver (RBAC, tokens, fairness): scripts/test runs it in its second part; "
                  "or pass --kubernetes=kube-apiserver with KUBEBUILDER_ASSETS, or set KUBECONFIG")
Probed = TypeVar("Probed")
_API_SEEN = pytest.StashKey[str]()


# A small CRD of the tests' own, for the API's semantics apart from the project's resources.
WIDGETS = kube.Resource("test.kubearq.dev", "v1alpha1", "widgets")
WIDGET_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.test.kubearq.dev"},
    "spec": {
        "group": "test.kubearq.dev",
        "scope": "Namespaced",
        "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "shortNames": ["wdg"],
                  "categories": ["widgetry"]},
        "versions": [{
            "name": "v1alpha1", "served": True, "storage": True,
            "subresources": {"status": {}},
            "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                "spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
            }}},
        }],
    },
}


def api_kind(config: pytest.Config) -> ApiKind:
    if config.getoption("kubernetes") == "kube-apiserver":
        return "kube-apiserver"
    return "kubeconfig" if os.environ.get("KUBECONFIG") else "emulator"


def add_options(parser: pytest.Parser) -> None:
    parser.addoption("--kubernetes", choices=("emulator", "kube-apiserver"), default="emulator",
                     help="the Kubernetes API the `k8s` tests run on: the emulator (default), or a real "
                          f"kube-apiserver started from ${ASSETS_ENV} (KUBECONFIG set: that cluster)")


def mark_kubernetes_tier(items: Sequence[pytest.Item]) -> None:
    """Mark every test that uses the API (`k8s`, directly or through a fixture) `kubernetes`."""
    for item in items:
        if "k8s" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.kubernetes)


def summary_line(config: pytest.Config) -> str:
    """One line saying which Kubernetes API the tests ran on."""
    seen = config.stash.get(_API_SEEN, "")
    kind = api_kind(config)
    if kind == "emulator":
        return "kubernetes: emulator"
    return f"kubernetes: {seen}" if seen else f"kubernetes: {kind} (not started: no test needed it, or {NO_ASSETS})"


def project_crds() -> list[dict[str, Any]]:
    """The CustomResourceDefinitions generated into `crds/`."""
    crds: list[dict[str, Any]] = []
    for path in sorted(PROJECT_CRDS_DIR.glob("*.yaml")):
        crds += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return crds


def write_kubeconfig(path: pathlib.Path, *, server: str, token: str, namespace: str) -> pathlib.Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kubearq-test",
        "clusters": [{"name": "kubearq-test", "cluster": {"server": server}}],
        "users": [{"name": "kubearq-test", "user": {"token": token}}],
        "contexts": [{"name": "kubearq-test", "context": {
            "cluster": "kubearq-test", "user": "kubearq-test", "namespace": namespace}}],
    }))
    return path


@dataclasses.dataclass
class ServiceAccountLogin:
    """A ServiceAccount with only the rules it was given, logged in with a token the API issued it."""

    name: str
    namespace: str
    connection: kopf.ConnectionInfo
    kubeconfig: pathlib.Path

    @property
    def username(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.name}"


@dataclasses.dataclass
class KubernetesUnderTest:
    """What a test gets from `k8s`: where the API is, how to log in to it, a client, the emulator's hooks."""

    server: str  # base URL
    kubeconfig: pathlib.Path
    connection: kopf.ConnectionInfo  # for kopf's `on.login` and `kube.KubeApi`
    api: kube.KubeApi
    namespace: str  # exists for this test only (on a real cluster, deleted after it)
    emulator: ApiServerEmulator | None  # None on a real cluster
    folder: pathlib.Path  # the test's tmp_path, for kubeconfigs of its own
    cluster_objects: list[tuple[kube.Resource, str]] = dataclasses.field(default_factory=list)

    def require_emulator(self) -> ApiServerEmulator:
        """The emulator, for what only it can do; on a real cluster, the test is skipped here."""
        if self.emulator is None:
            pytest.skip("needs the API emulator (its test hooks); a real API server has none")
        return self.emulator

    def end_watch_streams(self) -> None:
        self.require_emulator().end_watch_streams()

    def compact_history(self) -> None:
        self.require_emulator().compact_history()

    def http_client(self, *, connection: kopf.ConnectionInfo | None = None, **options: Any) -> httpx.AsyncClient:
        """Plain HTTP to the API with a login (the test's by default) and the kubeconfig's TLS settings."""
        login = connection or self.connection
        verify = login.as_ssl_context() if self.server.startswith("https:") else True
        return httpx.AsyncClient(base_url=self.server, headers=login.as_http_headers(), verify=verify, **options)

    async def install_crds(self, crds: Iterable[Mapping[str, Any]]) -> None:
        """Create or update CRDs, and wait until the API serves them (Established)."""
        crds = list(crds)
        for crd in crds:
            try:
                await self.api.create(CRDS, crd, timeout=API_TIMEOUT)
            except kube.ConflictError:  # there already: a long-lived cluster may hold an older one
                current = await self.api.get(CRDS, crd["metadata"]["name"], timeout=API_TIMEOUT)
                if current.get("spec") != crd["spec"]:
                    await self.api.replace(CRDS, crd["metadata"]["name"], {
                        **crd, "metadata": {**crd["metadata"], **_version_of(current)}}, timeout=API_TIMEOUT)
        async with asyncio.timeout(API_TIMEOUT):
            for crd in crds:
                await self._until_established(crd["metadata"]["name"])

    async def login_as_service_account(self, name: str, rules: Sequence[Mapping[str, Any]]) -> ServiceAccountLogin:
        """A ServiceAccount of the test's namespace bound (cluster-wide) to a ClusterRole of exactly `rules`."""
        if self.emulator is not None:
            pytest.skip(NEEDS_REAL_API)
        role = f"{self.namespace}-{name}"
        await self.api.create(SERVICE_ACCOUNTS, {"metadata": {"name": name}}, namespace=self.namespace,
                              timeout=API_TIMEOUT)
        await self.create_cluster_object(CLUSTER_ROLES, {"metadata": {"name": role}, "rules": list(rules)})
        await self.create_cluster_object(CLUSTER_ROLE_BINDINGS, {
            "metadata": {"name": role},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": self.namespace}]})
        path = SERVICE_ACCOUNTS.path(namespace=self.namespace, name=name, subresource="token")
        async with self.http_client(timeout=API_TIMEOUT) as client:
            issued = await client.post(path, json={"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                                                   "spec": {"expirationSeconds": 3600}})
        issued.raise_for_status()
        token = str(issued.json()["status"]["token"])
        connection = dataclasses.replace(
            self.connection, token=token, scheme="Bearer", username=None, password=None,
            certificate_path=None, certificate_data=None, private_key_path=None, private_key_data=None)
        config = self.folder / f"kubeconfig-{name}"
        ca = self.folder / f"ca-{name}.crt"
        ca.write_bytes(_ca_bytes(self.connection))
        config.write_text(kubeconfig(self.server, ca, {"token": token}, namespace=self.namespace))
        return ServiceAccountLogin(name, self.namespace, connection, config)

    async def create_cluster_object(self, resource: kube.Resource, body: Mapping[str, Any]) -> kube.KubeObject:
        """Create a cluster-scoped object, deleted again when the test ends."""
        created = await self.api.create(resource, body, timeout=API_TIMEOUT)
        self.cluster_objects.append((resource, str(body["metadata"]["name"])))
        return created

    async def _until_established(self, name: str) -> None:
        # A real API server establishes a CRD a moment after creating it: watch for that.
        selector = f"metadata.name={name}"
        crds = await self.api.list(CRDS, field_selector=selector, timeout=API_TIMEOUT)
        if any(_established(crd) for crd in crds.items):
            return
        events = self.api.watch(CRDS, field_selector=selector, resource_version=crds.resource_version,
                                server_timeout=int(API_TIMEOUT), timeout=API_TIMEOUT)
        async with contextlib.aclosing(events):
            async for _, crd in events:
                if _established(crd):
                    return


async def eventually(probe: Callable[[], Awaitable[Probed]], *, within: float = 10,
                     interval: float = 0.02) -> Probed:
    """Poll `probe` until it returns a truthy value (returned) or `within` seconds pass (its last value
    is asserted, so the failure shows it). Never sleep to wait for a condition: poll for it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        result = await probe()
        if result or loop.time() >= deadline:
            break
        await asyncio.sleep(interval)
    assert result, f"not true after {within}s: {result!r}"
    return result


def _established(crd: kube.KubeObject) -> bool:
    conditions = crd.get("status", {}).get("conditions") or []
    return any(isinstance(c, dict) and c.get("type") == "Established" and c.get("status") == "True"
               for c in (conditions if isinstance(conditions, list) else []))


def _version_of(obj: kube.KubeObject) -> dict[str, str]:
    return {"resourceVersion": obj.get("metadata", {}).get("resourceVersion", "")}


def _ca_bytes(connection: kopf.ConnectionInfo) -> bytes:
    if connection.ca_data:
        data = connection.ca_data
        return data if isinstance(data, bytes) else data.encode()
    if connection.ca_path:
        return pathlib.Path(os.fsdecode(connection.ca_path)).read_bytes()
    return b""


@pytest.fixture(scope="session")
def control_plane(request: pytest.FixtureRequest) -> Iterator[ControlPlane]:
    """A real control plane for the session (only with --kubernetes=kube-apiserver)."""
    assets = assets_folder()
    if assets is None:
        pytest.skip(NO_ASSETS)
    with ControlPlane(assets) as plane:
        request.config.stash[_API_SEEN] = f"kube-apiserver {plane.version}"
        yield plane


@pytest.fixture
async def k8s(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> AsyncIterator[KubernetesUnderTest]:
    """The Kubernetes API with the project's CRDs and a namespace of the test's own (see the module docstring)."""
    namespace = f"kubearq-test-{secrets.token_hex(4)}"
    kind = api_kind(request.config)
    if kind == "emulator":
        if request.node.get_closest_marker("cluster"):
            pytest.skip(NEEDS_REAL_API)
        token = secrets.token_urlsafe(16)
        async with running_emulator(token=token) as (emulator, server):
            connection = kopf.ConnectionInfo(server=server, token=token, default_namespace=namespace)
            config = write_kubeconfig(tmp_path / "kubeconfig", server=server, token=token, namespace=namespace)
            async with kube.KubeApi(connection) as api, _prepared(KubernetesUnderTest(
                    server=server, kubeconfig=config, connection=connection, api=api, namespace=namespace,
                    emulator=emulator, folder=tmp_path)) as cluster:
                yield cluster
        return
    if kind == "kube-apiserver":
        plane: ControlPlane = request.getfixturevalue("control_plane")
        pki = plane.pki
        connection = kopf.ConnectionInfo(
            server=plane.server, ca_path=str(pki.ca_cert), certificate_path=str(pki.admin_cert),
            private_key_path=str(pki.key_of(pki.admin_cert)), default_namespace=namespace)
        config = plane.kubeconfig
    else:
        login = kopf.login_via_client(logger=logger, settings=kopf.OperatorSettings())
        assert login is not None, "KUBECONFIG is set, but the kubernetes client cannot log in with it"
        connection = dataclasses.replace(login, default_namespace=namespace)
        config = pathlib.Path(os.environ["KUBECONFIG"].split(os.pathsep)[0])
    async with kube.KubeApi(connection) as api, _prepared(KubernetesUnderTest(
            server=connection.server, kubeconfig=config, connection=connection, api=api, namespace=namespace,
            emulator=None, folder=tmp_path)) as cluster:
        if kind == "kubeconfig":
            request.config.stash[_API_SEEN] = f"the cluster of KUBECONFIG ({await _server_version(cluster)})"
        yield cluster


async def _server_version(cluster: KubernetesUnderTest) -> str:
    async with cluster.http_client(timeout=API_TIMEOUT) as client:
        return str((await client.get("/version")).json().get("gitVersion", "unknown version"))


@contextlib.asynccontextmanager
async def _prepared(cluster: KubernetesUnderTest) -> AsyncIterator[KubernetesUnderTest]:
    await cluster.install_crds(project_crds())
    await cluster.api.create(NAMESPACES, {"metadata": {"name": cluster.namespace}}, timeout=API_TIMEOUT)
    try:
        yield cluster
    finally:
        for resource, name in reversed(cluster.cluster_objects):
            with contextlib.suppress(kube.NotFoundError):
                await cluster.api.delete(resource, name, timeout=API_TIMEOUT)
        await cluster.api.delete(NAMESPACES, cluster.namespace, timeout=API_TIMEOUT)

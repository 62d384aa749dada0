"""A real Kubernetes control plane of the test session's own: etcd, kube-apiserver and, where present,
kube-controller-manager, from the folder `KUBEBUILDER_ASSETS` names (the envtest convention).

No node ever joins, so no pod runs; every API rule is real: RBAC (403), API Priority and Fairness (429),
structural schemas and CEL, strict field validation, TokenReview and ServiceAccount tokens. Free loopback
ports, a CA and certificates made here, everything stopped by pid and its folder removed at the end.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import os
import shutil
import ssl
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Self, TypeVar

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kubearq.demo.processes import LOOPBACK, Service, ServiceError, free_port

ASSETS_ENV = "KUBEBUILDER_ASSETS"
S = TypeVar("S", bound=Service)
START_TIMEOUT = 60.0
SERVICE_CIDR = "10.0.0.0/24"
# The controllers a test's API needs: namespaces finalized (their objects deleted), ServiceAccounts and
# their tokens, owner references collected, roles aggregated into admin/edit/view as on any cluster.
CONTROLLERS = ("namespace-controller", "serviceaccount-controller", "serviceaccount-token-controller",
               "garbage-collector-controller", "clusterrole-aggregation-controller",
               "root-ca-certificate-publisher-controller")


def assets_folder() -> Path | None:
    """The folder of `KUBEBUILDER_ASSETS` if it holds `etcd` and `kube-apiserver`, else None."""
    folder = os.environ.get(ASSETS_ENV)
    if not folder:
        return None
    path = Path(folder)
    return path if all(os.access(path / name, os.X_OK) for name in ("etcd", "kube-apiserver")) else None


class Pki:
    """A CA, the API server's serving certificate, an admin client (system:masters), a ServiceAccount key."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(mode=0o700)
        self._ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubearq-test-ca")])
        self._ca_name = ca_name
        ca = self._builder(ca_name, self._ca_key.public_key()).add_extension(
            x509.BasicConstraints(ca=True, path_length=None), critical=True).add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False), critical=True)
        self.ca_cert = self._write("ca", ca.sign(self._ca_key, hashes.SHA256()), self._ca_key)
        names = [x509.DNSName(name) for name in ("localhost", "kubernetes", "kubernetes.default",
                                                  "kubernetes.default.svc")]
        addresses = [x509.IPAddress(ipaddress.IPv4Address(LOOPBACK)),
                     x509.IPAddress(ipaddress.IPv4Network(SERVICE_CIDR)[1])]
        self.serving_cert = self._issue("apiserver", "kube-apiserver", None, ExtendedKeyUsageOID.SERVER_AUTH,
                                        [*names, *addresses])
        self.admin_cert = self._issue("admin", "kubearq-test-admin", "system:masters",
                                      ExtendedKeyUsageOID.CLIENT_AUTH, [])
        service_accounts = ec.generate_private_key(ec.SECP256R1())
        self.service_account_key = self._write_key("sa", service_accounts)
        self.service_account_public = folder / "sa.pub"
        self.service_account_public.write_bytes(service_accounts.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))

    def key_of(self, cert: Path) -> Path:
        return cert.with_suffix(".key")

    def _builder(self, subject: x509.Name, key: ec.EllipticCurvePublicKey) -> x509.CertificateBuilder:
        now = datetime.datetime.now(datetime.UTC)
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(self._ca_name).public_key(key)
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1)))

    def _issue(self, name: str, common_name: str, organization: str | None, usage: x509.ObjectIdentifier,
               alternative_names: list[x509.GeneralName]) -> Path:
        key = ec.generate_private_key(ec.SECP256R1())
        attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
        if organization:
            attributes.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
        builder = self._builder(x509.Name(attributes), key.public_key()).add_extension(
            x509.BasicConstraints(ca=False, path_length=None), critical=True).add_extension(
            x509.ExtendedKeyUsage([usage]), critical=False)
        if alternative_names:
            builder = builder.add_extension(x509.SubjectAlternativeName(alternative_names), critical=False)
        return self._write(name, builder.sign(self._ca_key, hashes.SHA256()), key)

    def _write(self, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Path:
        path = self.folder / f"{name}.crt"
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self._write_key(name, key)
        return path

    def _write_key(self, name: str, key: ec.EllipticCurvePrivateKey) -> Path:
        path = self.folder / f"{name}.key"
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        path.chmod(0o600)
        return path


class Etcd(Service):
    _name = "etcd"

    def __init__(self, binary: Path, directory: Path) -> None:
        self._binary = binary
        self._peer_port = free_port()
        super().__init__(None, directory)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def _command(self) -> list[str]:
        peer = f"http://{LOOPBACK}:{self._peer_port}"
        return [str(self._binary), "--name=test", f"--data-dir={self._dir / 'data'}",
                f"--listen-client-urls={self.url}", f"--advertise-client-urls={self.url}",
                f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}",
                "--unsafe-no-fsync", "--log-level=warn"]

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=1) as response:  # noqa: S310 - loopback
                return bool(json.load(response).get("health") == "true")
        except (OSError, ValueError):
            return False

    def _timeout(self) -> float:
        return START_TIMEOUT


class KubeApiServer(Service):
    _name = "kube-apiserver"

    def __init__(self, binary: Path, directory: Path, pki: Pki, etcd: Etcd) -> None:
        self._binary = binary
        self._pki = pki
        self._etcd = etcd
        super().__init__(None, directory)

    @property
    def url(self) -> str:
        return f"https://{LOOPBACK}:{self.port}"

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self._pki.ca_cert))
        context.load_cert_chain(self._pki.admin_cert, self._pki.key_of(self._pki.admin_cert))
        return context

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=2, context=self.ssl_context()) as response:  # noqa: S310
            body: bytes = response.read()
            return body

    def _command(self) -> list[str]:
        pki = self._pki
        return [
            str(self._binary), f"--etcd-servers={self._etcd.url}",
            f"--bind-address={LOOPBACK}", f"--advertise-address={LOOPBACK}", f"--secure-port={self.port}",
            f"--tls-cert-file={pki.serving_cert}", f"--tls-private-key-file={pki.key_of(pki.serving_cert)}",
            f"--client-ca-file={pki.ca_cert}", "--authorization-mode=RBAC",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki.service_account_public}",
            f"--service-account-signing-key-file={pki.service_account_key}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            # The advertised address is loopback, which an Endpoints object may not hold: without this the
            # reconciler logs "Endpoints kubernetes is invalid" every 10 s (the kubernetes Service exists).
            "--endpoint-reconciler-type=none", "--profiling=false", "--v=1",
        ]

    def _ready(self) -> bool:
        try:
            return self.get("/readyz") == b"ok"
        except (OSError, ssl.SSLError, urllib.error.URLError):
            return False

    def _timeout(self) -> float:
        return START_TIMEOUT


class KubeControllerManager(Service):
    _name = "kube-controller-manager"

    def __init__(self, binary: Path, directory: Path, pki: Pki, kubeconfig: Path) -> None:
        self._binary = binary
        self._pki = pki
        self._kubeconfig = kubeconfig
        super().__init__(None, directory)

    def _command(self) -> list[str]:
        return [str(self._binary), f"--kubeconfig={self._kubeconfig}", "--secure-port=0", "--leader-elect=false",
                f"--service-account-private-key-file={self._pki.service_account_key}",
                f"--root-ca-file={self._pki.ca_cert}", f"--controllers={','.join(CONTROLLERS)}",
                "--kube-api-qps=200", "--kube-api-burst=400", "--profiling=false", "--v=1"]

    def _ready(self) -> bool:
        return True  # it serves nothing here (--secure-port=0); the API shows what it does

    def _timeout(self) -> float:
        return START_TIMEOUT


class ControlPlane:
    """etcd + kube-apiserver (+ kube-controller-manager) on free loopback ports; `kubeconfig` logs in as admin."""

    def __init__(self, assets: Path) -> None:
        self.assets = assets
        self.folder = Path(tempfile.mkdtemp(prefix="kubearq-k8s-"))
        self._services: list[Service] = []
        self.version = ""

    @property
    def kubeconfig(self) -> Path:
        return self.folder / "kubeconfig"

    @property
    def server(self) -> str:
        return self.apiserver.url

    def start(self) -> None:
        self.pki = Pki(self.folder / "pki")
        self.etcd = self._start(Etcd(self.assets / "etcd", self._folder("etcd")))
        self.apiserver = self._start(KubeApiServer(self.assets / "kube-apiserver", self._folder("apiserver"),
                                                   self.pki, self.etcd))
        self.kubeconfig.write_text(admin_kubeconfig(self.server, self.pki))
        self.kubeconfig.chmod(0o600)
        controller_manager = self.assets / "kube-controller-manager"
        if os.access(controller_manager, os.X_OK):
            self._start(KubeControllerManager(controller_manager, self._folder("kcm"), self.pki, self.kubeconfig))
        self.version = str(json.loads(self.apiserver.get("/version"))["gitVersion"])

    def close(self) -> None:
        """Stop everything started (API clients first, etcd last) and remove the folder."""
        try:
            for service in reversed(self._services):
                service.close()
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    def _folder(self, name: str) -> Path:
        path = self.folder / name
        path.mkdir()
        return path

    def _start(self, service: S) -> S:
        self._services.append(service)
        try:
            service.start()
        except ServiceError as error:
            raise ServiceError(f"the test control plane from {self.assets} did not start: {error}") from None
        return service

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def admin_kubeconfig(server: str, pki: Pki) -> str:
    return kubeconfig(server, pki.ca_cert, {
        "client-certificate-data": _b64(pki.admin_cert), "client-key-data": _b64(pki.key_of(pki.admin_cert))})


def kubeconfig(server: str, ca_cert: Path, user: dict[str, str], namespace: str = "default") -> str:
    """A kubeconfig of one cluster, user and context."""
    return yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kubearq-test",
        "clusters": [{"name": "kubearq-test", "cluster": {
            "server": server, "certificate-authority-data": _b64(ca_cert)}}],
        "users": [{"name": "kubearq-test", "user": user}],
        "contexts": [{"name": "kubearq-test", "context": {
            "cluster": "kubearq-test", "user": "kubearq-test", "namespace": namespace}}],
    })


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()

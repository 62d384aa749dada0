"""What the `schedule`, `scrape` and `queue` commands share: the cluster of KUBECONFIG, the scope flags, the
API's refusals as sentences, exit codes a script can trust, and tables as kubectl prints them.

Exit codes: 0 ok, 1 failed (refused by the operator, no answer in time, a server unreachable), 2 bad usage,
3 not found or forbidden.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import httpx
import kopf
import yaml

from kubearq.operator.actions import ask_id_of
from kubearq.operator.kube import ApiError, KubeApi, KubeObject, Resource
from kubearq.operator.login import NoKubernetesCredentials, check_kubeconfig, default_connection, kubeconfig_paths

OK, FAILED, USAGE, NOT_FOUND = 0, 1, 2, 3
FORBIDDEN = NOT_FOUND
API_TIMEOUT = 15.0
RETRIES_429 = 3
FIELD_MANAGER = "kubearq-cli"
_USER = re.compile(r'User "([^"]*)"')


class CommandError(Exception):
    """What the user is told (one line, on stderr) and the exit code."""

    def __init__(self, message: str, code: int = FAILED) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Cluster:
    """The API of KUBECONFIG (or the pod's service account) and the namespace the command works in."""

    api: KubeApi
    server: str
    namespace: str | None
    """None with -A (all namespaces)."""


def add_scope(parser: argparse.ArgumentParser, *, all_namespaces: bool = False, short: bool = True) -> None:
    names = ("-n", "--namespace") if short else ("--namespace",)
    parser.add_argument(*names, dest="namespace", metavar="NAMESPACE",
                        help="the namespace (default: the kubeconfig context's, else default)")
    if all_namespaces:
        parser.add_argument("-A", "--all-namespaces", action="store_true", help="every namespace")


def add_output(parser: argparse.ArgumentParser, *, wide: bool = True) -> None:
    choices = ("wide", "json", "yaml") if wide else ("json", "yaml")
    parser.add_argument("-o", "--output", choices=choices, help="a table (default), or " + ", ".join(choices))


def run(command: str, work: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run a command's coroutine; a CommandError becomes `kubearq COMMAND: message` on stderr and its exit code."""
    try:
        return asyncio.run(work())
    except CommandError as error:
        print(f"kubearq {command}: {error}", file=sys.stderr)
        return error.code


def login() -> kopf.ConnectionInfo:
    """The kubeconfig when there is one (KUBECONFIG, else ~/.kube/config), else the pod's service account: kubectl's
    order, so that a person in a pod acts as themselves. (The operator prefers its service account.)"""
    paths = kubeconfig_paths()
    if any(path.exists() for path in paths):
        for path in paths:
            check_kubeconfig(path)
        try:
            connection = kopf.login_with_kubeconfig(settings=kopf.OperatorSettings())
        except (OSError, ValueError, KeyError, TypeError, AttributeError, kopf.LoginError) as error:
            where = os.pathsep.join(str(path) for path in paths)
            raise NoKubernetesCredentials(
                f"cannot log in with the kubeconfig {where} ({type(error).__name__}: {error})") from None
        if connection is not None:
            return connection
    return default_connection()


async def connect(args: argparse.Namespace) -> Cluster:
    try:
        connection = login()
    except NoKubernetesCredentials as error:
        raise CommandError(str(error), USAGE) from None
    api = KubeApi(connection, field_manager=FIELD_MANAGER)
    everywhere = bool(getattr(args, "all_namespaces", False))
    namespace = None if everywhere else (args.namespace or connection.default_namespace or "default")
    return Cluster(api, connection.server, namespace)


def refusal(error: Exception, *, verb: str, resource: Resource, kind: str, name: str | None,
            namespace: str | None, server: str) -> CommandError:
    """The API's answer as a sentence: what was not found, or which verb RBAC does not grant on what."""
    where = f' in namespace "{namespace}"' if namespace else " in any namespace"
    if isinstance(error, ApiError):
        if error.code == 404:
            what = f'{kind.lower()} "{name}"' if name else f"the {resource.plural} resource (are the CRDs installed?)"
            return CommandError(f"{what} not found{where}", NOT_FOUND)
        if error.code == 403:
            found = _USER.search(error.message)
            who = found.group(1) if found else "your Kubernetes user"
            scope = f"in namespace {namespace}" if namespace else "across all namespaces"
            return CommandError(
                f"forbidden: {who} may not {verb} {resource.plural} {scope}; this needs the RBAC verb {verb} on "
                f"{resource.plural}.{resource.group or 'core'} (ask your cluster admin for it)",
                FORBIDDEN)
        if error.code == 401:
            return CommandError(f"the API server at {server} did not accept your credentials (401 Unauthorized): "
                                "log in again, or check KUBECONFIG", FORBIDDEN)
        return CommandError(f"the API server would not {verb} {resource.plural}: {error}")
    if isinstance(error, (httpx.TransportError, TimeoutError, OSError)):
        return CommandError(f"cannot reach the Kubernetes API at {server}: {type(error).__name__}: {error}")
    raise error


async def call(cluster: Cluster, request: Callable[[], Awaitable[KubeObject]], *, verb: str, resource: Resource,
               kind: str, name: str | None = None) -> KubeObject:
    """One API request, its refusal (if any) as a CommandError. 429 (the API server busy, or a CRD's storage still
    initializing) is tried again a few times, as kubectl does."""
    for attempt in range(RETRIES_429 + 1):
        try:
            return await request()
        except ApiError as error:
            if error.code == 429 and attempt < RETRIES_429:
                await asyncio.sleep(0.5 * 2 ** attempt)
                continue
            raise refusal(error, verb=verb, resource=resource, kind=kind, name=name, namespace=cluster.namespace,
                          server=cluster.server) from None
        except (httpx.TransportError, TimeoutError, OSError) as error:
            raise refusal(error, verb=verb, resource=resource, kind=kind, name=name, namespace=cluster.namespace,
                          server=cluster.server) from None
    raise AssertionError("unreachable")  # pragma: no cover


async def listed(cluster: Cluster, resource: Resource, kind: str) -> list[KubeObject]:
    async def listing() -> KubeObject:
        found = await cluster.api.list(resource, namespace=cluster.namespace, timeout=API_TIMEOUT)
        return cast(KubeObject, {"items": found.items})

    found = await call(cluster, listing, verb="list", resource=resource, kind=kind)
    items = cast(list[KubeObject], cast(Mapping[str, object], found)["items"])
    return sorted(items, key=lambda item: (item.get("metadata", {}).get("namespace", ""),
                                           item.get("metadata", {}).get("name", "")))


async def wait_for(probe: Callable[[], Awaitable[Any]], within: float) -> Any:
    """Poll `probe` until it returns something, or None after `within` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        found = await probe()
        if found is not None:
            return found
        if loop.time() >= deadline:
            return None
        await asyncio.sleep(0.2)


async def answer(fetch: Callable[[], Awaitable[KubeObject]], *, field: str, annotation: str, ask_id: str,
                 within: float, shown_by: str) -> Mapping[str, Any] | None:
    """The leader's record of an ask (`status.<field>`) once it is there, None after `within` seconds. Another ask
    that replaced ours on the annotation before the leader handled it is said as such (ours will never be)."""
    async def probe() -> Mapping[str, Any] | None:
        obj = await fetch()
        record = cast(Mapping[str, Any], (obj.get("status") or {}).get(field) or {})
        if record.get("id") == ask_id:
            return record
        current = ask_id_of(obj.get("metadata", {}).get("annotations"), annotation)
        if current is not None and current != ask_id:
            raise CommandError(f"another request (ask {current}) replaced this one (ask {ask_id}) on the {annotation} "
                               f"annotation before the operator answered; `{shown_by}` shows what it did", FAILED)
        return None

    return cast(Mapping[str, Any] | None, await wait_for(probe, within))


def no_answer(ask_id: str, within: float) -> CommandError:
    return CommandError(f"asked (ask {ask_id}), but the operator recorded no answer within {within:g} s: is it "
                        "running, and does a replica hold its Lease? Its leader acts on the ask when it comes",
                        FAILED)


def add_wait(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--no-wait", action="store_true", help=f"ask and return; do not wait for {what}")
    parser.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                        help="how long to wait for the operator (default: 30)")


def dump(value: object, output: str) -> str:
    if output == "json":
        return json.dumps(value, indent=2)
    return yaml.safe_dump(value, sort_keys=False, allow_unicode=True).rstrip()


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns as kubectl aligns them: upper-case headers, three spaces apart."""
    widths = [max([len(header), *(len(row[index]) for row in rows)]) for index, header in enumerate(headers)]
    lines = ["   ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
             for line in [list(headers), *rows]]
    return "\n".join(lines)


def parse_timestamp(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC)


def age(value: object, now: datetime) -> str:
    """How long ago, as kubectl says it: 45s, 12m, 5h, 3d; `<none>` when unset."""
    moment = parse_timestamp(value)
    if moment is None:
        return "<none>"
    seconds = max(0, int((now - moment).total_seconds()))
    for unit, size in (("d", 86_400), ("h", 3600), ("m", 60)):
        if seconds >= 2 * size or (unit == "m" and seconds >= size):
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def shown(value: object) -> str:
    return "<none>" if value is None or value == "" else str(value)


def namespaced(cluster: Cluster, header: Sequence[str], rows: Sequence[tuple[KubeObject, list[str]]]
               ) -> tuple[list[str], list[list[str]]]:
    """With -A, a NAMESPACE column first."""
    if cluster.namespace is not None:
        return list(header), [row for _, row in rows]
    return ["NAMESPACE", *header], [[str(obj.get("metadata", {}).get("namespace", "")), *row] for obj, row in rows]


def condition(obj: Mapping[str, Any], kind: str) -> Mapping[str, Any] | None:
    conditions = cast(list[Mapping[str, Any]], (obj.get("status") or {}).get("conditions") or [])
    return next((item for item in conditions if item.get("type") == kind), None)


def now_utc() -> datetime:
    return datetime.now(UTC)


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def duration(seconds: float) -> str:
    """A short age: 0s, 42s, 3m12s, 2h5m."""
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60}s"
    return f"{whole // 3600}h{(whole % 3600) // 60}m" if whole < 86_400 else f"{timedelta(seconds=whole).days}d"

"""The replica's copy of what it watches: every SyncSchedule and ScrapeRequest (and, for tenancy, the
QueuePolicies and namespace labels), filled by one LIST per resource at start and kept current by a watch:
our own lean informer (`follow`) for the two resources there are many of, kopf's for the tenancy ones."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from kubearq.core.connections import TRANSIENT_ERRORS
from kubearq.operator.actions import ACTION_ANNOTATIONS
from kubearq.operator.kube import ApiError, GoneError, KubeApi, KubeObject, Resource, is_transient
from kubearq.operator.resources import GROUP, VERSION
from kubearq.operator.tenancy import TenancyState

logger = logging.getLogger(__name__)

Key = tuple[str, str, str]  # (kind, namespace, name)
PLURALS = {"SyncSchedule": "syncschedules", "ScrapeRequest": "scraperequests"}
# Watched cluster-wide for what namespaces may enqueue (unless TENANCY=open): not reconciled, they decide.
TENANCY_RESOURCES = {"QueuePolicy": Resource(GROUP, VERSION, "queuepolicies"),
                     "Namespace": Resource("", "v1", "namespaces")}
DELETED_KEPT = 10_000
LIST_CHUNK = 500
LIST_TIMEOUT = 120.0
WATCH_SERVER_TIMEOUT = 300  # the server ends each watch stream after this long; the informer resumes it
WATCH_CLIENT_TIMEOUT = 30.0  # connecting; a stream silent beyond the server's timeout plus this counts as ended
Scope = tuple[str, str | None]  # (kind, namespace; None: all namespaces): what one LIST and one watch cover


def passing(error: BaseException) -> bool:
    """A failure worth one warning line and a retry, not a traceback: Redis or the API briefly away."""
    return isinstance(error, TRANSIENT_ERRORS) or is_transient(error)


def _set_event() -> asyncio.Event:
    event = asyncio.Event()
    event.set()
    return event


def _revision(body: KubeObject) -> int | None:
    version = body.get("metadata", {}).get("resourceVersion")
    return int(version) if isinstance(version, str) and version.isdigit() else None


def _intent(body: KubeObject) -> tuple[object, ...]:
    """What a reconcile acts on: everything but status and bookkeeping (the asks of actions.py included: they
    change no generation)."""
    metadata = body.get("metadata", {})
    annotations = metadata.get("annotations") or {}
    return (body.get("spec"), metadata.get("uid"), metadata.get("generation"), metadata.get("deletionTimestamp"),
            metadata.get("finalizers"), tuple(annotations.get(name) for name in ACTION_ANNOTATIONS))


@dataclass
class ResourceStore:
    """Every SyncSchedule and ScrapeRequest as last seen (on the watch, or as the leader wrote it);
    `dirty` holds the keys whose spec, generation, deletion or finalizers changed since they were read.

    A change of status alone is not work: the leader wrote it (and computed it from what it already
    knew). The leader's own writes come back on the watch, later than the write's answer, which is stored
    at once; a watch event older than what is stored is ignored. Versions are compared as numbers, as
    client-go's mutation cache does (every API server issues etcd revisions); any other version is taken
    as newer.
    """

    objects: dict[Key, KubeObject] = field(default_factory=dict)
    dirty: set[Key] = field(default_factory=set)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    listed: asyncio.Event = field(default_factory=_set_event)
    """Set once every object that existed at start is in the store (see `list_into`); set from the start
    for a store filled by other means."""
    deleted: dict[str, None] = field(default_factory=dict)
    """uids seen deleted, newest last (at most DELETED_KEPT): an object listed before its deletion but
    observed after it must not come back."""
    tenancy: TenancyState | None = None
    """QueuePolicies and namespace labels (watched unless TENANCY=open): a change makes the objects it
    decides for dirty, so it takes effect on the next pass, both ways."""
    policies: dict[str, KubeObject] = field(default_factory=dict)
    """Each QueuePolicy as last seen; those in `policies_to_report` may need their status written."""
    policies_to_report: set[str] = field(default_factory=set)

    def observe(self, kind: str, event_type: str | None, body: KubeObject) -> None:
        if kind in TENANCY_RESOURCES:
            self._observe_tenancy(kind, event_type, body)
            return
        metadata = body.get("metadata", {})
        key = (kind, str(metadata.get("namespace")), str(metadata.get("name")))
        uid = str(metadata.get("uid") or "")
        if event_type == "DELETED":
            if uid:
                self.deleted[uid] = None
                if len(self.deleted) > DELETED_KEPT:
                    del self.deleted[next(iter(self.deleted))]
            known = self.objects.get(key)
            if known is None or not uid or known.get("metadata", {}).get("uid") == uid:
                self.objects.pop(key, None)
                self.dirty.add(key)
                self.changed.set()
            return
        if uid in self.deleted:
            return
        known = self.objects.get(key)
        if known is not None:
            seen, arriving = _revision(known), _revision(body)
            if seen is not None and arriving is not None and arriving <= seen:
                return
        if "managedFields" in metadata:
            # Server-side apply's bookkeeping, on every object a real API server sends (often as large as the
            # rest of it): nothing here reads it, and 100,000 schedules would hold it all.
            body = cast(KubeObject, {**body, "metadata": {k: v for k, v in metadata.items() if k != "managedFields"}})
        self.objects[key] = body
        if known is None or _intent(known) != _intent(body):
            self.dirty.add(key)
            self.changed.set()

    def _observe_tenancy(self, kind: str, event_type: str | None, body: KubeObject) -> None:
        if self.tenancy is None:
            return
        metadata = body.get("metadata", {})
        name = str(metadata.get("name"))
        if kind == "QueuePolicy":
            if event_type == "DELETED":
                self.policies.pop(name, None)
            else:
                known = self.policies.get(name)
                seen, arriving = (_revision(known) if known else None), _revision(body)
                if seen is not None and arriving is not None and arriving <= seen:
                    return  # older than what the leader wrote
                self.policies[name] = body
            self.policies_to_report.add(name)
            self.changed.set()
            before = self.tenancy.policies.get(name)
            self.tenancy.observe_policy(name, None if event_type == "DELETED" else body.get("spec"))
            if self.tenancy.policies.get(name) != before:
                self.dirty.update(self.objects)
                self.changed.set()
        elif self.tenancy.observe_namespace(name, None if event_type == "DELETED" else metadata.get("labels") or {}):
            self.dirty.update(key for key in self.objects if key[1] == name)
            self.changed.set()

    def resync(self, kind: str, namespace: str | None, items: Iterable[KubeObject], version: str) -> None:
        """A fresh LIST of `kind` in `namespace` (None: all), taken at `version`, after the watch lost its place
        (410 Gone): what it holds is observed as on the watch, and what it lacks was deleted meanwhile, unless
        the store holds a version newer than the LIST (the leader's own write, or the watch that follows)."""
        listed = int(version) if version.isdigit() else None
        present = set()
        for item in items:
            body = as_watched(kind, item)
            metadata = body.get("metadata", {})
            present.add((kind, str(metadata.get("namespace")), str(metadata.get("name"))))
            self.observe(kind, "ADDED", body)
        for key, body in list(self.objects.items()):
            if key[0] != kind or (namespace is not None and key[1] != namespace) or key in present:
                continue
            seen = _revision(body)
            if listed is None or seen is None or seen <= listed:
                self.observe(kind, "DELETED", body)

    def queues(self) -> set[str]:
        found = set()
        for (kind, _, _), body in self.objects.items():
            spec = cast(dict[str, Any], body.get("spec") or {})
            queue = (spec.get("job") or {}).get("queue") if kind == "SyncSchedule" else spec.get("queue")
            found.add(str(queue or "arq:queue"))
        return found


def as_watched(kind: str, item: KubeObject) -> KubeObject:
    """A LIST item as watch events and the reconcilers carry it: items of a list have no apiVersion and kind."""
    return cast(KubeObject, {"apiVersion": f"{GROUP}/{VERSION}" if kind != "Namespace" else "v1", "kind": kind,
                             **item})


async def list_into(api: KubeApi, store: ResourceStore, namespaces: Sequence[str], *,
                    retry_seconds: float = 1.0) -> dict[Scope, str]:
    """Put every SyncSchedule and ScrapeRequest of `namespaces` (none: all) into `store` with one LIST per
    resource and namespace, then set `store.listed`; returns each SyncSchedule and ScrapeRequest LIST's
    resourceVersion, where `follow` watches from.

    kopf delivers the objects that exist at start one event at a time through its per-object machinery:
    10,000 took it 25 s (measured), and a leader elected meanwhile saw a part of them. A LIST takes a few
    seconds, and the watch store's rules keep it consistent with the watch: an older version never
    replaces a newer one, and a deleted object never comes back. Retries until it succeeds.
    """
    scopes: list[str | None] = [*namespaces] or [None]
    attempt = 0
    while True:
        try:
            listings = [((kind, namespace), await api.list(Resource(GROUP, VERSION, plural), namespace=namespace,
                                                           chunk_size=LIST_CHUNK, timeout=LIST_TIMEOUT))
                        for namespace in scopes for kind, plural in PLURALS.items()]
            if store.tenancy is not None:
                listings += [((kind, None), await api.list(resource, chunk_size=LIST_CHUNK, timeout=LIST_TIMEOUT))
                             for kind, resource in TENANCY_RESOURCES.items()]
            break
        except Exception as error:
            attempt += 1
            delay = min(30.0, retry_seconds * 2 ** (attempt - 1))
            if passing(error):
                logger.warning("listing the resources failed (%s); trying again in %g s", error, delay)
            elif isinstance(error, ApiError):  # e.g. 403: RBAC without list; not ready until it lists
                logger.error("listing the resources failed (%s); trying again in %g s", error, delay)
            else:
                logger.exception("listing the resources failed; trying again in %g s", delay)
            await asyncio.sleep(delay)
    for (kind, _), listing in listings:
        for item in listing.items:
            store.observe(kind, "ADDED", as_watched(kind, item))
    store.listed.set()
    logger.info("listed %d objects", sum(len(listing.items) for _, listing in listings))
    return {scope: listing.resource_version for scope, listing in listings if scope[0] in PLURALS}


async def follow(api: KubeApi, store: ResourceStore, namespaces: Sequence[str], *,
                 retry_seconds: float = 1.0) -> None:
    """The lean informer of the SyncSchedules and ScrapeRequests: `list_into`, then one watch per resource and
    namespace from its LIST's resourceVersion, into `store`, until cancelled.

    kopf's watch hands every event to a per-object worker task with its own state, diff base and handler
    machinery: ~25 s of the event loop for 10,000 objects at start and a share of every status write's echo,
    which the leader's ticks wait behind (measured, bench/scheduler_lag.py). The store needs only the body.
    As client-go's reflector: a stream that ends or fails resumes from the last version seen; a 410 Gone (the
    version compacted away) lists again and `ResourceStore.resync`s, which also notices deletions it missed.
    """
    versions = await list_into(api, store, namespaces, retry_seconds=retry_seconds)
    await asyncio.gather(*(watch_scope(api, store, scope, version, retry_seconds=retry_seconds)
                           for scope, version in versions.items()))


async def watch_scope(api: KubeApi, store: ResourceStore, scope: Scope, version: str | None, *,
                      retry_seconds: float = 1.0) -> None:
    """Watch one resource in one namespace (None: all) from `version` (None: list first) into `store`."""
    kind, namespace = scope
    resource = Resource(GROUP, VERSION, PLURALS[kind])
    where = f"namespace {namespace}" if namespace else "all namespaces"
    failures = 0
    while True:
        try:
            if version is None:
                listing = await api.list(resource, namespace=namespace, chunk_size=LIST_CHUNK, timeout=LIST_TIMEOUT)
                store.resync(kind, namespace, listing.items, listing.resource_version)
                version = listing.resource_version
                logger.info("listed %d %s objects of %s again", len(listing.items), kind, where)
            async with contextlib.aclosing(api.watch(resource, namespace=namespace, resource_version=version,
                                                     server_timeout=WATCH_SERVER_TIMEOUT,
                                                     timeout=WATCH_CLIENT_TIMEOUT)) as events:
                async for event in events:
                    failures = 0
                    store.observe(kind, event.type, event.object)
                    version = event.object.get("metadata", {}).get("resourceVersion") or version
        except GoneError as error:
            logger.info("the watch of %s in %s lost its place (%s); listing again", kind, where, error)
            version = None
        except Exception as error:
            failures += 1
            delay = min(30.0, retry_seconds * 2 ** (failures - 1))
            if passing(error) or isinstance(error, ApiError):
                logger.warning("watching %s in %s failed (%s); trying again in %g s", kind, where, error, delay)
            else:
                logger.exception("watching %s in %s failed; trying again in %g s", kind, where, delay)
            await asyncio.sleep(delay)

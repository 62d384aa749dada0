"""The lean informer of SyncSchedules and ScrapeRequests: list, watch from the list, and list again on 410 Gone."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, cast

import pytest

from kubearq.operator.context import SYNC_SCHEDULES
from kubearq.operator.kube import GoneError, KubeApi, KubeObject, Resource, WatchEvent
from kubearq.operator.store import ResourceStore, follow
from tests.kubernetes import KubernetesUnderTest
from tests.polling import until

KEY = ("SyncSchedule", "default", "nightly")


def schedule(name: str, version: str, *, function: str = "sync_connections", uid: str | None = None) -> KubeObject:
    return cast(KubeObject, {
        "apiVersion": "kubearq.dev/v1alpha1", "kind": "SyncSchedule",
        "metadata": {"name": name, "namespace": "default", "uid": uid or f"u-{name}", "resourceVersion": version,
                     "generation": 1},
        "spec": {"schedule": "* * * * *", "job": {"function": function}}})


def test_a_relist_takes_the_listed_versions_and_drops_what_was_deleted_meanwhile() -> None:
    store = ResourceStore()
    store.observe("SyncSchedule", "ADDED", schedule("edited", "10"))
    store.observe("SyncSchedule", "ADDED", schedule("deleted", "11"))
    store.observe("SyncSchedule", "ADDED", schedule("kept", "12"))
    store.dirty.clear()
    store.resync("SyncSchedule", None, [schedule("edited", "15", function="compact"), schedule("kept", "12")], "20")
    assert sorted(name for _, _, name in store.objects) == ["edited", "kept"]
    assert store.objects[("SyncSchedule", "default", "edited")]["spec"]["job"] == {"function": "compact"}
    assert store.dirty == {("SyncSchedule", "default", "edited"), ("SyncSchedule", "default", "deleted")}


def test_a_relist_keeps_an_object_stored_at_a_version_newer_than_the_list() -> None:
    """The leader's write answer (or the watch after the list) is newer than the list: not a deletion."""
    store = ResourceStore()
    store.observe("SyncSchedule", "MODIFIED", schedule("written", "25"))
    store.resync("SyncSchedule", None, [], "20")
    assert ("SyncSchedule", "default", "written") in store.objects


def test_a_relist_of_one_namespace_leaves_the_others_alone() -> None:
    store = ResourceStore()
    store.observe("SyncSchedule", "ADDED", schedule("here", "10"))
    other = schedule("there", "11")
    other["metadata"]["namespace"] = "team-b"
    store.observe("SyncSchedule", "ADDED", other)
    store.resync("SyncSchedule", "team-b", [], "20")
    assert list(store.objects) == [("SyncSchedule", "default", "here")]


class LosingWatchApi(KubeApi):
    """The test's API, whose first watch of SyncSchedules misses what `meanwhile` changes and then answers
    410 Gone, as after an etcd compaction while the operator was away from the stream."""

    meanwhile: list[Any]
    lost = False

    async def watch(self, resource: Resource, **options: Any) -> AsyncGenerator[WatchEvent, None]:
        if resource == SYNC_SCHEDULES and not self.lost:
            self.lost = True
            for change in self.meanwhile:
                await change()
            raise GoneError(410, "Expired", "too old resource version")
        async for event in super().watch(resource, **options):
            yield event


@pytest.fixture
async def losing_api(k8s: KubernetesUnderTest) -> AsyncIterator[LosingWatchApi]:
    api = LosingWatchApi(k8s.connection)
    yield api
    await api.aclose()


@contextlib.asynccontextmanager
async def following(api: KubeApi, store: ResourceStore, namespace: str) -> AsyncIterator[None]:
    task = asyncio.create_task(follow(api, store, [namespace], retry_seconds=0.01))
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def create(k8s: KubernetesUnderTest, name: str, function: str = "sync_connections") -> KubeObject:
    return await k8s.api.create(SYNC_SCHEDULES, {
        "apiVersion": "kubearq.dev/v1alpha1", "kind": "SyncSchedule", "metadata": {"name": name},
        "spec": {"schedule": "@daily", "job": {"function": function}}}, namespace=k8s.namespace, timeout=10)


async def holds(value: object) -> bool:
    return bool(value)


async def test_the_informer_lists_again_after_410_gone_and_catches_up_with_what_it_missed(
        k8s: KubernetesUnderTest, losing_api: LosingWatchApi) -> None:
    await create(k8s, "edited")
    await create(k8s, "deleted")

    async def edit() -> None:
        await k8s.api.patch(SYNC_SCHEDULES, "edited", {"spec": {"job": {"function": "compact"}}},
                            namespace=k8s.namespace, timeout=10)

    async def delete() -> None:
        await k8s.api.delete(SYNC_SCHEDULES, "deleted", namespace=k8s.namespace, timeout=10)

    losing_api.meanwhile = [edit, delete]
    store = ResourceStore(listed=asyncio.Event())
    edited = ("SyncSchedule", k8s.namespace, "edited")
    async with following(losing_api, store, k8s.namespace):
        await until(lambda: holds(list(store.objects) == [edited]), what="the deletion seen by the relist")
        assert cast(dict[str, Any], store.objects[edited]["spec"]["job"])["function"] == "compact"
        await create(k8s, "created")  # and the watch from the relist goes on
        await until(lambda: holds(("SyncSchedule", k8s.namespace, "created") in store.objects),
                    what="a creation after the relist")
    assert losing_api.lost


async def test_the_informer_keeps_the_store_current_from_its_watch(k8s: KubernetesUnderTest) -> None:
    await create(k8s, "nightly")
    store = ResourceStore(listed=asyncio.Event())
    key = ("SyncSchedule", k8s.namespace, "nightly")
    async with following(k8s.api, store, k8s.namespace):
        await until(lambda: holds(store.listed.is_set() and key in store.objects), what="the listing")
        store.dirty.clear()
        await k8s.api.patch(SYNC_SCHEDULES, "nightly", {"spec": {"suspend": True}}, namespace=k8s.namespace,
                            timeout=10)
        await until(lambda: holds(store.objects[key]["spec"].get("suspend") is True), what="the edit")
        assert store.dirty == {key}
        await k8s.api.delete(SYNC_SCHEDULES, "nightly", namespace=k8s.namespace, timeout=10)
        await until(lambda: holds(key not in store.objects), what="the deletion")


def test_the_store_keeps_no_managed_fields() -> None:
    store = ResourceStore()
    body = cast(dict[str, Any], schedule("nightly", "10"))
    body["metadata"]["managedFields"] = [{"manager": "kubectl", "operation": "Update", "fieldsV1": {"f:spec": {}}}]
    store.observe("SyncSchedule", "ADDED", cast(KubeObject, body))
    assert "managedFields" not in store.objects[KEY]["metadata"]
    assert store.objects[KEY]["metadata"]["uid"] == "u-nightly"

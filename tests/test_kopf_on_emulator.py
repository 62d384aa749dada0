"""A whole kopf operator runs against the API of the `k8s` fixture: its handlers fire, its status patches
land through the status subresource, and its finalizer holds a deletion until the delete handler is done."""

import asyncio
import dataclasses
import logging
import threading
from collections.abc import AsyncIterator

import kopf
import pytest

from kubearq.operator import kube
from tests.kubernetes import WIDGET_CRD, WIDGETS, KubernetesUnderTest, eventually

T = 10.0  # seconds for any one request


@dataclasses.dataclass
class WidgetOperator:
    """What the operator's handlers saw (appended from kopf's thread), and a gate on its delete handler."""

    calls: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (handler, widget name)
    spec_changes: list[tuple[object, object]] = dataclasses.field(default_factory=list)
    deletion_allowed: threading.Event = dataclasses.field(default_factory=threading.Event)

    async def saw(self, handler: str, name: str) -> bool:
        return (handler, name) in self.calls


def widget_handlers(registry: kopf.OperatorRegistry, seen: WidgetOperator, k8s: KubernetesUnderTest) -> None:
    @kopf.on.login(registry=registry)
    def login(**_: object) -> kopf.ConnectionInfo:
        return k8s.connection

    @kopf.on.create(WIDGETS.group, WIDGETS.version, WIDGETS.plural, registry=registry)
    def created(name: str, patch: kopf.Patch, **_: object) -> None:
        seen.calls.append(('create', name))
        patch.status['phase'] = 'Created'

    @kopf.on.update(WIDGETS.group, WIDGETS.version, WIDGETS.plural, field='spec', registry=registry)
    def updated(name: str, old: object, new: object, **_: object) -> None:
        seen.calls.append(('update', name))
        seen.spec_changes.append((old, new))

    @kopf.on.delete(WIDGETS.group, WIDGETS.version, WIDGETS.plural, registry=registry)
    def deleted(name: str, **_: object) -> None:  # sync: kopf runs it in its executor, free to block
        seen.calls.append(('delete-started', name))
        seen.deletion_allowed.wait(timeout=T)
        seen.calls.append(('delete', name))


@pytest.fixture
async def operator(k8s: KubernetesUnderTest) -> AsyncIterator[WidgetOperator]:
    """The widget operator, running until the test ends.

    kopf cancels every task that appears in its event loop after it starts (`run_tasks()`: "the loop is
    not fully ours"), the test's and the emulator's included; so it runs in a thread with a loop of its
    own. (`kopf.testing.KopfRunner` does the same through kopf's CLI, which also reconfigures the root
    and `asyncio` loggers for the rest of the session.)
    """
    await k8s.install_crds([WIDGET_CRD])
    seen = WidgetOperator()
    registry = kopf.OperatorRegistry()
    widget_handlers(registry, seen, k8s)
    settings = kopf.OperatorSettings()
    # A stalled watch must not go silent: the server ends each stream, the client gives up a bit later.
    settings.watching.server_timeout = 60
    settings.watching.client_timeout = 70
    settings.watching.connect_timeout = 5
    settings.networking.request_timeout = T
    settings.posting.level = logging.WARNING  # k8s events for warnings and errors only
    stop = threading.Event()
    failures: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(kopf.operator(registry=registry, settings=settings, standalone=True,
                                      namespaces=[k8s.namespace], stop_flag=stop))
        except BaseException as e:  # re-raised in the test's thread
            failures.append(e)

    thread = threading.Thread(target=run, name='kopf-operator')
    thread.start()
    try:
        yield seen
    finally:
        seen.deletion_allowed.set()
        stop.set()
        await asyncio.to_thread(thread.join, T)  # the emulator in this loop keeps serving meanwhile
        assert not thread.is_alive(), 'the operator did not stop'
        if failures:
            raise failures[0]


async def create_widget(k8s: KubernetesUnderTest, name: str) -> kube.KubeObject:
    body = {'apiVersion': WIDGETS.api_version, 'kind': 'Widget', 'metadata': {'name': name},
            'spec': {'size': 1}}
    return await k8s.api.create(WIDGETS, body, namespace=k8s.namespace, timeout=T)


async def get_widget(k8s: KubernetesUnderTest, name: str) -> kube.KubeObject:
    return await k8s.api.get(WIDGETS, name, namespace=k8s.namespace, timeout=T)


async def test_create_handler_fires_and_its_status_patch_lands_in_status(
        k8s: KubernetesUnderTest, operator: WidgetOperator) -> None:
    await create_widget(k8s, 'w1')

    # The main resource ignores status (test_emulator.py), so it can only have come through /status.
    async def phase() -> object:
        return (await get_widget(k8s, 'w1')).get('status', {}).get('phase')
    assert await eventually(phase) == 'Created'
    assert ('create', 'w1') in operator.calls


async def test_update_handler_fires_on_spec_change(k8s: KubernetesUnderTest, operator: WidgetOperator) -> None:
    await create_widget(k8s, 'w1')
    await eventually(lambda: operator.saw('create', 'w1'))

    await k8s.api.patch(WIDGETS, 'w1', {'spec': {'size': 2}}, namespace=k8s.namespace, timeout=T)

    await eventually(lambda: operator.saw('update', 'w1'))
    assert operator.spec_changes == [({'size': 1}, {'size': 2})]


async def test_finalizer_holds_deletion_until_the_delete_handler_completes(
        k8s: KubernetesUnderTest, operator: WidgetOperator) -> None:
    await create_widget(k8s, 'w1')

    async def finalizers() -> list[str]:
        return (await get_widget(k8s, 'w1'))['metadata'].get('finalizers', [])
    await eventually(finalizers)
    await eventually(lambda: operator.saw('create', 'w1'))

    await k8s.api.delete(WIDGETS, 'w1', namespace=k8s.namespace, timeout=T)
    await eventually(lambda: operator.saw('delete-started', 'w1'))
    held = await get_widget(k8s, 'w1')
    operator.deletion_allowed.set()

    assert held['metadata']['deletionTimestamp']
    assert held['metadata']['finalizers']

    async def gone() -> bool:
        try:
            await get_widget(k8s, 'w1')
        except kube.NotFoundError:
            return True
        return False
    await eventually(gone)
    assert ('delete', 'w1') in operator.calls


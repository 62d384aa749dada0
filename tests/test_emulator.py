"""The API emulator behaves as kube-apiserver does, as seen through `kube.KubeApi` (which this tests too)."""

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest

from kubearq.operator import kube
from tests.kubernetes import WIDGET_CRD, WIDGETS, KubernetesUnderTest

T = 10.0  # seconds for any one request
STALE = ('Operation cannot be fulfilled on widgets.test.kubearq.dev "w1": the object has been modified; '
         'please apply your changes to the latest version and try again')


@pytest.fixture
async def k8s_widgets(k8s: KubernetesUnderTest) -> KubernetesUnderTest:
    await k8s.install_crds([WIDGET_CRD])
    return k8s


@pytest.fixture
def api(k8s_widgets: KubernetesUnderTest) -> kube.KubeApi:
    return k8s_widgets.api


@pytest.fixture
def ns(k8s_widgets: KubernetesUnderTest) -> str:
    return k8s_widgets.namespace


@pytest.fixture
async def raw(k8s_widgets: KubernetesUnderTest) -> AsyncIterator[httpx.AsyncClient]:
    """Plain HTTP with the same login and TLS settings, for what the adapter does not send on purpose."""
    async with k8s_widgets.http_client(timeout=T) as client:
        yield client


async def create_widget(api: kube.KubeApi, ns: str, name: str = 'w1', **fields: object) -> kube.KubeObject:
    body = {'apiVersion': WIDGETS.api_version, 'kind': 'Widget', 'metadata': {'name': name}, **fields}
    return await api.create(WIDGETS, body, namespace=ns, timeout=T)


async def test_create_assigns_uid_timestamps_resource_version_and_generation(api: kube.KubeApi,
                                                                             ns: str) -> None:
    created = await create_widget(api, ns, spec={'size': 1})

    metadata = created['metadata']
    assert uuid.UUID(metadata['uid']).version == 4
    assert metadata['creationTimestamp'].endswith('Z')
    assert metadata['resourceVersion'].isdigit()
    assert metadata['generation'] == 1
    assert metadata['namespace'] == ns
    assert await api.get(WIDGETS, 'w1', namespace=ns, timeout=T) == created


async def test_resource_version_grows_on_every_write_across_objects(api: kube.KubeApi, ns: str) -> None:
    first = await create_widget(api, ns, 'w1')
    second = await create_widget(api, ns, 'w2')
    patched = await api.patch(WIDGETS, 'w1', {'spec': {'size': 2}}, namespace=ns, timeout=T)

    versions = [int(obj['metadata']['resourceVersion']) for obj in (first, second, patched)]
    assert versions == sorted(set(versions))


async def test_generation_moves_only_when_spec_changes(api: kube.KubeApi, ns: str) -> None:
    await create_widget(api, ns, spec={'size': 1})

    labelled = await api.patch(WIDGETS, 'w1', {'metadata': {'labels': {'a': 'b'}}}, namespace=ns, timeout=T)
    with_status = await api.patch_status(WIDGETS, 'w1', {'phase': 'Ready'}, namespace=ns, timeout=T)
    resized = await api.patch(WIDGETS, 'w1', {'spec': {'size': 2}}, namespace=ns, timeout=T)

    assert labelled['metadata']['generation'] == 1
    assert with_status['metadata']['generation'] == 1
    assert resized['metadata']['generation'] == 2


async def test_write_that_changes_nothing_keeps_resource_version(api: kube.KubeApi, ns: str) -> None:
    created = await create_widget(api, ns, spec={'size': 1})

    patched = await api.patch(WIDGETS, 'w1', {'spec': {'size': 1}}, namespace=ns, timeout=T)

    assert patched['metadata']['resourceVersion'] == created['metadata']['resourceVersion']


async def test_replace_with_stale_resource_version_is_conflict(api: kube.KubeApi, ns: str) -> None:
    stale = await create_widget(api, ns, spec={'size': 1})
    await api.patch(WIDGETS, 'w1', {'spec': {'size': 2}}, namespace=ns, timeout=T)

    with pytest.raises(kube.ConflictError) as error:
        await api.replace(WIDGETS, 'w1', {**stale, 'spec': {'size': 3}}, namespace=ns, timeout=T)

    assert (error.value.code, error.value.reason, error.value.message) == (409, 'Conflict', STALE)


async def test_patch_with_stale_resource_version_is_conflict(api: kube.KubeApi, ns: str) -> None:
    stale = await create_widget(api, ns, spec={'size': 1})
    await api.patch(WIDGETS, 'w1', {'spec': {'size': 2}}, namespace=ns, timeout=T)

    with pytest.raises(kube.ConflictError) as error:
        await api.patch(WIDGETS, 'w1', {'spec': {'size': 3}}, namespace=ns,
                        resource_version=stale['metadata']['resourceVersion'], timeout=T)

    assert (error.value.reason, error.value.message) == ('Conflict', STALE)


async def test_replace_with_current_resource_version_succeeds(api: kube.KubeApi, ns: str) -> None:
    current = await create_widget(api, ns, spec={'size': 1})

    replaced = await api.replace(WIDGETS, 'w1', {**current, 'spec': {'size': 3}}, namespace=ns, timeout=T)

    assert replaced['spec'] == {'size': 3}
    assert replaced['metadata']['generation'] == 2
    assert replaced['metadata']['uid'] == current['metadata']['uid']


async def test_replace_of_custom_resource_needs_resource_version(api: kube.KubeApi, ns: str) -> None:
    await create_widget(api, ns)
    body = {'apiVersion': WIDGETS.api_version, 'kind': 'Widget', 'metadata': {'name': 'w1'}, 'spec': {}}

    with pytest.raises(kube.ApiError) as error:
        await api.replace(WIDGETS, 'w1', body, namespace=ns, timeout=T)

    assert (error.value.code, error.value.reason) == (422, 'Invalid')
    assert error.value.message == ('widgets.test.kubearq.dev "w1" is invalid: metadata.resourceVersion: '
                                   'Invalid value: 0: must be specified for an update')
    assert error.value.details['kind'] == 'widgets'


async def test_custom_object_without_kind_is_a_bad_request(api: kube.KubeApi, ns: str,
                                                           raw: httpx.AsyncClient) -> None:
    await create_widget(api, ns)

    response = await raw.put(WIDGETS.path(namespace=ns, name='w1'), content=b'{"metadata":{"name":"w1"},"spec":{}}',
                             headers={'Content-Type': 'application/json'})
    created = await raw.post(WIDGETS.path(namespace=ns), content=b'{"metadata":{"name":"w2"}}',
                             headers={'Content-Type': 'application/json'})

    assert (response.status_code, response.json()['reason']) == (400, 'BadRequest')
    assert response.json()['message'] == (
        "the object provided is unrecognized (must be of type Widget): Object 'Kind' is missing in "
        """'{"metadata":{"name":"w1"},"spec":{}}' ({"metadata":{"name":"w1"},"spe ...)""")
    assert (created.status_code, created.json()['message']) == (400, (
        "the object provided is unrecognized (must be of type Widget): Object 'Kind' is missing in "
        """'{"metadata":{"name":"w2"}}' ({"metadata":{"name":"w2"}})"""))


async def test_custom_object_of_another_api_version_is_a_bad_request(api: kube.KubeApi, ns: str) -> None:
    body = {'apiVersion': 'test.kubearq.dev/v1', 'kind': 'Widget', 'metadata': {'name': 'w1'}}

    with pytest.raises(kube.ApiError) as error:
        await api.create(WIDGETS, body, namespace=ns, timeout=T)

    assert (error.value.code, error.value.reason, error.value.message) == (400, 'BadRequest', (
        'the API version in the data (test.kubearq.dev/v1) does not match the expected API version '
        '(test.kubearq.dev/v1alpha1)'))


async def test_create_of_existing_name_is_already_exists(api: kube.KubeApi, ns: str) -> None:
    await create_widget(api, ns)

    with pytest.raises(kube.ConflictError) as error:
        await create_widget(api, ns)

    assert (error.value.reason, error.value.message) == (
        'AlreadyExists', 'widgets.test.kubearq.dev "w1" already exists')


async def test_create_with_generate_name_gets_a_unique_name(api: kube.KubeApi, ns: str) -> None:
    body = {'apiVersion': WIDGETS.api_version, 'kind': 'Widget', 'metadata': {'generateName': 'w-'}}

    first = await api.create(WIDGETS, body, namespace=ns, timeout=T)
    second = await api.create(WIDGETS, body, namespace=ns, timeout=T)

    names = [first['metadata']['name'], second['metadata']['name']]
    assert all(name.startswith('w-') and len(name) == len('w-') + 5 for name in names)
    assert names[0] != names[1]


async def test_create_in_missing_namespace_is_not_found(api: kube.KubeApi) -> None:
    with pytest.raises(kube.NotFoundError) as error:
        await create_widget(api, 'kubearq-test-no-such-namespace')

    assert error.value.message == 'namespaces "kubearq-test-no-such-namespace" not found'


async def test_missing_object_is_not_found(api: kube.KubeApi, ns: str) -> None:
    with pytest.raises(kube.NotFoundError) as error:
        await api.get(WIDGETS, 'nope', namespace=ns, timeout=T)

    assert (error.value.reason, error.value.message) == ('NotFound', 'widgets.test.kubearq.dev "nope" not found')
    assert error.value.details == {'name': 'nope', 'group': 'test.kubearq.dev', 'kind': 'widgets'}


async def test_main_resource_ignores_status(api: kube.KubeApi, ns: str) -> None:
    created = await create_widget(api, ns, spec={'size': 1}, status={'phase': 'Faked'})
    await api.patch_status(WIDGETS, 'w1', {'phase': 'Ready'}, namespace=ns, timeout=T)

    patched = await api.patch(WIDGETS, 'w1', {'status': {'phase': 'Overwritten'}}, namespace=ns, timeout=T)

    assert 'status' not in created
    assert patched['status'] == {'phase': 'Ready'}


async def test_status_subresource_changes_only_status(api: kube.KubeApi, ns: str) -> None:
    await create_widget(api, ns, spec={'size': 1})

    patched = await api.patch(WIDGETS, 'w1', {'spec': {'size': 9}, 'metadata': {'labels': {'a': 'b'}},
                                              'status': {'phase': 'Ready'}},
                              namespace=ns, subresource='status', timeout=T)

    assert patched['spec'] == {'size': 1}
    assert 'labels' not in patched['metadata']
    assert patched['status'] == {'phase': 'Ready'}


async def test_json_patch_applies_and_failed_test_is_invalid(api: kube.KubeApi, ns: str) -> None:
    created = await create_widget(api, ns, spec={'size': 1})
    version = created['metadata']['resourceVersion']

    patched = await api.json_patch(WIDGETS, 'w1', [
        {'op': 'test', 'path': '/metadata/resourceVersion', 'value': version},
        {'op': 'replace', 'path': '/spec/size', 'value': 2},
    ], namespace=ns, timeout=T)
    with pytest.raises(kube.ApiError) as error:
        await api.json_patch(WIDGETS, 'w1', [
            {'op': 'test', 'path': '/metadata/resourceVersion', 'value': version},
            {'op': 'replace', 'path': '/spec/size', 'value': 3},
        ], namespace=ns, timeout=T)

    assert patched['spec'] == {'size': 2}
    assert (error.value.code, error.value.reason) == (422, 'Invalid')


async def test_strategic_merge_patch_on_custom_resource_is_unsupported(
        api: kube.KubeApi, ns: str, raw: httpx.AsyncClient) -> None:
    await create_widget(api, ns)

    response = await raw.patch(WIDGETS.path(namespace=ns, name='w1'), json={'spec': {'size': 2}},
                               headers={'Content-Type': 'application/strategic-merge-patch+json'})

    assert response.status_code == 415
    assert response.json()['reason'] == 'UnsupportedMediaType'
    assert response.json()['message'] == (
        'the body of the request was in an unknown format - accepted media types include: '
        'application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml')


async def test_finalizers_hold_deletion_until_the_last_is_removed(api: kube.KubeApi, ns: str) -> None:
    created = await create_widget(api, ns, spec={'size': 1})
    created = await api.patch(WIDGETS, 'w1', {'metadata': {'finalizers': ['a.test/x', 'b.test/y']}},
                              namespace=ns, timeout=T)
    events = api.watch(WIDGETS, namespace=ns, resource_version=created['metadata']['resourceVersion'],
                       server_timeout=60, timeout=T)
    async with contextlib.aclosing(events):
        held = await api.delete(WIDGETS, 'w1', namespace=ns, timeout=T)
        still_held = await api.patch(WIDGETS, 'w1', {'metadata': {'finalizers': ['b.test/y']}},
                                     namespace=ns, timeout=T)
        released = await api.patch(WIDGETS, 'w1', {'metadata': {'finalizers': []}}, namespace=ns, timeout=T)
        seen = [(await anext(events)).type for _ in range(3)]

    assert held is not None
    assert held['metadata']['deletionTimestamp']
    assert held['metadata']['generation'] == 2  # as markAsDeleting() does
    assert still_held['metadata']['deletionTimestamp'] == held['metadata']['deletionTimestamp']
    assert 'finalizers' not in released['metadata']  # ObjectMeta omits an empty list
    assert seen == ['MODIFIED', 'MODIFIED', 'DELETED']
    with pytest.raises(kube.NotFoundError):
        await api.get(WIDGETS, 'w1', namespace=ns, timeout=T)


async def test_delete_without_finalizers_removes_at_once(api: kube.KubeApi, ns: str) -> None:
    await create_widget(api, ns)

    result = await api.delete(WIDGETS, 'w1', namespace=ns, timeout=T)

    assert result is None
    with pytest.raises(kube.NotFoundError):
        await api.get(WIDGETS, 'w1', namespace=ns, timeout=T)


async def test_no_new_finalizers_once_deleting(api: kube.KubeApi, ns: str) -> None:
    await create_widget(api, ns, metadata={'name': 'w1', 'finalizers': ['a.test/x']})
    await api.delete(WIDGETS, 'w1', namespace=ns, timeout=T)

    with pytest.raises(kube.ApiError) as error:
        await api.patch(WIDGETS, 'w1', {'metadata': {'finalizers': ['a.test/x', 'b.test/y']}},
                        namespace=ns, timeout=T)

    assert (error.value.code, error.value.reason) == (422, 'Invalid')
    assert error.value.message.endswith(
        'metadata.finalizers: Forbidden: no new finalizers can be added if the object is being deleted, '
        'found new finalizers []string{"b.test/y"}')


async def test_delete_precondition_on_stale_resource_version_is_conflict(api: kube.KubeApi, ns: str) -> None:
    stale = await create_widget(api, ns)
    await api.patch(WIDGETS, 'w1', {'spec': {'size': 2}}, namespace=ns, timeout=T)

    with pytest.raises(kube.ConflictError):
        await api.delete(WIDGETS, 'w1', namespace=ns, resource_version=stale['metadata']['resourceVersion'],
                         timeout=T)


async def test_list_has_resource_version_selectors_and_pages(api: kube.KubeApi, ns: str) -> None:
    for name, tier in [('w1', 'gold'), ('w2', 'silver'), ('w3', 'gold'), ('w4', 'bronze')]:
        await create_widget(api, ns, name, metadata={'name': name, 'labels': {'tier': tier}})

    everything = await api.list(WIDGETS, namespace=ns, chunk_size=3, timeout=T)
    gold = await api.list(WIDGETS, namespace=ns, label_selector='tier=gold', timeout=T)
    not_gold = await api.list(WIDGETS, namespace=ns, label_selector='tier notin (gold),tier', timeout=T)
    by_name = await api.list(WIDGETS, namespace=ns, field_selector='metadata.name=w2', timeout=T)

    assert [w['metadata']['name'] for w in everything.items] == ['w1', 'w2', 'w3', 'w4']
    assert everything.resource_version == everything.items[-1]['metadata']['resourceVersion']
    assert [w['metadata']['name'] for w in gold.items] == ['w1', 'w3']
    assert [w['metadata']['name'] for w in not_gold.items] == ['w2', 'w4']
    assert [w['metadata']['name'] for w in by_name.items] == ['w2']


async def test_watch_resumes_from_resource_version(api: kube.KubeApi, ns: str) -> None:
    await create_widget(api, ns, 'w1')
    listed = await api.list(WIDGETS, namespace=ns, timeout=T)
    await create_widget(api, ns, 'w2')
    await api.patch(WIDGETS, 'w1', {'spec': {'size': 2}}, namespace=ns, timeout=T)
    await api.delete(WIDGETS, 'w2', namespace=ns, timeout=T)

    events = api.watch(WIDGETS, namespace=ns, resource_version=listed.resource_version,
                       server_timeout=60, timeout=T)
    async with contextlib.aclosing(events):
        seen = [(e.type, e.object['metadata']['name']) for e in [await anext(events) for _ in range(3)]]

    assert seen == [('ADDED', 'w2'), ('MODIFIED', 'w1'), ('DELETED', 'w2')]


async def test_watch_events_carry_their_resource_versions(api: kube.KubeApi, ns: str) -> None:
    listed = await api.list(WIDGETS, namespace=ns, timeout=T)
    created = await create_widget(api, ns)
    patched = await api.patch(WIDGETS, 'w1', {'spec': {'size': 2}}, namespace=ns, timeout=T)

    events = api.watch(WIDGETS, namespace=ns, resource_version=listed.resource_version,
                       server_timeout=60, timeout=T)
    async with contextlib.aclosing(events):
        versions = [(await anext(events)).object['metadata']['resourceVersion'] for _ in range(2)]

    assert versions == [created['metadata']['resourceVersion'], patched['metadata']['resourceVersion']]


async def test_watch_with_selector_sees_object_leave_as_deleted(api: kube.KubeApi, ns: str) -> None:
    created = await create_widget(api, ns, metadata={'name': 'w1', 'labels': {'tier': 'gold'}})

    events = api.watch(WIDGETS, namespace=ns, label_selector='tier=gold',
                       resource_version=created['metadata']['resourceVersion'], server_timeout=60, timeout=T)
    async with contextlib.aclosing(events):
        await api.patch(WIDGETS, 'w1', {'metadata': {'labels': {'tier': 'silver'}}}, namespace=ns, timeout=T)
        left = await anext(events)

    assert left.type == 'DELETED'


async def test_watch_from_compacted_history_is_gone(k8s_widgets: KubernetesUnderTest, api: kube.KubeApi,
                                                    ns: str) -> None:
    created = await create_widget(api, ns)
    await api.patch(WIDGETS, 'w1', {'spec': {'size': 2}}, namespace=ns, timeout=T)
    k8s_widgets.compact_history()

    events = api.watch(WIDGETS, namespace=ns, resource_version=created['metadata']['resourceVersion'],
                       server_timeout=60, timeout=T)
    with pytest.raises(kube.GoneError) as error:
        async with contextlib.aclosing(events):
            await anext(events)

    assert (error.value.code, error.value.reason) == (410, 'Expired')
    assert error.value.message.startswith(f'too old resource version: {created["metadata"]["resourceVersion"]} (')


async def test_ended_watch_streams_resume_without_losing_changes(k8s_widgets: KubernetesUnderTest,
                                                                 api: kube.KubeApi, ns: str) -> None:
    listed = await api.list(WIDGETS, namespace=ns, timeout=T)
    events = api.watch(WIDGETS, namespace=ns, resource_version=listed.resource_version,
                       server_timeout=60, timeout=T)
    async with contextlib.aclosing(events):
        await create_widget(api, ns, 'w1')
        first = await anext(events)
        k8s_widgets.end_watch_streams()
        await create_widget(api, ns, 'w2')  # while no stream is open
        second = await anext(events)

    assert (first.type, first.object['metadata']['name']) == ('ADDED', 'w1')
    assert (second.type, second.object['metadata']['name']) == ('ADDED', 'w2')


async def test_ended_watch_stream_ends_the_iteration_without_resume(k8s_widgets: KubernetesUnderTest,
                                                                    api: kube.KubeApi, ns: str) -> None:
    listed = await api.list(WIDGETS, namespace=ns, timeout=T)
    events = api.watch(WIDGETS, namespace=ns, resource_version=listed.resource_version,
                       server_timeout=60, timeout=T, resume=False)
    async with contextlib.aclosing(events):
        await create_widget(api, ns, 'w1')
        await anext(events)
        k8s_widgets.end_watch_streams()

        with pytest.raises(StopAsyncIteration):
            await anext(events)


async def test_watch_ends_after_timeout_seconds(api: kube.KubeApi, ns: str) -> None:
    listed = await api.list(WIDGETS, namespace=ns, timeout=T)
    events = api.watch(WIDGETS, namespace=ns, resource_version=listed.resource_version,
                       server_timeout=1, timeout=T, resume=False)
    async with contextlib.aclosing(events), asyncio.timeout(5):
        remaining = [event async for event in events]

    assert remaining == []


async def test_watch_with_initial_events_ends_them_with_a_bookmark(
        k8s_widgets: KubernetesUnderTest, api: kube.KubeApi, ns: str, raw: httpx.AsyncClient) -> None:
    k8s_widgets.require_emulator()  # WatchList (sendInitialEvents) is a feature gate on real clusters
    await create_widget(api, ns, 'w1')
    params = {'watch': 'true', 'sendInitialEvents': 'true', 'resourceVersionMatch': 'NotOlderThan',
              'allowWatchBookmarks': 'true', 'timeoutSeconds': '60'}

    async with raw.stream('GET', WIDGETS.path(namespace=ns), params=params) as response:
        lines = aiter(response.aiter_lines())
        added, bookmark = json.loads(await anext(lines)), json.loads(await anext(lines))

    assert (added['type'], added['object']['metadata']['name']) == ('ADDED', 'w1')
    assert bookmark['type'] == 'BOOKMARK'
    assert bookmark['object']['metadata']['annotations'] == {'k8s.io/initial-events-end': 'true'}


async def test_lease_create_renew_and_stale_renew_conflicts(api: kube.KubeApi, ns: str) -> None:
    lease = await api.create(kube.LEASES, {
        'metadata': {'name': 'kubearq-leader'},
        'spec': {'holderIdentity': 'pod-a', 'leaseDurationSeconds': 15,
                 'renewTime': '2025-01-01T00:00:00.000000Z'},
    }, namespace=ns, timeout=T)
    renewed = await api.replace(kube.LEASES, 'kubearq-leader', {
        **lease, 'spec': {**lease['spec'], 'renewTime': '2025-01-01T00:00:05.000000Z'}}, namespace=ns, timeout=T)

    with pytest.raises(kube.ConflictError) as error:
        await api.replace(kube.LEASES, 'kubearq-leader', {
            **lease, 'spec': {**lease['spec'], 'holderIdentity': 'pod-b'}}, namespace=ns, timeout=T)

    assert int(renewed['metadata']['resourceVersion']) > int(lease['metadata']['resourceVersion'])
    assert error.value.message == (
        'Operation cannot be fulfilled on leases.coordination.k8s.io "kubearq-leader": the object has been '
        'modified; please apply your changes to the latest version and try again')
    current = await api.get(kube.LEASES, 'kubearq-leader', namespace=ns, timeout=T)
    assert current['spec']['holderIdentity'] == 'pod-a'


async def test_discovery_serves_custom_resources_with_status_subresource(raw: httpx.AsyncClient) -> None:
    groups = (await raw.get('/apis')).json()
    resources = (await raw.get('/apis/test.kubearq.dev/v1alpha1')).json()

    names = {group['name'] for group in groups['groups']}
    assert {'test.kubearq.dev', 'apiextensions.k8s.io', 'coordination.k8s.io'} <= names
    by_name = {resource['name']: resource for resource in resources['resources']}
    assert by_name['widgets']['kind'] == 'Widget'
    assert by_name['widgets']['namespaced'] is True
    assert (by_name['widgets']['shortNames'], by_name['widgets']['categories']) == (['wdg'], ['widgetry'])
    # A subresource has neither short names nor categories (kubectl's `get <category>` would try to list it)
    # and takes only get, patch and update, as kube-apiserver says.
    status = by_name['widgets/status']
    assert (status['kind'], status['namespaced'], sorted(status['verbs'])) == ('Widget', True,
                                                                            ['get', 'patch', 'update'])
    assert not status.get('shortNames')
    assert not status.get('categories')


async def test_request_without_credentials_is_unauthorized(k8s_widgets: KubernetesUnderTest) -> None:
    k8s_widgets.require_emulator()  # a real cluster's anonymous access is its own policy
    async with httpx.AsyncClient(base_url=k8s_widgets.server, timeout=T) as anonymous:
        response = await anonymous.get(WIDGETS.path(namespace=k8s_widgets.namespace))  # plain HTTP: the emulator

    assert response.status_code == 401
    assert response.json()['reason'] == 'Unauthorized'

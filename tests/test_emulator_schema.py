"""The API checks custom objects against their CRD as kube-apiserver does: defaults, unknown fields, the
OpenAPI schema and the CEL rules, with the server's messages. Run on the emulator and on a real server.

The server lists several causes in Go map order (random), so several causes are compared as a set.
"""

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from kubearq.operator import kube
from kubearq.operator.context import QUEUE_POLICIES, SCRAPE_REQUESTS, SYNC_SCHEDULES
from tests.kubernetes import KubernetesUnderTest

T = 10.0
NOT_CHECKED = ('Invalid value: null: some validation rules were not checked because the object was invalid; '
               'correct the existing errors to complete validation')


@pytest.fixture
async def raw(k8s: KubernetesUnderTest) -> AsyncIterator[httpx.AsyncClient]:
    async with k8s.http_client(timeout=T) as client:
        yield client


def schedule(spec: dict[str, Any], name: str = 's1') -> dict[str, Any]:
    return {'apiVersion': SYNC_SCHEDULES.api_version, 'kind': 'SyncSchedule', 'metadata': {'name': name},
            'spec': spec}


MINIMAL = {'schedule': '*/5 * * * *', 'job': {'function': 'sync_connections'}}


async def create(raw: httpx.AsyncClient, k8s: KubernetesUnderTest, body: dict[str, Any], *,
                 resource: kube.Resource = SYNC_SCHEDULES, strict: bool = True) -> httpx.Response:
    params = {'fieldValidation': 'Strict'} if strict else {}
    return await raw.post(resource.path(namespace=k8s.namespace), json=body, params=params)


def causes(response: httpx.Response) -> set[tuple[str, str, str]]:
    return {(c['field'], c['reason'], c['message']) for c in response.json()['details']['causes']}


async def test_create_applies_the_schema_defaults(k8s: KubernetesUnderTest) -> None:
    created = await k8s.api.create(SYNC_SCHEDULES, schedule(MINIMAL), namespace=k8s.namespace, timeout=T)

    assert created['spec'] == {
        'schedule': '*/5 * * * *', 'timeZone': 'UTC', 'suspend': False, 'concurrencyPolicy': 'Allow',
        'jitterSeconds': 0, 'successfulRunsHistoryLimit': 3, 'failedRunsHistoryLimit': 1,
        'job': {'function': 'sync_connections', 'args': [], 'kwargs': {}, 'queue': 'arq:queue'}}


async def test_a_null_value_of_a_field_that_is_not_nullable_is_dropped_then_defaulted(
        k8s: KubernetesUnderTest) -> None:
    created = await k8s.api.create(SYNC_SCHEDULES, schedule({**MINIMAL, 'timeZone': None}),
                                   namespace=k8s.namespace, timeout=T)

    assert created['spec']['timeZone'] == 'UTC'


async def test_unknown_fields_are_refused_under_strict_field_validation(
        k8s: KubernetesUnderTest, raw: httpx.AsyncClient) -> None:
    body = schedule({**MINIMAL, 'timezone': 'Europe/Berlin', 'job': {'function': 'f', 'foo': 1}})
    body['metadata']['bogus'] = 1

    response = await create(raw, k8s, body)

    assert (response.status_code, response.json()['reason']) == (400, 'BadRequest')
    assert response.json()['message'] == (
        'SyncSchedule in version "v1alpha1" cannot be handled as a SyncSchedule: strict decoding error: '
        'unknown field "metadata.bogus", unknown field "spec.job.foo", unknown field "spec.timezone"')


async def test_unknown_fields_are_pruned_with_a_warning_by_default(
        k8s: KubernetesUnderTest, raw: httpx.AsyncClient) -> None:
    response = await create(raw, k8s, schedule({**MINIMAL, 'timezone': 'Europe/Berlin'}), strict=False)

    assert response.status_code == 201
    assert response.headers.get_list('Warning') == ['299 - "unknown field \\"spec.timezone\\""']
    assert 'timezone' not in response.json()['spec']
    assert response.json()['spec']['timeZone'] == 'UTC'


async def test_an_unknown_status_field_in_a_strict_patch_is_invalid(
        k8s: KubernetesUnderTest, raw: httpx.AsyncClient) -> None:
    await k8s.api.create(SYNC_SCHEDULES, schedule(MINIMAL), namespace=k8s.namespace, timeout=T)

    response = await raw.patch(SYNC_SCHEDULES.path(namespace=k8s.namespace, name='s1', subresource='status'),
                               json={'status': {'bogus': 1}}, params={'fieldValidation': 'Strict'},
                               headers={'Content-Type': 'application/merge-patch+json'})

    assert (response.status_code, response.json()['reason']) == (422, 'Invalid')
    assert response.json()['message'].startswith(' "" is invalid: patch: Invalid value: "{')
    assert response.json()['message'].endswith('": strict decoding error: unknown field "status.bogus"')


async def test_schema_violations_are_invalid_with_a_cause_each(k8s: KubernetesUnderTest,
                                                               raw: httpx.AsyncClient) -> None:
    spec = {'schedule': '', 'concurrencyPolicy': 'forbid', 'jitterSeconds': -1,
            'job': {'function': '9bad', 'maxTries': 1000}}

    response = await create(raw, k8s, schedule(spec))

    assert (response.status_code, response.json()['reason']) == (422, 'Invalid')
    assert causes(response) == {
        ('spec.schedule', 'FieldValueInvalid', 'Invalid value: "": spec.schedule in body should be at least 1 '
                                               'chars long'),
        ('spec.concurrencyPolicy', 'FieldValueNotSupported',
         'Unsupported value: "forbid": supported values: "Allow", "Forbid", "Replace"'),
        ('spec.jitterSeconds', 'FieldValueInvalid',
         'Invalid value: -1: spec.jitterSeconds in body should be greater than or equal to 0'),
        ('spec.job.function', 'FieldValueInvalid',
         "Invalid value: \"9bad\": spec.job.function in body should match '^[A-Za-z_][A-Za-z0-9_]*$'"),
        ('spec.job.maxTries', 'FieldValueInvalid',
         'Invalid value: 1000: spec.job.maxTries in body should be less than or equal to 100'),
        ('<nil>', 'FieldValueInvalid', NOT_CHECKED),  # an enum violation blocks the CEL rules
    }
    assert response.json()['message'].startswith('SyncSchedule.kubearq.dev "s1" is invalid: [')


async def test_one_violation_is_the_whole_message(k8s: KubernetesUnderTest, raw: httpx.AsyncClient) -> None:
    response = await create(raw, k8s, schedule({**MINIMAL, 'job': {'function': 'f', 'maxTries': 0}}))

    assert response.json()['message'] == (
        'SyncSchedule.kubearq.dev "s1" is invalid: spec.job.maxTries: Invalid value: 0: spec.job.maxTries in body '
        'should be greater than or equal to 1')
    assert response.json()['details'] == {
        'name': 's1', 'group': 'kubearq.dev', 'kind': 'SyncSchedule', 'causes': [{
            'reason': 'FieldValueInvalid', 'field': 'spec.job.maxTries',
            'message': 'Invalid value: 0: spec.job.maxTries in body should be greater than or equal to 1'}]}


async def test_wrong_types_lengths_and_counts_block_the_cel_rules(k8s: KubernetesUnderTest,
                                                                 raw: httpx.AsyncClient) -> None:
    spec = {'schedule': 5, 'suspend': 'yes', 'startingDeadlineSeconds': 5,
            'job': {'args': list(range(65)), 'queue': 'q' * 129}}

    response = await create(raw, k8s, schedule(spec))

    assert causes(response) == {
        ('spec.schedule', 'FieldValueTypeInvalid',
         'Invalid value: "integer": spec.schedule in body must be of type string: "integer"'),
        ('spec.suspend', 'FieldValueTypeInvalid',
         'Invalid value: "string": spec.suspend in body must be of type boolean: "string"'),
        ('spec.job.args', 'FieldValueTooMany', 'Too many: 65: must have at most 64 items'),
        ('spec.job.queue', 'FieldValueTooLong', 'Too long: may not be more than 128 bytes'),
        ('spec.job.function', 'FieldValueRequired', 'Required value'),
        ('<nil>', 'FieldValueInvalid', NOT_CHECKED),  # so the startingDeadlineSeconds rule did not run
    }


async def test_cel_rules_are_checked_with_their_messages(k8s: KubernetesUnderTest, raw: httpx.AsyncClient) -> None:
    response = await create(raw, k8s, schedule({**MINIMAL, 'startingDeadlineSeconds': 5, 'jitterSeconds': 20}))

    assert (response.status_code, response.json()['reason']) == (422, 'Invalid')
    assert causes(response) == {
        ('spec', 'FieldValueInvalid', 'Invalid value: startingDeadlineSeconds must be at least 10 when set'),
        ('spec', 'FieldValueInvalid', 'Invalid value: jitterSeconds must be less than startingDeadlineSeconds, '
                                      'or jittered ticks would count as missed'),
    }


async def test_duplicate_items_of_a_set_are_invalid(k8s: KubernetesUnderTest, raw: httpx.AsyncClient) -> None:
    body = {'apiVersion': SCRAPE_REQUESTS.api_version, 'kind': 'ScrapeRequest', 'metadata': {'name': 'r1'},
            'spec': {'urls': ['https://a.example/', 'https://a.example/']}}

    response = await create(raw, k8s, body, resource=SCRAPE_REQUESTS)

    assert response.json()['message'] == (
        'ScrapeRequest.kubearq.dev "r1" is invalid: spec.urls[1]: Duplicate value: "https://a.example/"')


async def test_a_status_write_is_checked_against_the_status_schema(k8s: KubernetesUnderTest) -> None:
    await k8s.api.create(SYNC_SCHEDULES, schedule(MINIMAL), namespace=k8s.namespace, timeout=T)
    ready = {'type': 'Ready', 'status': 'True', 'reason': 'Scheduled', 'lastTransitionTime': '2025-01-01T00:00:00Z'}

    with pytest.raises(kube.ApiError) as error:
        await k8s.api.patch_status(SYNC_SCHEDULES, 's1', {
            'lastScheduleTime': 'yesterday', 'conditions': [ready, {**ready, 'status': 'False'}],
            'runs': [{'scheduledTime': '2025-01-01T00:00:00Z'}]}, namespace=k8s.namespace, timeout=T)
    written = await k8s.api.patch_status(SYNC_SCHEDULES, 's1', {'runs': [
        {'jobId': 'j1', 'scheduledTime': '2025-01-01T00:00:00Z'}]}, namespace=k8s.namespace, timeout=T)

    assert error.value.code == 422
    found = error.value.details['causes']
    assert isinstance(found, list)
    assert {(c['field'], c['message']) for c in found} == {
        ('status.lastScheduleTime',
         'Invalid value: "yesterday": lastScheduleTime in body must be of type date-time: "yesterday"'),
        ('status.conditions[1]', 'Duplicate value: {"type":"Ready"}'),
        ('status.runs[0].jobId', 'Required value'),
        ('<nil>', NOT_CHECKED),
    }
    assert written['status']['runs'] == [{'jobId': 'j1', 'scheduledTime': '2025-01-01T00:00:00Z',
                                          'outcome': 'Queued', 'trigger': 'Scheduled'}]  # defaulted
    assert written['status']['activeCount'] == 0


async def test_a_schedule_may_not_name_a_job_only_the_operator_enqueues(k8s: KubernetesUnderTest,
                                                                        raw: httpx.AsyncClient) -> None:
    response = await create(raw, k8s, schedule({"schedule": "@daily", "job": {"function": "delete_scrape_results"}}))

    assert response.json()["message"] == (
        'SyncSchedule.kubearq.dev "s1" is invalid: spec.job: Invalid value: delete_scrape_results is enqueued by the '
        "operator alone (when a ScrapeRequest with deletionPolicy: Delete is deleted), never by a schedule")


async def test_a_queue_policy_must_select_namespaces(k8s: KubernetesUnderTest, raw: httpx.AsyncClient) -> None:
    body = {"apiVersion": QUEUE_POLICIES.api_version, "kind": "QueuePolicy", "metadata": {"name": "nobody"},
            "spec": {"namespaces": {}, "queues": ["team-a:*"]}}

    response = await raw.post(QUEUE_POLICIES.path(), json=body, params={"fieldValidation": "Strict"})

    assert response.json()["message"] == (
        'QueuePolicy.kubearq.dev "nobody" is invalid: spec.namespaces: Invalid value: name the namespaces (names) or '
        "select them by label (matchLabels, matchExpressions)")

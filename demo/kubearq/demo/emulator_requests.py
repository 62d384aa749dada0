"""The emulator's request helpers: the verb of a request, its body and parameters, continue tokens, and the
errors kube-apiserver answers with (their exact messages)."""

from __future__ import annotations

import base64
import copy
import datetime
import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

import kmock

from kubearq.demo.emulator_selectors import JsonDict, bad_request

# ObjectMeta's lists and maps are `omitempty`: stored empty, they are not there at all.
OMITTED_WHEN_EMPTY = ('labels', 'annotations', 'finalizers', 'ownerReferences')


def action(method: kmock.method, *, named: bool, watch: bool) -> kmock.action | None:
    """The Kubernetes verb of a request, as kmock guesses it (PUT is served by its method)."""
    match method, named:
        case kmock.method.GET, _:
            return kmock.action.WATCH if watch else kmock.action.FETCH if named else kmock.action.LIST
        case kmock.method.POST, False:
            return kmock.action.CREATE
        case kmock.method.PATCH, True:
            return kmock.action.UPDATE
        case kmock.method.DELETE, True:
            return kmock.action.DELETE
    return None


def check_type(request: kmock.Request, resource: kmock.resource, info: kmock.ResourceInfo,
                body: JsonDict) -> None:
    """A custom object must say what it is (built-in ones may leave it to the URL)."""
    if not body.get('kind'):
        raw = request.text
        shown = raw if len(raw) <= 30 else f'{raw[:30]} ...'
        raise bad_request(f"the object provided is unrecognized (must be of type {info.kind}): "
                          f"Object 'Kind' is missing in '{raw}' ({shown})")
    if body.get('apiVersion') != api_version(resource):
        raise bad_request(f'the API version in the data ({body.get("apiVersion", "")}) does not match the '
                          f'expected API version ({api_version(resource)})')


def omit_empty(metadata: JsonDict) -> None:
    for key in OMITTED_WHEN_EMPTY:
        if key in metadata and not metadata[key]:
            del metadata[key]


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    merged = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = merge_patch(merged.get(key), value)
    return merged


def without_metadata(obj: Mapping[str, Any]) -> JsonDict:
    return {key: value for key, value in obj.items() if key != 'metadata'}


def body(request: kmock.Request) -> JsonDict:
    if not isinstance(request.data, dict):
        raise bad_request('the request body is not a JSON object')
    return copy.deepcopy(request.data)


def metadata(obj: JsonDict) -> JsonDict:
    metadata = obj.setdefault('metadata', {})
    if not isinstance(metadata, dict):
        raise bad_request('metadata must be a JSON object')
    return metadata


def header(request: kmock.Request, name: str) -> str | None:
    return next((value for key, value in request.headers.items() if key.lower() == name.lower()), None)


def int_param(request: kmock.Request, name: str) -> int | None:
    text = request.params.get(name)
    if text is None:
        return None
    if not text.isdigit():
        raise bad_request(f'invalid {name}: {text!r}')
    return int(text)


def encode_continue(revision: int, start: str) -> str:
    return base64.urlsafe_b64encode(json.dumps({'rv': revision, 'start': start}).encode()).decode()


def decode_continue(token: str) -> tuple[int, str]:
    try:
        decoded = json.loads(base64.urlsafe_b64decode(token))
        return int(decoded['rv']), str(decoded['start'])
    except (ValueError, KeyError, TypeError) as e:
        raise bad_request(f'continue key is not valid: {e}') from e


def key(obj: Mapping[str, Any]) -> str:
    return f'{obj["metadata"].get("namespace", "")}/{obj["metadata"]["name"]}'


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%dT%H:%M:%SZ')


def api_version(resource: kmock.resource) -> str:
    return f'{resource.group}/{resource.version}' if resource.group else str(resource.version)


def qualified(resource: kmock.resource) -> str:
    return f'{resource.plural}.{resource.group}' if resource.group else str(resource.plural)


def details(resource: kmock.resource, name: str) -> JsonDict:
    details: JsonDict = {'name': name, 'kind': resource.plural}  # sic: kind is the plural here
    if resource.group:
        details['group'] = resource.group
    return details


def conflict(resource: kmock.resource, name: str, why: str) -> kmock.KubernetesError:
    return kmock.KubernetesError(409, 'Conflict', f'Operation cannot be fulfilled on {qualified(resource)} '
                                                  f'"{name}": {why}', details(resource, name))


def invalid(resource: kmock.resource, info: kmock.ResourceInfo, name: str, field: str,
             problem: str, *, by_resource: bool = False) -> kmock.KubernetesError:
    """422 Invalid; the generic registry's own checks (`by_resource`) name the resource, not the kind."""
    kind = str(info.kind) if not by_resource else str(resource.plural)
    named = qualified(resource) if by_resource else f'{kind}.{resource.group}' if resource.group else kind
    reason = {'Invalid': 'FieldValueInvalid', 'Required': 'FieldValueRequired',
              'Forbidden': 'FieldValueForbidden'}[problem.split(' ')[0].rstrip(':')]
    details = {'name': name, 'group': resource.group, 'kind': kind,
               'causes': [{'reason': reason, 'message': problem, 'field': field}]}
    return kmock.KubernetesError(422, 'Invalid', f'{named} "{name}" is invalid: {field}: {problem}', details)


async def once(event: JsonDict) -> AsyncIterator[Any]:
    yield event

"""
The Kubernetes API for tests: KMock taught the API server's semantics, behind the one fixture `k8s`.

KMock 0.8's `KubernetesEmulator` stores objects as merged dicts: no uid, resourceVersion, generation or
creationTimestamp, no optimistic concurrency, no status subresource, no PUT, every PATCH a deep merge,
watches without resourceVersion, history or timeout, lists without selectors. `ApiServerEmulator` keeps
KMock's scaffold (discovery, `Status` errors, the aiohttp server, the request log, `objects`) and
replaces the stateful part with what kube-apiserver does, citing it where the rule is not obvious.
With `KUBECONFIG` set, the fixture yields a real cluster instead, and the emulator's hooks skip.
"""

import asyncio
import base64
import collections
import contextlib
import copy
import dataclasses
import datetime
import json
import logging
import os
import pathlib
import re
import secrets
import string
import uuid
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Any, Literal, TypeVar

import aiohttp.web
import attrs
import jsonpatch
import kmock
import kopf
import pytest
import yaml

from kubearq.operator import kube

logger = logging.getLogger(__name__)

JsonDict = dict[str, Any]  # objects as the emulator handles them: JSON of any shape
EventType = Literal['ADDED', 'MODIFIED', 'DELETED']

CRDS = kube.Resource('apiextensions.k8s.io', 'v1', 'customresourcedefinitions')
PROJECT_CRDS_DIR = pathlib.Path(__file__).parent.parent / 'crds'
API_TIMEOUT = 30.0  # seconds for one request of the fixture's own
Probed = TypeVar('Probed')

# k8s.io/apimachinery/pkg/api/errors: OptimisticLockErrorMsg.
OPTIMISTIC_LOCK = ('the object has been modified; '
                   'please apply your changes to the latest version and try again')
# A CR accepts no strategic merge patch: apiextensions-apiserver serves only these.
CR_PATCH_TYPES = 'application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml'
SYSTEM_FIELDS = ('uid', 'creationTimestamp', 'deletionTimestamp', 'deletionGracePeriodSeconds', 'generation')
CRD_RESOURCE = kmock.resource(CRDS.group, CRDS.version, CRDS.plural)
NAMESPACES = kmock.resource('', 'v1', 'namespaces')
_NAMESPACE_URL = re.compile(r'/api/v1/namespaces(?:/(?P<name>[^/]+)(?:/(?P<subresource>status|finalize))?)?/?')
_JSON_HEADERS = {'Content-Type': 'application/json'}


@attrs.frozen
class Change:
    """One write, as watchers see it: the object carries the write's resourceVersion."""

    revision: int
    resource: kmock.resource
    type: EventType
    object: JsonDict
    previous: JsonDict | None  # before the write; a label selector may stop or start matching


@attrs.define(kw_only=True)
class ApiServerEmulator(kmock.KubernetesScaffold):
    """KMock's Kubernetes scaffold with kube-apiserver's object semantics (see the module docstring)."""

    token: str | None = None  # when set, every request needs `Authorization: Bearer <token>`
    history_limit: int = 1000  # changes kept for watches to resume from; older ones answer 410 Gone
    # KMock matches each request against its reactions by walking the whole request log (O(n) per request);
    # no test reads the log, so keep only the last few: 64 kept made a write cost ~7 ms, 4 make it ~1.5 ms.
    request_log_limit: int = 4
    objects: kmock.ObjectsArray = attrs.field(factory=kmock.ObjectsArray, init=False)
    _revision: int = attrs.field(default=0, init=False)  # one counter for every write, as etcd's
    _history: collections.deque[Change] = attrs.field(factory=collections.deque, init=False)
    _kept_after: int = attrs.field(default=0, init=False)  # every change after this revision is kept
    _watchers: set[asyncio.Queue[Change | None]] = attrs.field(factory=set, init=False)
    _custom: set[kmock.resource] = attrs.field(factory=set, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        with warnings.catch_warnings():
            # kmock 0.8 reads its bundled resource list with importlib.resources.read_binary().
            warnings.filterwarnings('ignore', 'read_binary is deprecated', DeprecationWarning)
            self.resources.load_bundled()  # the builtin API groups of a K3s cluster, no CRDs
        self.fallback[kmock.action.LIST] << self._serve_list
        self.fallback[kmock.action.WATCH] << kmock.headers(_JSON_HEADERS) << self._serve_watch
        self.fallback[kmock.action.FETCH] << self._serve_fetch
        self.fallback[kmock.action.CREATE] << 201 << self._serve_create
        self.fallback[kmock.method.PUT] << self._serve_replace
        self.fallback[kmock.action.UPDATE] << self._serve_patch
        self.fallback[kmock.action.DELETE] << self._serve_delete
        for name in ('default', 'kube-system', 'kube-public', 'kube-node-lease'):
            self._create(NAMESPACES, None, {'metadata': {'name': name}})

    # Test hooks.

    def end_watch_streams(self) -> None:
        """End every open watch stream now, as an API server restart or a load balancer would."""
        for queue in self._watchers:
            queue.put_nowait(None)

    def compact_history(self) -> None:
        """Forget all changes so far (etcd compaction): resuming a watch from an older version gets 410."""
        self._history.clear()
        self._kept_after = self._revision

    def register_crd(self, crd: Mapping[str, Any]) -> None:
        """Serve a CustomResourceDefinition's resources (with its subresources) in discovery and CRUD."""
        spec = crd['spec']
        names = spec['names']
        for version in spec['versions']:
            if not version.get('served', True):
                continue
            resource = kmock.resource(spec['group'], version['name'], names['plural'])
            subresources = version.get('subresources') or {}
            self.resources[resource] = kmock.ResourceInfo(
                kind=names['kind'],
                singular=names.get('singular') or names['kind'].lower(),
                namespaced=spec['scope'] == 'Namespaced',
                verbs={'create', 'delete', 'deletecollection', 'get', 'list', 'patch', 'update', 'watch'},
                shortnames=names.get('shortNames', []),
                categories=names.get('categories', []),
                subresources={'status'} if subresources.get('status') is not None else set(),  # no scale
            )
            self._custom.add(resource)

    # Serving.

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        if len(self._requests) > self.request_log_limit:
            del self._requests[: len(self._requests) - self.request_log_limit // 2]
        route = _NAMESPACE_URL.fullmatch(raw_request.path)
        if route is None:
            return await super().__call__(raw_request)
        # kmock 0.8's parse_path() takes ".../namespaces/<x>" for a namespace prefix even where Namespaces
        # are the resource (and raises on "/api/v1/namespaces"): parse those URLs here, serve them as usual.
        body = await raw_request.read()
        try:
            data = json.loads(body) if body else None
        except ValueError:
            data = None
        method = kmock.method(raw_request.method)
        request = kmock.Request(
            id=len(self._requests), raw_request=raw_request, url=raw_request.url, method=method,
            params=dict(raw_request.query), headers=dict(raw_request.headers), cookies=dict(raw_request.cookies),
            body=body, text=body.decode(errors='replace'), data=data, resource=NAMESPACES,
            name=route['name'], subresource=route['subresource'],
            action=_action(method, named=route['name'] is not None, watch=raw_request.query.get('watch') == 'true'))
        self._requests.append(request)
        try:
            return await self._handle(request)
        except kmock.KubernetesError as e:
            return await self._render_error(e)

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        if self.token is not None and _header(request, 'Authorization') != f'Bearer {self.token}':
            raise kmock.KubernetesError(401, 'Unauthorized', 'Unauthorized')
        return await super()._handle(request)

    async def _render_error(self, exc: Exception) -> aiohttp.web.StreamResponse:
        if not isinstance(exc, kmock.KubernetesError):
            return await super()._render_error(exc)
        status: JsonDict = {'kind': 'Status', 'apiVersion': 'v1', 'metadata': {}, 'status': 'Failure',
                            'message': exc.message, 'code': exc.status}
        if exc.reason:
            status['reason'] = exc.reason
        if exc.details:
            status['details'] = exc.details
        return aiohttp.web.json_response(status, status=exc.status)

    def _serve_fetch(self, request: kmock.Request) -> JsonDict:
        resource, info = self._resource(request, name_required=True)
        self._subresource(request, info)
        return self._existing(resource, request.namespace, request.name)

    def _serve_list(self, request: kmock.Request) -> JsonDict:
        resource, info = self._resource(request)
        selector = Selector.parse(request)
        matching = [obj for obj in self._stored(resource) if selector.matches(obj)]
        revision, start = self._revision, ''
        if request.params.get('continue'):
            revision, start = _decode_continue(request.params['continue'])
        matching = [obj for obj in matching if _key(obj) > start]
        limit = _int_param(request, 'limit') or len(matching)
        page, rest = matching[:limit], matching[limit:]
        metadata: JsonDict = {'resourceVersion': str(revision)}
        if rest:
            metadata['continue'] = _encode_continue(revision, _key(page[-1]))
            metadata['remainingItemCount'] = len(rest)
        return {'apiVersion': _api_version(resource), 'kind': f'{info.kind}List',
                'metadata': metadata, 'items': page}

    def _serve_watch(self, request: kmock.Request) -> AsyncIterator[Any]:
        resource, _ = self._resource(request)
        selector = Selector.parse(request)
        since = request.params.get('resourceVersion', '')
        timeout = _int_param(request, 'timeoutSeconds')
        initial_events = request.params.get('sendInitialEvents') == 'true'
        if since not in ('', '0') and not since.isdigit():
            raise _bad_request(f'invalid resource version "{since}"')
        if since.isdigit() and int(since) > self._revision:
            raise kmock.KubernetesError(504, 'Timeout', f'Too large resource version: {since}, '
                                                        f'current: {self._revision}')

        # Decide what comes before the live changes and subscribe, with no await in between.
        replay: list[JsonDict]
        if since in ('', '0') or initial_events:  # "start at most recent": the state, as ADDED
            replay = [{'type': 'ADDED', 'object': obj} for obj in self._stored(resource)
                      if selector.matches(obj)]
            if initial_events and request.params.get('allowWatchBookmarks') == 'true':
                replay.append({'type': 'BOOKMARK', 'object': {
                    'kind': self.resources[resource].kind, 'apiVersion': _api_version(resource),
                    'metadata': {'resourceVersion': str(self._revision),
                                 'annotations': {'k8s.io/initial-events-end': 'true'}}}})
        elif int(since) < self._kept_after:
            # The watch cache answers a too old version in the stream, not with an HTTP error.
            gone = {'kind': 'Status', 'apiVersion': 'v1', 'metadata': {}, 'status': 'Failure',
                    'message': f'too old resource version: {since} ({self._kept_after})',
                    'reason': 'Expired', 'code': 410}
            return _once({'type': 'ERROR', 'object': gone})
        else:
            replay = [event for change in self._history if change.revision > int(since)
                      if (event := selector.translate(change, resource)) is not None]
        queue: asyncio.Queue[Change | None] = asyncio.Queue()
        self._watchers.add(queue)
        return self._stream(queue, replay, resource, selector, lifetime=timeout)

    async def _stream(self, queue: asyncio.Queue[Change | None], replay: list[JsonDict],
                      resource: kmock.resource, selector: 'Selector',
                      lifetime: int | None) -> AsyncIterator[Any]:
        deadline = None if lifetime is None else asyncio.get_running_loop().time() + lifetime
        try:
            yield b''  # send the headers now: the client waits for them before it reads any event
            for event in replay:
                yield event
            while True:
                remaining = None if deadline is None else deadline - asyncio.get_running_loop().time()
                try:
                    change = await asyncio.wait_for(queue.get(), remaining)
                except TimeoutError:
                    return
                if change is None:
                    return
                if (live := selector.translate(change, resource)) is not None:
                    yield live
        finally:
            self._watchers.discard(queue)

    def _serve_create(self, request: kmock.Request) -> JsonDict:
        resource, info = self._resource(request, named=False)
        body = _body(request)
        return self._create(resource, self._namespace(request, info, _metadata(body)), body)

    def _create(self, resource: kmock.resource, namespace: str | None, body: JsonDict) -> JsonDict:
        info = self.resources[resource]
        metadata = _metadata(body)
        if metadata.get('resourceVersion'):
            raise kmock.KubernetesError(500, None,
                                        'resourceVersion should not be set on objects to be created')
        if not metadata.get('name'):
            if not metadata.get('generateName'):
                raise _invalid(resource, info, '', 'metadata.name',
                               'Required value: name or generateName is required')
            suffix = ''.join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(5))
            metadata['name'] = metadata['generateName'] + suffix
        name = metadata['name']
        if self._current(resource, namespace, name) is not None:
            message = f'{_qualified(resource)} "{name}" already exists'
            raise kmock.KubernetesError(409, 'AlreadyExists', message, _details(resource, name))
        for field in SYSTEM_FIELDS:
            metadata.pop(field, None)
        metadata.update(uid=str(uuid.uuid4()), creationTimestamp=_now())
        if namespace is not None:
            metadata['namespace'] = namespace
        if resource in self._custom:
            metadata['generation'] = 1
        if 'status' in info.subresources:
            body.pop('status', None)  # the main resource cannot set status
        if resource == NAMESPACES:
            body.update(spec={'finalizers': ['kubernetes']}, status={'phase': 'Active'})
        body.update(apiVersion=_api_version(resource), kind=info.kind)
        created = self._commit(resource, 'ADDED', body, previous=None)
        if resource == CRD_RESOURCE:
            self._establish(created)
        return created

    def _serve_replace(self, request: kmock.Request) -> JsonDict:
        resource, info = self._resource(request, name_required=True)
        status_only = self._subresource(request, info)
        current = self._existing(resource, request.namespace, request.name)
        candidate = _body(request)
        _metadata(candidate).setdefault('name', request.name)
        # For CRs, an update without resourceVersion is refused (AllowUnconditionalUpdate() is false).
        return self._update(resource, info, current, candidate, status_only=status_only,
                            unconditional=resource not in self._custom)

    def _serve_patch(self, request: kmock.Request) -> JsonDict:
        resource, info = self._resource(request, name_required=True)
        status_only = self._subresource(request, info)
        current = self._existing(resource, request.namespace, request.name)
        content_type = (_header(request, 'Content-Type') or '').split(';')[0].strip()
        candidate: Any
        if content_type == 'application/apply-patch+yaml':
            raise kmock.KubernetesError(415, 'UnsupportedMediaType', 'server-side apply is not emulated')
        if content_type == 'application/json-patch+json':
            if not isinstance(request.data, list):
                raise _bad_request('json: cannot unmarshal object into Go value of type jsonpatch.Patch')
            try:
                candidate = jsonpatch.apply_patch(current, request.data)
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as e:
                raise kmock.KubernetesError(422, 'Invalid', str(e)) from e
        elif content_type == 'application/merge-patch+json' or (
                content_type == 'application/strategic-merge-patch+json' and resource not in self._custom):
            # Built-ins accept strategic merge; its list-merge keys are not emulated (plain merge).
            candidate = _merge_patch(copy.deepcopy(current), _body(request))
        else:
            raise kmock.KubernetesError(415, 'UnsupportedMediaType', (
                'the body of the request was in an unknown format - accepted media types include: '
                + (CR_PATCH_TYPES if resource in self._custom else
                   'application/json-patch+json, application/merge-patch+json, '
                   'application/apply-patch+yaml, application/strategic-merge-patch+json')))
        if not isinstance(candidate, dict):
            raise _bad_request('the patched object is not a JSON object')
        # A patch is conditional only if it sets a resourceVersion itself.
        if not _metadata(candidate).get('resourceVersion'):
            candidate['metadata']['resourceVersion'] = current['metadata']['resourceVersion']
        return self._update(resource, info, current, candidate, status_only=status_only, unconditional=True)

    def _serve_delete(self, request: kmock.Request) -> JsonDict:
        resource, _ = self._resource(request, name_required=True)
        current = self._existing(resource, request.namespace, request.name)
        options = request.data if isinstance(request.data, dict) else {}
        preconditions = options.get('preconditions') or {}
        for field in ('uid', 'resourceVersion'):
            expected, actual = preconditions.get(field), current['metadata'][field]
            if expected is not None and expected != actual:
                what = 'UID' if field == 'uid' else 'ResourceVersion'
                raise _conflict(resource, current['metadata']['name'], f'Precondition failed: {what} in '
                                f'precondition: {expected}, {what} in object meta: {actual}')
        metadata = current['metadata']
        if metadata.get('finalizers'):
            if metadata.get('deletionTimestamp'):
                return current
            # registry/generic/registry/store.go, markAsDeleting(): the generation moves too.
            marked = copy.deepcopy(current)
            marked['metadata'].update(deletionTimestamp=_now(), deletionGracePeriodSeconds=0)
            if 'generation' in marked['metadata']:
                marked['metadata']['generation'] += 1
            return self._commit(resource, 'MODIFIED', marked, previous=current)
        self._remove(resource, current)
        return {'kind': 'Status', 'apiVersion': 'v1', 'metadata': {}, 'status': 'Success',
                'details': {**_details(resource, metadata['name']), 'uid': metadata['uid']}}

    # The semantics of writes.

    def _update(self, resource: kmock.resource, info: kmock.ResourceInfo, current: JsonDict,
                candidate: JsonDict, *, status_only: bool, unconditional: bool) -> JsonDict:
        name = current['metadata']['name']
        metadata = _metadata(candidate)
        if metadata.get('name', name) != name:
            raise _bad_request(f'the name of the object ({metadata["name"]}) does not match '
                               f'the name on the URL ({name})')
        namespace = current['metadata'].get('namespace')
        if metadata.get('namespace', namespace) != namespace:
            raise _bad_request('the namespace of the provided object does not match the namespace sent on '
                               'the request')
        given_version = metadata.get('resourceVersion') or ''
        if not given_version and not unconditional:
            raise _invalid(resource, info, name, 'metadata.resourceVersion',
                           'Invalid value: 0x0: must be specified for an update')
        if given_version and given_version != current['metadata']['resourceVersion']:
            raise _conflict(resource, name, OPTIMISTIC_LOCK)

        if status_only:  # status_strategy.go: the old object with the new status, nothing else
            updated = copy.deepcopy(current)
            updated.pop('status', None)
            if 'status' in candidate:
                updated['status'] = candidate['status']
        else:
            updated = candidate
            uid = metadata.get('uid')
            if uid and uid != current['metadata']['uid']:
                raise _invalid(resource, info, name, 'metadata.uid',
                               f'Invalid value: "{uid}": field is immutable')
            for field in SYSTEM_FIELDS:
                metadata.pop(field, None)
                if field in current['metadata']:
                    metadata[field] = current['metadata'][field]
            metadata.update(name=name, resourceVersion=current['metadata']['resourceVersion'])
            if namespace is not None:
                metadata['namespace'] = namespace
            updated.update(apiVersion=current['apiVersion'], kind=current['kind'])
            if 'status' in info.subresources:  # the main resource cannot change status
                updated.pop('status', None)
                if 'status' in current:
                    updated['status'] = current['status']
            if metadata.get('deletionTimestamp'):
                before = current['metadata'].get('finalizers', [])
                added = [f for f in metadata.get('finalizers', []) if f not in before]
                if added:
                    raise _invalid(resource, info, name, 'metadata.finalizers', (
                        'Forbidden: no new finalizers can be added if the object is being deleted, '
                        f'found new finalizers []string{{{", ".join(json.dumps(f) for f in added)}}}'))
            # customresource strategy: any change outside metadata moves the generation.
            if resource in self._custom and _without_metadata(updated) != _without_metadata(current):
                metadata['generation'] = current['metadata']['generation'] + 1

        if updated == current:
            return current  # etcd is not written when nothing changed: no new resourceVersion, no event
        if updated['metadata'].get('deletionTimestamp') and not updated['metadata'].get('finalizers'):
            # store.go, deleteWithoutFinalizers(): "clients are expecting an updated object if a PUT
            # succeeded", so it answers the update, at the deletion's resourceVersion.
            removed = self._remove(resource, current)
            updated['metadata']['resourceVersion'] = removed['metadata']['resourceVersion']
            return updated
        return self._commit(resource, 'MODIFIED', updated, previous=current)

    def _remove(self, resource: kmock.resource, current: JsonDict) -> JsonDict:
        # The DELETED event carries the last stored state at the deletion's revision (etcd's prevKV).
        removed = self._commit(resource, 'DELETED', copy.deepcopy(current), previous=current)
        if resource == CRD_RESOURCE:
            self._unregister_crd(removed)
        return removed

    def _commit(self, resource: kmock.resource, event_type: EventType, obj: JsonDict,
                previous: JsonDict | None) -> JsonDict:
        self._revision += 1
        obj['metadata']['resourceVersion'] = str(self._revision)
        key = (resource, obj['metadata'].get('namespace'), obj['metadata']['name'])
        if event_type == 'DELETED':
            self.objects[key].delete()
        elif key in self.objects:
            self.objects[key].history.append(copy.deepcopy(obj))
        else:
            self.objects[key] = copy.deepcopy(obj)
        change = Change(self._revision, resource, event_type, copy.deepcopy(obj), previous)
        if len(self._history) >= self.history_limit:
            self._kept_after = self._history.popleft().revision
        self._history.append(change)
        for queue in self._watchers:
            queue.put_nowait(change)
        return obj

    def _establish(self, crd: JsonDict) -> None:
        """Do what apiextensions' controllers do for a new CRD: serve it and report it Established."""
        self.register_crd(crd)
        now = _now()
        established = copy.deepcopy(crd)
        established['status'] = {
            'acceptedNames': crd['spec']['names'],
            'storedVersions': [v['name'] for v in crd['spec']['versions'] if v.get('storage')],
            'conditions': [
                {'type': 'NamesAccepted', 'status': 'True', 'reason': 'NoConflicts',
                 'message': 'no conflicts found', 'lastTransitionTime': now},
                {'type': 'Established', 'status': 'True', 'reason': 'InitialNamesAccepted',
                 'message': 'the initial names have been accepted', 'lastTransitionTime': now},
            ],
        }
        self._commit(CRD_RESOURCE, 'MODIFIED', established, previous=crd)

    def _unregister_crd(self, crd: JsonDict) -> None:
        spec = crd['spec']
        for version in spec['versions']:
            resource = kmock.resource(spec['group'], version['name'], spec['names']['plural'])
            for obj in list(self._stored(resource)):  # its objects go with it
                self._remove(resource, obj)
            self.resources.pop(resource, None)
            self._custom.discard(resource)

    # Reading the request and the store.

    def _resource(self, request: kmock.Request, *, named: bool | None = None,
                  name_required: bool = False) -> tuple[kmock.resource, kmock.ResourceInfo]:
        resource = request.resource
        if (resource is None or resource.plural is None or resource not in self.resources
                or (name_required and not request.name) or (named is False and request.name)):
            raise kmock.KubernetesError(404, 'NotFound', 'the server could not find the requested resource')
        info = self.resources[resource]
        if not info.namespaced and request.namespace is not None:
            raise kmock.KubernetesError(404, 'NotFound', 'the server could not find the requested resource')
        return resource, info

    def _subresource(self, request: kmock.Request, info: kmock.ResourceInfo) -> bool:
        """Whether the request addresses the status subresource (other subresources are not emulated)."""
        if request.subresource is None:
            return False
        if request.subresource == 'status' and 'status' in info.subresources:
            return True
        raise kmock.KubernetesError(404, 'NotFound', 'the server could not find the requested resource')

    def _namespace(self, request: kmock.Request, info: kmock.ResourceInfo, metadata: JsonDict) -> str | None:
        if not info.namespaced:
            metadata.pop('namespace', None)
            return None
        if request.namespace is None:
            raise kmock.KubernetesError(404, 'NotFound', 'the server could not find the requested resource')
        if metadata.get('namespace', request.namespace) != request.namespace:
            raise _bad_request('the namespace of the provided object does not match the namespace sent on '
                               'the request')
        if self._current(NAMESPACES, None, request.namespace) is None:  # the NamespaceLifecycle admission
            raise kmock.KubernetesError(404, 'NotFound', f'namespaces "{request.namespace}" not found',
                                        _details(NAMESPACES, request.namespace))
        return request.namespace

    def _current(self, resource: kmock.resource, namespace: str | None, name: str | None) -> JsonDict | None:
        key = (resource, namespace, name or '')
        if key not in self.objects or self.objects[key].deleted:
            return None
        return copy.deepcopy(self.objects[key].raw)

    def _existing(self, resource: kmock.resource, namespace: str | None, name: str | None) -> JsonDict:
        current = self._current(resource, namespace, name)
        if current is None:
            raise kmock.KubernetesError(404, 'NotFound', f'{_qualified(resource)} "{name}" not found',
                                        _details(resource, name or ''))
        return current

    def _stored(self, resource: kmock.resource) -> Iterator[JsonDict]:
        """Current objects of a resource in etcd's order (by namespace, then name)."""
        keys = sorted((key for key, obj in self.objects.items() if key[0] == resource and not obj.deleted),
                      key=lambda key: (key[1] or '', key[2]))
        for key in keys:
            yield copy.deepcopy(self.objects[key].raw)


# A small CRD of the tests' own, for the API's semantics apart from the project's resources.
WIDGETS = kube.Resource('test.kubearq.dev', 'v1alpha1', 'widgets')
WIDGET_CRD: JsonDict = {
    'apiVersion': 'apiextensions.k8s.io/v1',
    'kind': 'CustomResourceDefinition',
    'metadata': {'name': 'widgets.test.kubearq.dev'},
    'spec': {
        'group': 'test.kubearq.dev',
        'scope': 'Namespaced',
        'names': {'plural': 'widgets', 'singular': 'widget', 'kind': 'Widget', 'shortNames': ['wdg']},
        'versions': [{
            'name': 'v1alpha1', 'served': True, 'storage': True,
            'subresources': {'status': {}},
            'schema': {'openAPIV3Schema': {'type': 'object', 'properties': {
                'spec': {'type': 'object', 'x-kubernetes-preserve-unknown-fields': True},
                'status': {'type': 'object', 'x-kubernetes-preserve-unknown-fields': True},
            }}},
        }],
    },
}


@dataclasses.dataclass(frozen=True)
class LabelRequirement:
    key: str
    operator: str  # exists, !, =, !=, in, notin
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        value = labels.get(self.key)
        match self.operator:
            case 'exists':
                return value is not None
            case '!':
                return value is None
            case '=' | 'in':
                return value in self.values
            case _:  # != and notin
                return value not in self.values


_LABEL_REQUIREMENT = re.compile(r'''\s*(?:
    !\s*(?P<absent>[\w./-]+)
  | (?P<key>[\w./-]+)(?:
        \s*(?P<op>==|=|!=)\s*(?P<value>[\w.-]*)
      | \s+(?P<setop>in|notin)\s*\((?P<values>[^)]*)\)
    )?
)\s*''', re.VERBOSE)
_FIELD_REQUIREMENT = re.compile(r'\s*(?P<field>[\w.]+)\s*(?P<op>==|=|!=)\s*(?P<value>[^,]*?)\s*')


@dataclasses.dataclass(frozen=True)
class Selector:
    """Which objects a list or watch request sees: namespace, name, labelSelector, fieldSelector."""

    namespace: str | None = None
    labels: tuple[LabelRequirement, ...] = ()
    fields: tuple[tuple[str, str, bool], ...] = ()  # (field, value, equal)

    @classmethod
    def parse(cls, request: kmock.Request) -> 'Selector':
        labels = tuple(_parse_label_requirement(text)
                       for text in _split_outside_parentheses(request.params.get('labelSelector', '')))
        fields: list[tuple[str, str, bool]] = []
        for text in filter(None, request.params.get('fieldSelector', '').split(',')):
            match = _FIELD_REQUIREMENT.fullmatch(text)
            if match is None:
                raise _bad_request(f'invalid selector: {text!r}')
            if match['field'] not in ('metadata.name', 'metadata.namespace'):
                raise _bad_request(f'field label not supported: {match["field"]}')
            fields.append((match['field'], match['value'], match['op'] != '!='))
        if request.name is not None:  # a watch on one object's URL
            fields.append(('metadata.name', request.name, True))
        return cls(namespace=request.namespace, labels=labels, fields=tuple(fields))

    def matches(self, obj: Mapping[str, Any]) -> bool:
        metadata = obj.get('metadata') or {}
        if self.namespace is not None and metadata.get('namespace') != self.namespace:
            return False
        labels = metadata.get('labels') or {}
        return (all(requirement.matches(labels) for requirement in self.labels)
                and all((metadata.get(field.removeprefix('metadata.'), '') == value) == equal
                        for field, value, equal in self.fields))

    def translate(self, change: Change, resource: kmock.resource) -> JsonDict | None:
        """The event a watcher with this selector gets for a change, if any (selectors are evaluated
        on the old and new object: an object that stops matching is DELETED for this watcher)."""
        if change.resource != resource:
            return None
        now = self.matches(change.object)
        before = change.previous is not None and self.matches(change.previous)
        event_type: str | None = change.type if now else None
        if change.type == 'MODIFIED':
            event_type = 'MODIFIED' if now and before else 'ADDED' if now else 'DELETED' if before else None
        return None if event_type is None else {'type': event_type, 'object': change.object}


def _split_outside_parentheses(text: str) -> Iterator[str]:
    depth, start = 0, 0
    for index, char in enumerate(text + ','):
        depth += {'(': 1, ')': -1}.get(char, 0)
        if char == ',' and depth == 0:
            if text[start:index].strip():
                yield text[start:index]
            start = index + 1


def _parse_label_requirement(text: str) -> LabelRequirement:
    match = _LABEL_REQUIREMENT.fullmatch(text)
    if match is None:
        raise _bad_request(f'unable to parse requirement: {text!r}')
    if match['absent']:
        return LabelRequirement(match['absent'], '!')
    if match['op']:
        operator = '!=' if match['op'] == '!=' else '='
        return LabelRequirement(match['key'], operator, frozenset([match['value']]))
    if match['setop']:
        values = frozenset(value.strip() for value in match['values'].split(','))
        return LabelRequirement(match['key'], match['setop'], values)
    return LabelRequirement(match['key'], 'exists')


def _action(method: kmock.method, *, named: bool, watch: bool) -> kmock.action | None:
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


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    merged = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = _merge_patch(merged.get(key), value)
    return merged


def _without_metadata(obj: Mapping[str, Any]) -> JsonDict:
    return {key: value for key, value in obj.items() if key != 'metadata'}


def _body(request: kmock.Request) -> JsonDict:
    if not isinstance(request.data, dict):
        raise _bad_request('the request body is not a JSON object')
    return copy.deepcopy(request.data)


def _metadata(obj: JsonDict) -> JsonDict:
    metadata = obj.setdefault('metadata', {})
    if not isinstance(metadata, dict):
        raise _bad_request('metadata must be a JSON object')
    return metadata


def _header(request: kmock.Request, name: str) -> str | None:
    return next((value for key, value in request.headers.items() if key.lower() == name.lower()), None)


def _int_param(request: kmock.Request, name: str) -> int | None:
    text = request.params.get(name)
    if text is None:
        return None
    if not text.isdigit():
        raise _bad_request(f'invalid {name}: {text!r}')
    return int(text)


def _encode_continue(revision: int, start: str) -> str:
    return base64.urlsafe_b64encode(json.dumps({'rv': revision, 'start': start}).encode()).decode()


def _decode_continue(token: str) -> tuple[int, str]:
    try:
        decoded = json.loads(base64.urlsafe_b64decode(token))
        return int(decoded['rv']), str(decoded['start'])
    except (ValueError, KeyError, TypeError) as e:
        raise _bad_request(f'continue key is not valid: {e}') from e


def _key(obj: Mapping[str, Any]) -> str:
    return f'{obj["metadata"].get("namespace", "")}/{obj["metadata"]["name"]}'


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%dT%H:%M:%SZ')


def _api_version(resource: kmock.resource) -> str:
    return f'{resource.group}/{resource.version}' if resource.group else str(resource.version)


def _qualified(resource: kmock.resource) -> str:
    return f'{resource.plural}.{resource.group}' if resource.group else str(resource.plural)


def _details(resource: kmock.resource, name: str) -> JsonDict:
    details: JsonDict = {'name': name, 'kind': resource.plural}  # sic: kind is the plural here
    if resource.group:
        details['group'] = resource.group
    return details


def _conflict(resource: kmock.resource, name: str, why: str) -> kmock.KubernetesError:
    return kmock.KubernetesError(409, 'Conflict', f'Operation cannot be fulfilled on {_qualified(resource)} '
                                                  f'"{name}": {why}', _details(resource, name))


def _invalid(resource: kmock.resource, info: kmock.ResourceInfo, name: str, field: str,
             problem: str) -> kmock.KubernetesError:
    kind = f'{info.kind}.{resource.group}' if resource.group else str(info.kind)
    reason = {'Invalid': 'FieldValueInvalid', 'Required': 'FieldValueRequired',
              'Forbidden': 'FieldValueForbidden'}[problem.split(' ')[0].rstrip(':')]
    details = {'name': name, 'group': resource.group, 'kind': info.kind,
               'causes': [{'reason': reason, 'message': problem, 'field': field}]}
    return kmock.KubernetesError(422, 'Invalid', f'{kind} "{name}" is invalid: {field}: {problem}', details)


def _bad_request(message: str) -> kmock.KubernetesError:
    return kmock.KubernetesError(400, 'BadRequest', message)


async def _once(event: JsonDict) -> AsyncIterator[Any]:
    yield event


# Running it, and the fixture.


@contextlib.asynccontextmanager
async def running_emulator(*, token: str | None = None) -> AsyncIterator[tuple[ApiServerEmulator, str]]:
    """Serve an emulator on a free loopback port; yields it and its base URL."""
    emulator = ApiServerEmulator(token=token)
    async with emulator, kmock.Server(emulator, host='127.0.0.1') as server:
        try:
            yield emulator, f'http://{server.host}:{server.port}'
        finally:
            emulator.end_watch_streams()  # or the server's shutdown waits for them


def project_crds() -> list[JsonDict]:
    """The CustomResourceDefinitions generated into `crds/`."""
    crds: list[JsonDict] = []
    for path in sorted(PROJECT_CRDS_DIR.glob('*.yaml')):
        crds += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return crds


def write_kubeconfig(path: pathlib.Path, *, server: str, token: str, namespace: str) -> pathlib.Path:
    path.write_text(yaml.safe_dump({
        'apiVersion': 'v1', 'kind': 'Config', 'current-context': 'kubearq-test',
        'clusters': [{'name': 'kubearq-test', 'cluster': {'server': server}}],
        'users': [{'name': 'kubearq-test', 'user': {'token': token}}],
        'contexts': [{'name': 'kubearq-test', 'context': {
            'cluster': 'kubearq-test', 'user': 'kubearq-test', 'namespace': namespace}}],
    }))
    return path


@dataclasses.dataclass
class KubernetesUnderTest:
    """What a test gets from `k8s`: where the API is, how to log in to it, a client, the emulator's hooks."""

    server: str  # base URL
    kubeconfig: pathlib.Path
    connection: kopf.ConnectionInfo  # for kopf's `on.login` and `kube.KubeApi`
    api: kube.KubeApi
    namespace: str  # exists for this test only (on a real cluster, deleted after it)
    emulator: ApiServerEmulator | None  # None on a real cluster

    def require_emulator(self) -> ApiServerEmulator:
        """The emulator, for what only it can do; on a real cluster, the test is skipped here."""
        if self.emulator is None:
            pytest.skip('needs the API emulator (its test hooks); a real cluster (KUBECONFIG) has none')
        return self.emulator

    def end_watch_streams(self) -> None:
        self.require_emulator().end_watch_streams()

    def compact_history(self) -> None:
        self.require_emulator().compact_history()

    async def install_crds(self, crds: Iterable[Mapping[str, Any]]) -> None:
        """Create CRDs unless present, and wait until the API serves them (Established)."""
        for crd in crds:
            with contextlib.suppress(kube.ConflictError):
                await self.api.create(CRDS, crd, timeout=API_TIMEOUT)
        async with asyncio.timeout(API_TIMEOUT):
            for crd in crds:
                await self._until_established(crd['metadata']['name'])

    async def _until_established(self, name: str) -> None:
        # A real API server establishes a CRD a moment after creating it: watch for that.
        selector = f'metadata.name={name}'
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
    assert result, f'not true after {within}s: {result!r}'
    return result


def _established(crd: kube.KubeObject) -> bool:
    conditions = crd.get('status', {}).get('conditions') or []
    return any(isinstance(c, dict) and c.get('type') == 'Established' and c.get('status') == 'True'
               for c in (conditions if isinstance(conditions, list) else []))


@pytest.fixture
async def k8s(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> AsyncIterator[KubernetesUnderTest]:
    """The Kubernetes API with the project's CRDs and a namespace of the test's own: the emulator, or the
    cluster of `$KUBECONFIG` (tests marked `cluster` need the latter)."""
    namespace = f'kubearq-test-{secrets.token_hex(4)}'
    if os.environ.get('KUBECONFIG'):
        connection = kopf.login_via_client(logger=logger, settings=kopf.OperatorSettings())
        assert connection is not None, 'KUBECONFIG is set, but the kubernetes client cannot log in with it'
        connection = dataclasses.replace(connection, default_namespace=namespace)
        kubeconfig = pathlib.Path(os.environ['KUBECONFIG'].split(os.pathsep)[0])
        async with kube.KubeApi(connection) as api, _prepared(KubernetesUnderTest(
                server=connection.server, kubeconfig=kubeconfig, connection=connection, api=api,
                namespace=namespace, emulator=None)) as cluster:
            yield cluster
        return
    if request.node.get_closest_marker('cluster'):
        pytest.skip('needs a real Kubernetes API: set KUBECONFIG')
    token = secrets.token_urlsafe(16)
    async with running_emulator(token=token) as (emulator, server):
        connection = kopf.ConnectionInfo(server=server, token=token, default_namespace=namespace)
        kubeconfig = write_kubeconfig(tmp_path / 'kubeconfig', server=server, token=token, namespace=namespace)
        async with kube.KubeApi(connection) as api, _prepared(KubernetesUnderTest(
                server=server, kubeconfig=kubeconfig, connection=connection, api=api,
                namespace=namespace, emulator=emulator)) as cluster:
            yield cluster


@contextlib.asynccontextmanager
async def _prepared(cluster: KubernetesUnderTest) -> AsyncIterator[KubernetesUnderTest]:
    namespaces = kube.Resource('', 'v1', 'namespaces')
    await cluster.install_crds(project_crds())
    await cluster.api.create(namespaces, {'metadata': {'name': cluster.namespace}}, timeout=API_TIMEOUT)
    try:
        yield cluster
    finally:
        await cluster.api.delete(namespaces, cluster.namespace, timeout=API_TIMEOUT)

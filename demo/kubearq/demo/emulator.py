"""
The Kubernetes API without a cluster: KMock taught kube-apiserver's semantics, served to the tests (their
fixture `k8s`, `tests/kubernetes.py`) and to the demo.

KMock 0.8's `KubernetesEmulator` stores objects as merged dicts: no uid, resourceVersion, generation or
creationTimestamp, no optimistic concurrency, no status subresource, no PUT, every PATCH a deep merge,
watches without resourceVersion, history or timeout, lists without selectors, no schema. `ApiServerEmulator`
keeps KMock's scaffold (discovery, `Status` errors, the aiohttp server, the request log, `objects`) and
replaces the stateful part with what kube-apiserver does, citing it where the rule is not obvious; custom
objects go through their CRD's schema as on the server (`kubearq.demo.emulator_schema`). Where the emulator
and a real kube-apiserver disagree, the server is right: the contract tests (`tests/test_emulator*.py`) run
on both.
"""

import asyncio
import bisect
import collections
import contextlib
import contextvars
import copy
import json
import re
import secrets
import string
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any, Literal, cast

import aiohttp.web
import attrs
import jsonpatch
import kmock

from kubearq.demo import emulator_requests as wire
from kubearq.demo.emulator_schema import CustomResourceSchema, invalid_message
from kubearq.demo.emulator_selectors import Change, EventType, JsonDict, Selector, bad_request

FieldValidation = Literal['Ignore', 'Warn', 'Strict']
CRD_RESOURCE = kmock.resource('apiextensions.k8s.io', 'v1', 'customresourcedefinitions')
NAMESPACES = kmock.resource('', 'v1', 'namespaces')
# k8s.io/apimachinery/pkg/api/errors: OptimisticLockErrorMsg.
OPTIMISTIC_LOCK = ('the object has been modified; '
                   'please apply your changes to the latest version and try again')
# A CR accepts no strategic merge patch: apiextensions-apiserver serves only these.
CR_PATCH_TYPES = 'application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml'
SYSTEM_FIELDS = ('uid', 'creationTimestamp', 'deletionTimestamp', 'deletionGracePeriodSeconds', 'generation')
_NAMESPACE_URL = re.compile(r'/api/v1/namespaces(?:/(?P<name>[^/]+)(?:/(?P<subresource>status|finalize))?)?/?')
_JSON_HEADERS = {'Content-Type': 'application/json'}
_WARNINGS: contextvars.ContextVar[list[str]] = contextvars.ContextVar('warnings')  # the request's `Warning`s


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
    _schemas: dict[kmock.resource, CustomResourceSchema] = attrs.field(factory=dict, init=False)
    # Each resource's current keys in etcd's order, for LIST pages (dropped when an object comes or goes).
    _order: dict[kmock.resource, list[tuple[str | None, str]]] = attrs.field(factory=dict, init=False)

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

    async def _serve_version(self, request: Any) -> Any:
        """Discovery of a group version, its subresources as kube-apiserver lists them: no short names or
        categories (kubectl's `get <category>` would try to list `<plural>/status`), verbs get/patch/update."""
        listing = cast(JsonDict, await super()._serve_version(request))
        for entry in listing['resources']:
            if '/' in entry['name']:
                entry.update(shortNames=[], categories=[], verbs=['get', 'patch', 'update'])
        return listing

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
            schema = (version.get('schema') or {}).get('openAPIV3Schema')
            if schema is not None:
                self._schemas[resource] = CustomResourceSchema(schema)

    # Serving.

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        warnings_of_request = _WARNINGS.set([])
        try:
            response = await self._route(raw_request)
            for warning in _WARNINGS.get():
                response.headers.add('Warning', f'299 - {json.dumps(warning)}')
            return response
        finally:
            _WARNINGS.reset(warnings_of_request)

    async def _route(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
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
            action=wire.action(method, named=route['name'] is not None, watch=raw_request.query.get('watch') == 'true'))
        self._requests.append(request)
        try:
            return await self._handle(request)
        except kmock.KubernetesError as e:
            return await self._render_error(e)

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        if self.token is not None and wire.header(request, 'Authorization') != f'Bearer {self.token}':
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
        revision, start = self._revision, ''
        if request.params.get('continue'):
            revision, start = wire.decode_continue(request.params['continue'])
        # Only the page is read and copied: copying every object for each page made a paged LIST of N objects
        # cost O(N²) (100,000 SyncSchedules in pages of 500: 20 million copies, a LIST that never ended).
        keys = self._ordered(resource)
        lower, upper = 0, len(keys)
        if selector.namespace is not None:  # one namespace: a range of etcd's keys
            lower = bisect.bisect_left(keys, (selector.namespace, ''), key=_etcd_order)
            upper = bisect.bisect_left(keys, (selector.namespace + '\x00', ''), key=_etcd_order)
        if start:
            lower = max(lower, bisect.bisect_right(keys, _order_key(start), key=_etcd_order))
        limit = wire.int_param(request, 'limit') or None
        page: list[JsonDict] = []
        rest, position = 0, lower
        for position in range(lower, upper):
            raw = self.objects[(resource, *keys[position])].raw
            if not selector.matches(raw):
                continue
            if limit is not None and len(page) == limit:
                rest += 1
                if not selector.labels and not selector.fields:  # every key left in the range matches
                    rest = upper - position
                    break
                continue
            page.append(copy.deepcopy(raw))
        metadata: JsonDict = {'resourceVersion': str(revision)}
        if rest > 0:
            metadata['continue'] = wire.encode_continue(revision, wire.key(page[-1]))
            metadata['remainingItemCount'] = rest
        return {'apiVersion': wire.api_version(resource), 'kind': f'{info.kind}List',
                'metadata': metadata, 'items': page}

    def _serve_watch(self, request: kmock.Request) -> AsyncIterator[Any]:
        resource, _ = self._resource(request)
        selector = Selector.parse(request)
        since = request.params.get('resourceVersion', '')
        timeout = wire.int_param(request, 'timeoutSeconds')
        initial_events = request.params.get('sendInitialEvents') == 'true'
        if since not in ('', '0') and not since.isdigit():
            raise bad_request(f'invalid resource version "{since}"')
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
                    'kind': self.resources[resource].kind, 'apiVersion': wire.api_version(resource),
                    'metadata': {'resourceVersion': str(self._revision),
                                 'annotations': {'k8s.io/initial-events-end': 'true'}}}})
        elif int(since) < self._kept_after:
            # The watch cache answers a too old version in the stream, not with an HTTP error.
            gone = {'kind': 'Status', 'apiVersion': 'v1', 'metadata': {}, 'status': 'Failure',
                    'message': f'too old resource version: {since} ({self._kept_after})',
                    'reason': 'Expired', 'code': 410}
            return wire.once({'type': 'ERROR', 'object': gone})
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
        body = self._decode(request, resource, info, wire.body(request))
        return self._create(resource, self._namespace(request, info, wire.metadata(body)), body)

    def _create(self, resource: kmock.resource, namespace: str | None, body: JsonDict) -> JsonDict:
        info = self.resources[resource]
        metadata = wire.metadata(body)
        if metadata.get('resourceVersion'):
            raise kmock.KubernetesError(500, None,
                                        'resourceVersion should not be set on objects to be created')
        if not metadata.get('name'):
            if not metadata.get('generateName'):
                raise wire.invalid(resource, info, '', 'metadata.name',
                               'Required value: name or generateName is required')
            suffix = ''.join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(5))
            metadata['name'] = metadata['generateName'] + suffix
        name = metadata['name']
        if self._current(resource, namespace, name) is not None:
            message = f'{wire.qualified(resource)} "{name}" already exists'
            raise kmock.KubernetesError(409, 'AlreadyExists', message, wire.details(resource, name))
        for field in SYSTEM_FIELDS:
            metadata.pop(field, None)
        metadata.update(uid=str(uuid.uuid4()), creationTimestamp=wire.now())
        if namespace is not None:
            metadata['namespace'] = namespace
        if resource in self._custom:
            metadata['generation'] = 1
        if 'status' in info.subresources:
            body.pop('status', None)  # the main resource cannot set status
        if resource == NAMESPACES:
            body.update(spec={'finalizers': ['kubernetes']}, status={'phase': 'Active'})
        body.update(apiVersion=wire.api_version(resource), kind=info.kind)
        wire.omit_empty(metadata)
        self._validate(resource, info, body, None)
        created = self._commit(resource, 'ADDED', body, previous=None)
        if resource == CRD_RESOURCE:
            self._establish(created)
        return created

    def _serve_replace(self, request: kmock.Request) -> JsonDict:
        resource, info = self._resource(request, name_required=True)
        status_only = self._subresource(request, info)
        current = self._existing(resource, request.namespace, request.name)
        candidate = self._decode(request, resource, info, wire.body(request))
        wire.metadata(candidate).setdefault('name', request.name)
        # For CRs, an update without resourceVersion is refused (AllowUnconditionalUpdate() is false).
        return self._update(resource, info, current, candidate, status_only=status_only,
                            unconditional=resource not in self._custom)

    def _serve_patch(self, request: kmock.Request) -> JsonDict:
        resource, info = self._resource(request, name_required=True)
        status_only = self._subresource(request, info)
        current = self._existing(resource, request.namespace, request.name)
        content_type = (wire.header(request, 'Content-Type') or '').split(';')[0].strip()
        candidate: Any
        if content_type == 'application/apply-patch+yaml':
            raise kmock.KubernetesError(415, 'UnsupportedMediaType', 'server-side apply is not emulated')
        if content_type == 'application/json-patch+json':
            if not isinstance(request.data, list):
                raise bad_request('json: cannot unmarshal object into Go value of type jsonpatch.Patch')
            try:
                candidate = jsonpatch.apply_patch(current, request.data)
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as e:
                raise kmock.KubernetesError(422, 'Invalid', str(e)) from e
        elif content_type == 'application/merge-patch+json' or (
                content_type == 'application/strategic-merge-patch+json' and resource not in self._custom):
            # Built-ins accept strategic merge; its list-merge keys are not emulated (plain merge).
            candidate = wire.merge_patch(copy.deepcopy(current), wire.body(request))
        else:
            raise kmock.KubernetesError(415, 'UnsupportedMediaType', (
                'the body of the request was in an unknown format - accepted media types include: '
                + (CR_PATCH_TYPES if resource in self._custom else
                   'application/json-patch+json, application/merge-patch+json, '
                   'application/apply-patch+yaml, application/strategic-merge-patch+json')))
        if not isinstance(candidate, dict):
            raise bad_request('the patched object is not a JSON object')
        candidate = self._decode(request, resource, info, candidate, patched=True)
        # A patch is conditional only if it sets a resourceVersion itself.
        if not wire.metadata(candidate).get('resourceVersion'):
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
                raise wire.conflict(resource, current['metadata']['name'], f'Precondition failed: {what} in '
                                f'precondition: {expected}, {what} in object meta: {actual}')
        metadata = current['metadata']
        if metadata.get('finalizers'):
            if metadata.get('deletionTimestamp'):
                return current
            # registry/generic/registry/store.go, markAsDeleting(): the generation moves too.
            marked = copy.deepcopy(current)
            marked['metadata'].update(deletionTimestamp=wire.now(), deletionGracePeriodSeconds=0)
            if 'generation' in marked['metadata']:
                marked['metadata']['generation'] += 1
            return self._commit(resource, 'MODIFIED', marked, previous=current)
        self._remove(resource, current)
        return {'kind': 'Status', 'apiVersion': 'v1', 'metadata': {}, 'status': 'Success',
                'details': {**wire.details(resource, metadata['name']), 'uid': metadata['uid']}}

    # The semantics of writes.

    def _decode(self, request: kmock.Request, resource: kmock.resource, info: kmock.ResourceInfo,
                body: JsonDict, *, patched: bool = False) -> JsonDict:
        """A custom object's body as the server decodes it: of its own kind, unknown fields refused
        (`fieldValidation=Strict`) or pruned with a warning (`Warn`, the default) or quietly (`Ignore`)."""
        schema = self._schemas.get(resource)
        if schema is None:
            return body
        if not patched:
            wire.check_type(request, resource, info, body)
        mode = request.params.get('fieldValidation', 'Warn')
        unknown = schema.unknown_fields(body)
        if unknown and mode == 'Strict':
            found = ', '.join(f'unknown field {json.dumps(path)}' for path in unknown)
            if patched:  # the patched object is decoded again, and refused as the patch's fault
                shown = json.dumps(body, sort_keys=True, separators=(',', ':'))
                raise kmock.KubernetesError(422, 'Invalid', f' "" is invalid: patch: Invalid value: '
                                                            f'{json.dumps(shown)}: strict decoding error: {found}')
            raise bad_request(f'{info.kind} in version "{resource.version}" cannot be handled as a {info.kind}: '
                              f'strict decoding error: {found}')
        if unknown and mode == 'Warn':
            _WARNINGS.get().extend(f'unknown field {json.dumps(path)}' for path in unknown)
        return schema.admit(body)

    def _validate(self, resource: kmock.resource, info: kmock.ResourceInfo, obj: JsonDict,
                  old: JsonDict | None) -> None:
        """Refuse (422) what the CRD's schema and CEL rules refuse, with the server's message and causes."""
        schema = self._schemas.get(resource)
        if schema is None:
            return
        causes = schema.problems(obj, old)
        if causes:
            name = obj['metadata']['name']
            details = {'name': name, 'group': resource.group, 'kind': info.kind,
                       'causes': [cause.as_json() for cause in causes]}
            raise kmock.KubernetesError(422, 'Invalid', invalid_message(f'{info.kind}.{resource.group}', name, causes),
                                        details)

    def _update(self, resource: kmock.resource, info: kmock.ResourceInfo, current: JsonDict,
                candidate: JsonDict, *, status_only: bool, unconditional: bool) -> JsonDict:
        name = current['metadata']['name']
        metadata = wire.metadata(candidate)
        if metadata.get('name', name) != name:
            raise bad_request(f'the name of the object ({metadata["name"]}) does not match '
                               f'the name on the URL ({name})')
        namespace = current['metadata'].get('namespace')
        if metadata.get('namespace', namespace) != namespace:
            raise bad_request('the namespace of the provided object does not match the namespace sent on '
                               'the request')
        given_version = metadata.get('resourceVersion') or ''
        if not given_version and not unconditional:
            raise wire.invalid(resource, info, name, 'metadata.resourceVersion',
                           'Invalid value: 0: must be specified for an update', by_resource=True)
        if given_version and given_version != current['metadata']['resourceVersion']:
            raise wire.conflict(resource, name, OPTIMISTIC_LOCK)

        if status_only:  # status_strategy.go: the old object with the new status, nothing else
            updated = copy.deepcopy(current)
            updated.pop('status', None)
            if 'status' in candidate:
                updated['status'] = candidate['status']
        else:
            updated = candidate
            uid = metadata.get('uid')
            if uid and uid != current['metadata']['uid']:
                raise wire.invalid(resource, info, name, 'metadata.uid',
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
                    raise wire.invalid(resource, info, name, 'metadata.finalizers', (
                        'Forbidden: no new finalizers can be added if the object is being deleted, '
                        f'found new finalizers []string{{{", ".join(json.dumps(f) for f in added)}}}'))
            # customresource strategy: any change outside metadata moves the generation.
            if resource in self._custom and wire.without_metadata(updated) != wire.without_metadata(current):
                metadata['generation'] = current['metadata']['generation'] + 1

        wire.omit_empty(updated['metadata'])
        self._validate(resource, info, updated, current)
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
            self._order.pop(resource, None)
        elif key in self.objects:
            if self.objects[key].deleted:
                self._order.pop(resource, None)
            self.objects[key].history.append(copy.deepcopy(obj))
        else:
            self.objects[key] = copy.deepcopy(obj)
            self._order.pop(resource, None)
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
        now = wire.now()
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
            raise bad_request('the namespace of the provided object does not match the namespace sent on '
                               'the request')
        if self._current(NAMESPACES, None, request.namespace) is None:  # the NamespaceLifecycle admission
            raise kmock.KubernetesError(404, 'NotFound', f'namespaces "{request.namespace}" not found',
                                        wire.details(NAMESPACES, request.namespace))
        return request.namespace

    def _current(self, resource: kmock.resource, namespace: str | None, name: str | None) -> JsonDict | None:
        key = (resource, namespace, name or '')
        if key not in self.objects or self.objects[key].deleted:
            return None
        return copy.deepcopy(self.objects[key].raw)

    def _existing(self, resource: kmock.resource, namespace: str | None, name: str | None) -> JsonDict:
        current = self._current(resource, namespace, name)
        if current is None:
            raise kmock.KubernetesError(404, 'NotFound', f'{wire.qualified(resource)} "{name}" not found',
                                        wire.details(resource, name or ''))
        return current

    def _stored(self, resource: kmock.resource) -> Iterator[JsonDict]:
        """Current objects of a resource in etcd's order (by namespace, then name)."""
        for namespace, name in self._ordered(resource):
            yield copy.deepcopy(self.objects[resource, namespace, name].raw)

    def _ordered(self, resource: kmock.resource) -> list[tuple[str | None, str]]:
        """The (namespace, name) of a resource's current objects in etcd's order, kept until one comes or goes."""
        keys = self._order.get(resource)
        if keys is None:
            keys = self._order[resource] = sorted(
                ((key[1], key[2]) for key, obj in self.objects.items() if key[0] == resource and not obj.deleted),
                key=_etcd_order)
        return keys


def _etcd_order(key: tuple[str | None, str]) -> tuple[str, str]:
    return key[0] or '', key[1]


def _order_key(token_start: str) -> tuple[str, str]:
    """A continue token's `namespace/name` as the (namespace, name) the order sorts by."""
    namespace, _, name = token_start.partition('/')
    return namespace, name


# Running it.


@contextlib.asynccontextmanager
async def running_emulator(*, token: str | None = None) -> AsyncIterator[tuple[ApiServerEmulator, str]]:
    """Serve an emulator on a free loopback port; yields it and its base URL."""
    emulator = ApiServerEmulator(token=token)
    async with emulator, kmock.Server(emulator, host='127.0.0.1') as server:
        try:
            yield emulator, f'http://{server.host}:{server.port}'
        finally:
            emulator.end_watch_streams()  # or the server's shutdown waits for them



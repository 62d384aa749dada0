"""The one thin async adapter to the Kubernetes API, logged in the way kopf is (a `kopf.ConnectionInfo`).

Every call takes a `timeout`: the total time it may take, so that a caller such as leader election can
bound each Lease renewal by its renew deadline, and no call can hang unbounded by omission (hence the
`noqa: ASYNC109`: here a required parameter is the point). Objects travel as JSON dicts, typed loosely.
"""

import asyncio
import builtins
import contextlib
import dataclasses
import email.utils
import json
import time
from collections.abc import AsyncGenerator, Mapping, Sequence
from types import TracebackType
from typing import Literal, NamedTuple, Self, TypedDict, cast

import httpx
import kopf

JsonObject = dict[str, object]


class ObjectMeta(TypedDict, total=False):
    name: str
    generateName: str
    namespace: str
    uid: str
    resourceVersion: str
    generation: int
    creationTimestamp: str
    deletionTimestamp: str
    labels: dict[str, str]
    annotations: dict[str, str]
    finalizers: list[str]
    ownerReferences: list[JsonObject]


class KubeObject(TypedDict, total=False):
    """Any object as the API serves it; fields beyond these stay in the dict, untyped."""

    apiVersion: str
    kind: str
    metadata: ObjectMeta
    spec: JsonObject
    status: JsonObject


WatchEventType = Literal['ADDED', 'MODIFIED', 'DELETED']


class WatchEvent(NamedTuple):
    type: WatchEventType
    object: KubeObject


@dataclasses.dataclass(frozen=True)
class ObjectList:
    items: list[KubeObject]
    resource_version: str  # where a watch continues from without missing or repeating a change


@dataclasses.dataclass(frozen=True)
class Resource:
    """A kind of object as the API addresses it: `Resource('coordination.k8s.io', 'v1', 'leases')`."""

    group: str  # '' for the core API
    version: str
    plural: str

    @property
    def api_version(self) -> str:
        return f'{self.group}/{self.version}' if self.group else self.version

    def path(self, *, namespace: str | None = None, name: str | None = None,
             subresource: str | None = None) -> str:
        parts = ['/api', self.version] if not self.group else ['/apis', self.group, self.version]
        if namespace is not None:
            parts += ['namespaces', namespace]
        parts.append(self.plural)
        if name is not None:
            parts.append(name)
        if subresource is not None:
            parts.append(subresource)
        return '/'.join(parts)


LEASES = Resource('coordination.k8s.io', 'v1', 'leases')
EVENTS = Resource('', 'v1', 'events')


class ApiError(Exception):
    """The API refused a request; `reason` and `message` come from its `Status` object, `retry_after` (seconds)
    from its `Retry-After` header or else the Status's `details.retryAfterSeconds` (None when it asked neither)."""

    def __init__(self, code: int, reason: str, message: str, details: JsonObject | None = None, *,
                 retry_after: float | None = None) -> None:
        super().__init__(f'{code} {reason}: {message}')
        self.code = code
        self.reason = reason
        self.message = message
        self.details: JsonObject = details or {}
        if retry_after is None:
            asked = self.details.get('retryAfterSeconds')
            retry_after = float(asked) if isinstance(asked, int | float) and asked > 0 else None
        self.retry_after = retry_after


class ConflictError(ApiError):
    """409: a stale `resourceVersion` (reason `Conflict`) or an existing name (`AlreadyExists`)."""


class NotFoundError(ApiError):
    """404: no such object (or resource)."""


class GoneError(ApiError):
    """410: the resourceVersion to watch from is older than the API keeps; list again."""


_ERRORS_BY_CODE: dict[int, type[ApiError]] = {404: NotFoundError, 409: ConflictError, 410: GoneError}


def is_transient(error: BaseException) -> bool:
    """A failure the same request may not meet again: a timeout, a broken connection, 429 or a 5xx answer."""
    if isinstance(error, ApiError):
        return error.code == 429 or error.code >= 500
    return isinstance(error, (TimeoutError, httpx.TransportError))


def asks_to_slow_down(error: BaseException) -> bool:
    """The API server throttled the request: 429 (API Priority and Fairness, max-in-flight), or any answer that
    carries a Retry-After. A client should send less after it, not try the same again at once."""
    return isinstance(error, ApiError) and (error.code == 429 or error.retry_after is not None)


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds a `Retry-After` header asks for (RFC 9110: delay-seconds or an HTTP-date); None if absent/unreadable."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            moment = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = moment.timestamp() - (time.time() if now is None else now)
    return max(0.0, seconds) if seconds == seconds else None  # NaN is no answer


_MERGE_PATCH = 'application/merge-patch+json'
_JSON_PATCH = 'application/json-patch+json'


class KubeApi:
    """An HTTP client for the API server of one `kopf.ConnectionInfo`; close it with `aclose()`."""

    def __init__(self, connection: kopf.ConnectionInfo, *, field_manager: str | None = None) -> None:
        headers = {'Accept': 'application/json', **connection.as_http_headers()}
        secure = connection.server.startswith('https:')
        self.default_namespace = connection.default_namespace
        self._field_manager = field_manager
        self._http = httpx.AsyncClient(
            base_url=connection.server,
            headers=headers,
            verify=connection.as_ssl_context() if secure else True,
            proxy=connection.proxy_url,
            trust_env=connection.trust_env,
            timeout=None,  # noqa: S113  # each call brings its own
            # httpx keeps only 20 idle connections by default: with more requests in flight (the status
            # writer's 32, the watch, the Lease) every request beyond them opened a new connection.
            limits=httpx.Limits(max_connections=100, max_keepalive_connections=100),
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def get(self, resource: Resource, name: str, *, namespace: str | None = None,
                  timeout: float) -> KubeObject:  # noqa: ASYNC109
        return await self._request('GET', resource.path(namespace=namespace, name=name), timeout=timeout)

    async def create(self, resource: Resource, body: Mapping[str, object], *, namespace: str | None = None,
                     timeout: float) -> KubeObject:  # noqa: ASYNC109
        return await self._request('POST', resource.path(namespace=namespace), body=body,
                                   params=self._write_params(), timeout=timeout)

    async def replace(self, resource: Resource, name: str, body: Mapping[str, object], *,
                      namespace: str | None = None, subresource: str | None = None,
                      timeout: float) -> KubeObject:  # noqa: ASYNC109
        """PUT the whole object; its `metadata.resourceVersion` makes a stale write fail with 409."""
        path = resource.path(namespace=namespace, name=name, subresource=subresource)
        return await self._request('PUT', path, body=body, params=self._write_params(), timeout=timeout)

    async def patch(self, resource: Resource, name: str, patch: Mapping[str, object], *,
                    namespace: str | None = None, resource_version: str | None = None,
                    subresource: str | None = None, timeout: float) -> KubeObject:  # noqa: ASYNC109
        """Merge-patch (RFC 7386); with `resource_version`, only if the object is still at it (else 409)."""
        if resource_version is not None:
            metadata = dict(cast(Mapping[str, object], patch.get('metadata') or {}))
            patch = {**patch, 'metadata': {**metadata, 'resourceVersion': resource_version}}
        path = resource.path(namespace=namespace, name=name, subresource=subresource)
        return await self._request('PATCH', path, body=patch, content_type=_MERGE_PATCH,
                                   params=self._write_params(), timeout=timeout)

    async def patch_status(self, resource: Resource, name: str, status: Mapping[str, object], *,
                           namespace: str | None = None, resource_version: str | None = None,
                           timeout: float) -> KubeObject:  # noqa: ASYNC109
        """Merge-patch `status` through the status subresource (the only way status changes there)."""
        return await self.patch(resource, name, {'status': status}, namespace=namespace,
                                resource_version=resource_version, subresource='status', timeout=timeout)

    async def json_patch(self, resource: Resource, name: str, operations: Sequence[Mapping[str, object]], *,
                         namespace: str | None = None, subresource: str | None = None,
                         timeout: float) -> KubeObject:  # noqa: ASYNC109
        """JSON-patch (RFC 6902); a failed `test` operation answers 422 (reason `Invalid`)."""
        path = resource.path(namespace=namespace, name=name, subresource=subresource)
        return await self._request('PATCH', path, body=operations, content_type=_JSON_PATCH,
                                   params=self._write_params(), timeout=timeout)

    async def delete(self, resource: Resource, name: str, *, namespace: str | None = None,
                     resource_version: str | None = None, uid: str | None = None,
                     timeout: float) -> KubeObject | None:  # noqa: ASYNC109
        """Delete; returns the object while finalizers hold it (with deletionTimestamp), None once gone."""
        preconditions = {key: value for key, value in [('resourceVersion', resource_version), ('uid', uid)]
                         if value is not None}
        body: JsonObject = {'apiVersion': 'v1', 'kind': 'DeleteOptions'}
        if preconditions:
            body['preconditions'] = preconditions
        result = await self._request('DELETE', resource.path(namespace=namespace, name=name),
                                     body=body, timeout=timeout)
        return None if result.get('kind') == 'Status' else result

    async def watch(self, resource: Resource, *, namespace: str | None = None,
                    resource_version: str | None = None, label_selector: str | None = None,
                    field_selector: str | None = None, server_timeout: int, timeout: float,  # noqa: ASYNC109
                    resume: bool = True) -> AsyncGenerator[WatchEvent, None]:
        """
        Stream changes after `resource_version` (from `list()`; without it, every object comes ADDED first).

        A stream can end at any moment (server timeout, API restart); with `resume`, it continues from the
        last resourceVersion seen. `GoneError` means that version is no longer kept: list again.
        `timeout` bounds connecting; silence longer than `server_timeout + timeout` counts as an ended stream.
        Close it when done early: `async with contextlib.aclosing(api.watch(...)) as events`.
        """
        params = {'watch': 'true', 'allowWatchBookmarks': 'true', 'timeoutSeconds': str(server_timeout)}
        if label_selector:
            params['labelSelector'] = label_selector
        if field_selector:
            params['fieldSelector'] = field_selector
        read_timeout = httpx.Timeout(timeout, read=server_timeout + timeout)
        last_version = resource_version
        while True:
            if last_version:
                params['resourceVersion'] = last_version
            async with contextlib.AsyncExitStack() as stack:
                async with asyncio.timeout(timeout):
                    response = await stack.enter_async_context(self._http.stream(
                        'GET', resource.path(namespace=namespace), params=params, timeout=read_timeout))
                    if response.is_error:
                        await response.aread()
                        raise _api_error(response)
                try:
                    async for line in response.aiter_lines():
                        if not line.strip():
                            continue
                        event = cast(Mapping[str, object], json.loads(line))
                        kind, obj = event.get('type'), cast(KubeObject, event.get('object') or {})
                        if kind == 'ERROR':
                            raise _status_error(cast(JsonObject, obj), fallback_code=500)
                        last_version = obj.get('metadata', {}).get('resourceVersion') or last_version
                        if kind in ('ADDED', 'MODIFIED', 'DELETED'):
                            yield WatchEvent(kind, obj)
                # An abruptly cut or silent stream is just an ended stream: resume from where it was.
                except (httpx.ReadTimeout, httpx.RemoteProtocolError, httpx.ReadError):
                    pass
            if not resume:
                return

    # Last in the class: below this line, `list` names this method, not the builtin.
    async def list(self, resource: Resource, *, namespace: str | None = None,
                   label_selector: str | None = None, field_selector: str | None = None,
                   chunk_size: int | None = None, timeout: float) -> ObjectList:  # noqa: ASYNC109
        """All matching objects (fetched in pages of `chunk_size` if given) and the list's resourceVersion."""
        params: dict[str, str] = {}
        if label_selector:
            params['labelSelector'] = label_selector
        if field_selector:
            params['fieldSelector'] = field_selector
        if chunk_size is not None:
            params['limit'] = str(chunk_size)
        items: builtins.list[KubeObject] = []
        async with asyncio.timeout(timeout):
            while True:
                page = cast(Mapping[str, object],
                            await self._request('GET', resource.path(namespace=namespace), params=params,
                                                timeout=timeout))
                items += cast(builtins.list[KubeObject], page.get('items') or [])
                metadata = cast(Mapping[str, str], page.get('metadata') or {})
                if not metadata.get('continue'):
                    return ObjectList(items=items, resource_version=metadata.get('resourceVersion', ''))
                params['continue'] = metadata['continue']

    def _write_params(self) -> dict[str, str]:
        return {'fieldManager': self._field_manager} if self._field_manager else {}

    async def _request(self, method: str, path: str, *, timeout: float,  # noqa: ASYNC109
                       body: Mapping[str, object] | Sequence[Mapping[str, object]] | None = None,
                       content_type: str = 'application/json',
                       params: Mapping[str, str] | None = None) -> KubeObject:
        content = json.dumps(body).encode() if body is not None else None
        headers = {'Content-Type': content_type} if body is not None else {}
        async with asyncio.timeout(timeout):
            response = await self._http.request(method, path, content=content, headers=headers,
                                                params=params, timeout=timeout)
        if response.is_error:
            raise _api_error(response)
        return cast(KubeObject, response.json())


def _api_error(response: httpx.Response) -> ApiError:
    try:
        body = response.json()
    except ValueError:
        body = None
    # The header first, as kopf and client-go read it; the Status's retryAfterSeconds is the older way.
    retry_after = parse_retry_after(response.headers.get('Retry-After'))
    if isinstance(body, dict) and body.get('kind') == 'Status':
        return _status_error(body, fallback_code=response.status_code, retry_after=retry_after)
    return _ERRORS_BY_CODE.get(response.status_code, ApiError)(
        response.status_code, response.reason_phrase, response.text[:1000], retry_after=retry_after)


def _status_error(status: JsonObject, *, fallback_code: int, retry_after: float | None = None) -> ApiError:
    code = status.get('code')
    code = code if isinstance(code, int) else fallback_code
    details = status.get('details')
    return _ERRORS_BY_CODE.get(code, ApiError)(
        code, str(status.get('reason') or ''), str(status.get('message') or ''),
        cast(JsonObject, details) if isinstance(details, dict) else None, retry_after=retry_after)

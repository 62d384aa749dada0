"""Who a bearer token is (TokenReview) and what that user may do (SubjectAccessReview), asked of the API server.

Argo Server's client mode and the Kubernetes Dashboard hand the user's token on to the API server and let it decide;
the failed jobs and queues shown here are not served by the API server, so, as Argo does for its workflow archive,
each view and action asks explicitly (Argo's CVE-2024-53862 was an archive endpoint that forgot to ask: nothing is
shown or done here before a review allowed it). Answers are reused for `cache_seconds`, as Argo caches its reviews.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar, cast

from kubearq.operator.kube import KubeApi, Resource
from kubearq.operator.resources import GROUP

TOKEN_REVIEWS = Resource("authentication.k8s.io", "v1", "tokenreviews")
SUBJECT_ACCESS_REVIEWS = Resource("authorization.k8s.io", "v1", "subjectaccessreviews")
REVIEW_TIMEOUT = 10.0
MAX_TOKEN_LENGTH = 16_384  # a JWT with many groups is a few KB; anything longer is not a token
CACHE_ENTRIES = 10_000
V = TypeVar("V")


@dataclass(frozen=True)
class User:
    """An authenticated user, as TokenReview reported it."""

    name: str
    groups: tuple[str, ...] = ()
    uid: str = ""
    extra: tuple[tuple[str, tuple[str, ...]], ...] = ()


@dataclass(frozen=True)
class Permission:
    """One thing a user may or may not do: a verb on kubearq.dev `resource` (an object, or all in a namespace)."""

    verb: str
    resource: str
    namespace: str = ""  # "": cluster-wide (every namespace)
    name: str = ""

    def refusal(self, user: User) -> str:
        """The message, in the API server's own words, that says what `user` may not do."""
        what = f'{self.resource}.{GROUP} "{self.name}"' if self.name else f"{self.resource}.{GROUP}"
        where = f' in the namespace "{self.namespace}"' if self.namespace else " at the cluster scope"
        return (f'{what} is forbidden: User "{user.name}" cannot {self.verb} resource "{self.resource}" '
                f'in API group "{GROUP}"{where}')


class NotAuthenticatedError(Exception):
    """The API server did not accept the token; the message says why and what to do."""


class ForbiddenError(Exception):
    """A SubjectAccessReview refused; the message names the user, the verb and the resource."""

    def __init__(self, user: User, permission: Permission, reason: str = "") -> None:
        self.user = user
        self.permission = permission
        super().__init__(permission.refusal(user) + (f" ({reason})" if reason else ""))


@dataclass
class AnswerCache(Generic[V]):
    """Answers by key for `seconds`; the oldest go first past CACHE_ENTRIES. Concurrent misses of one key share
    one request."""

    seconds: float
    clock: Callable[[], float] = time.monotonic
    _answers: dict[Hashable, tuple[float, V]] = field(default_factory=dict)
    _asking: dict[Hashable, asyncio.Future[V]] = field(default_factory=dict)

    async def get(self, key: Hashable, ask: Callable[[], Awaitable[V]]) -> V:
        now = self.clock()
        known = self._answers.get(key)
        if known is not None and known[0] > now:
            return known[1]
        pending = self._asking.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[V] = asyncio.get_running_loop().create_future()
        self._asking[key] = future
        try:
            answer = await ask()
        except BaseException as error:
            future.set_exception(error)
            future.exception()  # retrieved: a miss nobody else waited on must not warn at collection
            raise
        finally:
            self._asking.pop(key, None)
        future.set_result(answer)
        if self.seconds > 0:
            if len(self._answers) >= CACHE_ENTRIES:
                for stale in list(self._answers)[: CACHE_ENTRIES // 10]:
                    del self._answers[stale]
            self._answers[key] = (now + self.seconds, answer)
        return answer


class Reviews:
    """TokenReview and SubjectAccessReview through the operator's own API client (which may create both)."""

    def __init__(self, api: KubeApi, *, cache_seconds: float = 10.0, clock: Callable[[], float] = time.monotonic,
                 audiences: tuple[str, ...] = ()) -> None:
        self._api = api
        self._audiences = audiences
        self._users: AnswerCache[User | str] = AnswerCache(cache_seconds, clock)
        self._decisions: AnswerCache[tuple[bool, str]] = AnswerCache(cache_seconds, clock)

    async def authenticate(self, token: str) -> User:
        """The user of `token`; raises NotAuthenticatedError saying why the API server refused it."""
        token = token.strip()
        if not token or len(token) > MAX_TOKEN_LENGTH or any(char.isspace() for char in token):
            raise NotAuthenticatedError("that is not a bearer token: paste the output of `kubectl create token NAME`")
        # Keyed by a digest: the cache never holds a token itself.
        digest = hashlib.sha256(token.encode()).hexdigest()
        answer = await self._users.get(("token", digest), lambda: self._token_review(token))
        if isinstance(answer, str):
            raise NotAuthenticatedError(answer)
        return answer

    async def _token_review(self, token: str) -> User | str:
        spec: dict[str, object] = {"token": token}
        if self._audiences:
            spec["audiences"] = list(self._audiences)
        review = await self._api.create(TOKEN_REVIEWS, {
            "apiVersion": TOKEN_REVIEWS.api_version, "kind": "TokenReview", "spec": spec}, timeout=REVIEW_TIMEOUT)
        status = cast(Mapping[str, object], review.get("status") or {})
        if not status.get("authenticated"):
            error = str(status.get("error") or "").strip()
            return ("the Kubernetes API did not accept this token" + (f" ({error})" if error else "") +
                    ": it may have expired, been revoked or be for another cluster; log in again with a new one "
                    "(`kubectl create token NAME`)")
        user = cast(Mapping[str, object], status.get("user") or {})
        extra = cast(Mapping[str, list[str]], user.get("extra") or {})
        return User(name=str(user.get("username") or ""), groups=tuple(cast(list[str], user.get("groups") or [])),
                    uid=str(user.get("uid") or ""),
                    extra=tuple(sorted((key, tuple(values)) for key, values in extra.items())))

    async def allowed(self, user: User, permission: Permission) -> tuple[bool, str]:
        """Whether `user` may, and the authorizer's reason (shown when it refuses)."""
        return await self._decisions.get((user, permission), lambda: self._access_review(user, permission))

    async def require(self, user: User, permission: Permission) -> None:
        """Raise ForbiddenError unless `user` may."""
        allowed, reason = await self.allowed(user, permission)
        if not allowed:
            raise ForbiddenError(user, permission, reason)

    async def allowed_all(self, user: User, permissions: list[Permission]) -> dict[Permission, bool]:
        """Many reviews at once (the buttons of a page)."""
        answers = await asyncio.gather(*(self.allowed(user, permission) for permission in permissions))
        return {permission: allowed for permission, (allowed, _) in zip(permissions, answers, strict=True)}

    async def _access_review(self, user: User, permission: Permission) -> tuple[bool, str]:
        attributes: dict[str, str] = {"group": GROUP, "resource": permission.resource, "verb": permission.verb}
        if permission.namespace:
            attributes["namespace"] = permission.namespace
        if permission.name:
            attributes["name"] = permission.name
        spec: dict[str, object] = {"resourceAttributes": attributes, "user": user.name, "groups": list(user.groups)}
        if user.uid:
            spec["uid"] = user.uid
        if user.extra:
            spec["extra"] = {key: list(values) for key, values in user.extra}
        review = await self._api.create(SUBJECT_ACCESS_REVIEWS, {
            "apiVersion": SUBJECT_ACCESS_REVIEWS.api_version, "kind": "SubjectAccessReview", "spec": spec},
            timeout=REVIEW_TIMEOUT)
        status = cast(Mapping[str, object], review.get("status") or {})
        return bool(status.get("allowed")) and not status.get("denied"), str(status.get("reason") or "")

"""Whether this replica may still read what kopf watches, for `/readyz`.

kopf's watch retries a refused LIST or WATCH forever with an ERROR line per attempt, and nothing else tells:
a replica whose RBAC lost `list` (or never had it) would look ready while its store went stale. So every
`interval` one LIST of a single item per watched resource and namespace asks the API the same question; the
replica is not ready while one is refused, and says once what is missing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from kubearq.operator.kube import ApiError, KubeApi, Resource, is_transient

logger = logging.getLogger(__name__)

INTERVAL_SECONDS = 30.0
REQUEST_TIMEOUT = 10.0


@dataclass
class WatchAccess:
    """Checks LIST access to `resources` in `namespaces` (none: cluster-wide) every `interval` seconds."""

    api: KubeApi
    resources: Sequence[Resource]
    namespaces: Sequence[str]
    interval: float = INTERVAL_SECONDS
    refused: str | None = None  # the last refusal, None while every LIST is allowed
    checked: asyncio.Event = field(default_factory=asyncio.Event)  # set once the first round is done

    async def allowed(self) -> bool:
        """The readiness check: every LIST allowed in the last round (a passing API outage does not count)."""
        return self.checked.is_set() and self.refused is None

    async def check_once(self) -> None:
        refused = None
        scopes: list[str | None] = [*self.namespaces] or [None]
        for namespace in scopes:
            for resource in self.resources:
                try:
                    await self.api.list(resource, namespace=namespace, chunk_size=1, timeout=REQUEST_TIMEOUT)
                except Exception as error:
                    if is_transient(error) or not isinstance(error, ApiError):
                        # an outage, not a refusal: kopf's watch and the Lease report those
                        logger.debug("checking LIST access: %s", error)
                        continue
                    where = f"in namespace {namespace}" if namespace else "cluster-wide"
                    refused = f"cannot list {resource.plural} {where} ({error.code} {error.reason}: {error.message})"
                    break
            if refused:
                break
        if refused and refused != self.refused:
            logger.error("%s: kopf cannot watch them either, so this replica is not ready until it can", refused)
        elif self.refused and not refused:
            logger.info("LIST access to the watched resources is back; ready again")
        self.refused = refused
        self.checked.set()

    async def run(self) -> None:
        while True:
            try:
                await self.check_once()
            except Exception:  # a probe must never stop: log it with its context, count it as refused
                logger.exception("checking LIST access failed")
                self.refused = self.refused or "the LIST access check failed (see the log)"
            await asyncio.sleep(self.interval)

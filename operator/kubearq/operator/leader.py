"""Leader election on a `coordination.k8s.io/v1` Lease, with client-go's semantics, in asyncio.

One replica holds the Lease and does the leader-only work (enqueueing, writing status); the others stay
hot, polling the Lease, and take it over when it expires or is released. As in client-go's
`tools/leaderelection`, a Lease counts as expired `leaseDurationSeconds` after *this* replica last saw it
change — never by comparing our clock with the holder's `renewTime` — so clock skew between nodes does not
matter, only clock rate. Every write carries the `resourceVersion` last seen: of two candidates, the
second gets 409 Conflict. The leader gives up when it has not renewed for `renew_deadline`, which is
`lease_duration - renew_deadline` before any standby may take over; that gap is the margin for clock rate
and for the leader-only work to stop.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import random
import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol, Self

import httpx
import pydantic

from kubearq.operator import kube

logger = logging.getLogger(__name__)

MICROTIME_FORMAT = '%Y-%m-%dT%H:%M:%S.%fZ'  # metav1.MicroTime, as client-go writes acquireTime/renewTime
RELEASED_LEASE_DURATION = 1  # seconds; client-go writes it on release for clients that ignore an empty holder

# What a failed attempt at the API looks like; anything else is a bug and surfaces. The adapter does not
# wrap httpx's transport errors, so they are named here.
_API_FAILURES = (kube.ApiError, httpx.HTTPError, TimeoutError)

LeadershipCallback = Callable[[], Awaitable[None]]


def _default_identity() -> str:
    return os.environ.get('POD_NAME') or socket.gethostname()


def _default_namespace() -> str:
    return os.environ.get('POD_NAMESPACE') or 'default'


class LeaderElectionConfig(pydantic.BaseModel):
    """Where the Lease is, who this replica is, and the timings (client-go's defaults)."""

    model_config = pydantic.ConfigDict(frozen=True, extra='forbid')

    lease_name: str = pydantic.Field('kubearq-leader', min_length=1)
    lease_namespace: str = pydantic.Field(default_factory=_default_namespace, min_length=1)
    identity: str = pydantic.Field(default_factory=_default_identity, min_length=1,
                                   description='The pod name ($POD_NAME, else the hostname).')
    lease_duration: int = pydantic.Field(
        15, gt=0, description='Seconds a standby waits, after it last saw the Lease change, before taking it '
                              'over; whole seconds, as the Lease stores leaseDurationSeconds.')
    renew_deadline: float = pydantic.Field(
        10.0, gt=0, description='Seconds the leader keeps trying to renew before it gives up leading.')
    retry_period: float = pydantic.Field(
        2.0, gt=0, description='Seconds between renewals, and between a standby\'s looks at the Lease.')
    jitter_factor: float = pydantic.Field(
        1.2, ge=1.0, description='A standby waits between retry_period and retry_period * jitter_factor.')

    @pydantic.model_validator(mode='after')
    def _timings_nest(self) -> Self:
        if not self.lease_duration > self.renew_deadline:
            raise ValueError(
                f'lease_duration ({self.lease_duration} s) must be greater than renew_deadline '
                f'({self.renew_deadline} s): the leader must give up before a standby may take the Lease over')
        if not self.renew_deadline > self.retry_period * self.jitter_factor:
            raise ValueError(
                f'renew_deadline ({self.renew_deadline} s) must be greater than retry_period * jitter_factor '
                f'({self.retry_period} s * {self.jitter_factor} = {self.retry_period * self.jitter_factor:g} s): '
                f'the leader must be able to retry a failed renewal before it gives up')
        return self


class LeaseApi(Protocol):
    """The part of `kube.KubeApi` the elector uses."""

    async def get(self, resource: kube.Resource, name: str, *, namespace: str | None = None,
                  timeout: float) -> kube.KubeObject: ...  # noqa: ASYNC109

    async def create(self, resource: kube.Resource, body: Mapping[str, object], *, namespace: str | None = None,
                     timeout: float) -> kube.KubeObject: ...  # noqa: ASYNC109

    async def replace(self, resource: kube.Resource, name: str, body: Mapping[str, object], *,
                      namespace: str | None = None, subresource: str | None = None,
                      timeout: float) -> kube.KubeObject: ...  # noqa: ASYNC109


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds for deadlines; must advance with the event loop's time, on which asyncio sleeps and times out."""
        ...

    def now(self) -> datetime.datetime:
        """Wall time (UTC) for the Lease's acquireTime and renewTime, which only people read."""
        ...


class LoopClock:
    """The event loop's clock for deadlines (looptime makes tests of it fast), the system's for timestamps."""

    def monotonic(self) -> float:
        return asyncio.get_running_loop().time()

    def now(self) -> datetime.datetime:
        return datetime.datetime.now(datetime.UTC)


class Gauge(Protocol):
    """A `prometheus_client.Gauge`, or anything that takes its value the same way."""

    def set(self, value: float) -> None: ...


class Counter(Protocol):
    """A `prometheus_client.Counter` (or a labelled child of one)."""

    def inc(self, amount: float = 1) -> None: ...


class NotLeaderError(RuntimeError):
    """This replica does not hold a fresh Lease now: it must not do leader-only work."""


class LeaderElector:
    """
    Campaigns for one Lease and runs leader-only work while holding it.

    `run(leader_work)` campaigns until `release()`; while this replica leads, `leader_work()` runs as a task
    that is cancelled the moment leadership is lost, before `on_stopped_leading` is awaited. `ensure_leader()`
    is the fence for each leader-only write: it raises unless the Lease is held and was renewed less than
    `renew_deadline` ago, so a write can never be started once a standby could have taken over.

        elector = LeaderElector(kube.KubeApi(connection), LeaderElectionConfig(lease_namespace=namespace),
                                leader_gauge=metrics.leader, lease_errors=metrics.errors.labels(operation='lease'))
        election = asyncio.create_task(elector.run(reconcile_forever))  # on startup
        elector.ensure_leader()  # in reconcile_forever, right before each enqueue or status write
        await elector.release()  # on SIGTERM: the work stops, the Lease is handed over, run() returns
    """

    def __init__(self, api: LeaseApi, config: LeaderElectionConfig, *,
                 on_started_leading: LeadershipCallback | None = None,
                 on_stopped_leading: LeadershipCallback | None = None,
                 leader_gauge: Gauge | None = None,
                 lease_errors: Counter | None = None,
                 clock: Clock | None = None,
                 rng: random.Random | None = None) -> None:
        self.config = config
        self._api = api
        self._on_started_leading = on_started_leading
        self._on_stopped_leading = on_stopped_leading
        self._leader_gauge = leader_gauge
        self._lease_errors = lease_errors
        self._clock = clock or LoopClock()
        self._rng = rng or random.Random()  # noqa: S311  # jitter, not cryptography
        self._lease: kube.KubeObject | None = None  # as last seen (read or written)
        self._seen_version: tuple[str, str] | None = None  # (uid, resourceVersion) of `_lease`
        self._seen_changing_at = 0.0  # monotonic: when this replica last saw the Lease change
        self._renewed_at: float | None = None  # monotonic: when our last successful write as holder began
        self._write_in_doubt = False  # a write of ours was cut short (timeout, cancel): it may have landed
        self._leading = False
        self._closing = False
        self._runner: asyncio.Task[None] | None = None
        self._work: asyncio.Task[None] | None = None
        self._set_gauge(0)

    @property
    def identity(self) -> str:
        return self.config.identity

    @property
    def lease_holder(self) -> str | None:
        """The holder of the Lease as last seen; None if nobody holds it (or it was not seen yet)."""
        if self._lease is None:
            return None
        return _holder(self._lease) or None

    @property
    def is_leader(self) -> bool:
        """Whether this replica leads and renewed the Lease less than `renew_deadline` ago."""
        return self._leading and self._lease_age() < self.config.renew_deadline

    def ensure_leader(self) -> None:
        """Raise `NotLeaderError` unless this replica may do leader-only work now; call it right before each."""
        if not self._leading:
            raise NotLeaderError(f'{self.identity} does not lead: Lease {self._lease_path} is held by '
                                 f'{self.lease_holder or "nobody"}')
        age = self._lease_age()
        if age >= self.config.renew_deadline:
            raise NotLeaderError(f'{self.identity} last renewed Lease {self._lease_path} {age:.1f} s ago, '
                                 f'not within the renew deadline of {self.config.renew_deadline:g} s')

    async def run(self, leader_work: LeadershipCallback | None = None) -> None:
        """
        Campaign for the Lease until `release()`; lead with `leader_work()` whenever holding it.

        After losing the Lease, this replica stands by and campaigns again. If `leader_work()` raises, the
        Lease is released and the error raised from here. `release()` makes this return.
        """
        if self._runner is not None:
            raise RuntimeError(f'the elector of {self.identity} is already running')
        self._runner = asyncio.current_task()
        try:
            while not self._closing:
                await self._acquire()
                await self._lead(leader_work)
        except asyncio.CancelledError:
            runner = asyncio.current_task()
            if self._closing and runner is not None and runner.uncancel() == 0:
                return  # cancelled by release() alone, to stop at once, even mid-request
            raise
        finally:
            self._runner = None

    async def release(self) -> bool:
        """
        Step down for good (on shutdown): stop the leader work, then clear the Lease's holder.

        A standby then takes the Lease within about one retry period, not a lease duration. Returns whether
        the Lease is free of this replica. Call it from outside the leader work (e.g. on SIGTERM).
        """
        self._closing = True
        runner = self._runner
        if runner is not None and not runner.done() and runner is not asyncio.current_task():
            runner.cancel()
            await asyncio.wait([runner])  # run() stops leading on its way out
        return await self._write_release()

    # Campaigning and leading.

    async def _acquire(self) -> None:
        logger.info('%s: campaigning for Lease %s', self.identity, self._lease_path, extra=self._log_extra())
        while not await self._attempt(self.config.renew_deadline):
            retry_period = self.config.retry_period
            # client-go waits retry_period + rand * jitter_factor * retry_period (up to 2.2 times) between tries;
            # here retry_period * jitter_factor is the longest wait, which keeps a hand-off under 3 s.
            await asyncio.sleep(self._rng.uniform(retry_period, retry_period * self.config.jitter_factor))

    async def _lead(self, leader_work: LeadershipCallback | None) -> None:
        self._leading = True
        self._set_gauge(1)
        logger.info('%s: started leading; Lease %s is held by %s', self.identity, self._lease_path,
                    self.lease_holder, extra=self._log_extra())
        work = self._work = asyncio.create_task(self._do_leader_work(leader_work),
                                                name=f'leader work of {self.identity}')
        reason = 'the elector was cancelled'
        try:
            reason = await self._keep_renewing(work)
        finally:
            await self._stop_leading('the Lease is being released' if self._closing else reason)
        if work.done() and not work.cancelled() and work.exception() is not None:
            self._closing = True
            await self._write_release()
            work.result()  # raises the leader work's error

    async def _do_leader_work(self, leader_work: LeadershipCallback | None) -> None:
        if self._on_started_leading is not None:
            await self._on_started_leading()
        if leader_work is not None:
            await leader_work()

    async def _keep_renewing(self, work: asyncio.Task[None]) -> str:
        """Renew every retry period until leadership is lost; returns why it was."""
        config = self.config
        while True:
            assert self._renewed_at is not None, 'leading without a renewal'
            deadline = self._renewed_at + config.renew_deadline
            pause = max(0.0, min(config.retry_period, deadline - self._clock.monotonic()))
            if work.done():
                await asyncio.sleep(pause)
            else:
                await asyncio.wait([work], timeout=pause)
            if work.done() and not work.cancelled() and work.exception() is not None:
                return self._lose('the leader work failed')
            time_left = deadline - self._clock.monotonic()
            if time_left <= 0:
                return self._lose(f'the Lease was not renewed within the renew deadline ({config.renew_deadline:g} s)')
            if await self._attempt(time_left):
                continue
            holder = self.lease_holder
            if holder is not None and holder != self.identity:
                return self._lose(f'the Lease is now held by {holder}')

    def _lose(self, reason: str) -> str:
        """Stop leading at once (no await): the fence closes and the leader work is cancelled now."""
        if self._leading:
            self._leading = False
            self._set_gauge(0)
        if self._work is not None:
            self._work.cancel()
        return reason

    async def _stop_leading(self, reason: str) -> None:
        self._lose(reason)
        work, self._work = self._work, None
        if work is not None:
            # A standby may take over `lease_duration - renew_deadline` after we gave up: stop before then.
            grace = self.config.lease_duration - self.config.renew_deadline
            done, _ = await asyncio.wait([work], timeout=grace)
            if not done:
                logger.error('%s: the leader work did not stop within %g s of losing Lease %s; '
                             'it may overlap with the next leader', self.identity, grace, self._lease_path,
                             extra=self._log_extra())
        logger.info('%s: stopped leading: %s; Lease %s is held by %s', self.identity, reason,
                    self._lease_path, self.lease_holder, extra=self._log_extra())
        if self._on_stopped_leading is not None:
            await self._on_stopped_leading()

    # One look at the Lease: client-go's tryAcquireOrRenew().

    async def _attempt(self, budget: float) -> bool:
        """Acquire or renew the Lease within `budget` seconds; whether this replica holds it now."""
        started = self._clock.monotonic()
        try:
            async with asyncio.timeout(budget):
                held = await self._try_acquire_or_renew(deadline=started + budget)
        except _API_FAILURES as e:
            if self._lease_errors is not None:
                self._lease_errors.inc()
            logger.warning('%s: cannot %s Lease %s: %s', self.identity, 'renew' if self._leading else 'acquire',
                           self._lease_path, str(e) or type(e).__name__, extra=self._log_extra())
            return False
        if held:
            self._renewed_at = started  # not later: others count the lease duration from when they see our write
        return held

    async def _try_acquire_or_renew(self, *, deadline: float) -> bool:
        now = self._clock.now()
        if self._leading and self._lease is not None:
            # client-go's fast path: the leader writes over the Lease it last saw without reading it first.
            try:
                await self._replace(self._renewal(self._lease, now), deadline=deadline)
                return True
            except (kube.ConflictError, kube.NotFoundError) as e:
                logger.debug('%s: renewing over the Lease last seen failed (%s); reading it', self.identity, e)
        try:
            lease = await self._look(deadline=deadline)
        except kube.NotFoundError:
            return await self._create(now, deadline=deadline)
        holder = _holder(lease)
        if holder and holder != self.identity and not self._expired(lease):
            return False
        body = self._renewal(lease, now) if holder == self.identity else self._takeover(lease, now)
        try:
            await self._replace(body, deadline=deadline)
        except kube.ConflictError:
            logger.debug('%s: another replica wrote Lease %s first', self.identity, self._lease_path)
            return False
        return True

    async def _create(self, now: datetime.datetime, *, deadline: float) -> bool:
        body: dict[str, object] = {
            'apiVersion': kube.LEASES.api_version, 'kind': 'Lease',
            'metadata': {'name': self.config.lease_name, 'namespace': self.config.lease_namespace},
            'spec': self._record(acquired=_microtime(now), renewed=_microtime(now), transitions=0),
        }
        self._write_in_doubt = True
        try:
            created = await self._api.create(kube.LEASES, body, namespace=self.config.lease_namespace,
                                             timeout=self._time_left(deadline))
        except kube.ConflictError:  # AlreadyExists: another replica created it first
            self._write_in_doubt = False
            return False
        self._write_in_doubt = False
        self._see(created)
        return True

    async def _write_release(self) -> bool:
        """Clear the holder as client-go's release() does, retrying on a stale version until the deadline."""
        self._renewed_at = None
        deadline = self._clock.monotonic() + self.config.renew_deadline
        try:
            async with asyncio.timeout(self.config.renew_deadline):
                if self._write_in_doubt:  # a write of ours was cut short, and may have landed: look
                    await self._look(deadline=deadline)
                while self._lease is not None and _holder(self._lease) == self.identity:
                    try:
                        await self._replace(self._release(self._lease), deadline=deadline)
                    except kube.ConflictError:  # e.g. a renewal whose answer was lost: look again
                        await self._look(deadline=deadline)
        except kube.NotFoundError:
            return True
        except _API_FAILURES as e:
            if self._lease_errors is not None:
                self._lease_errors.inc()
            logger.warning('%s: cannot release Lease %s (a standby takes over when it expires): %s',
                           self.identity, self._lease_path, str(e) or type(e).__name__, extra=self._log_extra())
            return False
        return True

    # The Lease's record.

    def _record(self, *, acquired: str, renewed: str, transitions: int) -> dict[str, object]:
        return {'holderIdentity': self.identity, 'leaseDurationSeconds': self.config.lease_duration,
                'acquireTime': acquired, 'renewTime': renewed, 'leaseTransitions': transitions}

    def _renewal(self, lease: kube.KubeObject, now: datetime.datetime) -> kube.KubeObject:
        acquired = lease.get('spec', {}).get('acquireTime')
        acquired = acquired if isinstance(acquired, str) else _microtime(now)
        return {**lease, 'spec': self._record(acquired=acquired, renewed=_microtime(now),
                                              transitions=_transitions(lease))}

    def _takeover(self, lease: kube.KubeObject, now: datetime.datetime) -> kube.KubeObject:
        return {**lease, 'spec': self._record(acquired=_microtime(now), renewed=_microtime(now),
                                              transitions=_transitions(lease) + 1)}

    def _release(self, lease: kube.KubeObject) -> kube.KubeObject:
        now = _microtime(self._clock.now())
        return {**lease, 'spec': {'holderIdentity': '', 'leaseDurationSeconds': RELEASED_LEASE_DURATION,
                                  'acquireTime': now, 'renewTime': now, 'leaseTransitions': _transitions(lease)}}

    async def _look(self, *, deadline: float) -> kube.KubeObject:
        lease = await self._api.get(kube.LEASES, self.config.lease_name, namespace=self.config.lease_namespace,
                                    timeout=self._time_left(deadline))
        self._see(lease)
        return lease

    async def _replace(self, lease: kube.KubeObject, *, deadline: float) -> None:
        # The body's resourceVersion is the one last seen: if anyone wrote since, this is a 409 Conflict.
        self._write_in_doubt = True
        try:
            written = await self._api.replace(kube.LEASES, self.config.lease_name, lease,
                                              namespace=self.config.lease_namespace,
                                              timeout=self._time_left(deadline))
        except (kube.ConflictError, kube.NotFoundError):
            self._write_in_doubt = False  # refused: nothing was written
            raise
        self._write_in_doubt = False
        self._see(written)

    def _see(self, lease: kube.KubeObject) -> None:
        """Remember the Lease as seen now; a new version restarts the clock of its expiry."""
        metadata = lease.get('metadata', {})
        version = (metadata.get('uid', ''), metadata.get('resourceVersion', ''))
        if version != self._seen_version:
            self._seen_version = version
            self._seen_changing_at = self._clock.monotonic()
        first_look = self._lease is None
        before = self.lease_holder
        self._lease = lease
        if first_look or self.lease_holder != before:
            logger.info('%s: Lease %s is now held by %s', self.identity, self._lease_path,
                        self.lease_holder or 'nobody', extra=self._log_extra())

    def _expired(self, lease: kube.KubeObject) -> bool:
        duration = lease.get('spec', {}).get('leaseDurationSeconds')
        if not isinstance(duration, int) or duration <= 0:
            duration = self.config.lease_duration
        return self._clock.monotonic() >= self._seen_changing_at + duration

    # Small helpers.

    @property
    def _lease_path(self) -> str:
        return f'{self.config.lease_namespace}/{self.config.lease_name}'

    def _lease_age(self) -> float:
        """Seconds since our last successful write as holder began (infinite if none counts)."""
        if self._renewed_at is None:
            return float('inf')
        return self._clock.monotonic() - self._renewed_at

    def _time_left(self, deadline: float) -> float:
        time_left = deadline - self._clock.monotonic()
        if time_left <= 0:
            raise TimeoutError
        return time_left

    def _set_gauge(self, value: float) -> None:
        if self._leader_gauge is not None:
            self._leader_gauge.set(value)

    def _log_extra(self) -> dict[str, object]:
        return {'lease': self._lease_path, 'identity': self.identity, 'holder': self.lease_holder}


def _holder(lease: kube.KubeObject) -> str:
    holder = lease.get('spec', {}).get('holderIdentity')
    return holder if isinstance(holder, str) else ''


def _transitions(lease: kube.KubeObject) -> int:
    transitions = lease.get('spec', {}).get('leaseTransitions')
    return transitions if isinstance(transitions, int) else 0


def _microtime(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).strftime(MICROTIME_FORMAT)

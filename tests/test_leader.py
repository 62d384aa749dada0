"""Leader election on a Lease: one leader at a time, client-go's timings, against the API emulator.

The tests run in looptime's fake time with client-go's default timings (15 s lease, 10 s renew deadline,
2 s retry period): the emulator answers in no loop time, so every duration below is the elector's own.
Each replica reaches the API through a `Network` of its own, which a test can cut (calls hang, as on a
dead link) or break (calls fail at once) without touching the other replicas' view of the Lease.
"""

import asyncio
import dataclasses
import datetime
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Literal

import pydantic
import pytest

from kubearq.operator import kube
from kubearq.operator.leader import MICROTIME_FORMAT, LeaderElectionConfig, LeaderElector, NotLeaderError
from tests.kubernetes import KubernetesUnderTest, eventually

pytestmark = pytest.mark.looptime

T = 10.0  # seconds for a request of the test's own
LEASE = 'kubearq-leader'
LEASE_DURATION, RENEW_DEADLINE, RETRY_PERIOD, JITTER = 15, 10.0, 2.0, 1.2
LONGEST_POLL = RETRY_PERIOD * JITTER  # the longest a standby waits between two looks at the Lease
EPOCH = datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)


class LoopTimeClock:
    """Loop time for deadlines, and for the Lease's timestamps too, so that a test can compare them."""

    def monotonic(self) -> float:
        return asyncio.get_running_loop().time()

    def now(self) -> datetime.datetime:
        return EPOCH + datetime.timedelta(seconds=self.monotonic())


def lease_time(microtime: object) -> float:
    """A Lease timestamp written by `LoopTimeClock`, as loop time."""
    assert isinstance(microtime, str)
    moment = datetime.datetime.strptime(microtime, MICROTIME_FORMAT).replace(tzinfo=datetime.UTC)
    return (moment - EPOCH).total_seconds()


def now() -> float:
    return asyncio.get_running_loop().time()


class Network:
    """One replica's path to the API: `up`; `cut` (calls hang until the caller gives up); `failing` (503)."""

    def __init__(self, api: kube.KubeApi) -> None:
        self.api = api
        self.state: Literal['up', 'cut', 'failing'] = 'up'
        self.before_next_replace: Callable[[], Awaitable[None]] | None = None
        self.lose_next_replace_reply = False  # the write lands, its answer never comes

    async def _through(self) -> None:
        if self.state == 'cut':
            await asyncio.Event().wait()  # forever: only the caller's own timeout ends it
        if self.state == 'failing':
            raise kube.ApiError(503, 'ServiceUnavailable', 'the API server is unavailable')

    async def get(self, resource: kube.Resource, name: str, *, namespace: str | None = None,
                  timeout: float) -> kube.KubeObject:  # noqa: ASYNC109
        await self._through()
        return await self.api.get(resource, name, namespace=namespace, timeout=timeout)

    async def create(self, resource: kube.Resource, body: Mapping[str, object], *, namespace: str | None = None,
                     timeout: float) -> kube.KubeObject:  # noqa: ASYNC109
        await self._through()
        return await self.api.create(resource, body, namespace=namespace, timeout=timeout)

    async def replace(self, resource: kube.Resource, name: str, body: Mapping[str, object], *,
                      namespace: str | None = None, subresource: str | None = None,
                      timeout: float) -> kube.KubeObject:  # noqa: ASYNC109
        await self._through()
        if self.before_next_replace is not None:
            hook, self.before_next_replace = self.before_next_replace, None
            await hook()
        written = await self.api.replace(resource, name, body, namespace=namespace, subresource=subresource,
                                         timeout=timeout)
        if self.lose_next_replace_reply:
            self.lose_next_replace_reply = False
            await asyncio.Event().wait()
        return written


@dataclasses.dataclass
class Timeline:
    """Who led when, from the electors' callbacks: leading from `on_started_leading` until `on_stopped_leading`
    has run (so a leader counts as leading for as long as it might still act)."""

    events: list[tuple[float, str, Literal['start', 'stop']]] = dataclasses.field(default_factory=list)

    def callback(self, identity: str, what: Literal['start', 'stop']) -> Callable[[], Awaitable[None]]:
        async def record() -> None:
            self.events.append((now(), identity, what))
        return record

    def times(self, identity: str, what: Literal['start', 'stop']) -> list[float]:
        return [time for time, who, kind in self.events if who == identity and kind == what]

    def starts(self) -> list[tuple[float, str]]:
        return [(time, who) for time, who, kind in self.events if kind == 'start']

    def assert_one_leader_at_a_time(self) -> None:
        leading: set[str] = set()
        for time, who, kind in self.events:
            if kind == 'start':
                assert not leading, f'{who} started leading at {time} while {leading} still led: {self.events}'
                leading.add(who)
            else:
                leading.discard(who)


class RecordingGauge:
    def __init__(self) -> None:
        self.values: list[float] = []

    def set(self, value: float) -> None:
        self.values.append(value)


@dataclasses.dataclass
class Replica:
    identity: str
    elector: LeaderElector
    network: Network
    gauge: RecordingGauge
    task: asyncio.Task[None]


class Replicas:
    """Operator replicas, each with its own API client, network and elector."""

    def __init__(self, k8s: KubernetesUnderTest) -> None:
        self.k8s = k8s
        self.timeline = Timeline()
        self.all: list[Replica] = []
        self._apis: list[kube.KubeApi] = []

    def start(self, identity: str, leader_work: Callable[[], Awaitable[None]] | None = None) -> Replica:
        api = kube.KubeApi(self.k8s.connection)
        self._apis.append(api)
        network, gauge = Network(api), RecordingGauge()
        config = LeaderElectionConfig(lease_name=LEASE, lease_namespace=self.k8s.namespace, identity=identity)
        elector = LeaderElector(network, config, clock=LoopTimeClock(), leader_gauge=gauge,
                                rng=random.Random(identity),
                                on_started_leading=self.timeline.callback(identity, 'start'),
                                on_stopped_leading=self.timeline.callback(identity, 'stop'))
        task = asyncio.create_task(elector.run(leader_work), name=f'elector {identity}')
        replica = Replica(identity, elector, network, gauge, task)
        self.all.append(replica)
        return replica

    async def kill(self, replica: Replica) -> None:
        """End a replica as a crash would: no release; the Lease stays as it last wrote it."""
        replica.task.cancel()
        await asyncio.wait([replica.task])

    async def leader(self, *, within: float = 60) -> Replica:
        async def probe() -> Replica | None:
            return next((replica for replica in self.all if replica.elector.is_leader and not replica.task.done()),
                        None)
        found = await eventually(probe, within=within, interval=0.1)
        assert found is not None
        return found

    async def lease(self) -> kube.KubeObject:
        return await self.k8s.api.get(kube.LEASES, LEASE, namespace=self.k8s.namespace, timeout=T)

    async def aclose(self) -> None:
        for replica in self.all:
            replica.task.cancel()
        await asyncio.gather(*(replica.task for replica in self.all), return_exceptions=True)
        for api in self._apis:
            await api.aclose()


@pytest.fixture
async def replicas(k8s: KubernetesUnderTest) -> AsyncIterator[Replicas]:
    k8s.require_emulator()  # fake time needs an API that answers in no time: the emulator, in this loop
    group = Replicas(k8s)
    try:
        yield group
    finally:
        await group.aclose()


async def until(condition: Callable[[], bool], *, within: float) -> None:
    async def probe() -> bool:
        return condition()
    await eventually(probe, within=within, interval=0.01)


async def wait(seconds: float) -> None:
    await asyncio.sleep(seconds)  # fake time passing with the electors at work, not waiting for a condition


def spec(lease: kube.KubeObject) -> kube.JsonObject:
    return lease.get('spec', {})


# Configuration.


def test_config_defaults_are_client_go_timings_and_identity_is_the_pod_name(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv('POD_NAME', 'kubearq-operator-7d9f-x2x1')
    monkeypatch.setenv('POD_NAMESPACE', 'kubearq-system')

    config = LeaderElectionConfig()

    assert (config.identity, config.lease_namespace, config.lease_name) == (
        'kubearq-operator-7d9f-x2x1', 'kubearq-system', 'kubearq-leader')
    assert (config.lease_duration, config.renew_deadline, config.retry_period, config.jitter_factor) == (
        15, 10.0, 2.0, 1.2)


def test_config_rejects_renew_deadline_not_below_lease_duration() -> None:
    with pytest.raises(pydantic.ValidationError) as error:
        LeaderElectionConfig(identity='a', lease_duration=10, renew_deadline=10)

    assert ('lease_duration (10 s) must be greater than renew_deadline (10.0 s): '
            'the leader must give up before a standby may take the Lease over') in str(error.value)


def test_config_rejects_retry_period_times_jitter_not_below_renew_deadline() -> None:
    with pytest.raises(pydantic.ValidationError) as error:
        LeaderElectionConfig(identity='a', renew_deadline=5, retry_period=5)

    assert ('renew_deadline (5.0 s) must be greater than retry_period * jitter_factor (5.0 s * 1.2 = 6 s): '
            'the leader must be able to retry a failed renewal before it gives up') in str(error.value)


def test_config_lease_duration_is_whole_seconds_as_the_lease_stores_it() -> None:
    with pytest.raises(pydantic.ValidationError, match='lease_duration'):
        LeaderElectionConfig(identity='a', lease_duration=15.5)


# Electing.


async def test_first_elector_creates_the_lease_with_client_go_fields(replicas: Replicas) -> None:
    replicas.start('a')
    await replicas.leader()
    created = await replicas.lease()
    await wait(RETRY_PERIOD + 0.1)
    renewed = await replicas.lease()

    assert spec(created) == {'holderIdentity': 'a', 'leaseDurationSeconds': 15, 'leaseTransitions': 0,
                             'acquireTime': spec(created)['renewTime'], 'renewTime': spec(created)['renewTime']}
    assert str(spec(created)['renewTime']).endswith('Z')
    assert len(str(spec(created)['renewTime'])) == 27
    assert spec(renewed)['acquireTime'] == spec(created)['acquireTime']
    assert lease_time(spec(renewed)['renewTime']) == lease_time(spec(created)['renewTime']) + RETRY_PERIOD
    assert int(renewed['metadata']['resourceVersion']) > int(created['metadata']['resourceVersion'])


async def test_two_electors_at_once_make_one_leader_and_one_hot_standby(replicas: Replicas) -> None:
    a, b = replicas.start('a'), replicas.start('b')
    leader = await replicas.leader()
    standby = b if leader is a else a
    await wait(10 * LEASE_DURATION)

    assert [who for _, who in replicas.timeline.starts()] == [leader.identity]
    assert leader.elector.is_leader
    assert not standby.elector.is_leader
    assert standby.elector.lease_holder == leader.identity
    with pytest.raises(NotLeaderError, match=f'^{standby.identity} does not lead: Lease '
                                             f'{replicas.k8s.namespace}/kubearq-leader is held by {leader.identity}$'):
        standby.elector.ensure_leader()
    leader.elector.ensure_leader()
    assert spec(await replicas.lease())['leaseTransitions'] == 0
    assert leader.gauge.values == [0, 1]
    assert standby.gauge.values == [0]


@pytest.mark.parametrize('outage', ['cut', 'failing'])
async def test_leader_that_cannot_renew_stops_within_renew_deadline_before_a_standby_takes_over(
        replicas: Replicas, outage: Literal['cut', 'failing']) -> None:
    a = replicas.start('a')
    await replicas.leader()
    b = replicas.start('b')
    await wait(3 * LEASE_DURATION)

    a.network.state = outage
    await until(lambda: bool(replicas.timeline.times('a', 'stop')), within=RENEW_DEADLINE + 1)
    last_renewal = lease_time(spec(await replicas.lease())['renewTime'])
    stopped = replicas.timeline.times('a', 'stop')[0]
    assert stopped == pytest.approx(last_renewal + RENEW_DEADLINE, abs=0.01)
    assert not a.elector.is_leader
    assert a.gauge.values == [0, 1, 0]
    with pytest.raises(NotLeaderError):
        a.elector.ensure_leader()

    await until(lambda: b.elector.is_leader, within=LEASE_DURATION + 2 * LONGEST_POLL)
    taken_over = replicas.timeline.times('b', 'start')[0]
    assert taken_over - last_renewal >= LEASE_DURATION
    a.network.state = 'up'
    await wait(3 * LEASE_DURATION)

    assert not a.elector.is_leader
    assert a.elector.lease_holder == 'b'
    assert spec(await replicas.lease())['leaseTransitions'] == 1
    replicas.timeline.assert_one_leader_at_a_time()


async def test_release_on_shutdown_hands_over_within_a_retry_period(replicas: Replicas) -> None:
    a = replicas.start('a')
    await replicas.leader()
    b = replicas.start('b')
    await wait(LEASE_DURATION)

    released_at = now()
    assert await a.elector.release() is True
    released = await replicas.lease()
    await until(lambda: b.elector.is_leader, within=LONGEST_POLL + 0.1)

    assert a.task.done()
    assert a.task.exception() is None
    assert replicas.timeline.times('a', 'stop') == [released_at]  # stopped before the Lease was written
    assert replicas.timeline.times('b', 'start')[0] - released_at <= 3.0  # the hand-off target
    assert spec(released) | {'acquireTime': None, 'renewTime': None} == {
        'holderIdentity': '', 'leaseDurationSeconds': 1, 'leaseTransitions': 0,
        'acquireTime': None, 'renewTime': None}
    assert spec(await replicas.lease())['leaseTransitions'] == 1
    assert a.gauge.values == [0, 1, 0]
    replicas.timeline.assert_one_leader_at_a_time()


async def test_killed_leader_is_replaced_after_the_lease_duration_not_before(replicas: Replicas) -> None:
    a = replicas.start('a')
    await replicas.leader()
    b = replicas.start('b')
    await wait(LEASE_DURATION + 0.5)

    await replicas.kill(a)
    last_renewal = lease_time(spec(await replicas.lease())['renewTime'])
    await until(lambda: b.elector.is_leader, within=LEASE_DURATION + 2 * LONGEST_POLL)
    taken_over = replicas.timeline.times('b', 'start')[0]
    lease = await replicas.lease()

    assert LEASE_DURATION <= taken_over - last_renewal <= LEASE_DURATION + 2 * LONGEST_POLL
    assert spec(lease)['holderIdentity'] == 'b'
    assert spec(lease)['leaseTransitions'] == 1
    assert spec(lease)['acquireTime'] == spec(lease)['renewTime']
    replicas.timeline.assert_one_leader_at_a_time()


async def test_standby_judges_expiry_by_seeing_the_lease_change_not_by_the_holders_clock(
        replicas: Replicas) -> None:
    ns = replicas.k8s.namespace
    hour_behind = (EPOCH - datetime.timedelta(hours=1)).strftime(MICROTIME_FORMAT)
    lease = await replicas.k8s.api.create(kube.LEASES, {'metadata': {'name': LEASE}, 'spec': {
        'holderIdentity': 'skewed', 'leaseDurationSeconds': LEASE_DURATION, 'renewTime': hour_behind}},
        namespace=ns, timeout=T)

    async def renew_with_a_clock_an_hour_behind() -> None:
        nonlocal lease
        for count in range(5 * LEASE_DURATION):
            await asyncio.sleep(RETRY_PERIOD)
            lease = await replicas.k8s.api.replace(kube.LEASES, LEASE, {**lease, 'spec': {
                **spec(lease), 'acquireTime': hour_behind, 'renewTime': hour_behind,
                'leaseTransitions': count}}, namespace=ns, timeout=T)

    a = replicas.start('a')
    await renew_with_a_clock_an_hour_behind()
    stopped_renewing = now()

    assert not replicas.timeline.starts()
    assert a.elector.lease_holder == 'skewed'
    await until(lambda: a.elector.is_leader, within=LEASE_DURATION + 2 * LONGEST_POLL)
    assert replicas.timeline.times('a', 'start')[0] - stopped_renewing >= LEASE_DURATION


async def test_takeover_loses_to_a_write_made_between_its_read_and_its_write(replicas: Replicas) -> None:
    ns = replicas.k8s.namespace
    await replicas.k8s.api.create(kube.LEASES, {'metadata': {'name': LEASE}, 'spec': {
        'holderIdentity': 'gone', 'leaseDurationSeconds': LEASE_DURATION, 'leaseTransitions': 4}},
        namespace=ns, timeout=T)
    intruded_at: list[float] = []

    async def intrude() -> None:
        current = await replicas.lease()
        await replicas.k8s.api.replace(kube.LEASES, LEASE, {**current, 'spec': {
            **spec(current), 'holderIdentity': 'intruder', 'leaseTransitions': 5}}, namespace=ns, timeout=T)
        intruded_at.append(now())

    a = replicas.start('a')
    a.network.before_next_replace = intrude
    await until(lambda: bool(intruded_at), within=LEASE_DURATION + 2 * LONGEST_POLL)
    await wait(LEASE_DURATION - 2 * LONGEST_POLL)

    assert not replicas.timeline.starts()
    assert not a.elector.is_leader
    assert a.elector.lease_holder == 'intruder'
    assert spec(await replicas.lease())['holderIdentity'] == 'intruder'
    await until(lambda: a.elector.is_leader, within=4 * LONGEST_POLL)  # the intruder never renews
    assert replicas.timeline.times('a', 'start')[0] - intruded_at[0] >= LEASE_DURATION
    assert spec(await replicas.lease())['leaseTransitions'] == 6


async def test_release_frees_a_lease_taken_by_a_write_whose_answer_was_lost(replicas: Replicas) -> None:
    await replicas.k8s.api.create(kube.LEASES, {'metadata': {'name': LEASE}, 'spec': {
        'holderIdentity': 'gone', 'leaseDurationSeconds': LEASE_DURATION, 'leaseTransitions': 2}},
        namespace=replicas.k8s.namespace, timeout=T)
    a = replicas.start('a')
    a.network.lose_next_replace_reply = True

    async def taken_by_a() -> bool:
        return spec(await replicas.lease())['holderIdentity'] == 'a'
    await eventually(taken_by_a, within=LEASE_DURATION + 2 * LONGEST_POLL, interval=0.5)  # a GET a look
    assert await a.elector.release() is True
    released = await replicas.lease()

    assert not replicas.timeline.starts()  # it never knew it held the Lease
    assert spec(released)['holderIdentity'] == ''
    assert spec(released)['leaseTransitions'] == 3


@pytest.mark.parametrize('how', ['overwritten', 'recreated'])
async def test_leader_stops_at_once_when_another_holder_wrote_the_lease(
        replicas: Replicas, how: Literal['overwritten', 'recreated']) -> None:
    ns = replicas.k8s.namespace
    a = replicas.start('a')
    await replicas.leader()
    await wait(LEASE_DURATION)

    current = await replicas.lease()
    usurper_spec = {'holderIdentity': 'usurper', 'leaseDurationSeconds': LEASE_DURATION, 'leaseTransitions': 1}
    if how == 'overwritten':
        await replicas.k8s.api.replace(kube.LEASES, LEASE, {**current, 'spec': usurper_spec}, namespace=ns, timeout=T)
    else:
        await replicas.k8s.api.delete(kube.LEASES, LEASE, namespace=ns, timeout=T)
        await replicas.k8s.api.create(kube.LEASES, {'metadata': {'name': LEASE}, 'spec': usurper_spec},
                                      namespace=ns, timeout=T)
    written_at = now()
    await until(lambda: not a.elector.is_leader, within=RETRY_PERIOD + 0.1)

    assert replicas.timeline.times('a', 'stop')[0] - written_at <= RETRY_PERIOD  # at its next renewal
    assert a.elector.lease_holder == 'usurper'
    assert spec(await replicas.lease())['holderIdentity'] == 'usurper'


async def test_leader_work_is_cancelled_before_on_stopped_leading_runs(replicas: Replicas) -> None:
    steps: list[str] = []

    async def reconcile_forever() -> None:
        steps.append('reconciling')
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            steps.append('cancelled')
            raise

    a = replicas.start('a', reconcile_forever)
    await replicas.leader()
    a.network.state = 'failing'
    await until(lambda: bool(replicas.timeline.times('a', 'stop')), within=RENEW_DEADLINE + 1)

    assert steps == ['reconciling', 'cancelled']
    assert [kind for _, who, kind in replicas.timeline.events] == ['start', 'stop']
    assert not a.task.done()  # stands by and campaigns again


async def test_failing_leader_work_releases_the_lease_and_raises_from_run(replicas: Replicas) -> None:
    async def broken_reconcile() -> None:
        await asyncio.sleep(1)
        raise RuntimeError('a bug in the reconciler')

    a = replicas.start('a', broken_reconcile)
    await replicas.leader()
    b = replicas.start('b')
    await asyncio.wait([a.task])
    failed_at = now()

    with pytest.raises(RuntimeError, match='a bug in the reconciler'):
        a.task.result()
    await until(lambda: b.elector.is_leader, within=LONGEST_POLL + 0.1)
    assert replicas.timeline.times('b', 'start')[0] - failed_at <= LONGEST_POLL
    replicas.timeline.assert_one_leader_at_a_time()


async def test_twenty_forced_leader_kills_among_three_electors_keep_one_leader_at_a_time(
        replicas: Replicas) -> None:
    for identity in ('a', 'b', 'c'):
        replicas.start(identity)
    leader = await replicas.leader()

    for generation in range(1, 21):
        await wait(RETRY_PERIOD * generation % 7)  # kill at different points of the renewal cycle
        killed_at = now()
        await replicas.kill(leader)
        replicas.start(f'{leader.identity.split("-")[0]}-{generation}')  # its pod, restarted under a new name
        leader = await replicas.leader(within=LEASE_DURATION + 2 * LONGEST_POLL + RETRY_PERIOD)
        assert now() - killed_at <= LEASE_DURATION + 2 * LONGEST_POLL

    starts = replicas.timeline.starts()
    assert len(starts) == 21
    assert len({who for _, who in starts}) == 21
    replicas.timeline.assert_one_leader_at_a_time()
    assert sum(replica.elector.is_leader for replica in replicas.all) == 1
    assert spec(await replicas.lease())['leaseTransitions'] == 20

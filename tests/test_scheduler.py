"""Planning ticks: the shared two-tick answer gives the plan a full walk over the cron expression gives."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from kubearq.operator.cron import iter_ticks
from kubearq.operator.scheduler import TickPlan, plan_ticks

EXPRESSIONS = ["* * * * *", "*/15 * * * *", "0 * * * *", "30 2 * * *", "0 1 * * 0", "@daily"]
ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe"]


def walked_plan(schedule: str, time_zone: str, since: datetime, now: datetime, deadline: int | None) -> TickPlan:
    """Every tick in (since, now] walked one by one: what the plan must equal."""
    due = []
    ticks = iter_ticks(schedule, time_zone, since)
    tick = next(ticks)
    while tick <= now:
        due.append(tick)
        tick = next(ticks)
    enqueue = due[-1:] if deadline is None else [t for t in due if t >= now - timedelta(seconds=deadline)]
    return TickPlan(enqueue, len(due) - len(enqueue), due[-1] if due else None, tick)


@settings(max_examples=300, deadline=None)
@given(schedule=st.sampled_from(EXPRESSIONS), time_zone=st.sampled_from(ZONES),
       since=st.datetimes(min_value=datetime(2026, 1, 1), max_value=datetime(2027, 1, 1), timezones=st.just(UTC)),
       after=st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=2)),
       deadline=st.none() | st.integers(min_value=0, max_value=7200))
def test_a_plan_is_the_walk_of_every_tick_since_the_last(schedule: str, time_zone: str, since: datetime,
                                                          after: timedelta, deadline: int | None) -> None:
    now = since + after
    assert plan_ticks(schedule, time_zone, since, now, deadline) == walked_plan(schedule, time_zone, since, now,
                                                                                 deadline)


def test_a_pass_on_the_tick_plans_that_tick_and_the_next() -> None:
    since = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)
    plan = plan_ticks("* * * * *", "UTC", since, since + timedelta(minutes=1), None)
    assert (plan.enqueue, plan.missed, plan.next_tick) == (
        [since + timedelta(minutes=1)], 0, since + timedelta(minutes=2))

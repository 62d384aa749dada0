"""Cron parsing and tick iteration, including the DST days CronJob gets wrong (kubernetes#121594)."""

from __future__ import annotations

from datetime import UTC, datetime
from itertools import islice, pairwise

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kubearq.operator.cron import MACROS, check_schedule, expand_macro, iter_ticks, next_tick


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def test_next_tick_is_strictly_after_the_given_time() -> None:
    assert next_tick("*/15 * * * *", "UTC", utc(2026, 1, 1, 0, 15)) == utc(2026, 1, 1, 0, 30)
    assert next_tick("*/15 * * * *", "UTC", utc(2026, 1, 1, 0, 14, 59)) == utc(2026, 1, 1, 0, 15)


@pytest.mark.parametrize(("macro", "expression"), sorted(MACROS.items()))
def test_macros_expand_to_five_fields(macro: str, expression: str) -> None:
    assert expand_macro(macro) == expression
    assert check_schedule(macro) == macro


def test_schedule_is_read_in_its_time_zone() -> None:
    tick = next_tick("0 3 * * *", "Europe/Berlin", utc(2026, 7, 1, 0, 0))
    assert tick.astimezone(UTC) == utc(2026, 7, 1, 1, 0)


def test_spring_forward_fixed_time_tick_fires_once_at_the_end_of_the_gap() -> None:
    # 2026-03-08 America/New_York: 02:00 EST jumps to 03:00 EDT; 02:30 does not exist that day.
    ticks = list(islice(iter_ticks("30 2 * * *", "America/New_York", utc(2026, 3, 7, 12, 0)), 3))
    assert [tick.astimezone(UTC) for tick in ticks] == [
        utc(2026, 3, 8, 7, 0),  # 03:00 EDT, the end of the gap: fired once, not skipped
        utc(2026, 3, 9, 6, 30),
        utc(2026, 3, 10, 6, 30),
    ]


def test_fall_back_fixed_time_tick_fires_once() -> None:
    # 2026-11-01 America/New_York: 01:00-02:00 happens twice (EDT, then EST).
    ticks = list(islice(iter_ticks("30 1 * * *", "America/New_York", utc(2026, 10, 31, 12, 0)), 3))
    assert [tick.astimezone(UTC) for tick in ticks] == [
        utc(2026, 11, 1, 5, 30),  # 01:30 EDT only; not again at 01:30 EST
        utc(2026, 11, 2, 6, 30),
        utc(2026, 11, 3, 6, 30),
    ]


def test_fall_back_wildcard_hour_fires_in_both_copies_of_the_repeated_hour() -> None:
    start = utc(2026, 11, 1, 4, 0)  # 00:00 EDT
    ticks = [tick.astimezone(UTC) for tick in islice(iter_ticks("30 * * * *", "America/New_York", start), 4)]
    assert ticks == [utc(2026, 11, 1, 4, 30), utc(2026, 11, 1, 5, 30), utc(2026, 11, 1, 6, 30),
                     utc(2026, 11, 1, 7, 30)]


@given(
    minute=st.integers(0, 59),
    hour=st.integers(0, 23),
    start=st.datetimes(min_value=datetime(2020, 1, 1), max_value=datetime(2035, 1, 1), timezones=st.just(UTC)),
    zone=st.sampled_from(["UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "Asia/Kolkata"]),
)
def test_daily_schedule_fires_once_per_local_day_in_order(
    minute: int, hour: int, start: datetime, zone: str
) -> None:
    ticks = list(islice(iter_ticks(f"{minute} {hour} * * *", zone, start), 40))
    assert all(later > earlier for earlier, later in pairwise(ticks))
    local_days = [tick.date() for tick in ticks]
    assert len(set(local_days)) == len(local_days)  # never twice on one local day (fall-back)
    assert (local_days[-1] - local_days[0]).days == len(local_days) - 1  # no day lost (spring-forward)

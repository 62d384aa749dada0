"""Cron expressions and time zones: parsing, validation with helpful messages, tick iteration.

`cronsim` implements Debian cron's DST rules, which design.md asks for: a fixed-time tick inside a
spring-forward gap fires once at the end of the gap, one inside the repeated fall-back hour fires once,
and wildcard-hour schedules fire in both copies of the repeated hour.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from itertools import islice
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
CRON_EXAMPLE = "e.g. '*/15 * * * *' (every 15 minutes), '0 3 * * *' (daily 03:00) or '@daily'"
FIELD_NAMES = ("minute", "hour", "day-of-month", "month", "day-of-week")


def expand_macro(schedule: str) -> str:
    """`@daily` → `0 0 * * *`; five-field expressions pass through with white space folded."""
    text = " ".join(schedule.split())
    return MACROS.get(text.lower(), text)


def check_schedule(schedule: str) -> str:
    """Validate a 5-field cron expression or macro; the message says what is wrong and what is right."""
    expression = expand_macro(schedule)
    if expression.startswith("@"):
        raise ValueError(
            f"{schedule!r} is not a known macro; use one of {', '.join(MACROS)} or 5 fields, {CRON_EXAMPLE}"
        )
    fields = expression.split(" ")
    if len(fields) != len(FIELD_NAMES):
        raise ValueError(
            f"{schedule!r} has {len(fields)} fields, cron needs 5 "
            f"(minute hour day-of-month month day-of-week); {CRON_EXAMPLE}"
        )
    try:
        CronSim(expression, datetime(2000, 1, 1, tzinfo=ZoneInfo("UTC")))
    except CronSimError as error:
        # cronsim says "Bad minute" / "Bad day-of-month" (that never occurs, e.g. 30 February).
        reason = str(error).lower()
        raise ValueError(f"{schedule!r} is not a valid cron expression ({reason}); {CRON_EXAMPLE}") from None
    return schedule


def load_time_zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"{name!r} is not an IANA time zone; use a name like 'UTC', 'Europe/Berlin' or 'America/New_York'"
        ) from None


def check_time_zone(name: str) -> str:
    load_time_zone(name)
    return name


def iter_ticks(schedule: str, time_zone: str, after: datetime) -> Iterator[datetime]:
    """Fire times strictly after `after`, as aware datetimes in the schedule's time zone."""
    zone = load_time_zone(time_zone)
    yield from CronSim(expand_macro(schedule), after.astimezone(zone))


def next_tick(schedule: str, time_zone: str, after: datetime) -> datetime:
    return next(iter_ticks(schedule, time_zone, after))


def fire_times(schedule: str, time_zone: str, after: datetime, count: int) -> list[tuple[datetime, str]]:
    """The next `count` fire times after `after` (as `iter_ticks` gives them, in the schedule's time zone), each
    with a note where its UTC offset differs from the one before (or from `after`'s, for the first): a DST change
    in between, e.g. "UTC offset now +02:00 (CEST)"; else ""."""
    offset = after.astimezone(load_time_zone(time_zone)).utcoffset()
    found = []
    for tick in islice(iter_ticks(schedule, time_zone, after), count):
        note = ""
        if tick.utcoffset() != offset:
            sign = tick.strftime("%z")
            note = f"UTC offset now {sign[:3]}:{sign[3:]} ({tick.tzname()})"
            offset = tick.utcoffset()
        found.append((tick, note))
    return found

"""Schemathesis hooks for tally's API (loaded by scripts/api-fuzz.sh).

The OpenAPI document states every rule of a single parameter (patterns, enums,
formats, years). Two rules tie parameters together and no schema can state
them: `from` and `to` are bucket boundaries of the granularity in the time zone
(a local clock hour, local midnight, a Monday's, the first of a month), and `to`
comes after `from` by at most 745 hours, 366 days, 260 weeks or 120 months. So
that the fuzzer's *valid* requests are valid, this hook moves a positive case's
generated `from` to the start of its bucket in the zone and puts `to` a drawn
number of buckets after it (written in UTC). Its zone is one of a few with
30- and 45-minute offsets and DST changes (the server is tested against
Python's tz database for these in serving-layer/tests/calendar.rs), always
given as `tz`: a settings change the fuzzer made (even a negative case that
happens to be valid) may have moved any merchant's own calendar. Half of the positive cases are
moved into the last days, for merchant `m_1`, where the test lake has data, so
that the batch and speed views are read too. A positive settings change goes
to a merchant of its own, so it never moves the other cases' calendars.
Negative cases are left as generated: the server must refuse them whatever
their range.
"""

import datetime as dt
import hashlib
from zoneinfo import ZoneInfo

import schemathesis

UTC = dt.timezone.utc
MAX_BUCKETS = {"hour": 31 * 24 + 1, "day": 366, "week": 260, "month": 120}
ZONES = ["UTC", "Asia/Kolkata", "Asia/Kathmandu", "America/St_Johns",
         "Europe/London", "America/New_York", "Australia/Lord_Howe"]
QUARTER = dt.timedelta(minutes=15)


def _draw(*values) -> int:
    """A number derived from the generated values (so shrinking stays stable)."""
    digest = hashlib.sha256(repr(values).encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _parse(value):
    if not isinstance(value, str):
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None


def _midnight(d: dt.date, tz) -> dt.datetime:
    return dt.datetime(d.year, d.month, d.day, tzinfo=tz).astimezone(UTC)


def _floor(t: dt.datetime, tz, unit: str) -> dt.datetime:
    """The start of `t`'s bucket (PEP 495: a repeated hour keeps its fold, a
    wall time in a gap is the instant the gap ends)."""
    local = t.astimezone(tz)
    if unit == "hour":
        return local.replace(minute=0, second=0, microsecond=0).astimezone(UTC)
    d = local.date()
    if unit == "week":
        d -= dt.timedelta(days=d.weekday())
    elif unit == "month":
        d = d.replace(day=1)
    return _midnight(d, tz)


def _after(t: dt.datetime, tz, unit: str, n: int) -> dt.datetime:
    """The `n`-th bucket boundary after boundary `t`."""
    if unit == "hour":
        for _ in range(n):
            s = t + QUARTER
            while _floor(s, tz, unit) != s:
                s += QUARTER
            t = s
        return t
    d = t.astimezone(tz).date()
    if unit == "day":
        d += dt.timedelta(days=n)
    elif unit == "week":
        d += dt.timedelta(weeks=n)
    else:
        months = d.year * 12 + d.month - 1 + n
        d = dt.date(months // 12, months % 12 + 1, 1)
    return _midnight(d, tz)


@schemathesis.hook
def map_case(context, case):
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return case
    if case.method.upper() == "PUT" and isinstance(case.path_parameters, dict):
        case.path_parameters["merchant_id"] = "fuzz_settings"
        return case
    query = case.query
    if not isinstance(query, dict) or "from" not in query or "to" not in query:
        return case
    unit = query.get("granularity", "hour")
    if unit not in MAX_BUCKETS:
        return case
    start = _parse(query["from"])
    if start is None:
        return case
    draw = _draw(query["from"], query["to"], unit, query.get("tz"))
    zone = ZONES[(draw // 7) % len(ZONES)]
    query["tz"] = zone
    tz = ZoneInfo(zone)
    if draw % 2 == 0:
        # into the test lake's data: the last days, merchant m_1
        start = dt.datetime.now(UTC) - dt.timedelta(days=3 if unit == "hour" else 6)
        if isinstance(case.path_parameters, dict):
            case.path_parameters["merchant_id"] = "m_1"
    # within the years chrono-tz has transitions for (it lists them up to
    # 2099 and does not extend the rules beyond, where Python's zoneinfo
    # follows the zone's POSIX rule; noted in DEPLOY.md), and not at 1970,
    # where a zone's offset could move the written year out of range
    start = min(max(start.astimezone(UTC), dt.datetime(1971, 1, 1, tzinfo=UTC)),
                dt.datetime(2088, 1, 1, tzinfo=UTC))
    buckets = 1 + (draw // 2) % (MAX_BUCKETS[unit] - 1 if unit == "hour" else MAX_BUCKETS[unit])
    if unit == "hour":
        buckets = min(buckets, 200)
    first = _floor(start, tz, unit)
    query["from"] = first.strftime("%Y-%m-%dT%H:%M:%SZ")
    query["to"] = _after(first, tz, unit, buckets).strftime("%Y-%m-%dT%H:%M:%SZ")
    return case

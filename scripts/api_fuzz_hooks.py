"""Schemathesis hooks for tally's API (loaded by scripts/api-fuzz.sh).

The OpenAPI document states every rule of a single parameter (patterns, enums,
formats, years). Two rules tie parameters together and no schema can state
them: `from` and `to` are aligned to the granularity (a whole UTC hour, or a
UTC midnight for `day`), and `to` comes after `from` by at most 744 hours or
366 days. So that the fuzzer's *valid* requests are valid, this hook moves a
positive case's generated `from` to the start of its bucket and puts `to` a
drawn number of buckets after it, keeping each value's generated offset style
(`Z` or `±hh:mm`). Half of the positive cases are moved into the last days,
for merchant `m_1`, where the test lake has data, so that the batch and speed
views are read too. Negative cases are left as generated: the server must
refuse them whatever their range.
"""

import datetime as dt
import hashlib

import schemathesis

UTC = dt.timezone.utc
EPOCH = dt.datetime(1970, 1, 1, tzinfo=UTC)
STEP = {"hour": dt.timedelta(hours=1), "day": dt.timedelta(days=1)}
MAX_BUCKETS = {"hour": 31 * 24, "day": 366}
# the last `to` that can be written with a four-digit year
LAST_END = {
    "hour": dt.datetime(9999, 12, 31, 23, tzinfo=UTC),
    "day": dt.datetime(9999, 12, 31, tzinfo=UTC),
}


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


def _write(instant: dt.datetime, like: str) -> str:
    """`instant` in the offset style of the generated value `like`."""
    original = _parse(like)
    if original is not None and not like.endswith("Z"):
        local = instant.astimezone(original.tzinfo)
        if 1970 <= local.year <= 9999:
            return local.isoformat()
    return instant.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@schemathesis.hook
def map_case(context, case):
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return case
    query = case.query
    if not isinstance(query, dict) or "from" not in query or "to" not in query:
        return case
    granularity = query.get("granularity", "hour")
    if granularity not in STEP:
        return case
    start = _parse(query["from"])
    if start is None:
        return case
    step = STEP[granularity]
    draw = _draw(query["from"], query["to"], granularity)
    if draw % 2 == 0:
        # into the test lake's data: the last days, merchant m_1
        now = dt.datetime.now(UTC)
        start = now - dt.timedelta(days=3 if granularity == "hour" else 6)
        if isinstance(case.path_parameters, dict):
            case.path_parameters["merchant_id"] = "m_1"
    buckets = 1 + (draw // 2) % MAX_BUCKETS[granularity]
    # in whole buckets since the epoch, so nothing steps past year 9999
    first = min((start - EPOCH) // step, (LAST_END[granularity] - EPOCH) // step - buckets)
    start = EPOCH + first * step
    end = start + buckets * step
    query["from"] = _write(start, query["from"])
    query["to"] = _write(end, query["to"])
    return case

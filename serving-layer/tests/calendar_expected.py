"""The independent side of serving-layer/tests/calendar.rs.

Reads {"events": [...], "merchants": [...], "zones": [...]} on stdin and writes,
for every merchant in every zone, the expected buckets of a set of hour, day,
week and month ranges, computed from the raw events with Python's own tz
database (zoneinfo): every bucket's counters and exact distinct customers, and
the range's totals. Nothing here shares code with tally.

Buckets are the zone's calendar units: a bucket starts at the first instant of
its local unit (a local clock hour, midnight, a Monday's midnight, the first of
the month). An instant's bucket is found by truncating its local wall time and
converting back (PEP 495: the fold of a repeated hour is kept; a wall time in a
gap maps to the instant the gap ends), and a range's buckets are enumerated by
flooring every 15-minute step, so empty buckets are there too.
"""

import json
import sys
from datetime import date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

UTC = timezone.utc
STEP = 15 * 60 * 1000
COUNTERS = ["orders", "gross_sales", "refunds", "refunded_amount", "page_views"]

# local dates whose neighbourhoods the hour ranges cover: the 2026 DST changes
# of the zones tested, and two month ends
HOUR_DATES = [
    date(2026, 3, 8), date(2026, 3, 29), date(2026, 4, 1), date(2026, 4, 5),
    date(2026, 10, 4), date(2026, 10, 25), date(2026, 11, 1),
]


def ms(dt):
    return int(round(dt.timestamp() * 1000))


def floor(t_ms, tz, unit):
    local = datetime.fromtimestamp(t_ms / 1000, UTC).astimezone(tz)
    if unit == "hour":
        start = local.replace(minute=0, second=0, microsecond=0)
    else:
        d = local.date()
        if unit == "week":
            d = d - timedelta(days=d.weekday())
        elif unit == "month":
            d = d.replace(day=1)
        start = datetime(d.year, d.month, d.day, tzinfo=tz)
    return ms(start)


def midnight(d, tz):
    return ms(datetime(d.year, d.month, d.day, tzinfo=tz))


def ranges(tz):
    out = []
    for d in HOUR_DATES:
        out.append(("hour", midnight(d - timedelta(days=1), tz), midnight(d + timedelta(days=1), tz)))
    out.append(("day", midnight(date(2026, 3, 1), tz), midnight(date(2026, 4, 16), tz)))
    out.append(("day", midnight(date(2026, 10, 1), tz), midnight(date(2026, 11, 8), tz)))
    out.append(("week", midnight(date(2026, 2, 23), tz), midnight(date(2026, 4, 13), tz)))
    out.append(("week", midnight(date(2026, 9, 28), tz), midnight(date(2026, 11, 9), tz)))
    out.append(("month", midnight(date(2026, 2, 1), tz), midnight(date(2026, 12, 1), tz)))
    return out


def iso(t_ms):
    return datetime.fromtimestamp(t_ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def main():
    data = json.load(sys.stdin)
    by_merchant = {}
    for e in data["events"]:
        by_merchant.setdefault(e["merchant"], []).append(e)
    out = []
    for m in data["merchants"]:
        events = by_merchant.get(m, [])
        for zone in data["zones"]:
            tz = ZoneInfo(zone)
            for unit, frm, to in ranges(tz):
                starts = []
                t = frm
                while t < to:
                    s = floor(t, tz, unit)
                    if not starts or starts[-1] != s:
                        starts.append(s)
                    t += STEP
                assert starts[0] == frm, (zone, unit, frm)
                buckets = {s: ([0] * 5, set()) for s in starts}
                total = ([0] * 5, set())
                for e in events:
                    if not (frm <= e["ts_ms"] < to):
                        continue
                    b = buckets[floor(e["ts_ms"], tz, unit)]
                    for counters, customers in (b, total):
                        if e["type"] == "order":
                            counters[0] += 1
                            counters[1] += e["amount"]
                        elif e["type"] == "refund":
                            counters[2] += 1
                            counters[3] += e["amount"]
                        elif e["type"] == "page_view":
                            counters[4] += 1
                        if e.get("customer") is not None:
                            customers.add(e["customer"])
                out.append({
                    "merchant": m,
                    "zone": zone,
                    "unit": unit,
                    "from": iso(frm),
                    "to": iso(to),
                    "buckets": [
                        {"start": s, "c": buckets[s][0], "u": len(buckets[s][1])} for s in starts
                    ],
                    "totals": {"c": total[0], "u": len(total[1])},
                })
    json.dump(out, sys.stdout)


main()

"""Value forms shared by indexing and querying: normalised strings, date ranges, number ranges.

A date is a range at its own precision (`2024` is all of 2024; `2024-03-05T10:00Z` is one second),
stored as [low, high) in microseconds since the epoch, UTC. Dates without a time zone are taken as UTC.
"""
from __future__ import annotations

import re
import unicodedata
from calendar import monthrange
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation

MIN_US = -(2**62)
MAX_US = 2**62
NARROW_US = 86_400_000_000  # a date range at most this long (a day or finer) is "narrow"

_DATE = re.compile(
    r"(?P<y>\d{4})(?:-(?P<m>\d{2})(?:-(?P<d>\d{2})"
    r"(?:T(?P<H>\d{2})(?::(?P<M>\d{2})(?::(?P<S>\d{2})(?P<f>\.\d+)?)?)?(?P<tz>Z|[+-]\d{2}:\d{2})?)?)?)?")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def normalise(text: str) -> str:
    """Case- and accent-insensitive form for string search (`Zoë` -> `zoe`)."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold().strip()


def _us(dt: datetime) -> int:
    return (dt - _EPOCH) // timedelta(microseconds=1)


def date_range(value: str) -> tuple[int, int] | None:
    """[low, high) microseconds covered by a FHIR date/dateTime/instant; None if it is not one."""
    m = _DATE.fullmatch(value.strip())
    if not m:
        return None
    try:
        y = int(m["y"])
        if m["m"] is None:
            lo, hi = datetime(y, 1, 1, tzinfo=UTC), datetime(y + 1, 1, 1, tzinfo=UTC) if y < 9999 else None
        elif m["d"] is None:
            mo = int(m["m"])
            lo = datetime(y, mo, 1, tzinfo=UTC)
            hi = lo + timedelta(days=monthrange(y, mo)[1])
        elif m["H"] is None:
            lo = datetime(y, int(m["m"]), int(m["d"]), tzinfo=UTC)
            hi = lo + timedelta(days=1)
        else:
            tz = UTC
            if m["tz"] and m["tz"] != "Z":
                sign = 1 if m["tz"][0] == "+" else -1
                hours, minutes = int(m["tz"][1:3]), int(m["tz"][4:6])
                tz = timezone(timedelta(minutes=sign * (hours * 60 + minutes)))
            seconds = int(m["S"] or 0)
            frac = m["f"] or ""
            micro = int((frac[1:] + "000000")[:6]) if frac else 0
            lo = datetime(y, int(m["m"]), int(m["d"]), int(m["H"]), int(m["M"] or 0), seconds, micro, tzinfo=tz)
            if frac:
                step = timedelta(microseconds=max(1, 10 ** (6 - min(len(frac) - 1, 6))))
            elif m["S"] is not None:
                step = timedelta(seconds=1)
            else:
                step = timedelta(minutes=1)
            hi = lo + step
    except ValueError:
        return None
    return _us(lo), (_us(hi) if hi is not None else MAX_US)


def number_range(raw: str) -> tuple[Decimal, Decimal, Decimal] | None:
    """(value, low, high) of a search number at its precision: `100` -> 99.5 .. 100.5, `1e2` likewise."""
    try:
        value = Decimal(raw)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    exponent = value.as_tuple().exponent
    half = Decimal(5).scaleb(int(exponent) - 1)
    return value, value - half, value + half

"""Instants: stored as integer microseconds (UTC), shown as FHIR `instant` and HTTP-date strings."""
from __future__ import annotations

import time
from datetime import UTC, datetime
from email.utils import format_datetime, parsedate_to_datetime

from fhir_server.outcome import error


def now_us() -> int:
    """Now, to the millisecond (what `meta.lastUpdated` shows), as microseconds."""
    return time.time_ns() // 1_000_000 * 1000


def to_instant(us: int) -> str:
    """FHIR instant, e.g. `2026-11-23T15:24:50.123+00:00`."""
    return datetime.fromtimestamp(us / 1_000_000, UTC).isoformat(timespec="milliseconds")


def to_http_date(us: int) -> str:
    return format_datetime(datetime.fromtimestamp(us // 1_000_000, UTC), usegmt=True)


def parse_instant(value: str, param: str) -> int:
    """A FHIR instant/dateTime with a time zone (as `_since` requires) -> microseconds."""
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise error(400, "invalid", f"Parameter '{param}': '{value}' is not a valid instant") from None
    if dt.tzinfo is None:
        raise error(400, "invalid", f"Parameter '{param}': '{value}' needs a time zone")
    return int(dt.timestamp() * 1_000_000)


def parse_http_date(value: str) -> int | None:
    """An HTTP-date (If-Modified-Since) -> microseconds; None if unreadable (the header is then ignored)."""
    try:
        return int(parsedate_to_datetime(value).timestamp() * 1_000_000)
    except (TypeError, ValueError):
        return None

"""One small unit per search-parameter type: which modifiers it takes, how a value is parsed, and the
SQL that matches it against its index table.

Each unit's `clause` returns a condition on the primary-key column of the searched resource table,
so the engine can AND/OR units, nest them in chains and `_has`, and put a policy beside them.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, ClassVar

import sqlalchemy as sa

from conformance.search_parameters import SearchParameter
from fhir_server.outcome import error
from fhir_server.search.index import split_reference
from fhir_server.search.values import NARROW_US, date_range, normalise, number_range
from fhir_server.storage.schema import INDEX_TABLES

PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")


def split_escaped(value: str, sep: str) -> list[str]:
    """Split on `sep` but not on `\\sep` (FHIR search escaping); unescape `\\,` `\\|` `\\$` `\\\\`."""
    parts, cur, i = [], [], 0
    while i < len(value):
        ch = value[i]
        if ch == "\\" and i + 1 < len(value):
            nxt = value[i + 1]
            cur.append(nxt if nxt in ",|$\\" else ch + nxt)
            i += 2
            continue
        if ch == sep:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    parts.append("".join(cur))
    return parts


def bad_value(name: str, raw: str, why: str) -> Exception:
    return error(400, "invalid", f"Search parameter '{name}': '{raw}' {why}")


def _prefixed(raw: str) -> tuple[str, str]:
    if len(raw) > 2 and raw[:2] in PREFIXES and not raw[2].isalpha():
        return raw[:2], raw[2:]
    return "eq", raw


@dataclass
class Unit(ABC):
    """A search-parameter type: its modifiers, and the SQL condition for one parameter occurrence."""

    param: SearchParameter
    rtype: str | None  # None: any type (a common parameter in a search across types)
    modifier: str | None
    name: str  # as written in the request, for error messages

    modifiers: ClassVar[frozenset[str]] = frozenset()

    @abstractmethod
    def clause(self, r: sa.FromClause, raw: str) -> sa.ColumnElement[bool]:
        """Condition on resource table `r` for one occurrence (comma-separated values are ORed)."""

    @abstractmethod
    def sort_key(self, r: sa.FromClause, descending: bool) -> sa.ColumnElement[Any]:
        """A per-resource value to sort on."""


class IndexedUnit(Unit):
    """A type whose values live in an index table (`kind`)."""

    kind: ClassVar[str]

    @property
    def table(self) -> sa.Table:
        return INDEX_TABLES[self.kind]

    def rows(self, param_code: str | None = None) -> sa.Select[Any]:
        t = self.table
        q = sa.select(t.c.resource_pk).where(t.c.param == (param_code or self.param.code))
        return q.where(t.c.type == self.rtype) if self.rtype else q

    def clause(self, r: sa.FromClause, raw: str) -> sa.ColumnElement[bool]:
        pk = r.c.pk
        if self.modifier == "missing":
            if raw not in ("true", "false"):
                raise bad_value(self.name, raw, "must be true or false")
            present = pk.in_(self.rows())
            return sa.not_(present) if raw == "true" else present
        values = [v for v in split_escaped(raw, ",")]
        if any(v == "" for v in values):
            raise bad_value(self.name, raw, "has an empty value")
        matching = self.rows().where(sa.or_(*(self.match(v) for v in values)))
        return pk.not_in(matching) if self.modifier == "not" else pk.in_(matching)

    @abstractmethod
    def match(self, value: str) -> sa.ColumnElement[bool]:
        """The condition on an index row for one value."""

    def sort_key(self, r: sa.FromClause, descending: bool) -> sa.ColumnElement[Any]:
        """A per-resource value to sort on: the lowest (ascending) or highest (descending) indexed value."""
        agg = sa.func.max if descending else sa.func.min
        t = self.table
        return (sa.select(agg(self.sort_column())).where(t.c.resource_pk == r.c.pk, t.c.param == self.param.code)
                .scalar_subquery())

    @abstractmethod
    def sort_column(self) -> sa.ColumnElement[Any]:
        """The index column this type sorts by."""


class TokenUnit(IndexedUnit):
    kind = "token"
    modifiers = frozenset({"missing", "not", "text"})

    def clause(self, r: sa.FromClause, raw: str) -> sa.ColumnElement[bool]:
        if self.modifier == "text":  # string search on the codes' display text
            text = StringUnit(self.param, self.rtype, None, self.name)
            return r.c.pk.in_(text.rows(f"{self.param.code}:text").where(
                sa.or_(*(text.match(v) for v in split_escaped(raw, ",")))))
        return super().clause(r, raw)

    def match(self, value: str) -> sa.ColumnElement[bool]:
        t = self.table
        parts = split_escaped(value, "|") if "|" in value.replace("\\|", "") else [value]
        if len(parts) == 1:
            return t.c.code == parts[0]
        if len(parts) != 2:
            raise bad_value(self.name, value, "has more than one '|'")
        system, code = parts
        conds = []
        if code:
            conds.append(t.c.code == code)
        conds.append(t.c.system.is_(None) if system == "" else t.c.system == system)
        return sa.and_(*conds)

    def sort_column(self) -> sa.ColumnElement[Any]:
        return self.table.c.code


class StringUnit(IndexedUnit):
    kind = "string"
    modifiers = frozenset({"missing", "exact", "contains"})

    def match(self, value: str) -> sa.ColumnElement[bool]:
        t = self.table
        if self.modifier == "exact":
            return t.c.exact == value
        norm = normalise(value)[:255]
        if self.modifier == "contains":
            escaped = norm.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            return t.c.value.like(f"%{escaped}%", escape="\\")
        return sa.and_(t.c.value >= norm, t.c.value < norm + "\U0010ffff")  # starts-with, index range

    def sort_column(self) -> sa.ColumnElement[Any]:
        return self.table.c.value


class DateUnit(IndexedUnit):
    """Dates are ranges. Most indexed values are narrow (a day or finer): for those, every prefix
    also bounds `lo`, which makes the condition an index range scan instead of a scan of every
    value below or above the search date; wide values (years, periods) are checked as they are.
    Repeated occurrences (`date=ge2020&date=lt2021`) are one range on one value, as HAPI does."""

    kind = "date"
    modifiers = frozenset({"missing"})

    def match(self, value: str) -> sa.ColumnElement[bool]:
        return self._and_match([value])

    def clause_and(self, r: sa.FromClause, raws: list[str]) -> sa.ColumnElement[bool]:
        """Several ANDed occurrences (single values each) as one condition on the same value."""
        return r.c.pk.in_(self.rows().where(self._and_match(raws)))

    def _and_match(self, values: list[str]) -> sa.ColumnElement[bool]:
        t = self.table
        conds, low, high = [], None, None
        now = datetime_now_us()
        for value in values:
            prefix, raw = _prefixed(value)
            rng = date_range(raw)
            if rng is None:
                raise bad_value(self.name, value, "is not a valid date, dateTime or instant")
            conds.append(range_condition(prefix, rng[0], rng[1], t.c.lo, t.c.hi, now))
            lo_bound, hi_bound = _narrow_lo_bounds(prefix, rng[0], rng[1], now)
            low = lo_bound if low is None or (lo_bound is not None and lo_bound > low) else low
            high = hi_bound if high is None or (hi_bound is not None and hi_bound < high) else high
        narrow = [t.c.narrow.is_(True), *conds]
        if low is not None:
            narrow.append(t.c.lo >= low)
        if high is not None:
            narrow.append(t.c.lo < high)
        return sa.or_(sa.and_(*narrow), sa.and_(t.c.narrow.is_(False), *conds))

    def sort_column(self) -> sa.ColumnElement[Any]:
        return self.table.c.lo


def _narrow_lo_bounds(prefix: str, plo: int, phi: int, now: int) -> tuple[int | None, int | None]:
    """For values with hi - lo <= NARROW_US: bounds on lo implied by each prefix's condition."""
    day = NARROW_US
    if prefix == "eq":
        return plo, phi
    if prefix in ("gt", "ge"):
        return (phi if prefix == "gt" else plo) - day, None
    if prefix == "sa":
        return phi, None
    if prefix in ("lt", "eb"):
        return None, plo
    if prefix == "le":
        return None, phi
    if prefix == "ap":
        gap = int(abs(now - plo) * 0.1)
        return plo - gap - day, phi + gap
    return None, None  # ne


def datetime_now_us() -> int:
    return int(datetime.now(UTC).timestamp() * 1_000_000)


def range_condition(prefix: str, plo: Any, phi: Any, lo: Any, hi: Any, now: Any) -> sa.ColumnElement[bool]:
    """FHIR prefix semantics between a search range [plo, phi) and indexed ranges [lo, hi)."""
    eq = sa.and_(lo >= plo, hi <= phi)
    if prefix == "eq":
        return eq
    if prefix == "ne":
        return sa.not_(eq)
    if prefix == "gt":
        return hi > phi
    if prefix == "lt":
        return lo < plo
    if prefix == "ge":
        return sa.or_(hi > phi, eq)
    if prefix == "le":
        return sa.or_(lo < plo, eq)
    if prefix == "sa":
        return lo >= phi
    if prefix == "eb":
        return hi <= plo
    # ap: within 10% of the distance from now (spec's suggestion)
    gap = abs(now - plo) * 0.1 if now is not None else 0
    return sa.and_(lo < phi + gap, hi > plo - gap)


class NumberUnit(IndexedUnit):
    kind = "number"
    modifiers = frozenset({"missing"})

    def match(self, value: str) -> sa.ColumnElement[bool]:
        prefix, raw = _prefixed(value)
        parsed = number_range(raw)
        if parsed is None:
            raise bad_value(self.name, value, "is not a number")
        return number_condition(prefix, parsed, self.table.c.value)

    def sort_column(self) -> sa.ColumnElement[Any]:
        return self.table.c.value


def number_condition(prefix: str, parsed: tuple[Decimal, Decimal, Decimal], column: Any) -> sa.ColumnElement[bool]:
    value, lo, hi = (float(x) for x in parsed)
    if prefix == "eq":
        return sa.and_(column >= lo, column < hi)
    if prefix == "ne":
        return sa.or_(column < lo, column >= hi)
    if prefix in ("gt", "sa"):
        return column > value
    if prefix in ("lt", "eb"):
        return column < value
    if prefix == "ge":
        return column >= value
    if prefix == "le":
        return column <= value
    gap = abs(value) * 0.1  # ap
    return sa.and_(column >= value - gap, column <= value + gap)


class QuantityUnit(IndexedUnit):
    kind = "quantity"
    modifiers = frozenset({"missing"})

    def match(self, value: str) -> sa.ColumnElement[bool]:
        parts = split_escaped(value, "|")
        if len(parts) not in (1, 3):
            raise bad_value(self.name, value, "is not [prefix]number[|system|code]")
        prefix, raw = _prefixed(parts[0])
        parsed = number_range(raw)
        if parsed is None:
            raise bad_value(self.name, value, "does not start with a number")
        t = self.table
        conds = [number_condition(prefix, parsed, t.c.value)]
        if len(parts) == 3:
            system, code = parts[1], parts[2]
            if system:
                conds.append(t.c.system == system)
            if code:
                conds.append(t.c.code == code)
        return sa.and_(*conds)

    def sort_column(self) -> sa.ColumnElement[Any]:
        return self.table.c.value


class UriUnit(IndexedUnit):
    kind = "uri"
    modifiers = frozenset({"missing", "below", "above", "not"})

    def match(self, value: str) -> sa.ColumnElement[bool]:
        col = self.table.c.uri
        if self.modifier == "below":
            return sa.or_(col == value, sa.and_(col >= value.rstrip("/") + "/", col < value.rstrip("/") + "0"))
        if self.modifier == "above":
            parts = value.rstrip("/").split("/")
            prefixes = ["/".join(parts[:i]) for i in range(3, len(parts) + 1)]
            return col.in_(prefixes or [value])
        return col == value

    def sort_column(self) -> sa.ColumnElement[Any]:
        return self.table.c.uri


class ReferenceUnit(IndexedUnit):
    kind = "reference"
    modifiers = frozenset({"missing", "identifier", "not"})  # plus :[Type], checked by the engine

    @property
    def type_modifier(self) -> str | None:
        return self.modifier if self.modifier and self.modifier[:1].isupper() else None

    def clause(self, r: sa.FromClause, raw: str) -> sa.ColumnElement[bool]:
        if self.modifier == "identifier":
            token = TokenUnit(self.param, self.rtype, None, self.name)
            return r.c.pk.in_(token.rows(f"{self.param.code}:identifier").where(
                sa.or_(*(token.match(v) for v in split_escaped(raw, ",")))))
        return super().clause(r, raw)

    def match(self, value: str) -> sa.ColumnElement[bool]:
        t = self.table
        target_type, target_id, url = split_reference(value)
        if url is not None and "/" not in value:
            target_type, target_id, url = None, value, None  # a bare id
        if url is not None:
            base_match = t.c.url == url.split("|", 1)[0]
            return base_match
        wanted = self.type_modifier or target_type
        if wanted and self.param.targets and wanted not in self.param.targets:
            raise bad_value(self.name, value, f"refers to {wanted}, which this parameter cannot reference")
        conds = [t.c.target_id == target_id]
        if wanted:
            conds.append(t.c.target_type == wanted)
        return sa.and_(*conds)

    def sort_column(self) -> sa.ColumnElement[Any]:
        return self.table.c.target_id


class IdUnit(Unit):
    """`_id`: the logical id, held by the resource table itself."""

    modifiers = frozenset({"not"})

    def clause(self, r: sa.FromClause, raw: str) -> sa.ColumnElement[bool]:
        ids = split_escaped(raw, ",")
        return r.c.id.not_in(ids) if self.modifier == "not" else r.c.id.in_(ids)

    def sort_key(self, r: sa.FromClause, descending: bool) -> sa.ColumnElement[Any]:
        return r.c.id


class LastUpdatedUnit(Unit):
    """`_lastUpdated`: an instant (millisecond precision) on the resource table."""

    modifiers = frozenset()

    def clause(self, r: sa.FromClause, raw: str) -> sa.ColumnElement[bool]:
        conds = []
        for value in split_escaped(raw, ","):
            prefix, text = _prefixed(value)
            rng = date_range(text)
            if rng is None:
                raise bad_value(self.name, value, "is not a valid date, dateTime or instant")
            lu = r.c.last_updated
            conds.append(range_condition(prefix, rng[0], rng[1], lu, lu + 1000, datetime_now_us()))
        return sa.or_(*conds)

    def sort_key(self, r: sa.FromClause, descending: bool) -> sa.ColumnElement[Any]:
        return r.c.last_updated


UNITS: dict[str, type[Unit]] = {
    "_id": IdUnit, "_lastUpdated": LastUpdatedUnit, "token": TokenUnit, "string": StringUnit, "date": DateUnit, "number": NumberUnit,
    "quantity": QuantityUnit, "uri": UriUnit, "reference": ReferenceUnit,
}

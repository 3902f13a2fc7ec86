"""Index extraction: a resource's search-parameter values as rows of the search_* tables.

Runs on every write, inside the write's transaction, so a search never reads resource JSON. One small
function per parameter type turns the values an expression selects (strings, Codings, Periods,
References, ...) into rows; the rows are deduplicated.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

from conformance.search_parameters import SearchParameter, for_type
from consent.facts import policy_facts
from fhir_server.search.fhirpath import compile_expression, reference_type
from fhir_server.search.values import MAX_US, MIN_US, NARROW_US, date_range, normalise

# Bump when extraction changes: stored indexes are then rebuilt at the next start (reindex()).
INDEX_VERSION = "2"

Row = tuple[Any, ...]
IndexRows = dict[str, set[Row]]  # parameter type -> rows (param, ...columns)

# Parameters held by the resource table itself, and those with no expression to index.
COLUMN_PARAMS = frozenset({"_id", "_lastUpdated"})
CONTACT_SYSTEMS = frozenset({"phone", "fax", "email", "pager", "url", "sms", "other"})
TEXT_MAX = 255


@functools.cache
def indexed_params(rtype: str) -> tuple[SearchParameter, ...]:
    return tuple(p for p in for_type(rtype).values()
                 if p.expression and p.code not in COLUMN_PARAMS and p.type in EXTRACTORS)


def index_resource(resource: dict[str, Any]) -> IndexRows:
    """All index rows for one resource (its current version): search values, and the facts the
    access policy reads (consent/facts.py, a leaf module that derives them from these rows)."""
    rows: IndexRows = {}
    for param in indexed_params(resource["resourceType"]):
        values = compile_expression(param.expression)(resource)  # type: ignore[arg-type]
        if not values:
            continue
        for kind, row in EXTRACTORS[param.type](param.code, values):
            rows.setdefault(kind, set()).add(row)
    rows.update(policy_facts(resource, rows))
    return rows


def _clip(text: str) -> str:
    return text[:TEXT_MAX]


def _strings(code: str, values: list[Any]) -> Iterator[tuple[str, Row]]:
    for v in values:
        for text in _string_parts(v):
            if text.strip():
                yield "string", (code, _clip(normalise(text)), text)


def _string_parts(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, dict):
        return []
    if "family" in value or "given" in value or "prefix" in value:  # HumanName
        keys = ("text", "family", "given", "prefix", "suffix")
    elif "line" in value or "city" in value or "postalCode" in value:  # Address
        keys = ("text", "line", "city", "district", "state", "postalCode", "country")
    else:
        keys = tuple(k for k, v in value.items() if isinstance(v, str) and k not in ("system", "url", "reference"))
    out: list[str] = []
    for k in keys:
        v = value.get(k)
        out.extend(v if isinstance(v, list) else [v] if isinstance(v, str) else [])
    return [s for s in out if isinstance(s, str)]


def _tokens(code: str, values: list[Any]) -> Iterator[tuple[str, Row]]:
    text_param = f"{code}:text"
    for v in values:
        if isinstance(v, bool):
            yield "token", (code, None, "true" if v else "false")
        elif isinstance(v, (str, int, Decimal)):
            yield "token", (code, None, _clip(str(v)))
        elif isinstance(v, dict):
            codings = v.get("coding") if "coding" in v or "text" in v and "value" not in v else [v]
            for coding in codings or ():
                if not isinstance(coding, dict):
                    continue
                value = coding.get("code", coding.get("value"))
                if value is not None:
                    system = coding.get("system")
                    yield "token", (code, _clip(system) if isinstance(system, str) else None, _clip(str(value)))
                if isinstance(coding.get("display"), str):
                    yield "string", (text_param, _clip(normalise(coding["display"])), coding["display"])
            if isinstance(v.get("text"), str):
                yield "string", (text_param, _clip(normalise(v["text"])), v["text"])


def _date_row(code: str, lo: int, hi: int) -> tuple[str, Row]:
    return "date", (code, lo, hi, hi - lo <= NARROW_US)


def _dates(code: str, values: list[Any]) -> Iterator[tuple[str, Row]]:
    for v in values:
        if isinstance(v, str):
            rng = date_range(v)
            if rng:
                yield _date_row(code, *rng)
        elif isinstance(v, dict) and ("start" in v or "end" in v):  # Period
            start = date_range(v["start"]) if isinstance(v.get("start"), str) else None
            end = date_range(v["end"]) if isinstance(v.get("end"), str) else None
            yield _date_row(code, start[0] if start else MIN_US, end[1] if end else MAX_US)
        elif isinstance(v, dict) and isinstance(v.get("event"), list):  # Timing
            yield from _dates(code, v["event"])


def _references(code: str, values: list[Any]) -> Iterator[tuple[str, Row]]:
    for v in values:
        if isinstance(v, str):  # canonical or uri
            yield "reference", (code, None, None, _clip(v.split("|", 1)[0]))
            continue
        if not isinstance(v, dict):
            continue
        ref = v.get("reference")
        if isinstance(ref, str) and not ref.startswith("#"):
            yield "reference", (code, *split_reference(ref))
        ident = v.get("identifier")
        if isinstance(ident, dict) and ident.get("value"):
            system = ident.get("system")
            yield "token", (f"{code}:identifier", _clip(system) if isinstance(system, str) else None,
                            _clip(str(ident["value"])))


def split_reference(ref: str) -> tuple[str | None, str | None, str | None]:
    """(target_type, target_id, url): relative references by type and id, absolute ones by URL."""
    if "://" in ref or ref.startswith("urn:"):
        return None, None, _clip(ref.split("/_history/", 1)[0])
    parts = ref.split("/_history/", 1)[0].split("/")
    if len(parts) == 2 and reference_type(ref):
        return parts[0], parts[1][:64], None
    return None, None, _clip(ref)


def _numbers(code: str, values: list[Any]) -> Iterator[tuple[str, Row]]:
    for v in values:
        if isinstance(v, (int, float, Decimal)) and not isinstance(v, bool):
            yield "number", (code, float(v))


def _quantities(code: str, values: list[Any]) -> Iterator[tuple[str, Row]]:
    for v in values:
        if isinstance(v, dict) and isinstance(v.get("value"), (int, float, Decimal)):
            system = v.get("system") if isinstance(v.get("system"), str) else None
            units = {u for u in (v.get("code"), v.get("unit")) if isinstance(u, str)} or {None}
            for unit in units:
                yield "quantity", (code, system, unit, float(v["value"]))


def _uris(code: str, values: list[Any]) -> Iterator[tuple[str, Row]]:
    for v in values:
        if isinstance(v, str):
            yield "uri", (code, _clip(v))


EXTRACTORS: dict[str, Callable[[str, list[Any]], Iterator[tuple[str, Row]]]] = {
    "string": _strings, "token": _tokens, "date": _dates, "reference": _references,
    "number": _numbers, "quantity": _quantities, "uri": _uris,
}

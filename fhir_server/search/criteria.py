"""Search criteria for conditional interactions (If-None-Exist, conditional update/patch/delete).

This is the first slice of the search engine: `_id` and `identifier` (token), indexed at write time
in `search_token`. A criterion the server cannot evaluate is an error, never ignored: ignoring it would
widen the match and let a conditional delete remove the wrong records.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import sqlalchemy as sa

from conformance.validation import model_class
from fhir_server.outcome import error
from fhir_server.storage.repository import select_live_pks
from fhir_server.storage.schema import resource, search_token

# Parameters that shape a response rather than select resources; harmless in a conditional URL.
RESULT_PARAMETERS = frozenset({"_format", "_pretty", "_summary", "_elements", "_count", "_sort", "_total"})


@dataclass(frozen=True)
class Token:
    """One token value: `code`, `system|code`, `|code` (no system) or `system|` (any code)."""

    system: str | None  # None: any system; "": explicitly no system
    code: str | None    # None: any code in the system


@dataclass(frozen=True)
class Criterion:
    """One parameter: its values are ORed; criteria are ANDed."""

    param: str
    values: tuple[Token, ...]


def split_escaped(value: str, sep: str) -> list[str]:
    """Split on `sep` but not on `\\sep` (FHIR search escaping), unescaping `\\,` `\\|` `\\$` `\\\\`."""
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


def parse_token(raw: str) -> Token:
    parts = split_escaped(raw, "|")
    if len(parts) == 1:
        return Token(None, parts[0])
    if len(parts) == 2:
        return Token(parts[0], parts[1] or None)
    raise error(400, "invalid", f"Token value '{raw}' has more than one '|'")


def parse_criteria(rtype: str, query: str) -> list[Criterion]:
    """Parse the query part of a conditional URL (`identifier=sys|123&_id=a,b`)."""
    criteria: list[Criterion] = []
    for name, raw in parse_qsl(query, keep_blank_values=True):
        if name in RESULT_PARAMETERS:
            continue
        if name == "_id":
            tokens = tuple(Token(None, v) for v in split_escaped(raw, ",") if v)
        elif name == "identifier" and _has_element(rtype, "identifier"):
            tokens = tuple(parse_token(v) for v in split_escaped(raw, ","))
        else:
            raise error(400, "not-supported",
                        f"Search parameter '{name}' is not supported in conditional operations on {rtype} "
                        "(supported: _id, identifier)")
        if not tokens:
            raise error(400, "invalid", f"Search parameter '{name}' has no value")
        criteria.append(Criterion(name, tokens))
    if not criteria:
        raise error(400, "invalid", "A conditional operation needs at least one search criterion")
    return criteria


def _has_element(rtype: str, element: str) -> bool:
    cls = model_class(rtype)
    return cls is not None and element in cls.model_fields


def _token_clause(rtype: str, crit: Criterion) -> sa.ColumnElement[bool]:
    st = search_token.c
    ors = []
    for tok in crit.values:
        conds: list[Any] = [st.param == crit.param, st.type == rtype]
        if tok.code is not None:
            conds.append(st.code == tok.code)
        if tok.system == "":
            conds.append(st.system.is_(None))
        elif tok.system is not None:
            conds.append(st.system == tok.system)
        ors.append(sa.and_(*conds))
    return resource.c.pk.in_(sa.select(st.resource_pk).where(sa.or_(*ors)))


def matching_pks(conn: sa.Connection, rtype: str, criteria: list[Criterion], limit: int = 2) -> list[int]:
    """Primary keys of live resources matching every criterion (at most `limit`: callers need 0/1/many)."""
    q = select_live_pks(rtype)
    for crit in criteria:
        if crit.param == "_id":
            q = q.where(resource.c.id.in_([t.code for t in crit.values]))
        else:
            q = q.where(_token_clause(rtype, crit))
    return list(conn.execute(q.limit(limit)).scalars())


def token_index(resource_json: dict[str, Any]) -> list[tuple[str, str | None, str]]:
    """Token rows (param, system, code) to index for a resource: its business identifiers."""
    ids = resource_json.get("identifier")
    if isinstance(ids, dict):
        ids = [ids]
    rows = []
    for ident in ids or ():
        if isinstance(ident, dict) and ident.get("value"):
            rows.append(("identifier", ident.get("system"), str(ident["value"])[:255]))
    return rows

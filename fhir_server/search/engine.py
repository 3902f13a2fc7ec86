"""The search engine: FHIR search parameters -> one SQL query over the index tables.

Parsing decides what each parameter means (type, modifier, chain, `_has`); the units in params.py
build the conditions; this module assembles them, with sorting and keyset paging, and finds
`_include`/`_revinclude` resources. Every condition is on the resource table, so a caller's policy
can be added to the same WHERE clause before paging and counting.
"""
from __future__ import annotations

import base64
import json
from urllib.parse import parse_qsl
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from conformance.search_parameters import SearchParameter, for_type, patient_compartment
from fhir_server.outcome import error
from fhir_server.search.params import UNITS, DateUnit, ReferenceUnit, Unit, split_escaped
from fhir_server.search.values import MAX_US, MIN_US
from fhir_server.storage.schema import resource, search_reference

# Parameters that shape the result rather than select resources.
RESULT_PARAMETERS = frozenset({
    "_count", "_sort", "_total", "_summary", "_elements", "_include", "_revinclude", "_contained",
    "_containedType", "_format", "_pretty", "_cursor", "_type",
})
MAX_CHAIN_DEPTH = 4
MAX_INCLUDE_ITERATIONS = 4
# A caller's access policy as the engine sees it: (alias of the resource table, type or None for
# any, nested) -> the condition on the rows it may reach, None for all. Applied to the rows chains,
# `_has` and includes reach, as the caller applies it to the matches. `nested`: inside a chain or
# `_has` subquery, where the policy may answer with a stricter, shallower condition (SQLite limits
# how deeply subqueries nest).
Reach = Callable[[sa.FromClause, "str | None", bool], "sa.ColumnElement[bool] | None"]
# And a condition on a row of (type, parameter code) matched through alias `r`, when the policy
# withholds what that parameter indexes from some rows (a restricted patient's address).
Guard = Callable[[str, str, sa.FromClause], "sa.ColumnElement[bool] | None"]


@dataclass(frozen=True)
class Include:
    source_type: str
    param: str | None  # None: every reference parameter (`*`)
    target_type: str | None
    iterate: bool


@dataclass
class Search:
    """A parsed search: criteria for the WHERE clause, plus how to shape the result."""

    types: tuple[str, ...]  # the types searched (one, or several for a system search)
    criteria: list[tuple[str, str]] = field(default_factory=list)  # (name, raw value) kept, for the self link
    conditions: list[sa.ColumnElement[bool]] = field(default_factory=list)
    sort: list[tuple[str, bool]] = field(default_factory=list)  # (parameter, descending)
    includes: list[Include] = field(default_factory=list)
    revincludes: list[Include] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    @property
    def criteria_names(self) -> set[str]:
        return {name for name, _ in self.criteria}


def parse_search(types: tuple[str, ...], params: list[tuple[str, str]], strict: bool, base_url: str,
                 r: sa.FromClause = resource, reach: Reach | None = None, guard: Guard | None = None) -> Search:
    """Parse search parameters for `types` into conditions on `r`. Unknown parameters are ignored
    (and reported) unless `strict`; malformed values are always a 400 naming the parameter.
    `reach`: the caller's policy, applied to the resources chains and `_has` look at; `guard`: its
    conditions on what particular parameters match."""
    search = Search(types)
    ranges = _date_ranges(types, params)
    for name, raw in params:
        if name.split(":", 1)[0] in RESULT_PARAMETERS:
            continue
        if name in ranges:
            if name not in search.criteria_names:  # the whole range once, at its first occurrence
                search.criteria.extend((name, v) for v in ranges[name])
                search.conditions.append(_guarded(DateUnit(for_type(types[0])[name], types[0], None, name)
                                                  .clause_and(r, ranges[name]), types[0], name, r, guard))
            continue
        cond = condition(types, name, raw, r, base_url, strict, reach=reach, guard=guard)
        if cond is None:
            search.ignored.append(name)
            continue
        search.criteria.append((name, raw))
        search.conditions.append(cond)
    for name, raw in params:
        base, _, mod = name.partition(":")
        if base == "_sort":
            search.sort = parse_sort(types, raw)
        elif base in ("_include", "_revinclude"):
            if mod not in ("", "iterate", "recurse"):
                raise error(400, "invalid", f"'{name}' has an unknown modifier")
            include = parse_include(raw, mod in ("iterate", "recurse"), name)
            (search.includes if base == "_include" else search.revincludes).append(include)
    return search


def _date_ranges(types: tuple[str, ...], params: list[tuple[str, str]]) -> dict[str, list[str]]:
    """Date parameters given more than once with single values (`birthdate=ge1950&birthdate=lt1951`)."""
    if len(types) != 1:
        return {}
    seen: dict[str, list[str]] = {}
    for name, raw in params:
        param = for_type(types[0]).get(name)
        if param is not None and param.type == "date" and name != "_lastUpdated" and "," not in raw:
            seen.setdefault(name, []).append(raw)
    return {name: raws for name, raws in seen.items() if len(raws) > 1}


def condition(types: tuple[str, ...], name: str, raw: str, r: sa.FromClause, base_url: str,
              strict: bool, depth: int = 0, reach: Reach | None = None,
              guard: Guard | None = None) -> sa.ColumnElement[bool] | None:
    """The condition for one parameter over the given types (ORed across types), or None if unknown."""
    if depth > MAX_CHAIN_DEPTH:
        raise error(400, "too-costly", f"'{name}': chains are limited to {MAX_CHAIN_DEPTH} levels")
    code, _, modifier = name.partition(":")
    if len(types) > 1 and all(for_type(t).get(code) is not None and for_type(t)[code].base == "Resource"
                              for t in types):
        # a common parameter (_tag, _profile, ...): one condition, not one per type
        unit = make_unit(for_type(types[0])[code], None, modifier or None, name)
        return unit.clause(r, raw)
    per_type = []
    for rtype in types:
        cond = _type_condition(rtype, name, raw, r, base_url, strict, depth, reach, guard)
        if cond is not None:
            per_type.append(cond if len(types) == 1 else sa.and_(r.c.type == rtype, cond))
    if not per_type:
        if strict:
            raise error(400, "not-supported", f"Unknown search parameter '{name}' for {', '.join(types)}")
        return None
    return per_type[0] if len(per_type) == 1 else sa.or_(*per_type)


def _type_condition(rtype: str, name: str, raw: str, r: sa.FromClause, base_url: str, strict: bool,
                    depth: int, reach: Reach | None = None, guard: Guard | None = None) -> sa.ColumnElement[bool] | None:
    if name.startswith("_has:"):
        return _has(rtype, name, raw, r, base_url, strict, depth, reach, guard)
    head, dot, rest = name.partition(".")
    code, _, modifier = head.partition(":")
    param = for_type(rtype).get(code)
    if param is None:
        return None
    if dot:
        return _guarded(_chain(rtype, param, modifier or None, rest, raw, r, base_url, strict, depth, name, reach,
                               guard), rtype, code, r, guard)
    unit = make_unit(param, rtype, modifier or None, name)
    if isinstance(unit, ReferenceUnit):
        raw = ",".join(_relative(v, base_url) for v in split_escaped(raw, ","))
    return _guarded(unit.clause(r, raw), rtype, code, r, guard)


def _guarded(cond: sa.ColumnElement[bool], rtype: str, code: str, r: sa.FromClause,
             guard: Guard | None) -> sa.ColumnElement[bool]:
    extra = guard(rtype, code, r) if guard is not None else None
    return cond if extra is None else sa.and_(cond, extra)


def make_unit(param: SearchParameter, rtype: str | None, modifier: str | None, name: str) -> Unit:
    unit_cls = UNITS.get(param.code) or UNITS.get(param.type)
    if unit_cls is None:
        raise error(400, "not-supported", f"Search parameter '{param.code}' ({param.type}) is not supported")
    if modifier is not None and modifier not in unit_cls.modifiers and not (
            unit_cls is ReferenceUnit and modifier[:1].isupper()):
        raise error(400, "not-supported", f"Modifier ':{modifier}' is not supported for '{param.code}' "
                    f"({param.type})")
    return unit_cls(param, rtype, modifier, name)


def _relative(value: str, base_url: str) -> str:
    """A reference to this server by absolute URL is the same as the relative one."""
    prefix = base_url.rstrip("/") + "/"
    return value[len(prefix):] if value.startswith(prefix) else value


def _chain(rtype: str, param: SearchParameter, type_modifier: str | None, rest: str, raw: str,
           r: sa.FromClause, base_url: str, strict: bool, depth: int, name: str,
           reach: Reach | None = None, guard: Guard | None = None) -> sa.ColumnElement[bool]:
    """`subject:Patient.name=x`: resources whose reference points to a resource matching `name=x`."""
    if param.type != "reference":
        raise error(400, "invalid", f"'{name}': only reference parameters can be chained")
    targets = (type_modifier,) if type_modifier else param.targets
    sr = search_reference.alias()
    ors = []
    for target in targets:
        inner_r = resource.alias(f"chain{depth}")  # named by depth: the policy's condition on it is compiled once
        inner = condition((target,), rest, raw, inner_r, base_url, False, depth + 1, reach, guard)
        if inner is None:
            continue
        matching_ids = sa.select(inner_r.c.id).where(inner_r.c.type == target, inner_r.c.deleted.is_(False), inner)
        if reach is not None and (allowed := reach(inner_r, target, True)) is not None:
            matching_ids = matching_ids.where(allowed)
        ors.append(sa.and_(sr.c.target_type == target, sr.c.target_id.in_(matching_ids)))
    if not ors:
        raise error(400, "not-supported", f"'{name}': no target type of '{param.code}' has a parameter "
                    f"'{rest.split('.')[0]}'")
    return r.c.pk.in_(sa.select(sr.c.resource_pk).where(
        sr.c.type == rtype, sr.c.param == param.code, sa.or_(*ors)))


def _has(rtype: str, name: str, raw: str, r: sa.FromClause, base_url: str, strict: bool,
         depth: int, reach: Reach | None = None, guard: Guard | None = None) -> sa.ColumnElement[bool]:
    """`_has:CareTeam:patient:participant=X`: resources referred to (by CareTeam.patient) from a
    CareTeam matching `participant=X`. The referring type passes the same rules as a direct search."""
    parts = name.split(":", 3)
    if len(parts) != 4 or not parts[3]:
        raise error(400, "invalid", f"'{name}' is not of the form _has:Type:reference:parameter")
    _, source, ref_code, rest = parts
    ref = for_type(source).get(ref_code) if source[:1].isupper() else None
    if ref is None or ref.type != "reference":
        raise error(400, "invalid", f"'{name}': {source} has no reference parameter '{ref_code}'")
    src = resource.alias(f"has{depth}")  # named by depth: the policy's condition on it is compiled once
    inner = condition((source,), rest, raw, src, base_url, True, depth + 1, reach, guard)
    sr = search_reference.alias()
    referrers = sa.select(src.c.pk).where(src.c.type == source, src.c.deleted.is_(False), inner)
    if reach is not None and (allowed := reach(src, source, True)) is not None:
        referrers = referrers.where(allowed)
    return r.c.id.in_(sa.select(sr.c.target_id).where(
        sr.c.type == source, sr.c.param == ref_code, sr.c.target_type == rtype, sr.c.resource_pk.in_(referrers)))


def compartment_condition(rtype: str, compartment_id: str, r: sa.FromClause) -> sa.ColumnElement[bool]:
    """Membership of the Patient compartment, per the official CompartmentDefinition."""
    if rtype not in patient_compartment():
        raise error(404, "not-found", f"{rtype} is not in the Patient compartment")
    member = r.c.pk.in_(compartment_references([compartment_id], (rtype,)))
    return sa.or_(member, r.c.id == compartment_id) if rtype == "Patient" else member


PatientIds = list[str] | sa.Select[Any]


def compartment_references(patients: PatientIds, types: Iterable[str]) -> sa.Select[Any]:
    """pks of the resources of `types` that refer to one of `patients` (ids, or a query of ids) by a
    parameter that puts them in the Patient compartment. The Patient resources themselves are not
    among them (a Patient is in its own compartment by id, not by reference)."""
    sr = search_reference.alias()
    pairs = [sa.and_(sr.c.type == t, sr.c.param.in_(patient_compartment()[t])) for t in types]
    return sa.select(sr.c.resource_pk.label("pk")).where(
        sr.c.target_type == "Patient", sr.c.target_id.in_(patients), sa.or_(*pairs))


def everything_search(patients: list[str] | None, types: tuple[str, ...], since: int | None) -> Search:
    """Patient `$everything` as a search of `types`, so it pages, counts and takes a policy condition
    like any search: the patients (None: every live one), everything in their compartments, and the
    resources those refer to whose type is not in the Patient compartment (Practitioner,
    Organization, Location, Medication, ...), so another patient's record is never pulled in.
    References are followed as indexed (search_reference): one level, by relative reference."""
    if patients is None:
        live = resource.alias()
        ids: PatientIds = sa.select(live.c.id).where(live.c.type == "Patient", live.c.deleted.is_(False))
    else:
        ids = patients
    pat, ref, target = resource.alias(), search_reference.alias(), resource.alias()
    compartment = sa.union_all(
        sa.select(pat.c.pk).where(pat.c.type == "Patient", pat.c.id.in_(ids)),
        compartment_references(ids, patient_compartment()),
    ).cte("compartment")
    referenced = (sa.select(target.c.pk).select_from(ref.join(target, sa.and_(
        target.c.type == ref.c.target_type, target.c.id == ref.c.target_id)))
        .where(ref.c.resource_pk.in_(sa.select(compartment.c.pk)),
               ref.c.target_type.not_in(list(patient_compartment()))))
    conditions = [resource.c.pk.in_(sa.union_all(sa.select(compartment.c.pk), referenced))]
    if since is not None:
        conditions.append(resource.c.last_updated >= since)
    return Search(types, conditions=conditions)


def parse_sort(types: tuple[str, ...], raw: str) -> list[tuple[str, bool]]:
    keys = []
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        desc = item.startswith("-")
        code = item.lstrip("-")
        if not all(code in for_type(t) for t in types):
            raise error(400, "not-supported", f"Cannot sort by '{code}': not a search parameter of "
                        f"{', '.join(types)}")
        keys.append((code, desc))
    return keys


def parse_include(raw: str, iterate: bool, name: str) -> Include:
    if raw == "*":
        return Include("*", None, None, iterate)
    parts = raw.split(":")
    if len(parts) not in (2, 3) or not parts[0][:1].isupper():
        raise error(400, "invalid", f"'{name}={raw}' is not of the form Type:parameter[:targetType] or *")
    source, code = parts[0], parts[1]
    if code != "*":
        param = for_type(source).get(code)
        if param is None or param.type != "reference":
            raise error(400, "invalid", f"'{name}': {source} has no reference parameter '{code}'")
    return Include(source, None if code == "*" else code, parts[2] if len(parts) == 3 else None, iterate)


# -- paging cursors -------------------------------------------------------------------------------

def encode_cursor(values: list[Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(values, separators=(",", ":")).encode()).decode().rstrip("=")


def decode_cursor(raw: str) -> list[Any]:
    try:
        padded = raw + "=" * (-len(raw) % 4)
        values = json.loads(base64.urlsafe_b64decode(padded))
    except (ValueError, json.JSONDecodeError):
        raise error(400, "invalid", "Parameter '_cursor' is not a valid page position") from None
    if not isinstance(values, list) or len(values) < 2 or values[0] not in ("after", "before"):
        raise error(400, "invalid", "Parameter '_cursor' is not a valid page position")
    return values


# -- running a search -----------------------------------------------------------------------------

@dataclass
class Page:
    """One page of matches (pks in order) with what is needed for links and the total."""

    pks: list[int]
    total: int | None
    next_cursor: str | None
    previous_cursor: str | None
    included: list[int]


_TEXT_LAST, _TEXT_FIRST = "\U0010ffff", ""
_NUM_LAST, _NUM_FIRST = 1e308, -1e308


def _nulls_last(expr: sa.ColumnElement[Any], param_type: str, desc: bool) -> sa.ColumnElement[Any]:
    """Missing sort values go last in both directions, and keyset comparisons never meet NULL."""
    if param_type in ("_id", "_lastUpdated"):
        return expr
    if param_type in ("number", "quantity"):
        return sa.func.coalesce(expr, _NUM_FIRST if desc else _NUM_LAST)
    if param_type == "date":
        return sa.func.coalesce(expr, MIN_US if desc else MAX_US)
    return sa.func.coalesce(expr, _TEXT_FIRST if desc else _TEXT_LAST)


_WINDOW_TOTAL = sa.func.count().over().label("total")


def run_search(conn: sa.Connection, search: Search, extra: list[sa.ColumnElement[bool]], count: int,
               cursor: str | None, want_total: bool, r: sa.FromClause = resource, reach: Reach | None = None,
               one_pass: bool = False) -> Page:
    """Execute: filter, sort, keyset-page, count (same WHERE as the page; not again when the first
    page holds every match), then includes (only those within `reach`, the caller's policy, as
    `extra` holds it for the matches). `one_pass`: `extra` is costly to check row by row (a
    caller's policy), so the total comes with the page, from one pass over the candidates: a page
    that few candidates pass seldom stops early, and a count would check each candidate again.
    (Without one, a page stops at its limit and a count needs no rows, which is cheaper for large
    results.)"""
    where = [r.c.deleted.is_(False), *search.conditions, *extra]
    where.append(r.c.type == search.types[0] if len(search.types) == 1 else r.c.type.in_(search.types))
    keys: list[tuple[sa.ColumnElement[Any], bool]] = []
    for code, desc in search.sort:
        param = for_type(search.types[0])[code]
        kind = code if code in ("_id", "_lastUpdated") else param.type
        expr = make_unit(param, search.types[0], None, code).sort_key(r, desc)
        keys.append((_nulls_last(expr, kind, desc), desc))
    keys.append((r.c.pk, False))
    windowed = want_total and one_pass
    total_col = [_WINDOW_TOTAL] if windowed else []
    inner = sa.select(*(k.label(f"k{i}") for i, (k, _) in enumerate(keys)), *total_col).where(*where).subquery()
    cols = [inner.c[f"k{i}"] for i in range(len(keys))]
    directions = [d for _, d in keys]

    q = sa.select(*cols, *([inner.c.total] if windowed else []))
    backwards = False
    if cursor:
        decoded = decode_cursor(cursor)
        backwards = decoded[0] == "before"
        q = q.where(_seek(cols, directions, decoded[1:], backwards))
    order = [(c.desc() if d != backwards else c.asc()) for c, d in zip(cols, directions)]
    fetched = conn.execute(q.order_by(*order).limit(count + 1)).all()
    windowed_total = int(fetched[0][-1]) if windowed and fetched else None
    rows = [tuple(row)[:len(keys)] for row in fetched]
    more = len(rows) > count
    rows = rows[:count]
    if backwards:
        rows.reverse()
    next_cursor = prev_cursor = None
    if rows:
        if more or backwards:
            next_cursor = encode_cursor(["after", *rows[-1]])
        if cursor and (more or not backwards):
            prev_cursor = encode_cursor(["before", *rows[0]])
    total = None
    if want_total and not cursor and not more:
        total = len(rows)  # the first page holds every match: counting would check each again
    elif windowed_total is not None:
        total = windowed_total
    elif want_total:
        total = int(conn.execute(sa.select(sa.func.count()).select_from(r).where(*where)).scalar_one())
    pks = [int(row[-1]) for row in rows]
    included = find_includes(conn, pks, search, reach) if pks and (search.includes or search.revincludes) else []
    return Page(pks, total, next_cursor, prev_cursor, included)


def _seek(cols: list[Any], directions: list[bool], values: list[Any], backwards: bool) -> sa.ColumnElement[bool]:
    """Rows strictly after (or before) the row with key `values`, in the sort order."""
    if len(values) != len(cols):
        raise error(400, "invalid", "Parameter '_cursor' does not belong to this search")
    ors = []
    for i, (col, desc) in enumerate(zip(cols, directions)):
        later = (col < values[i]) if desc != backwards else (col > values[i])
        ors.append(sa.and_(*(cols[j] == values[j] for j in range(i)), later))
    return sa.or_(*ors)


def find_includes(conn: sa.Connection, match_pks: list[int], search: Search, reach: Reach | None = None) -> list[int]:
    """pks of `_include`d and `_revinclude`d resources (live only, within `reach`), iterating where asked."""
    seen = set(match_pks)
    found: list[int] = []
    frontier = list(match_pks)
    for round_ in range(MAX_INCLUDE_ITERATIONS + 1):
        includes = [i for i in search.includes if round_ == 0 or i.iterate]
        revincludes = [i for i in search.revincludes if round_ == 0 or i.iterate]
        if not frontier or not (includes or revincludes):
            break
        new: list[int] = []
        for inc in includes:
            new.extend(conn.execute(_include_query(frontier, inc, reach)).scalars())
        for inc in revincludes:
            new.extend(conn.execute(_revinclude_query(frontier, inc, reach)).scalars())
        frontier = [pk for pk in dict.fromkeys(new) if pk not in seen]
        seen.update(frontier)
        found.extend(frontier)
    return found


def _include_query(source_pks: list[int], inc: Include, reach: Reach | None = None) -> sa.Select[Any]:
    # the included rows are the `resource` table itself, whose policy condition is built once
    sr, target = search_reference.alias(), resource
    q = (sa.select(target.c.pk).select_from(sr.join(target, sa.and_(
        target.c.type == sr.c.target_type, target.c.id == sr.c.target_id)))
        .where(sr.c.resource_pk.in_(source_pks), target.c.deleted.is_(False)))
    if reach is not None and (allowed := reach(target, inc.target_type, False)) is not None:
        q = q.where(allowed)
    return _narrowed(q, sr, inc)


def _revinclude_query(target_pks: list[int], inc: Include, reach: Reach | None = None) -> sa.Select[Any]:
    sr, source, target = search_reference.alias(), resource, resource.alias()
    q = (sa.select(source.c.pk).select_from(
        sr.join(target, sa.and_(target.c.type == sr.c.target_type, target.c.id == sr.c.target_id))
        .join(source, source.c.pk == sr.c.resource_pk))
        .where(target.c.pk.in_(target_pks), source.c.deleted.is_(False)))
    if reach is not None and (allowed := reach(source, None if inc.source_type == "*" else inc.source_type, False)) is not None:
        q = q.where(allowed)
    return _narrowed(q, sr, inc)


def _narrowed(q: sa.Select[Any], sr: sa.FromClause, inc: Include) -> sa.Select[Any]:
    """Restrict reference rows to those the _include/_revinclude names (source type, parameter, target)."""
    if inc.source_type != "*":
        q = q.where(sr.c.type == inc.source_type)
    if inc.param:
        q = q.where(sr.c.param == inc.param)
    if inc.target_type:
        q = q.where(sr.c.target_type == inc.target_type)
    return q


def conditional_matches(conn: sa.Connection, rtype: str, query: str, limit: int = 2,
                        extra: Iterable[sa.ColumnElement[bool]] = ()) -> list[int]:
    """pks of live resources matching a conditional URL's criteria (at most `limit`: callers need
    0/1/many), and `extra` (a caller's policy). Unknown parameters are errors here: ignoring one
    would widen the match."""
    params = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k.split(":", 1)[0] not in RESULT_PARAMETERS]
    if not params:
        raise error(400, "invalid", "A conditional operation needs at least one search criterion")
    search = parse_search((rtype,), params, True, "")
    where = [resource.c.type == rtype, resource.c.deleted.is_(False), *search.conditions, *extra]
    return list(conn.execute(sa.select(resource.c.pk).where(*where).limit(limit)).scalars())


def in_patient_compartments(rtype: str, patients: sa.Select[Any] | None,
                            r: sa.FromClause = resource) -> sa.ColumnElement[bool]:
    """Whether a resource (the row of `r`, of type `rtype`) is in the Patient compartment of one of
    `patients` (a query of Patient ids; None: of any Patient), per the official CompartmentDefinition.
    Correlated with the row, so the indexes are probed per resource: a caller reading `r` in keyset
    batches (bulk export) pays for the rows it reads, never for the whole set of patients at each
    batch, as it would for the set of `compartment_references` (made for one page of a search)."""
    codes = patient_compartment().get(rtype)
    if not codes:
        raise error(404, "not-found", f"{rtype} is not in the Patient compartment")
    sr = search_reference.alias()
    refers = [sr.c.resource_pk == r.c.pk, sr.c.param.in_(codes), sr.c.target_type == "Patient"]
    if patients is None:
        return sa.true() if rtype == "Patient" else sa.exists().where(*refers)
    patient_id = patients.selected_columns[0]

    def among_patients(pid: sa.ColumnElement[str]) -> sa.Exists:
        # OFFSET keeps PostgreSQL from flattening the probe into a join it may plan as a scan of
        # every patient per reference (it does, while the job's patient rows have no statistics)
        return sa.exists(patients.where(patient_id == pid).offset(0))

    member = sa.exists().where(*refers, among_patients(sr.c.target_id))
    return sa.or_(member, among_patients(r.c.id)) if rtype == "Patient" else member

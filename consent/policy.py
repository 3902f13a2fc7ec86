"""The policy decision point: one `RequestPolicy` per request, asked by every read and write path.

It follows the consent-service lifecycle: it is built when a request starts (the caller's roles,
their PractitionerRoles and care teams, any break-glass grants), it says inside each query which
rows the caller can see (`where`: SQL conditions over the policy fact tables, so pages are full and
totals honest, and chains, `_has` and includes reach only visible rows), it shapes what is shown
(`present`: redaction of restricted patients, de-identification for analysts), and it completes
(`complete`: break-glass accesses recorded durably).

The SMART scopes (fhir_server/auth/access.py) and the role rules (consent/rules.py) both apply: a
row must pass both.
"""
from __future__ import annotations

import functools
import json
import os
import re
import secrets
import threading
import time
from contextvars import ContextVar
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.elements import _anonymous_label

from consent import facts
from consent.deidentify import Pseudonymiser, check_analyst_search, deidentify
from consent.access_log import AccessLog
from consent.break_glass import BreakGlassLog
from consent.rules import DIRECTORY, NO_ROLE, ROLE_RULES, SYSTEM_CLIENT, WRITE, RoleRule
from fhir_server import jsonfmt
from fhir_server.auth.access import Access, forbidden
from fhir_server.auth.principal import EMERGENCY_PURPOSE, Principal, principal_from_claims
from fhir_server.outcome import FhirError, error
from fhir_server.search.values import MAX_US, MIN_US
from fhir_server.service.timefmt import now_us
from fhir_server.service.interactions import FhirService
from fhir_server.storage.repository import Version
from fhir_server.storage.schema import (policy_consent, policy_consent_term, policy_relationship, policy_subject,
                                        resource, search_token)

REDACTED_PATIENT_ELEMENTS = ("address", "telecom", "generalPractitioner", "contact", "photo")
SUBSETTED = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED"}
# Patient search parameters over the elements withheld from restricted patients: outside the
# custodian they match only patients that are not restricted, so a search cannot reveal them.
REDACTED_PATIENT_PARAMS = frozenset({"address", "address-city", "address-country", "address-postalcode",
                                     "address-state", "address-use", "email", "phone", "telecom",
                                     "general-practitioner"})


@dataclass
class Caller:
    """What the rows are checked against: the references that stand for the caller (their
    Practitioner, PractitionerRoles, organisation) and the care teams they belong to, their
    purpose of use, the patients they hold break-glass grants for, the time of the request, and
    the patient they are (a patient's own access), if so."""

    refs: tuple[str, ...]
    careteams: tuple[str, ...]
    organization: str | None
    purpose: str
    break_glass: dict[str, str] = field(default_factory=dict)  # patient id -> grant id
    now: int = 0
    patient: str = ""

    @property
    def actors(self) -> tuple[str, ...]:
        """What a Consent's actor may name to mean this caller."""
        return self.refs + self.careteams

    @property
    def org(self) -> str:
        return self.organization or ""

    @property
    def break_glass_patients(self) -> list[str]:
        return sorted(self.break_glass)

    def binds(self) -> dict[str, Any]:
        """Values for the parameter markers of conditions built with MARKERS."""
        return {"pol_refs": list(self.refs), "pol_actors": list(self.actors), "pol_org": self.org,
                "pol_purpose": self.purpose, "pol_break_glass": self.break_glass_patients, "pol_now": self.now,
                "pol_patient": self.patient}


# The values of the caller whose conditions are being run (set by `RequestPolicy.where`, in the
# thread or task that runs them).
_BINDS: ContextVar[dict[str, Any]] = ContextVar("carebroker-policy-binds")


@dataclass(frozen=True)
class _ListMarker:
    """A list-valued parameter marker: bound as one string (a JSON array on SQLite, an array
    literal on PostgreSQL), so the statement's text is the same whatever the list's length, needs no
    expansion per execution, and PostgreSQL can keep it prepared."""

    name: str


class _Markers:
    """A caller made of parameter markers: the conditions for a search's matches are built with it
    once, compiled to SQL text per database, and reused, each request's values bound when its
    statement runs. (Building them, and SQLAlchemy's cache key over them, cost more than running
    them: a text fragment's cache key is its text.)"""

    refs, actors, break_glass_patients = (_ListMarker(f"pol_{n}") for n in ("refs", "actors", "break_glass"))
    org, purpose, now, patient = (sa.literal_column(f":pol_{n}") for n in ("org", "purpose", "now", "patient"))


MARKERS: Any = _Markers()
_LISTS = frozenset(m.name for m in (MARKERS.refs, MARKERS.actors, MARKERS.break_glass_patients))


class _AmongMarker(sa.sql.expression.ColumnElement[bool]):
    """`column IN` a list-valued parameter marker."""

    type = sa.types.NullType()  # not Boolean: SQLite's compiler would append "= 1"
    inherit_cache = False  # compiled once, to text (`_role_shape`)

    def __init__(self, column: sa.ColumnElement[Any], marker: _ListMarker) -> None:
        self.column, self.marker = column, marker


@compiles(_AmongMarker)
def _among_json(element: _AmongMarker, compiler: Any, **kw: Any) -> str:
    return f"{compiler.process(element.column, **kw)} IN (SELECT value FROM json_each(:{element.marker.name}))"


@compiles(_AmongMarker, "postgresql")
def _among_array(element: _AmongMarker, compiler: Any, **kw: Any) -> str:
    return f"{compiler.process(element.column, **kw)} = ANY(CAST(:{element.marker.name} AS TEXT[]))"


def _in(column: sa.ColumnElement[Any], values: Any) -> sa.ColumnElement[bool]:
    """`column IN values`: a list, or a list-valued parameter marker."""
    return _AmongMarker(column, values) if isinstance(values, _ListMarker) else column.in_(values)


def _bind(key: str) -> sa.BindParameter[Any]:
    """The parameter `key` of a condition compiled by `_role_shape`, its value taken from `_BINDS`.
    A list's value is one string (`_list_string`), bound untyped: PostgreSQL takes its type from
    the CAST around it, TEXT[], and parses it once per execution (not at each row, as a cast of a
    VARCHAR would be)."""
    kind = sa.types.NullType() if key in _LISTS else sa.BigInteger() if key == "pol_now" else sa.String()
    return sa.bindparam(key, type_=kind, callable_=lambda: _BINDS.get()[key])


def _list_string(values: Sequence[str], dialect: str) -> str:
    """A list as one string: a JSON array for SQLite's json_each, an array literal for PostgreSQL
    (binding a Python list costs psycopg about 1 µs an element: 0.2 ms for a clinician's care teams)."""
    if dialect == "postgresql":
        return "{" + ",".join('"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in values) + "}"
    return json.dumps(list(values))


class RequestPolicy:
    """The caller's scopes and roles applied to one request (see the module docstring)."""

    def __init__(self, principal: Principal, access: Access | None, caller: Caller,
                 pseudonymiser: Callable[[], Pseudonymiser], dialect: sa.Dialect) -> None:
        self.principal = principal
        self.dialect = dialect
        self.access = access
        self.caller = caller
        self.rules = _rules(principal)
        self._pseudonymiser = pseudonymiser
        self.seen: list[str] = []  # Type/id of what was shown, when the request is recorded
        self.about: str | None = None  # the one patient the request names, if any

    # -- interactions ----------------------------------------------------------------------------

    @property
    def audited(self) -> bool:
        """Whether the request is recorded with what it returned: a user who sees everything."""
        return "admin" in self.principal.roles

    @property
    def unrestricted(self) -> bool:
        """Every row of every type, as it is stored: no conditions, no shaping."""
        return all(r.rows == "all" and r.reads is None for r in self.rules) and (
            self.access is None or self.access.reaches_every_row)

    def allows(self, interaction: str, rtype: str) -> bool:
        return any(rule.may(interaction, rtype) for rule in self.rules)

    def require(self, interaction: str, rtype: str) -> None:
        """403 unless one of the caller's roles allows `interaction` on `rtype`."""
        if not self.allows(interaction, rtype):
            roles = ", ".join(sorted(self.principal.roles)) or "no carebroker role"
            raise forbidden(f"{interaction} of {rtype or 'resources'} is not allowed for {roles}")

    def readable_types(self, types: Sequence[str]) -> tuple[str, ...]:
        return tuple(t for t in types if any(rule.may("search-type", t) for rule in self.rules))

    def check_search(self, types: Sequence[str], params: list[tuple[str, str]]) -> None:
        """Analysts search only by parameters that cannot single a person out."""
        if self._kinds() == {"deidentified"}:
            for rtype in types:
                check_analyst_search(rtype, params)
        if self._direct_care_only and "Patient" in types:
            for code, _desc in _sort_keys(params):
                if code in REDACTED_PATIENT_PARAMS:
                    raise forbidden(f"Sorting Patients by '{code}' is not allowed: restricted patients' {code} is withheld")

    # -- rows ------------------------------------------------------------------------------------

    def pinned_patient(self) -> str | None:
        if self._kinds() == {"own"}:
            return self.principal.patient
        return self.access.pinned_patient() if self.access is not None else None

    def where(self, permission: str, types: Sequence[str] | None, r: sa.FromClause,
              exact: bool = True) -> sa.ColumnElement[bool] | None:
        """The condition on `r` for the rows of `types` (None: any) that `permission` (a SMART
        letter: c, r, u, d, s) reaches; None when it reaches them all. Not `exact`: a stricter,
        shallower condition, for subqueries nested in others (chains, `_has`)."""
        scoped = self.access.where(permission, types, r) if self.access is not None else None
        roles = self._role_where(permission, types, r, exact)
        if scoped is None:
            return roles
        return scoped if roles is None else sa.and_(scoped, roles)

    def _role_where(self, permission: str, types: Sequence[str] | None, r: sa.FromClause,
                    exact: bool) -> sa.ColumnElement[bool] | None:
        name = _shape_name(r)
        if name is not None:  # the same shape every time: compiled once
            _BINDS.set(self._binds)
            return _role_shape(tuple(self.rules), permission, None if types is None else tuple(types), exact,
                               self.dialect, name)
        return _role_condition(self.rules, permission, types, r, exact, self.caller)

    def rows_reached(self, rule: RoleRule, permission: str, r: sa.FromClause,
                     exact: bool) -> sa.ColumnElement[bool] | None:
        """The rows of `r` that `rule`'s row reach gives this caller for `permission` (None: all)."""
        return _rows(rule, permission, r, exact, self.caller)

    def guard(self, rtype: str, code: str, r: sa.FromClause) -> sa.ColumnElement[bool] | None:
        """An extra condition on a row matched by search parameter `code` (direct, chained or in
        `_has`): withheld elements of restricted patients match nothing outside the custodian."""
        if not (self._direct_care_only and rtype == "Patient" and code in REDACTED_PATIENT_PARAMS):
            return None
        ps = _A.guarded
        return ~_exists(ps, ps.c.resource_pk == r.c.pk, ps.c.flags.op("&")(facts.RESTRICTED) != 0,
                        sa.func.coalesce(ps.c.custodian, "") != self.caller.org)

    def refusal(self, conn: sa.Connection, rtype: str, rid: str) -> FhirError:
        """What a read of a row outside reach answers, the same whether or not it exists: for direct
        care, 403 unless the caller has a relationship with the resource's patient (then 404: the
        record is theirs to see, this resource is not); otherwise 404."""
        if self._direct_care_only:
            ps = _A.subject
            related = conn.execute(sa.select(resource.c.pk).where(
                resource.c.type == rtype, resource.c.id == rid,
                _exists(ps, ps.c.resource_pk == resource.c.pk, is_related(ps.c.patient_id, self.caller)))).first()
            if related is None:
                return forbidden(f"{rtype}/{rid} is not available to you: there is no such resource, or you have "
                                 "no legitimate relationship with its patient")
        return error(404, "not-found", f"{rtype}/{rid} is not known")

    # -- what is shown -----------------------------------------------------------------------------

    @functools.cached_property
    def _binds(self) -> dict[str, Any]:
        """The caller's values for the conditions' parameters, lists as this database binds them."""
        values = self.caller.binds()
        return values | {k: _list_string(values[k], self.dialect.name) for k in _LISTS}

    @functools.cached_property
    def _direct_care_only(self) -> bool:
        """Reaching rows only through relationships (no all-rows role): such callers get 403 for a
        read outside them, and restricted patients redacted."""
        return "care" in self._kinds() and not self._kinds() & {"all"}

    def present(self, v: Version) -> Version:
        """The version as this caller may see it."""
        if self.caller.break_glass or self.audited:
            self.seen.append(f"{v.type}/{v.id}")
        if v.content is None:
            return v
        kinds = self._kinds()
        if kinds == {"deidentified"}:
            pseudo = self._pseudonymiser()
            shown = deidentify(jsonfmt.loads(v.content), pseudo)
            return Version(v.type, pseudo.id(v.type, v.id), v.version_id, v.last_updated, v.method,
                           jsonfmt.dumps(shown).decode(), v.seq)
        if self._direct_care_only and v.type == "Patient" and '"R"' in v.content:
            content = self._redacted_patient(v.content)
            if content is not None:
                return Version(v.type, v.id, v.version_id, v.last_updated, v.method, content, v.seq)
        return v

    def present_content(self, rtype: str, rid: str, content: str) -> str:
        shown = self.present(Version(rtype, rid, 0, 0, "GET", content))
        assert shown.content is not None
        return shown.content

    def _redacted_patient(self, content: str) -> str | None:
        patient = jsonfmt.loads(content)
        if not facts.label_flags(patient) & facts.RESTRICTED or facts.custodian_of(patient) == self.caller.organization:
            return None
        for name in REDACTED_PATIENT_ELEMENTS:
            patient.pop(name, None)
        meta = dict(patient.get("meta") or {})
        meta["tag"] = [*meta.get("tag", []), SUBSETTED]
        patient["meta"] = meta
        return jsonfmt.dumps(patient).decode()

    def admit(self, rtype: str, body: dict[str, Any]) -> dict[str, Any]:
        """A resource this caller writes: it is their organisation's data. Direct-care users may not
        name another custodian; integration and admin callers (feeds) may."""
        org = self.principal.organization
        declared = facts.custodian_of(body)
        if declared is not None and declared != org and not self._kinds() & {"all"}:
            raise forbidden(f"{rtype}: you may record data only as your own organisation's ({org or 'none'}), "
                            f"not as {declared}'s")
        if declared is None and org is not None:
            return facts.with_custodian(body, org)
        return body

    def _kinds(self) -> set[str]:
        return {rule.rows for rule in self.rules}

    # -- serialisation (an export job runs later, elsewhere) ----------------------------------------

    def principal_json(self) -> str:
        p = self.principal
        return json.dumps({"iss": p.issuer, "sub": p.subject, "client_id": p.client_id, "scope": p.scope,
                           "fhirUser": p.fhir_user, "patient": p.patient, "roles": sorted(p.roles),
                           "organization": p.organization, "purpose_of_use": p.purpose_of_use})


def _rules(principal: Principal) -> list[RoleRule]:
    rules = [ROLE_RULES[role] for role in sorted(principal.roles) if role in ROLE_RULES]
    if rules:
        return rules
    system_only = principal.scopes and all(s.context == "system" for s in principal.scopes)
    return [SYSTEM_CLIENT if system_only else NO_ROLE]


def _allowed(rule: RoleRule, interaction: str, candidates: list[str] | None) -> list[str] | None:
    """The candidate types `rule` allows `interaction` on; None: all of them, whatever they are."""
    if candidates is None:
        if interaction in WRITE and "*" in rule.writes or interaction not in WRITE and rule.reads is None:
            return None
        return sorted(rule.writes if interaction in WRITE else rule.reads or ())
    return [t for t in candidates if rule.may(interaction, t)]


def _sort_keys(params: list[tuple[str, str]]) -> list[tuple[str, bool]]:
    return [(item.strip().lstrip("-"), item.strip().startswith("-"))
            for name, raw in params if name == "_sort" for item in raw.split(",") if item.strip()]


# -- the conditions -------------------------------------------------------------------------------

class _A:
    """The table aliases the conditions use, made once: building aliases (their column proxies) cost
    more than the rest of a search. Each has one place in the shape of a condition; where the same
    condition occurs twice in a statement the occurrences are siblings, never nested in each other,
    so their subqueries' names do not collide."""

    subject, withheld, own, written, guarded, strict_subject, strict_other, analysed = (
        policy_subject.alias(f"pol_{name}") for name in (
            "subject", "withheld", "own", "written", "guarded", "strict_subject", "strict_other", "analysed"))
    relationship = policy_relationship.alias("pol_relationship")
    consent, strict_consent, opt_out = (policy_consent.alias(f"pol_{n}") for n in ("consent", "strict_consent", "opt_out"))
    term = policy_consent_term.alias("pol_term")
    label = search_token.alias("pol_label")


def _exists(own: sa.FromClause, *conditions: sa.ColumnElement[bool]) -> sa.Exists:
    """EXISTS over `own`, correlated with every other table it names, at whatever depth of nesting
    they are (SQLAlchemy's automatic correlation reaches only the enclosing SELECT)."""
    return sa.exists(sa.select(sa.literal(1)).select_from(own).where(*conditions).correlate_except(own))


def _role_condition(rules: Sequence[RoleRule], permission: str, types: Sequence[str] | None, r: sa.FromClause,
                    exact: bool, caller: Any) -> sa.ColumnElement[bool] | None:
    """The rows of `r` of `types` (None: any) that `rules` reach for `caller` (a Caller, or
    MARKERS) with `permission`; None: all of them."""
    interaction = {"c": "create", "u": "update", "d": "delete"}.get(permission, "search-type")
    candidates = list(types) if types is not None else None
    ors: list[sa.ColumnElement[bool]] = []
    for rule in rules:
        allowed = _allowed(rule, interaction, candidates)
        if allowed is None or allowed:
            rows = _rows(rule, permission, r, exact, caller)
            if rows is None and allowed is None:
                return None
            if rows is None:
                if candidates is not None and set(allowed or ()) >= set(candidates):
                    return None
                ors.append(r.c.type.in_(sorted(allowed or ())))
                continue
            directory = sorted(t for t in (allowed if allowed is not None else DIRECTORY) if t in DIRECTORY)
            if directory:
                ors.append(r.c.type.in_(directory))
            if allowed is None:
                ors.append(sa.and_(r.c.type.not_in(sorted(DIRECTORY)), rows))
            else:
                record = sorted(t for t in allowed if t not in DIRECTORY)
                if record:
                    ors.append(sa.and_(r.c.type.in_(record) if len(record) > 1 else r.c.type == record[0], rows))
    if not ors:
        return sa.false()
    return ors[0] if len(ors) == 1 else sa.or_(*ors)


def _shape_name(r: sa.FromClause) -> str | None:
    """'' for the resource table (a search's matches, included rows), the name of a named alias of
    it (the engine names the rows of chains and `_has` by their depth); None for anything else."""
    if r is resource:
        return ""
    if isinstance(r, sa.Alias) and r.element is resource and not isinstance(r.name, _anonymous_label):
        return str(r.name)
    return None


@functools.cache
def _named_row(name: str) -> sa.FromClause:
    return resource.alias(name) if name else resource


@functools.lru_cache(maxsize=4096)
def _role_shape(rules: tuple[RoleRule, ...], permission: str, types: tuple[str, ...] | None, exact: bool,
                dialect: sa.Dialect, name: str) -> sa.TextClause | None:
    """`_role_condition` on the resource table (or its alias `name`) as SQL text for `dialect`, its
    values bound from `_BINDS` when it runs."""
    row = _named_row(name)
    cond = _role_condition(rules, permission, types, row, exact, MARKERS)
    if cond is None:
        return None
    # compiled as the WHERE of a query of the row, so its subqueries correlate with it
    query = sa.select(sa.literal(1)).select_from(row).where(cond)
    sql = str(query.compile(dialect=dialect, compile_kwargs={"literal_binds": True})).split("\nWHERE ", 1)[1]
    keys = sorted(set(re.findall(r":(pol_\w+)", sql)))
    return sa.text(f"({sql})").bindparams(*(_bind(k) for k in keys))


def _rows(rule: RoleRule, permission: str, r: sa.FromClause, exact: bool, caller: Any) -> sa.ColumnElement[bool] | None:
    """The rows of `r` that `rule`'s row reach gives `caller` for `permission` (None: all)."""
    if rule.rows == "all":
        return None
    if rule.rows == "own":
        ps = _A.own
        return _exists(ps, ps.c.resource_pk == r.c.pk, ps.c.patient_id == caller.patient)
    return _row_condition(rule.rows, permission in ("u", "d"), exact, r, caller)


def _row_condition(kind: str, changes: bool, exact: bool, r: sa.FromClause, caller: Any) -> sa.ColumnElement[bool]:
    """The rows of `r` a row-reach `kind` (but all and own) reaches for `caller` (a Caller, or MARKERS);
    `changes`: for an update or delete, which only the custodian's users may make."""
    if kind == "deidentified":
        return deidentified_rows(r, caller.now)
    cond = care_rows(r, caller) if exact else _care_rows_strict(r, caller)
    if changes:
        ps = _A.written
        cond = sa.and_(cond, ~_exists(ps, ps.c.resource_pk == r.c.pk, sa.func.coalesce(ps.c.custodian, "") != caller.org))
    return cond


def is_related(patient: sa.ColumnElement[str], caller: Any) -> sa.ColumnElement[bool]:
    """A legitimate relationship with `patient`, or a break-glass grant for them."""
    rel = _A.relationship
    return sa.or_(_in(patient, caller.break_glass_patients), _exists(
        rel, rel.c.patient_id == patient, _in(rel.c.actor, caller.refs),
        sa.or_(rel.c.until.is_(None), rel.c.until > caller.now)))


def provision_applies(c: sa.FromClause, ps: sa.FromClause, r: sa.FromClause, caller: Any) -> sa.ColumnElement[bool]:
    """Whether provision row `c` applies to row `r` (subject row `ps`) for this caller: in force,
    its dataPeriod met (an undated resource is covered by a deny, never by a permit), and every
    condition group with a matching term. Kept shallow: SQLite's parser limits nesting depth."""
    t, st = _A.term, _A.label
    label = sa.and_(st.c.resource_pk == r.c.pk, st.c.param == "_security", st.c.code == t.c.code,
                    sa.or_(t.c.system.is_(None), st.c.system == t.c.system))
    term = sa.or_(
        sa.and_(t.c.kind == "actor", _in(t.c.code, caller.actors)),
        sa.and_(t.c.kind == "class", t.c.code == r.c.type),
        sa.and_(t.c.kind == "purpose", t.c.code == caller.purpose),
        sa.and_(t.c.kind == "data", t.c.code == r.c.type + "/" + r.c.id),
        sa.and_(t.c.kind == "label", st.c.resource_pk.is_not(None)),
    )
    matched = (sa.select(sa.func.count(sa.distinct(t.c.grp))).select_from(t.outerjoin(st, label))
               .where(t.c.resource_pk == c.c.resource_pk, t.c.param == c.c.param, term).correlate_except(t, st)
               .scalar_subquery())
    # An undated row spans all time where the provision covers undated data, else no time; an open
    # end is no bound.
    undated_lo = sa.case((c.c.undated.is_(True), MIN_US), else_=MAX_US)
    undated_hi = sa.case((c.c.undated.is_(True), MAX_US), else_=MIN_US)
    return sa.and_(
        sa.func.coalesce(c.c.lo, MIN_US) <= caller.now, sa.func.coalesce(c.c.hi, MAX_US) > caller.now,
        sa.func.coalesce(ps.c.data_lo, undated_lo) < sa.func.coalesce(c.c.data_hi, MAX_US + 1),
        sa.func.coalesce(ps.c.data_hi, undated_hi) > sa.func.coalesce(c.c.data_lo, MIN_US - 1),
        matched == c.c.groups)


def _deepest(c: sa.FromClause, effect: str, explicit: bool = False) -> sa.ColumnElement[Any]:
    """The depth of the deepest applying provision of `effect` in a Consent's group (-1: none)."""
    which = c.c.effect == effect if not explicit else sa.and_(c.c.effect == effect, c.c.explicit.is_(True))
    return sa.func.coalesce(sa.func.max(sa.case((which, c.c.depth))), -1)


def consents_deciding(ps: sa.FromClause, r: sa.FromClause, caller: Any,
                      decides: Callable[[sa.FromClause], Any], consent: int | None = None) -> sa.Exists:
    """Whether the patient of subject row `ps` (of row `r`) has a Consent whose provisions that
    apply to `r` meet `decides`; one grouped query, kept flat (SQLite's parser limits nesting).
    `consent`: only that Consent (its pk), as `policy explain` asks them one by one."""
    c = _A.consent
    one = [c.c.resource_pk == consent] if consent is not None else []
    return sa.exists(sa.select(sa.literal(1)).select_from(c)
                     .where(c.c.patient_id == ps.c.patient_id, *one, c.c.effect.in_(("permit", "deny")),
                            provision_applies(c, ps, r, caller))
                     .group_by(c.c.resource_pk).having(decides(c)).correlate_except(c))


def consent_denies(c: sa.FromClause) -> sa.ColumnElement[bool]:
    """A Consent denies when its deepest applying provision is a deny (ties: deny)."""
    return sa.and_(_deepest(c, "deny") >= 0, _deepest(c, "deny") >= _deepest(c, "permit"))


def consent_permits_explicitly(c: sa.FromClause) -> sa.ColumnElement[bool]:
    """A permit naming actors or labels (the patient's own choice) applies, deeper than any applying
    deny of the same Consent: what opens sensitive data to other organisations."""
    return _deepest(c, "permit", explicit=True) > _deepest(c, "deny")


def care_rows(r: sa.FromClause, caller: Any) -> sa.ColumnElement[bool]:
    """Direct care: a relationship with one of the row's patients, and none of its patients' rules
    withholding it from a user outside its custodian organisation: a REDACTED patient, a Consent
    that denies it, a sensitive label without a Consent that explicitly permits it."""
    ps, w = _A.subject, _A.withheld
    withheld = _exists(w, w.c.resource_pk == r.c.pk, sa.func.coalesce(w.c.custodian, "") != caller.org, sa.or_(
        w.c.flags.op("&")(facts.HIDDEN) != 0,
        consents_deciding(w, r, caller, consent_denies),
        sa.and_(w.c.flags.op("&")(facts.SENSITIVE) != 0,
                ~consents_deciding(w, r, caller, consent_permits_explicitly))))
    # CASE: the rules are looked at only for rows of related patients (planners may otherwise run
    # them first, for every candidate row)
    return sa.case((_exists(ps, ps.c.resource_pk == r.c.pk, is_related(ps.c.patient_id, caller)), ~withheld),
                   else_=sa.false())


def _care_rows_strict(r: sa.FromClause, caller: Any) -> sa.ColumnElement[bool]:
    """`care_rows` made stricter and two levels deep, for chains and `_has`: outside the custodian,
    nothing of a patient with any privacy Consent, and nothing labelled. Never more than the exact
    rule allows, so such a parameter cannot reveal what the caller may not see."""
    ps, other, c = _A.strict_subject, _A.strict_other, _A.strict_consent
    consented = _exists(c, c.c.patient_id == other.c.patient_id, c.c.effect.in_(("permit", "deny")))
    return sa.and_(
        _exists(ps, ps.c.resource_pk == r.c.pk, is_related(ps.c.patient_id, caller)),
        ~_exists(other, other.c.resource_pk == r.c.pk,
                 sa.func.coalesce(other.c.custodian, "") != caller.org,
                 sa.or_(other.c.flags != 0, consented)))


def deidentified_rows(r: sa.FromClause, now: Any) -> sa.ColumnElement[bool]:
    """Secondary use: nothing of a patient with a secondary-use opt-out in force, or REDACTED."""
    ps, c = _A.analysed, _A.opt_out
    opted_out = _exists(c, c.c.patient_id == ps.c.patient_id, c.c.effect == "secondary-opt-out",
                        sa.or_(c.c.lo.is_(None), c.c.lo <= now), sa.or_(c.c.hi.is_(None), c.c.hi > now))
    return ~_exists(ps, ps.c.resource_pk == r.c.pk, sa.or_(ps.c.flags.op("&")(facts.HIDDEN) != 0, opted_out))



# -- the decision point ---------------------------------------------------------------------------

PSEUDONYM_KEY_ENV = "CAREBROKER_PSEUDONYM_KEY"
BREAK_GLASS_HEADER = "x-break-glass-reason"
CALLER_CACHE_SECONDS = 10.0  # a user's PractitionerRoles and care teams, looked up at most this often


class PolicyDecisionPoint:
    """Builds each request's policy, and completes it (break-glass records)."""

    def __init__(self, service: FhirService, types: frozenset[str]) -> None:
        self.service = service  # unrestricted: the policy's own lookups
        self.types = types
        self.break_glass = BreakGlassLog(service.store)
        self.access_log = AccessLog(service.store)
        self._callers: dict[tuple[str | None, str | None], tuple[float, tuple[str, ...], tuple[str, ...]]] = {}
        self._lock = threading.Lock()

    @functools.cached_property
    def pseudonymiser(self) -> Pseudonymiser:
        """Keyed by $CAREBROKER_PSEUDONYM_KEY, or a random key made once and kept in the database, so
        pseudonyms stay stable across restarts and server nodes."""
        key = os.environ.get(PSEUDONYM_KEY_ENV)
        if not key:
            store = self.service.store
            with store.writing() as conn:
                key = store.state(conn, "pseudonym_key")
                if key is None:
                    key = secrets.token_hex(32)
                    store.set_state(conn, "pseudonym_key", key)
        return Pseudonymiser(key.encode())

    def for_principal(self, principal: Principal, base_url: str, break_glass_reason: str | None = None,
                      patient: str | None = None) -> RequestPolicy:
        """The policy for `principal`; `break_glass_reason` (the X-Break-Glass-Reason header) opens
        a grant for `patient`, the one patient the request is about."""
        access = Access(principal, self.types, base_url)
        refs, careteams = self._caller_refs(principal)
        caller = Caller(refs, careteams, principal.organization, principal.purpose_of_use, now=now_us(),
                        patient=principal.patient or "")
        requester = f"{principal.issuer}|{principal.subject or principal.client_id}"
        if break_glass_reason is not None:
            if "clinician" not in principal.roles:
                raise forbidden("Break-glass access is for clinicians")
            if not principal.emergency:
                raise forbidden(f"Break-glass access needs an access token with purpose of use {EMERGENCY_PURPOSE}")
            if not break_glass_reason.strip():
                raise error(400, "required", "X-Break-Glass-Reason must give the reason for emergency access")
            if patient is None:
                raise error(400, "invalid", "Break-glass access is to one patient: read, search or $everything "
                            "naming that patient (Patient/[id], or patient=/subject=)")
            self.break_glass.open(requester, principal.fhir_user, principal.organization, patient,
                                  break_glass_reason, now=caller.now)
        if principal.emergency and "clinician" in principal.roles:
            caller.break_glass = self.break_glass.active(requester, now=caller.now)
        policy = RequestPolicy(principal, access, caller, lambda: self.pseudonymiser, self.service.store.engine.dialect)
        policy.about = patient
        return policy

    def for_export(self, principal_json: str) -> RequestPolicy:
        """The policy of the caller who kicked off an export, for the worker that runs it later."""
        return self.for_principal(principal_from_claims(json.loads(principal_json)), "")

    def complete(self, policy: RequestPolicy, method: str, url: str, status: int) -> None:
        """Record an administrator's request, and a request made while break-glass grants were open
        (under each grant whose patient it read, or was about)."""
        seen = list(dict.fromkeys(policy.seen))
        if policy.audited:
            p = policy.principal
            self.access_log.add(f"{p.issuer}|{p.subject or p.client_id}", p.roles, method, url, status, seen)
        if not policy.caller.break_glass:
            return
        patients = self._patients_of(seen)
        grants = [g for p, g in policy.caller.break_glass.items() if p in patients or p == policy.about]
        if grants:
            self.break_glass.record(grants, method, url, status, seen)

    def _patients_of(self, refs: list[str]) -> set[str]:
        if not refs:
            return set()
        pairs = [tuple(ref.split("/", 1)) for ref in refs]
        with self.service.store.single_read() as conn:
            rows = conn.execute(sa.select(policy_subject.c.patient_id).select_from(
                policy_subject.join(resource, resource.c.pk == policy_subject.c.resource_pk))
                .where(sa.tuple_(resource.c.type, resource.c.id).in_(pairs))).scalars()
            return set(rows)

    def _caller_refs(self, principal: Principal) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(the references standing for the caller, the care teams they are in): their fhirUser,
        its active PractitionerRoles and their organisations, the token's organisation."""
        key = (principal.fhir_user, principal.organization)
        if key == (None, None):
            return (), ()
        with self._lock:
            cached = self._callers.get(key)
        if cached is not None and time.monotonic() - cached[0] < CALLER_CACHE_SECONDS:
            return cached[1], cached[2]
        refs: list[str] = [r for r in key if r]
        if principal.fhir_user and principal.fhir_user.startswith("Practitioner/"):
            _, roles, _, _ = self.service.search(
                ("PractitionerRole",), [("practitioner", principal.fhir_user), ("active:not", "false")],
                strict=True, base_url="", count=100, cursor=None, want_total=False)
            for role in roles:
                refs.append(f"PractitionerRole/{role.id}")
                org = (jsonfmt.loads(role.content or "{}").get("organization") or {}).get("reference")
                if isinstance(org, str) and org.startswith("Organization/"):
                    refs.append(org)
        refs = list(dict.fromkeys(refs))
        _, teams, _, _ = self.service.search(
            ("CareTeam",), [("participant", ",".join(refs)), ("status", "active")],
            strict=True, base_url="", count=1000, cursor=None, want_total=False)
        careteams = tuple(f"CareTeam/{t.id}" for t in teams)
        with self._lock:
            if len(self._callers) > 10_000:
                self._callers.clear()
            self._callers[key] = (time.monotonic(), tuple(refs), careteams)
        return tuple(refs), careteams

"""What a principal's SMART scopes let it do: interaction checks (403) and row conditions.

Two questions are answered here. Is the interaction allowed at all (`require`: a scope must grant
the permission letter on the type, else 403)? And which rows may it touch (`where`: an SQL condition
on the resource table that the service adds to its queries, so a `patient/` scope restricts a
search *before* paging and counting, and includes, history, `$everything` and writes alike)?

- A `user/` or `system/` scope grants every row of its types; a granular one (`?category=...`) only
  those its query matches.
- A `patient/` scope grants the rows in the token's patient's compartment (the official R4 Patient
  CompartmentDefinition). Types outside the compartment that hold no one's record (directories,
  medications, definitions: SHARED_TYPES) are granted whole, as an app needs the Practitioner or
  Medication its patient's record points to; any other type outside the compartment (Task, Device,
  Binary, Bundle, ...) cannot be tied to the patient and is not granted by a `patient/` scope.
- A `patient/` scope without a `patient` claim grants nothing.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import sqlalchemy as sa

from conformance.search_parameters import patient_compartment
from fhir_server.auth.principal import Principal
from fhir_server.auth.smart_scopes import SmartScope
from fhir_server.outcome import FhirError, Issue
from fhir_server.search.engine import compartment_references, parse_search

# Types outside the Patient compartment that hold no patient's record: readable under patient/ scopes.
SHARED_TYPES = frozenset({
    "Practitioner", "PractitionerRole", "Organization", "OrganizationAffiliation", "Location",
    "HealthcareService", "Endpoint", "InsurancePlan", "Medication", "MedicationKnowledge", "Substance",
    "DeviceDefinition", "ObservationDefinition", "SpecimenDefinition", "ActivityDefinition",
    "CapabilityStatement", "ChargeItemDefinition", "CodeSystem", "CompartmentDefinition", "ConceptMap",
    "EventDefinition", "ExampleScenario", "GraphDefinition", "ImplementationGuide", "Library", "Measure",
    "MessageDefinition", "NamingSystem", "OperationDefinition", "PlanDefinition", "Questionnaire",
    "ResearchDefinition", "ResearchElementDefinition", "SearchParameter", "StructureDefinition",
    "StructureMap", "TerminologyCapabilities", "TestScript", "ValueSet", "CatalogEntry",
})
NAMES = {"c": "create", "r": "read", "u": "update", "d": "delete", "s": "search"}


def forbidden(message: str, scope_hint: str | None = None) -> FhirError:
    header = 'Bearer realm="carebroker", error="insufficient_scope"'
    if scope_hint:
        header += f', scope="{scope_hint}"'
    return FhirError(403, [Issue("forbidden", message)], headers={"WWW-Authenticate": header})


@dataclass(frozen=True)
class _Grant:
    """Rows of one type a scope grants: all (no patient, no query), a patient's compartment, and/or a query."""

    patient: str | None
    query: tuple[tuple[str, str], ...]


class Access:
    """A principal's scopes applied to interactions and rows. `types`: the types the server serves."""

    def __init__(self, principal: Principal, types: frozenset[str], base_url: str) -> None:
        self.principal = principal
        self.types = types
        self.base_url = base_url

    @property
    def reaches_every_row(self) -> bool:
        """Whether every permission the scopes grant at all is granted on every row of every type
        (`system/*.*`, `user/*.rs`, ...): then no row conditions are needed anywhere (an interaction
        the scopes do not grant is refused before it reaches a row)."""
        granted = {p for s in self.principal.scopes for p in s.permissions}
        return all(self._every_row(p) for p in granted)

    def _every_row(self, permission: str) -> bool:
        """Whether a scope grants `permission` on every row of every type (`user/*.rs`, ...)."""
        return any(s.resource_type == "*" and s.context != "patient" and not s.query and permission in s.permissions
                   for s in self.principal.scopes)

    # -- interaction level --------------------------------------------------------------------------

    def grants(self, permission: str, rtype: str, bulk: bool = False) -> list[_Grant]:
        """What the scopes covering (`rtype`, `permission`) grant; empty: nothing. `bulk`: only
        scopes that grant whole types (user/ and system/, no query), as Bulk Data export needs."""
        out = []
        for scope in self.principal.scopes:
            if not scope.covers(rtype, permission) or bulk and scope.context == "patient":
                continue
            grant = self._grant(scope, rtype)
            if grant is not None and (not bulk or (grant.patient is None and not grant.query)):
                out.append(grant)
        return out

    def _grant(self, scope: SmartScope, rtype: str) -> _Grant | None:
        if scope.context != "patient":
            return _Grant(None, scope.query)
        patient = self.principal.patient
        if patient is None:
            return None
        if rtype in patient_compartment():
            return _Grant(patient, scope.query)
        return _Grant(None, scope.query) if rtype in SHARED_TYPES else None

    def permits(self, permission: str, rtype: str, bulk: bool = False) -> bool:
        return bool(self.grants(permission, rtype, bulk))

    def require(self, permissions: str, rtype: str, bulk: bool = False) -> None:
        """403 unless every letter of `permissions` is granted on `rtype`."""
        for p in permissions:
            if not self.permits(p, rtype, bulk):
                what = "system/ or user/ " if bulk else ""
                raise forbidden(f"The access token grants no {what}{NAMES[p]} access to {rtype} "
                                f"(scopes: {self.principal.scope or 'none'})", f"user/{rtype}.{p}")

    def require_any(self, permissions: str, rtype: str) -> None:
        """403 unless at least one letter of `permissions` is granted on `rtype`."""
        if not any(self.permits(p, rtype) for p in permissions):
            names = " or ".join(NAMES[p] for p in permissions)
            raise forbidden(f"The access token grants no {names} access to {rtype}", f"user/{rtype}.{permissions}")

    def permitted_types(self, permission: str, types: Iterable[str], bulk: bool = False) -> tuple[str, ...]:
        return tuple(t for t in types if self.permits(permission, t, bulk))

    def pinned_patient(self) -> str | None:
        """The patient every patient/ scope is bound to, when the token has patient/ scopes only."""
        if self.principal.scopes and all(s.context == "patient" for s in self.principal.scopes):
            return self.principal.patient
        return None

    # -- row level ------------------------------------------------------------------------------------

    def where(self, permission: str, types: Sequence[str] | None, r: sa.FromClause) -> sa.ColumnElement[bool] | None:
        """The condition on `r` (a resource table alias) for the rows of `types` (None: any type)
        `permission` reaches; None when it reaches every row of them."""
        if self._every_row(permission):
            return None
        candidates = sorted(self.types) if types is None else list(types)
        whole: list[str] = []
        compartments: dict[str, list[str]] = {}  # patient -> types granted by compartment
        others: list[sa.ColumnElement[bool]] = []
        for rtype in candidates:
            grants = self.grants(permission, rtype)
            if any(g.patient is None and not g.query for g in grants):
                whole.append(rtype)
                continue
            for g in grants:
                if g.patient is not None and not g.query:
                    compartments.setdefault(g.patient, []).append(rtype)
                else:
                    others.append(self._granular(rtype, g, r, len(candidates) > 1))
        if len(whole) == len(candidates):
            return None
        ors: list[sa.ColumnElement[bool]] = []
        if whole:
            ors.append(r.c.type.in_(whole))
        for patient, ctypes in compartments.items():
            ors.append(_compartment(patient, ctypes, r))
        ors.extend(others)
        if not ors:
            return sa.false()
        return ors[0] if len(ors) == 1 else sa.or_(*ors)

    def _granular(self, rtype: str, grant: _Grant, r: sa.FromClause, typed: bool) -> sa.ColumnElement[bool]:
        """A granular scope's query as conditions (ANDed with the compartment for patient/ scopes).
        A query this server cannot evaluate grants nothing rather than everything."""
        try:
            search = parse_search((rtype,), list(grant.query), True, self.base_url, r)
        except FhirError:
            return sa.false()
        conds = list(search.conditions)
        if grant.patient is not None:
            conds.append(_compartment(grant.patient, [rtype], r))
        if typed:
            conds.insert(0, r.c.type == rtype)
        return sa.and_(*conds) if conds else sa.true()


def _compartment(patient: str, types: list[str], r: sa.FromClause) -> sa.ColumnElement[bool]:
    """Rows of `types` in `patient`'s compartment (the Patient itself, by id) or of a SHARED type."""
    in_comp = [t for t in types if t in patient_compartment()]
    shared = [t for t in types if t not in patient_compartment()]
    ors: list[sa.ColumnElement[bool]] = []
    members = [t for t in in_comp if t != "Patient"]
    if members:
        ors.append(r.c.pk.in_(compartment_references([patient], members)))
    if "Patient" in in_comp:
        ors.append(sa.and_(r.c.type == "Patient", r.c.id == patient))
    if shared:
        ors.append(r.c.type.in_(shared))
    return ors[0] if len(ors) == 1 else sa.or_(*ors)

"""The role rules, as data: what each carebroker role may do with which resource types, and which
rows of them it reaches. consent/policy.py interprets this table; changing what a role may see is
changing a line here.

Row reach kinds:
- `all`: every row of the types (scopes still apply).
- `care`: direct care. Rows of a patient's record only with a legitimate relationship (an active
  CareTeam or Encounter naming the user, their PractitionerRole or organisation; or the patient's
  registered GP practice), or an open break-glass grant; then Consents, sensitivity labels and
  restricted/REDACTED patients decide, and other organisations' data of an opted-out patient is gone.
- `own`: the user's own Patient compartment (a patient).
- `deidentified`: secondary use. Patients with a National Data Opt-out or a Type 1 opt-out are left
  out entirely; what remains is pseudonymised (consent/deidentify.py).
Types outside the Patient compartment that hold no one's record (DIRECTORY) carry no patient rows:
a role that reads them reads them all.
"""
from __future__ import annotations

from dataclasses import dataclass

from conformance.search_parameters import patient_compartment
from fhir_server.auth.access import SHARED_TYPES

DIRECTORY = SHARED_TYPES
RECORD = frozenset(patient_compartment())  # types that are part of a patient's record
READ = frozenset({"read", "vread", "history-instance", "history-type", "history-system", "search-type",
                  "search-system", "search-compartment", "$everything", "$export", "$validate"})
SEARCH_ONLY = frozenset({"search-type", "search-system", "$export"})
WRITE = frozenset({"create", "update", "patch", "delete"})


@dataclass(frozen=True)
class RoleRule:
    """`reads`/`writes`: the types a role may read and search / create, update and delete (None:
    every type); `interactions`: the interactions it may use at all; `rows`: how its rows are
    reached (see the module docstring)."""

    reads: frozenset[str] | None
    writes: frozenset[str]
    rows: str
    interactions: frozenset[str] = READ | WRITE

    def may(self, interaction: str, rtype: str) -> bool:
        if interaction not in self.interactions:
            return False
        if interaction in WRITE:
            return rtype in self.writes or "*" in self.writes
        return self.reads is None or rtype in self.reads


ALL = frozenset({"*"})
ROLE_RULES: dict[str, RoleRule] = {
    "clinician": RoleRule(reads=(RECORD - {"AuditEvent"}) | DIRECTORY, writes=RECORD - {"AuditEvent"}, rows="care"),
    "support": RoleRule(reads=frozenset({"Patient", "RelatedPerson", "Appointment"}) | DIRECTORY,
                        writes=frozenset({"Appointment"}), rows="care"),
    "ig-officer": RoleRule(reads=frozenset({"AuditEvent", "Consent"}) | DIRECTORY, writes=frozenset(), rows="all",
                           interactions=READ - {"$everything"}),
    "integration": RoleRule(reads=None, writes=ALL, rows="all"),
    "patient": RoleRule(reads=RECORD | DIRECTORY, writes=frozenset({"Consent"}), rows="own"),
    "admin": RoleRule(reads=None, writes=ALL, rows="all"),
    "analyst": RoleRule(reads=(RECORD - {"AuditEvent", "Consent", "Provenance"}) | DIRECTORY, writes=frozenset(),
                        rows="deidentified", interactions=SEARCH_ONLY),
}
# A token with no carebroker role: a system-level client (SMART Backend Services, `system/` scopes
# only) is governed by its scopes alone, as `integration`; anyone else reaches no patient's record.
SYSTEM_CLIENT = ROLE_RULES["integration"]
NO_ROLE = RoleRule(reads=DIRECTORY, writes=frozenset(), rows="all", interactions=READ - {"$everything", "$export"})

# What the CapabilityStatement tells clients about the policy (rest.security.description).
POLICY_SUMMARY = (
    "Access policy: every search, read, include, chain, _has, history, $everything and $export is kept to the rows "
    "the token's scopes and the user's role allow, inside the query: direct care (role clinician, support) "
    "by legitimate relationship (active CareTeam or Encounter, registered GP practice) and the patient's "
    "privacy Consents (opt-out: only the user's own organisation's data); sensitive and restricted data only "
    "for the custodian organisation or under an explicit permit; analysts get pseudonymised data without "
    "patients with a National Data Opt-out or Type 1 opt-out. Bundle.total (_total, _summary=count) counts "
    "exactly what the caller may see, so pages are full and totals honest. A read of a resource out of reach "
    "answers 403 (no legitimate relationship, or no such resource) or 404. Break-glass: purpose of use ETREAT "
    "with an X-Break-Glass-Reason header, recorded for review."
)

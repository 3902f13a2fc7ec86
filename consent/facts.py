"""Policy facts: what the access policy needs to know of a resource, extracted when it is written.

Like search values, the facts go into index tables (storage/schema.py `policy_*`) in the write's
transaction, so the policy (consent/policy.py) is a few index probes inside each query and a new
Consent or CareTeam counts from the very next request. Everything here is a function of one
resource and its search index rows; nothing reads the database.

- `policy_subject`: whose record the resource is part of (its Patient compartment, per the official
  CompartmentDefinition; a Patient is its own), the custodian organisation (the meta.tag
  CUSTODIAN_SYSTEM), label flags, and the clinical date Consent `dataPeriod`s are compared with.
- `policy_relationship`: the care relationships it states: an active CareTeam's participants, an
  active Encounter's participants, a Patient's registered GP (practice or practitioner).
- `policy_consent` / `policy_consent_term`: an active Consent's provisions, flattened (see
  `consent_facts`), and National Data Opt-out / Type 1 dissents.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from conformance.search_parameters import patient_compartment
from fhir_server.search.values import MAX_US, date_range

CUSTODIAN_SYSTEM = "https://carebroker.example/CodeSystem/custodian"  # meta.tag code: Organization/<id>
CONFIDENTIALITY = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
OBSERVATION_VALUE = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue"
SNOMED = "http://snomed.info/sct"

# Label flags of a policy_subject row.
SENSITIVE = 1  # seen only by the custodian's users or under an explicit permit
RESTRICTED = 2  # a Patient whose address, telecom and GP are withheld outside the custodian
HIDDEN = 4  # a Patient that does not exist for users outside the custodian

# v3 ActCode information sensitivity codes (mental health, sexual health, substance use, ...).
SENSITIVITY_CODES = frozenset({
    "BH", "COGN", "DVD", "EMOTDIS", "ETH", "GDIS", "HIV", "MH", "MST", "PSY", "PSYTHPN", "SCA", "SDV", "SEX",
    "SICKLE", "STD", "SUD", "TBOO",
})
# Consents that withhold a patient's data from secondary use (planning, research): the NHS Type 1
# opt-out and the National Data Opt-out, as SNOMED CT codes in Consent.category, policyRule or a
# provision's code.
SECONDARY_OPT_OUT_CODES = frozenset({
    "827241000000103",  # Dissent from secondary use of general practitioner patient identifiable data (Type 1)
    "827261000000102",  # Dissent from disclosure of personal confidential data by Health and Social Care Information Centre
    "1332491000000107",  # National data opt-out
})
PRIVACY_SCOPE = "patient-privacy"
DENYING_POLICY_RULES = frozenset({"OPTOUT", "OPTOUTE"})
READ_ACTIONS = frozenset({"access", "use", "disclose"})  # provisions about other actions do not govern reads
ACTIVE_ENCOUNTER = frozenset({"planned", "arrived", "triaged", "in-progress", "onleave"})
# The search parameter (date type) holding a type's clinical date, for Consent dataPeriod.
DATA_DATE = {
    "AllergyIntolerance": "date", "Appointment": "date", "CarePlan": "date", "CareTeam": "date",
    "Condition": "onset-date", "DiagnosticReport": "date", "DocumentReference": "date", "Encounter": "date",
    "Immunization": "date", "MedicationStatement": "effective", "MedicationRequest": "authoredon",
    "Observation": "date", "Procedure": "date", "ServiceRequest": "authored", "QuestionnaireResponse": "authored",
    "Composition": "date", "Consent": "date", "Provenance": "recorded", "Goal": "start-date",
}
TERM_KINDS = ("actor", "class", "label", "purpose", "data")

Rows = dict[str, set[tuple[Any, ...]]]


def policy_facts(resource: dict[str, Any], index: Rows) -> Rows:
    """The policy rows of `resource`, given its search index rows."""
    rtype = resource["resourceType"]
    rows: Rows = {}
    subjects = _subjects(resource, index)
    if subjects:
        custodian = custodian_of(resource)
        flags = label_flags(resource)
        lo, hi = _data_period(rtype, index)
        rows["policy_subject"] = {(param, pid, custodian, flags, lo, hi) for param, pid in subjects}
    if relationships := set(_relationships(resource, index)):
        rows["policy_relationship"] = relationships
    if rtype == "Consent":
        rows.update(consent_facts(resource))
    return rows


def custodian_of(resource: dict[str, Any]) -> str | None:
    for tag in (resource.get("meta") or {}).get("tag") or ():
        if isinstance(tag, dict) and tag.get("system") == CUSTODIAN_SYSTEM and isinstance(tag.get("code"), str):
            return tag["code"]
    return None


def with_custodian(resource: dict[str, Any], organization: str) -> dict[str, Any]:
    """`resource` with its custodian tag set to `organization` (a new dict when it changes)."""
    if custodian_of(resource) == organization:
        return resource
    meta = dict(resource.get("meta") or {})
    meta["tag"] = [t for t in meta.get("tag") or () if not (isinstance(t, dict) and t.get("system") == CUSTODIAN_SYSTEM)]
    meta["tag"].append({"system": CUSTODIAN_SYSTEM, "code": organization})
    return {**resource, "meta": meta}


def security_labels(resource: dict[str, Any]) -> set[tuple[str | None, str]]:
    return {(c.get("system"), c["code"]) for c in (resource.get("meta") or {}).get("security") or ()
            if isinstance(c, dict) and isinstance(c.get("code"), str)}


def label_flags(resource: dict[str, Any]) -> int:
    """Patients: R -> RESTRICTED, V or REDACTED -> HIDDEN. Other resources: R, V or a sensitivity
    code -> SENSITIVE."""
    labels = security_labels(resource)
    confidential = {code for system, code in labels if system == CONFIDENTIALITY}
    if resource["resourceType"] == "Patient":
        hidden = "V" in confidential or (OBSERVATION_VALUE, "REDACTED") in labels
        return HIDDEN if hidden else RESTRICTED if "R" in confidential else 0
    sensitive = confidential & {"R", "V"} or any(system == ACT_CODE and code in SENSITIVITY_CODES
                                                  for system, code in labels)
    return SENSITIVE if sensitive else 0


def _subjects(resource: dict[str, Any], index: Rows) -> set[tuple[str, str]]:
    """(compartment parameter, patient id) pairs: the patients whose record this is part of."""
    rtype = resource["resourceType"]
    if rtype == "Patient":
        return {("_self", resource["id"])} if resource.get("id") else set()
    params = patient_compartment().get(rtype)
    if not params:
        return set()
    return {(param, tid) for param, ttype, tid, _url in index.get("reference", ())
            if ttype == "Patient" and tid and param in params}


def _references(index: Rows, param: str, target: str | None = None) -> list[str]:
    return [f"{ttype}/{tid}" for p, ttype, tid, _url in index.get("reference", ())
            if p == param and ttype and tid and (target is None or ttype == target)]


def _token(index: Rows, param: str) -> set[str]:
    return {code for p, _system, code in index.get("token", ()) if p == param}


def _period_end(index: Rows, param: str) -> int | None:
    ends = [hi for p, _lo, hi, _narrow in index.get("date", ()) if p == param]
    return None if not ends or max(ends) >= MAX_US else max(ends)


def _relationships(resource: dict[str, Any], index: Rows) -> Iterator[tuple[str, str, str, int | None]]:
    """(kind, patient id, actor, until) rows; only while the resource states an active relationship."""
    rtype = resource["resourceType"]
    if rtype == "Patient" and resource.get("id"):
        for actor in _references(index, "general-practitioner"):
            yield "gp", resource["id"], actor, None
        return
    if rtype == "CareTeam" and _token(index, "status") == {"active"}:
        kind, members = "careteam", _references(index, "participant")
    elif rtype == "Encounter" and _token(index, "status") & ACTIVE_ENCOUNTER:
        kind, members = "encounter", _references(index, "participant")
    else:
        return
    until = _period_end(index, "date")
    for patient in {ref.split("/", 1)[1] for ref in _references(index, "patient", "Patient")}:
        for actor in members:
            if not actor.startswith("Patient/"):
                yield kind, patient, actor, until


def _data_period(rtype: str, index: Rows) -> tuple[int | None, int | None]:
    param = DATA_DATE.get(rtype)
    spans = [(lo, hi) for p, lo, hi, _narrow in index.get("date", ()) if p == param]
    if not spans:
        return None, None
    return min(lo for lo, _ in spans), max(hi for _, hi in spans)


# -- Consent --------------------------------------------------------------------------------------

def _codes(concepts: Any) -> set[str]:
    """Codes of a CodeableConcept, a list of them, or a list of Codings."""
    items = concepts if isinstance(concepts, list) else [concepts]
    out = set()
    for item in items:
        if not isinstance(item, dict):
            continue
        for coding in item.get("coding", [item]):
            if isinstance(coding, dict) and isinstance(coding.get("code"), str):
                out.add(coding["code"])
    return out


def _period(value: Any) -> tuple[int | None, int | None]:
    if not isinstance(value, dict):
        return None, None
    start = date_range(value["start"]) if isinstance(value.get("start"), str) else None
    end = date_range(value["end"]) if isinstance(value.get("end"), str) else None
    return (start[0] if start else None), (end[1] if end else None)


def _intersect(a: tuple[int | None, int | None], b: tuple[int | None, int | None]) -> tuple[int | None, int | None]:
    lo = max((x for x in (a[0], b[0]) if x is not None), default=None)
    hi = min((x for x in (a[1], b[1]) if x is not None), default=None)
    return lo, hi


def _ref(value: Any) -> str | None:
    ref = value.get("reference") if isinstance(value, dict) else None
    if not isinstance(ref, str) or "/" not in ref:
        return None
    parts = ref.split("/_history/", 1)[0].rstrip("/").split("/")
    return f"{parts[-2]}/{parts[-1]}"


def _terms(provision: dict[str, Any]) -> list[tuple[str, set[tuple[str | None, str]]]]:
    """A provision's own condition groups: (kind, {(system, code)}), each non-empty."""
    groups: list[tuple[str, set[tuple[str | None, str]]]] = []
    actors = {(None, r) for a in provision.get("actor") or () if (r := _ref((a or {}).get("reference")))}
    classes = {(None, c["code"]) for c in provision.get("class") or () if isinstance(c, dict) and isinstance(c.get("code"), str)}
    labels = {(c.get("system"), c["code"]) for c in provision.get("securityLabel") or ()
              if isinstance(c, dict) and isinstance(c.get("code"), str)}
    purposes = {(c.get("system"), c["code"]) for c in provision.get("purpose") or ()
                if isinstance(c, dict) and isinstance(c.get("code"), str)}
    data = {(None, r) for d in provision.get("data") or () if (r := _ref((d or {}).get("reference")))}
    for kind, values, named in (("actor", actors, provision.get("actor")), ("class", classes, provision.get("class")),
                                ("label", labels, provision.get("securityLabel")),
                                ("purpose", purposes, provision.get("purpose")), ("data", data, provision.get("data"))):
        if values or named:  # a list naming nothing usable matches nothing, rather than everything
            groups.append((kind, values))
    return groups


def consent_facts(consent: dict[str, Any]) -> Rows:
    """An active Consent as policy rows. Privacy consents (scope patient-privacy): each provision
    that governs reads becomes a rule row with the conditions of its ancestors and its own: periods
    and dataPeriods intersected, condition groups carried down. The deepest applicable provision
    decides (ties: deny). The root's type, when absent, comes from policyRule (OPTOUT: deny,
    otherwise permit). Any active Consent carrying a secondary-use opt-out code adds a
    secondary-opt-out row. Inactive, draft or rejected Consents state nothing."""
    patient = _ref(consent.get("patient"))
    if consent.get("status") != "active" or not patient or not patient.startswith("Patient/"):
        return {}
    pid = patient.split("/", 1)[1]
    root = consent.get("provision") if isinstance(consent.get("provision"), dict) else {}
    rules: set[tuple[Any, ...]] = set()
    terms: set[tuple[Any, ...]] = set()
    codes = _codes(consent.get("category")) | _codes(consent.get("policyRule"))
    stack = [root]
    while stack:
        node = stack.pop()
        codes |= _codes(node.get("code"))
        stack.extend(p for p in node.get("provision") or () if isinstance(p, dict))
    if codes & SECONDARY_OPT_OUT_CODES:
        lo, hi = _period(root.get("period"))
        rules.add(("secondary", pid, 0, "secondary-opt-out", False, 0, lo, hi, None, None, True))
    if PRIVACY_SCOPE in _codes(consent.get("scope")):
        default = "deny" if _codes(consent.get("policyRule")) & DENYING_POLICY_RULES else "permit"
        _flatten(root, "0", 0, root.get("type") or default, pid, (None, None), (None, None), True, [], rules, terms)
    return {"policy_consent": rules, "policy_consent_term": terms} if rules else {}


def _flatten(node: dict[str, Any], path: str, depth: int, effect: str, pid: str,
             period: tuple[int | None, int | None], data_period: tuple[int | None, int | None], undated: bool,
             groups: list[tuple[str, set[tuple[str | None, str]]]],
             rules: set[tuple[Any, ...]], terms: set[tuple[Any, ...]]) -> None:
    actions = _codes(node.get("action"))
    if actions and not actions & READ_ACTIONS:
        return  # about collecting or correcting, not reading; its exceptions go with it
    period = _intersect(period, _period(node.get("period")))
    own_data_period = _period(node.get("dataPeriod"))
    data_period = _intersect(data_period, own_data_period)
    # an undated resource meets a deny's dataPeriod and not a permit's, at each level
    undated = undated and (own_data_period == (None, None) or effect == "deny")
    if period[0] is not None and period[1] is not None and period[0] >= period[1]:
        return  # never in force
    groups = groups + _terms(node)
    explicit = any(kind in ("actor", "label") for kind, _ in groups)
    rules.add((path, pid, depth, effect, explicit, len(groups), period[0], period[1], *data_period, undated))
    for g, (kind, values) in enumerate(groups):
        for system, code in values:
            terms.add((path, kind, g, system, code[:255]))
    for i, child in enumerate(node.get("provision") or ()):
        if isinstance(child, dict) and child.get("type") in ("permit", "deny"):
            _flatten(child, f"{path}.{i}", depth + 1, child["type"], pid, period, data_period, undated, groups, rules,
                     terms)


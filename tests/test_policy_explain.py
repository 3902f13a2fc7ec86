"""`carebroker policy explain` (consent/explain.py): the explanation of a decision must be the
decision. Each case builds the explanation for a registered user and checks its final answer against
what a real read, search or update through `FhirService(...).restricted(policy)` gives for the same
user, on SQLite and PostgreSQL; and the steps it shows (relationships, provisions that apply,
sensitivity, secondary-use opt-outs) for the cases that turn on them."""
from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conformance.validation import supported_resource_types
from consent.break_glass import BreakGlassLog
from consent.explain import explain, principal_for_user, render_text
from consent.policy import PolicyDecisionPoint
from fhir_server import jsonfmt
from fhir_server.auth.principal import Principal, principal_from_claims
from fhir_server.auth.registry import Registry
from fhir_server.auth.resource_server import organization_finder
from fhir_server.outcome import FhirError
from fhir_server.service.interactions import FhirService
from fhir_server.storage.engine import create_engine
from fhir_server.storage.repository import Store

from conftest import BACKENDS, Backends

REPO = Path(__file__).resolve().parents[1]
ISSUER = "https://issuer.carebroker.test"
CUSTODIAN = "https://carebroker.example/CodeSystem/custodian"
CONF = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
ACT = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
OBS_VALUE = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue"
PRIVACY = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]}
TYPE_1 = {"coding": [{"system": "http://snomed.info/sct", "code": "827241000000103"}]}


def actor(ref: str) -> dict[str, Any]:
    return {"role": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                                 "code": "IRCP"}]}, "reference": {"reference": ref}}


def meta(custodian: str, *security: tuple[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {"tag": [{"system": CUSTODIAN, "code": f"Organization/{custodian}"}]}
    if security:
        out["security"] = [{"system": s, "code": c} for s, c in security]
    return out


def patient(pid: str, *security: tuple[str, str], gp: str = "Organization/oA") -> dict[str, Any]:
    return {"resourceType": "Patient", "id": pid, "meta": meta("oA", *security), "name": [{"family": pid}],
            "telecom": [{"system": "phone", "value": "01632 960001"}], "address": [{"postalCode": "LS1 4AP"}],
            "generalPractitioner": [{"reference": gp}]}


def obs(oid: str, pid: str, custodian: str, *security: tuple[str, str], when: str = "2024-03-01") -> dict[str, Any]:
    return {"resourceType": "Observation", "id": oid, "meta": meta(custodian, *security), "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
            "subject": {"reference": f"Patient/{pid}"}, "effectiveDateTime": when}


def careteam(cid: str, pid: str, member: str) -> dict[str, Any]:
    return {"resourceType": "CareTeam", "id": cid, "status": "active", "meta": meta("oB"),
            "subject": {"reference": f"Patient/{pid}"}, "participant": [{"member": {"reference": member}}]}


def consent(cid: str, pid: str, provision: dict[str, Any] | None = None, rule: str = "OPTOUT",
            **extra: Any) -> dict[str, Any]:
    body = {"resourceType": "Consent", "id": cid, "status": "active", "scope": PRIVACY, "meta": meta("oA"),
            "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
            "patient": {"reference": f"Patient/{pid}"}, "policyRule": {"coding": [{"system": ACT, "code": rule}]},
            **extra}
    if provision is not None:
        body["provision"] = provision
    return body


def world() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [{"resourceType": "Organization", "id": o, "name": o} for o in ("oA", "oB", "oC")]
    for who, org in (("drA", "oA"), ("drB", "oB"), ("drC", "oC")):
        out += [{"resourceType": "Practitioner", "id": who, "name": [{"family": who}]},
                {"resourceType": "PractitionerRole", "id": f"r{who[-1]}", "active": True,
                 "practitioner": {"reference": f"Practitioner/{who}"},
                 "organization": {"reference": f"Organization/{org}"}}]
    # p1: registered at oA (drA's practice), in drB's care team; nothing withheld
    out += [patient("p1"), careteam("ct1", "p1", "Practitioner/drB"), obs("o1a", "p1", "oA"), obs("o1b", "p1", "oB"),
            {**consent("c1", "p1"), "status": "inactive"}]
    # p2: opted out of sharing (OPTOUT, no provision: the root denies); drB knows them by an Encounter
    out += [patient("p2"), consent("c2", "p2"), obs("o2a", "p2", "oA"), obs("o2b", "p2", "oB"),
            {"resourceType": "Encounter", "id": "e2", "status": "in-progress", "meta": meta("oB"),
             "class": {"system": ACT, "code": "IMP"}, "subject": {"reference": "Patient/p2"},
             "participant": [{"individual": {"reference": "PractitionerRole/rB"}}]}]
    # p3: restricted (R), in drB's care; p4: REDACTED, in drB's care
    out += [patient("p3", (CONF, "R")), careteam("ct3", "p3", "Practitioner/drB"),
            patient("p4", (OBS_VALUE, "REDACTED")), careteam("ct4", "p4", "Practitioner/drB")]
    # p5: oA's mental-health Observation, seen by drB (care team) without a permit;
    # p6: the same with the patient's explicit permit for oB
    out += [patient("p5"), careteam("ct5", "p5", "Practitioner/drB"), obs("o5s", "p5", "oA", (ACT, "MH")),
            patient("p6"), careteam("ct6", "p6", "Practitioner/drB"), obs("o6s", "p6", "oA", (ACT, "MH")),
            consent("c6", "p6", {"type": "permit", "actor": [actor("Organization/oB")],
                                 "securityLabel": [{"system": ACT, "code": "MH"}]}, rule="OPTIN")]
    # p7: opted out, except for oA (a nested permit); drA is their GP practice, drB in their care team
    out += [patient("p7"), careteam("ct7", "p7", "Practitioner/drB"), obs("o7b", "p7", "oB"), obs("o7c", "p7", "oC"),
            consent("c7", "p7", {"type": "deny", "provision": [
                {"type": "permit", "actor": [actor("Organization/oA")]}]})]
    # p8: a Type 1 opt-out (secondary use only; its deny is for research purposes)
    out += [patient("p8"), careteam("ct8", "p8", "Practitioner/drB"), obs("o8", "p8", "oA"),
            consent("c8", "p8", {"type": "deny", "purpose": [
                {"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "HRESCH"}]},
                category=[TYPE_1])]
    # p9: opted out of sharing data from 2019-2020 only
    out += [patient("p9"), careteam("ct9", "p9", "Practitioner/drB"), obs("o9old", "p9", "oA", when="2020-05-01"),
            obs("o9new", "p9", "oA", when="2023-05-01"),
            consent("c9", "p9", {"type": "deny", "dataPeriod": {"start": "2019-01-01", "end": "2020-12-31"}})]
    return out


USERS: dict[str, dict[str, Any]] = {
    "drA": {"roles": ("clinician",), "fhir_user": "Practitioner/drA"},  # organisation: from the PractitionerRole
    "drB": {"roles": ("clinician",), "fhir_user": "Practitioner/drB", "organization": "Organization/oB"},
    "drC": {"roles": ("clinician",), "fhir_user": "Practitioner/drC", "organization": "Organization/oC"},
    "analyst": {"roles": ("analyst",), "organization": "Organization/oB"},
    "ig": {"roles": ("ig-officer",), "organization": "Organization/oA"},
    "pat1": {"roles": ("patient",), "patient": "p1"},
}


@dataclass
class Db:
    url: str
    service: FhirService
    pdp: PolicyDecisionPoint


@pytest.fixture(scope="module", params=BACKENDS)
def db(request: pytest.FixtureRequest, backends: Backends) -> Iterator[Db]:
    url = backends.fresh_url(str(request.param))
    engine = create_engine(url)
    service = FhirService(Store(engine))  # unrestricted: the world as the feeds write it
    for res in world():
        service.update(res["resourceType"], res["id"], res)
    registry = Registry(service.store)
    for name, attrs in USERS.items():
        registry.add_user(name, "not-used-" + name, **attrs)
    yield Db(url, service, PolicyDecisionPoint(service, frozenset(supported_resource_types())))
    engine.dispose()


def token_principal(db: Db, name: str, purpose: str | None = None) -> Principal:
    """The principal the resource server makes of a built-in token for the user (independently of
    consent/explain.py's own construction)."""
    u = USERS[name]
    claims = {"iss": ISSUER, "sub": name, "client_id": "app", "roles": list(u["roles"]),
              "scope": "patient/*.cruds" if u.get("patient") else "user/*.cruds", "fhirUser": u.get("fhir_user"),
              "organization": u.get("organization"), "patient": u.get("patient"), "purpose_of_use": purpose}
    return principal_from_claims({k: v for k, v in claims.items() if v is not None}, builtin=True,
                                 find_organization=organization_finder(db.service))


PERMISSION = {"read": "r", "search-type": "s", "update": "u"}


def actual(db: Db, name: str, interaction: str, ref: str, purpose: str | None = None) -> tuple[int, str, bool]:
    """(status, outcome, redacted or de-identified) of the real interaction, as the router runs it:
    scopes and role rules first, then the service restricted to the caller's policy."""
    rtype, rid = ref.split("/")
    policy = db.pdp.for_principal(token_principal(db, name, purpose), "")
    try:
        assert policy.access is not None
        policy.access.require(PERMISSION[interaction], rtype)
        policy.require(interaction, rtype)
    except FhirError as exc:
        return exc.status, "forbidden", False
    view = db.service.restricted(policy)
    if interaction == "read":
        try:
            shown = view.read(rtype, rid)
        except FhirError as exc:
            return exc.status, "forbidden" if exc.status == 403 else "not found", False
        return 200, "visible", "SUBSETTED" in (shown.content or "")
    if interaction == "search-type":
        _, matches, _, _ = view.search((rtype,), [], strict=True, base_url="", count=1000, cursor=None,
                                       want_total=False)
        deidentified = {r.rows for r in policy.rules} == {"deidentified"}
        wanted = db.pdp.pseudonymiser.id(rtype, rid) if deidentified else rid
        hit = next((m for m in matches if m.id == wanted), None)
        if hit is None:
            return 200, "left out", False
        return 200, "included", deidentified or "SUBSETTED" in (hit.content or "")
    current = db.service.read(rtype, rid)
    try:
        view.update(rtype, rid, jsonfmt.loads(current.content or "{}"))
    except FhirError as exc:
        return exc.status, "forbidden", False
    return 200, "allowed", False


def explained(db: Db, name: str, interaction: str | None, ref: str, purpose: str | None = None) -> dict[str, Any]:
    rtype, rid = ref.split("/")
    principal = principal_for_user(db.service, name, purpose=purpose, issuer=ISSUER)
    report = explain(db.service, principal, rtype, rid, interaction, user=name, pdp=db.pdp)
    assert report["inconsistencies"] == [], render_text(report)
    render_text(report)  # renders without error
    return report


# (user, interaction, resource, purpose, expected status, expected outcome, shaped: redacted/de-identified)
CASES = [
    ("drA", "read", "Patient/p1", None, 200, "visible", False),  # the registered GP practice
    ("drA", "read", "Observation/o1b", None, 200, "visible", False),  # another organisation's, nothing withheld
    ("drC", "read", "Observation/o1a", None, 403, "forbidden", False),  # no relationship
    ("drC", "read", "Observation/nothing-here", None, 403, "forbidden", False),  # the same for no such resource
    ("drB", "read", "Observation/o2a", None, 404, "not found", False),  # opt-out: oA's data withheld from oB
    ("drB", "read", "Observation/o2b", None, 200, "visible", False),  # opt-out: oB's own data stays
    ("drB", "read", "Patient/p3", None, 200, "visible", True),  # restricted: redacted outside oA
    ("drB", "read", "Patient/p4", None, 404, "not found", False),  # REDACTED: does not exist outside oA
    ("drB", "read", "Observation/o5s", None, 404, "not found", False),  # sensitive, no permit
    ("drB", "read", "Observation/o6s", None, 200, "visible", False),  # sensitive, explicit permit for oB
    ("drA", "read", "Observation/o7b", None, 200, "visible", False),  # opt-out with a nested permit for oA
    ("drB", "read", "Observation/o7c", None, 404, "not found", False),  # ... which does not cover oB
    ("drB", "read", "Observation/o8", None, 200, "visible", False),  # Type 1 opt-out: direct care unaffected
    ("drB", "read", "Observation/o9old", None, 404, "not found", False),  # inside the opted-out dataPeriod
    ("drB", "read", "Observation/o9new", None, 200, "visible", False),  # outside it
    ("analyst", None, "Observation/o1a", None, 200, "included", True),  # de-identified
    ("analyst", "search-type", "Observation/o8", None, 200, "left out", False),  # Type 1 opt-out
    ("analyst", "read", "Observation/o1a", None, 403, "forbidden", False),  # analysts only search
    ("ig", "read", "Observation/o1a", None, 403, "forbidden", False),  # IG officers: Consents and audit only
    ("ig", "read", "Consent/c2", None, 200, "visible", False),
    ("pat1", "read", "Observation/o1b", None, 200, "visible", False),  # their own record
    ("pat1", "read", "Observation/o2a", None, 404, "not found", False),  # someone else's
    ("drA", "update", "Observation/o1b", None, 403, "forbidden", False),  # only the custodian's users change it
    ("drA", "search-type", "Observation/o1a", None, 200, "included", False),
    ("drC", "search-type", "Observation/o1a", None, 200, "left out", False),
]


@pytest.mark.parametrize("name,interaction,ref,purpose,status,outcome,shaped", CASES,
                         ids=[f"{c[0]}-{c[1] or 'default'}-{c[2]}" for c in CASES])
def test_the_explained_answer_is_the_servers(db: Db, name: str, interaction: str | None, ref: str,
                                             purpose: str | None, status: int, outcome: str, shaped: bool) -> None:
    report = explained(db, name, interaction, ref, purpose)
    real = actual(db, name, report["request"]["interaction"], ref, purpose)
    assert shown(report["answer"]) == real
    assert real == (status, outcome, shaped)


def shown(answer: dict[str, Any]) -> tuple[int, str, bool]:
    shaped = answer["outcome"] in ("visible", "included") and (answer["redacted"] or answer["deidentified"])
    return answer["status"], answer["outcome"], shaped


def test_every_decision_in_the_world_is_explained_as_made(db: Db) -> None:
    """Every user x every resource x read and search (and drC in an emergency without a grant):
    the explanation's answer is the server's, and the explanation is consistent with itself."""
    refs = [f"{r['resourceType']}/{r['id']}" for r in world()] + ["Observation/no-such"]
    callers = [(name, None) for name in USERS] + [("drB", "ETREAT")]
    wrong = []
    for name, purpose in callers:
        principal = principal_for_user(db.service, name, purpose=purpose, issuer=ISSUER)
        for interaction in ("read", "search-type"):
            for ref in refs:
                rtype, rid = ref.split("/")
                report = explain(db.service, principal, rtype, rid, interaction, user=name, pdp=db.pdp)
                real = actual(db, name, interaction, ref, purpose)
                if report["inconsistencies"] or shown(report["answer"]) != real:
                    wrong.append((name, purpose, interaction, ref, shown(report["answer"]), real,
                                  report["inconsistencies"]))
    assert wrong == []


def care(report: dict[str, Any]) -> dict[str, Any]:
    (reach,) = [r for r in report["reach"] if "care" in r]
    return reach["care"]


def test_a_related_gp_sees_the_patient_and_the_relationship_is_named(db: Db) -> None:
    report = explained(db, "drA", "read", "Observation/o1a")
    c = care(report)
    (p1,) = c["patients"]
    assert p1["related"] and not c["foreign"]
    assert {"kind": "gp", "actor": "Organization/oA", "source": "Patient/p1", "until": None, "current": True} \
        in p1["relationships"]
    assert report["caller"]["organization"] == "Organization/oA"  # found from drA's PractitionerRole
    assert "PractitionerRole/rA" in report["caller"]["actsAs"]
    # An inactive opt-out is listed, as stating nothing.
    assert p1["consents"] == [{"consent": "Consent/c1", "status": "inactive", "provisions": [],
                               "secondaryOptOut": None, "privacy": False, "silent": True}]
    assert "Consent/c1 (Patient/p1): status inactive; states no rule (no effect)" in render_text(report)


def test_an_unrelated_practitioner_is_told_there_is_no_relationship(db: Db) -> None:
    report = explained(db, "drC", "read", "Observation/o1a")
    c = care(report)
    assert c["patients"][0]["relationships"] == [] and not c["verdicts"]["related"]
    assert report["answer"]["status"] == 403
    assert "no legitimate relationship with Patient/p1" in report["answer"]["reason"]
    text = render_text(report)
    assert "Answer: 403 forbidden" in text and "your relationships: none" in text


def test_an_opt_out_shows_the_deny_provision_applying(db: Db) -> None:
    report = explained(db, "drB", "read", "Observation/o2a")
    c = care(report)
    (p2,) = c["patients"]
    assert c["foreign"] and p2["related"] and p2["denied"]
    assert [r["source"] for r in p2["relationships"]] == ["Encounter/e2"]
    (c2,) = [x for x in p2["consents"] if x["consent"] == "Consent/c2"]
    assert c2["denies"] and [(p["path"], p["effect"], p["applies"]) for p in c2["provisions"]] == [("0", "deny", True)]
    assert "Consent/c2 of Patient/p2 withholds Organization/oA" in report["answer"]["reason"]
    # The same Consent, for the organisation's own data: applies, but binds only other organisations.
    own = care(explained(db, "drB", "read", "Observation/o2b"))
    assert own["patients"][0]["consentDenies"] and not own["patients"][0]["denied"] and not own["foreign"]


def test_a_nested_permit_exception_is_the_deepest_applying_provision(db: Db) -> None:
    c7 = care(explained(db, "drA", "read", "Observation/o7b"))["patients"][0]["consents"][0]
    assert {p["path"]: p["applies"] for p in c7["provisions"]} == {"0": True, "0.0": True}
    assert not c7["denies"] and c7["permitsExplicitly"]
    assert c7["deepest"] == {"depth": 1, "effect": "permit", "paths": ["0.0"]}
    c7b = care(explained(db, "drB", "read", "Observation/o7c"))["patients"][0]["consents"][0]
    assert {p["path"]: p["applies"] for p in c7b["provisions"]} == {"0": True, "0.0": False}
    assert c7b["denies"]
    assert c7b["provisions"][1]["groups"] == [{"kind": "actor", "values": ["Organization/oA"]}]


def test_sensitive_data_needs_an_explicit_permit(db: Db) -> None:
    p5 = care(explained(db, "drB", "read", "Observation/o5s"))["patients"][0]
    assert p5["sensitive"] and p5["sensitiveWithheld"] and not p5["explicitlyPermitted"]
    p6 = care(explained(db, "drB", "read", "Observation/o6s"))["patients"][0]
    assert p6["sensitive"] and p6["explicitlyPermitted"] and not p6["sensitiveWithheld"]
    (c6,) = p6["consents"]
    assert c6["provisions"][0]["applies"] and c6["permitsExplicitly"]


def test_an_analyst_is_told_of_the_type_1_opt_out(db: Db) -> None:
    report = explained(db, "analyst", None, "Observation/o8")
    assert report["request"]["interaction"] == "search-type"
    (reach,) = report["reach"]
    (p8,) = reach["deidentified"]["patients"]
    assert p8["excluded"] and p8["optOuts"][0]["consent"] == "Consent/c8" and p8["optOuts"][0]["inForce"]
    assert report["answer"]["outcome"] == "left out"
    assert report["answer"]["reason"] == "Patient/p8 has a secondary-use opt-out in force (Consent/c8)"
    # The same Consent's deny is for research: it does not apply to direct care (purpose TREAT).
    c8 = care(explained(db, "drB", "read", "Observation/o8"))["patients"][0]["consents"][0]
    assert c8["secondaryOptOut"]["inForce"] and [p["applies"] for p in c8["provisions"]] == [False]


def test_break_glass_counts_only_with_purpose_etreat(db: Db) -> None:
    BreakGlassLog(db.service.store).open(f"{ISSUER}|drC", "Practitioner/drC", "Organization/oC", "p1", "collapsed")
    report = explained(db, "drC", "read", "Observation/o1a", "ETREAT")
    assert report["answer"]["status"] == 200 == actual(db, "drC", "read", "Observation/o1a", "ETREAT")[0]
    assert care(report)["patients"][0]["breakGlass"]
    assert "break-glass grants open: Patient/p1" in render_text(report)
    plain = explained(db, "drC", "read", "Observation/o1a")
    assert plain["answer"]["status"] == 403 and plain["caller"]["idleBreakGlass"]
    # Without --issuer, the issuer is that of the user's open grant.
    found = explain(db.service, principal_for_user(db.service, "drC", purpose="ETREAT"), "Observation", "o1a",
                    user="drC", pdp=db.pdp)
    assert found["answer"]["status"] == 200


def test_the_command_explains_in_text_and_json(db: Db) -> None:
    base = [sys.executable, "-m", "fhir_server.cli", "policy", "explain", "--database", db.url]
    run = subprocess.run([*base, "--user", "drB", "--resource", "Observation/o2a"], cwd=REPO, check=False,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    for line in ("Can drB read Observation/o2a?", "clinician: read of Observation: allowed", "Patient/p2",
                 "encounter: Encounter/e2", "another organisation's data", "Consent/c2 (Patient/p2):", "APPLIES",
                 "DENIES this row", "Answer: 404 not found", "404, not 403"):
        assert line in out, out
    assert max(len(line) for line in out.splitlines()) <= 100, out
    run = subprocess.run([*base, "--fhir-user", "Practitioner/drC", "--role", "clinician", "--resource",
                          "Observation/o1a", "--json"], cwd=REPO, check=False, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["answer"]["status"] == 403 and report["caller"]["organization"] == "Organization/oC"
    run = subprocess.run([*base, "--user", "nobody", "--resource", "Observation/o1a"], cwd=REPO, check=False,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "no user named 'nobody'" in run.stderr

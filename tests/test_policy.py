"""The access policy end to end: roles x relationships x consents x paths, through a real server
(uvicorn) with signed tokens, on SQLite and PostgreSQL. Every denied resource is checked to be
absent by id, from every Bundle, count and error text."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from conftest import BACKENDS, TEST_ISSUER, Backends
from consent.policy import _list_string

CUSTODIAN = "https://carebroker.example/CodeSystem/custodian"
CONF = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
ACT = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
OBS_VALUE = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue"
SCOPE = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]}
ACTOR_OA = {"role": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "IRCP"}]},
            "reference": {"reference": "Organization/oA"}}
SECRET = "SECRET-MARKER"  # in every hidden resource: must never show up in a response to whom it is hidden


def org(oid: str) -> dict[str, Any]:
    return {"resourceType": "Organization", "id": oid, "name": oid}


def practitioner(pid: str, role: str, oid: str) -> list[dict[str, Any]]:
    return [{"resourceType": "Practitioner", "id": pid, "name": [{"family": pid}]},
            {"resourceType": "PractitionerRole", "id": role, "active": True,
             "practitioner": {"reference": f"Practitioner/{pid}"}, "organization": {"reference": f"Organization/{oid}"}}]


def meta(custodian: str, *security: tuple[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {"tag": [{"system": CUSTODIAN, "code": f"Organization/{custodian}"}]}
    if security:
        out["security"] = [{"system": s, "code": c} for s, c in security]
    return out


def patient(pid: str, custodian: str = "oA", *security: tuple[str, str]) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": pid, "meta": meta(custodian, *security),
            "name": [{"family": f"Family-{pid}"}], "gender": "female", "birthDate": "1950-02-03",
            "telecom": [{"system": "phone", "value": "01632 960001"}],
            "address": [{"line": ["1 High St"], "postalCode": f"W{len(pid)} 1AA"}],
            "generalPractitioner": [{"reference": "Organization/oA"}]}


def obs(oid: str, pid: str, custodian: str, code: str = "8867-4", when: str = "2024-03-01",
        hidden: bool = False, *security: tuple[str, str]) -> dict[str, Any]:
    text = f"{oid} {SECRET}" if hidden else oid
    return {"resourceType": "Observation", "id": oid, "meta": meta(custodian, *security), "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": code}], "text": text},
            "subject": {"reference": f"Patient/{pid}"}, "effectiveDateTime": when}


def careteam(cid: str, pid: str, member: str, custodian: str = "oB", status: str = "active") -> dict[str, Any]:
    return {"resourceType": "CareTeam", "id": cid, "status": status, "meta": meta(custodian),
            "subject": {"reference": f"Patient/{pid}"}, "participant": [{"member": {"reference": member}}]}


def consent(cid: str, pid: str, provision: dict[str, Any] | None = None, rule: str = "OPTOUT",
            status: str = "active", **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"resourceType": "Consent", "id": cid, "status": status, "scope": SCOPE, "meta": meta("oA"),
                            "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
                            "patient": {"reference": f"Patient/{pid}"},
                            "policyRule": {"coding": [{"system": ACT, "code": rule}]}, **extra}
    if provision is not None:
        body["provision"] = provision
    return body


def world() -> list[dict[str, Any]]:
    """Three organisations (oA a GP practice, oB a hospital, oC elsewhere), a practitioner at each,
    and patients each set up for one rule."""
    out = [org("oA"), org("oB"), org("oC"), *practitioner("drA", "rA", "oA"), *practitioner("drB", "rB", "oB"),
           *practitioner("drC", "rC", "oC")]
    # p1: registered at oA, in drB's care team; nothing withheld
    out += [patient("p1"), careteam("ct1", "p1", "Practitioner/drB"), obs("o1a", "p1", "oA"), obs("o1b", "p1", "oB"),
            {"resourceType": "Appointment", "id": "ap1", "status": "booked", "meta": meta("oA"),
             "participant": [{"actor": {"reference": "Patient/p1"}, "status": "accepted"}]}]
    # p2: opted out of sharing; drB knows them through an active Encounter (by PractitionerRole)
    out += [patient("p2"), consent("c2", "p2"), obs("o2a", "p2", "oA", code="2339-0"),
            obs("o2b", "p2", "oB", "1111-1", "2024-03-01", True),
            {"resourceType": "Encounter", "id": "e2", "status": "in-progress", "meta": meta("oB"),
             "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"},
             "subject": {"reference": "Patient/p2"}, "participant": [{"individual": {"reference": "PractitionerRole/rB"}}],
             "text": {"status": "generated", "div": f"<div xmlns=\"http://www.w3.org/1999/xhtml\">{SECRET}</div>"}}]
    # p3: restricted (R); p4: REDACTED; both oA's, in drB's care
    out += [patient("p3", "oA", (CONF, "R")), careteam("ct3", "p3", "Practitioner/drB"),
            patient("p4", "oA", (OBS_VALUE, "REDACTED")), careteam("ct4", "p4", "Practitioner/drB")]
    # p5: a sensitive (mental health) Observation of oB; p6: the same, with an explicit permit for oA
    out += [patient("p5"), careteam("ct5", "p5", "Practitioner/drB"),
            obs("o5s", "p5", "oB", "3333-3", "2024-03-01", True, (ACT, "MH")), obs("o5n", "p5", "oB"),
            patient("p6"), careteam("ct6", "p6", "Practitioner/drB"), obs("o6s", "p6", "oB", "8867-4", "2024-03-01", False, (ACT, "MH")),
            consent("c6", "p6", {"type": "permit", "actor": [ACTOR_OA],
                                 "securityLabel": [{"system": ACT, "code": "MH"}]}, rule="OPTIN")]
    # p7: opted out, except for oA (a nested permit); o7x is oC's
    out += [patient("p7"), careteam("ct7", "p7", "Practitioner/drB"), obs("o7b", "p7", "oB"),
            obs("o7x", "p7", "oC", "8867-4", "2024-03-01", False),
            consent("c7", "p7", {"type": "deny", "provision": [
                {"type": "permit", "actor": [ACTOR_OA]}]})]
    # p8: National Data Opt-out / Type 1 (secondary use only); direct care unaffected
    out += [patient("p8"), obs("o8", "p8", "oB", "7777-7"),
            consent("c8", "p8", {"type": "deny", "purpose": [
                {"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "HRESCH"}]},
                category=[{"coding": [{"system": "http://snomed.info/sct", "code": "827241000000103"}]}])]
    # p9: an inactive and an expired opt-out: no effect
    out += [patient("p9"), obs("o9b", "p9", "oB"), consent("c9a", "p9", status="inactive"),
            consent("c9b", "p9", {"type": "deny", "period": {"start": "2015-01-01", "end": "2020-01-01"}})]
    # p10: opted out of sharing Observations only
    out += [patient("p10"), obs("o10b", "p10", "oB", "8867-4", "2024-03-01", True),
            {"resourceType": "Condition", "id": "cond10b", "meta": meta("oB"), "subject": {"reference": "Patient/p10"},
             "code": {"text": "asthma"}},
            consent("c10", "p10", {"type": "deny", "class": [{"system": "http://hl7.org/fhir/resource-types",
                                                                "code": "Observation"}]})]
    # p11: opted out of sharing data from 2019-2020
    out += [patient("p11"), obs("o11old", "p11", "oB", "8867-4", "2020-05-01", True), obs("o11new", "p11", "oB", "8867-4", "2023-05-01"),
            consent("c11", "p11", {"type": "deny", "dataPeriod": {"start": "2019-01-01", "end": "2020-12-31"}})]
    out += [{"resourceType": "AuditEvent", "id": "ae1", "type": {"code": "rest"}, "recorded": "2024-01-01T00:00:00Z",
             "agent": [{"requestor": True}], "source": {"observer": {"reference": "Organization/oA"}}}]
    return out


def put_all(client: httpx.Client, resources: list[dict[str, Any]]) -> None:
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}} for r in resources]}
    response = client.post("", json=bundle)
    assert response.status_code == 200, response.text


class World:
    def __init__(self, base: str, url: str) -> None:
        self.base, self.db = base, url
        self.clients: dict[str, httpx.Client] = {}

    def as_(self, name: str, **claims: Any) -> httpx.Client:
        key = name + json.dumps(claims, sort_keys=True)
        if key not in self.clients:
            token = TEST_ISSUER.token(**{**USERS[name], **claims})
            self.clients[key] = httpx.Client(base_url=self.base + "/", timeout=30,
                                             headers={"Authorization": f"Bearer {token}"})
        return self.clients[key]


USERS: dict[str, dict[str, Any]] = {
    "admin": {"scope": "system/*.*", "roles": ["admin"]},
    "drA": {"scope": "user/*.cruds", "roles": ["clinician"], "fhirUser": "Practitioner/drA", "organization": "Organization/oA",
            "sub": "drA"},
    "drB": {"scope": "user/*.cruds", "roles": ["clinician"], "fhirUser": "Practitioner/drB", "organization": "Organization/oB",
            "sub": "drB"},
    "drC": {"scope": "user/*.cruds", "roles": ["clinician"], "fhirUser": "Practitioner/drC", "organization": "Organization/oC",
            "sub": "drC"},
    "support": {"scope": "user/*.cruds", "roles": ["support"], "organization": "Organization/oA", "sub": "support"},
    "ig": {"scope": "user/*.rs", "roles": ["ig-officer"], "organization": "Organization/oA", "sub": "ig"},
    "analyst": {"scope": "user/*.rs", "roles": ["analyst"], "organization": "Organization/oB", "sub": "analyst"},
    "p1": {"scope": "patient/*.rs", "roles": ["patient"], "fhirUser": "Patient/p1", "patient": "p1", "sub": "p1"},
}


@pytest.fixture(scope="module", params=BACKENDS)
def w(request: pytest.FixtureRequest, backends: Backends) -> Iterator[World]:
    url = backends.fresh_url(str(request.param))
    world_ = World(backends.start_server(url), url)
    put_all(world_.as_("admin"), world())
    yield world_
    for client in world_.clients.values():
        client.close()


def ids(bundle: dict[str, Any], rtype: str | None = None) -> set[str]:
    return {e["resource"]["id"] for e in bundle.get("entry", [])
            if "resource" in e and (rtype is None or e["resource"]["resourceType"] == rtype)
            and e["resource"]["resourceType"] != "OperationOutcome"}


def search(client: httpx.Client, path: str, **params: str) -> dict[str, Any]:
    response = client.get(path, params=params)
    assert response.status_code == 200, response.text
    return response.json()


def status(client: httpx.Client, path: str) -> int:
    return client.get(path).status_code


def test_legitimate_relationship_decides_reads_and_searches(w: World) -> None:
    drA, drB, drC = w.as_("drA"), w.as_("drB"), w.as_("drC")
    assert status(drA, "Patient/p1") == 200  # registered GP practice
    assert status(drB, "Patient/p1") == 200  # care team
    assert status(drB, "Observation/o1a") == 200
    # no relationship: 403, the same as for an id that does not exist
    for path in ("Patient/p1", "Observation/o1a", "Patient/p1/_history/1", "Patient/does-not-exist"):
        response = drC.get(path)
        assert response.status_code == 403, (path, response.text)
        assert "no such resource, or you have no legitimate relationship" in response.text
    bundle = search(drC, "Patient", _id="p1,p2,p3")
    assert bundle["total"] == 0 and ids(bundle) == set()
    assert search(drC, "Observation", _summary="count")["total"] == 0
    assert drC.get("Patient/p1/$everything").status_code == 403
    # drB sees the patients it cares for, except the demographics oA holds of those who opted out (p2, p7)
    assert ids(search(drB, "Patient", _count="100")) == {"p1", "p3", "p5", "p6"}


def test_pages_and_totals_under_the_policy(w: World) -> None:
    """Page and total come from one statement under a policy: every page gives the full total, and
    the pages together are exactly the visible matches, forwards and backwards."""
    drB = w.as_("drB")
    visible = {"p1", "p3", "p5", "p6"}
    pages, bundle = [], search(drB, "Patient", _count="3")
    while True:
        assert bundle["total"] == len(visible)
        pages.append([e["resource"]["id"] for e in bundle.get("entry", [])])
        nxt = next((link["url"] for link in bundle["link"] if link["relation"] == "next"), None)
        if nxt is None:
            break
        bundle = drB.get(nxt).json()
    assert [len(p) for p in pages] == [3, 1] and set(pages[0] + pages[1]) == visible
    previous = next(link["url"] for link in bundle["link"] if link["relation"] == "previous")
    back = drB.get(previous).json()
    assert back["total"] == len(visible) and [e["resource"]["id"] for e in back["entry"]] == pages[0]
    assert search(drB, "Patient", _count="3", _total="none").get("total") is None


def test_opt_out_keeps_each_organisation_to_its_own_data_in_every_path(w: World) -> None:
    drA, drB, admin = w.as_("drA"), w.as_("drB"), w.as_("admin")
    assert status(drA, "Observation/o2a") == 200 and status(drA, "Observation/o2b") == 404
    assert status(drB, "Observation/o2b") == 200 and status(drB, "Observation/o2a") == 404
    checks: list[tuple[str, dict[str, str]]] = [
        ("Observation", {"patient": "p2"}),
        ("Observation", {"subject": "Patient/p2", "_summary": "count"}),
        ("Patient", {"_id": "p2", "_revinclude": "Observation:patient"}),
        ("Patient", {"_id": "p2", "_revinclude": "Encounter:patient"}),
        ("Patient", {"_has:Observation:patient:code": "1111-1"}),  # o2b's code: no oracle
        ("Patient", {"_has:Encounter:patient:status": "in-progress"}),
        ("Observation", {"patient._has:Encounter:patient:status": "in-progress"}),
        ("Observation", {"code": "1111-1"}),
        ("Patient/p2/Observation", {}),
        ("Patient/p2/$everything", {}),
        ("Observation/_history", {"_count": "1000"}),
        ("_history", {"_count": "1000"}),
        ("", {"_type": "Observation,Encounter", "_count": "1000"}),
    ]
    for path, params in checks:
        response = drA.get(path, params=params)
        assert response.status_code == 200, (path, response.text)
        assert SECRET not in response.text, (path, params)
        found = {e["resource"]["id"] for e in response.json().get("entry", []) if "resource" in e}
        assert not found & {"o2b", "e2"}, (path, params, found)
    assert search(drA, "Observation", patient="p2")["total"] == 1
    assert search(drA, "Observation", patient="p2", _summary="count")["total"] == 1
    assert search(admin, "Observation", patient="p2")["total"] == 2
    assert ids(search(admin, "Patient", **{"_has:Observation:patient:code": "1111-1"})) == {"p2"}
    assert ids(search(drA, "Patient", _id="p2", _revinclude="Observation:patient")) == {"p2", "o2a"}
    assert drA.get("Observation/o2b/_history").status_code == 404
    assert drA.get("Observation/o2b/_history/1").status_code == 404
    # Bundle entries are asked one by one, with the same answers
    batch = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "Observation/o2b"}},
        {"request": {"method": "GET", "url": "Observation?patient=p2"}}]}
    response = drA.post("", json=batch)
    assert response.status_code == 200 and SECRET not in response.text
    first, second = response.json()["entry"]
    assert first["response"]["status"].startswith("404")
    assert ids(second["resource"]) == {"o2a"}


def test_restricted_and_redacted_patients(w: World) -> None:
    drA, drB = w.as_("drA"), w.as_("drB")
    full = drA.get("Patient/p3").json()
    assert full["address"] and full["telecom"] and full["generalPractitioner"]
    shown = drB.get("Patient/p3").json()
    assert not {"address", "telecom", "generalPractitioner"} & shown.keys()
    assert any(t.get("code") == "SUBSETTED" for t in shown["meta"]["tag"])
    in_search = [e["resource"] for e in search(drB, "Patient", _id="p3")["entry"]]
    assert "address" not in in_search[0]
    # withheld elements cannot be searched (or chained) by outside users
    postcode = full["address"][0]["postalCode"]
    assert ids(search(drA, "Patient", **{"address-postalcode": postcode})) >= {"p3"}
    assert "p3" not in ids(search(drB, "Patient", **{"address-postalcode": postcode}))
    assert "p3" not in ids(search(drB, "Patient", phone="01632 960001"))
    assert drB.get("Patient", params={"_sort": "address"}).status_code == 403
    # REDACTED: not there for users outside the custodian
    assert drB.get("Patient/p4").status_code == 404
    assert search(drB, "Patient", _id="p4")["total"] == 0
    assert ids(search(drB, "CareTeam", _id="ct4", _include="CareTeam:patient")) == {"ct4"}
    assert drA.get("Patient/p4").status_code == 200


def test_sensitive_labels_need_the_custodian_or_an_explicit_permit(w: World) -> None:
    drA, drB = w.as_("drA"), w.as_("drB")
    assert status(drA, "Observation/o5s") == 404 and status(drA, "Observation/o5n") == 200
    assert status(drB, "Observation/o5s") == 200  # its custodian
    assert ids(search(drA, "Observation", patient="p5")) == {"o5n"}
    assert status(drA, "Observation/o6s") == 200  # the patient permitted oA to see it


def test_consent_provisions(w: World) -> None:
    drA, drB = w.as_("drA"), w.as_("drB")
    # nested permit for oA within an opt-out
    assert status(drA, "Observation/o7b") == 200 and status(drA, "Observation/o7x") == 200
    assert status(drB, "Observation/o7b") == 200 and status(drB, "Observation/o7x") == 404
    # a National Data Opt-out does not touch direct care
    assert status(drA, "Observation/o8") == 200
    # inactive and expired Consents have no effect
    assert status(drA, "Observation/o9b") == 200
    # class: only Observations withheld
    assert status(drA, "Observation/o10b") == 404 and status(drA, "Condition/cond10b") == 200
    # dataPeriod: only data from the period withheld
    assert status(drA, "Observation/o11old") == 404 and status(drA, "Observation/o11new") == 200


def test_a_new_consent_counts_from_the_next_request(w: World) -> None:
    drB, admin = w.as_("drB"), w.as_("admin")
    put_all(admin, [patient("p12"), careteam("ct12", "p12", "Practitioner/drB"), obs("o12a", "p12", "oA")])
    assert status(drB, "Observation/o12a") == 200
    put_all(admin, [consent("c12", "p12")])
    assert status(drB, "Observation/o12a") == 404
    assert search(drB, "Observation", patient="p12")["total"] == 0
    assert admin.delete("Consent/c12").status_code in (200, 204)
    assert status(drB, "Observation/o12a") == 200


def test_roles(w: World) -> None:
    support, ig, me, admin = w.as_("support"), w.as_("ig"), w.as_("p1"), w.as_("admin")
    # support: demographics and appointments of their practice's patients, no clinical data
    assert status(support, "Patient/p1") == 200
    assert support.get("Observation", params={"patient": "p1"}).status_code == 403
    assert status(support, "Observation/o1a") == 403
    assert ids(search(support, "Appointment")) == {"ap1"}
    # IG officer: audit and consents, nothing clinical
    assert "c2" in ids(search(ig, "Consent", _count="100"))
    assert ids(search(ig, "AuditEvent")) == {"ae1"}
    assert status(ig, "Patient/p1") == 403 and ig.get("Observation").status_code == 403
    # patient: their own compartment
    assert ids(search(me, "Observation")) == {"o1a", "o1b"}
    assert status(me, "Patient/p2") == 404 and status(me, "Patient/p1") == 200
    # admin: everything
    assert search(admin, "Observation", _summary="count")["total"] >= 14


def test_analyst_gets_deidentified_data_without_opted_out_patients(w: World) -> None:
    analyst, admin = w.as_("analyst"), w.as_("admin")
    assert search(admin, "Observation", code="7777-7")["total"] == 1  # p8's
    assert search(analyst, "Observation", code="7777-7")["total"] == 0  # p8 has a Type 1 opt-out
    bundle = search(analyst, "Patient", gender="female", _count="100")
    patients = [e["resource"] for e in bundle["entry"]]
    assert patients and not ids(bundle) & {"p1", "p2", "p3", "p8"}  # pseudonyms, not ids
    for p in patients:
        assert not {"name", "telecom"} & p.keys() and p["birthDate"] == "1950"
        assert all("line" not in a for a in p.get("address", []))
    assert bundle["total"] == search(admin, "Patient", gender="female", _summary="count")["total"] - 2  # p4 and p8
    for path, params in (("Observation/o1a", {}), ("Patient", {"identifier": "x"}), ("Patient", {"name": "Family"}),
                         ("Observation", {"patient": "p1"}), ("Patient/p1/$everything", {})):
        assert analyst.get(path, params=params).status_code == 403, path


def test_writes_are_stamped_and_kept_to_the_custodian(w: World) -> None:
    drA, drB, drC = w.as_("drA"), w.as_("drB"), w.as_("drC")
    new = {"resourceType": "Observation", "status": "final", "code": {"text": "pulse"}, "subject": {"reference": "Patient/p1"}}
    created = drA.post("Observation", json=new)
    assert created.status_code == 201, created.text
    tags = created.json()["meta"]["tag"]
    assert {"system": CUSTODIAN, "code": "Organization/oA"} in tags
    assert drC.post("Observation", json=new).status_code == 403  # no relationship with p1
    claimed = {**new, "meta": {"tag": [{"system": CUSTODIAN, "code": "Organization/oB"}]}}
    assert drA.post("Observation", json=claimed).status_code == 403  # not their organisation's to record
    o1b = drB.get("Observation/o1b").json()
    assert drA.put("Observation/o1b", json={**o1b, "status": "amended"}).status_code == 403  # oB's data
    assert drB.put("Observation/o1b", json={**o1b, "status": "amended"}).status_code == 200


def export(client: httpx.Client, rtype: str) -> list[dict[str, Any]]:
    kick = client.get("$export", params={"_type": rtype}, headers={"Prefer": "respond-async"})
    assert kick.status_code == 202, kick.text
    status_url = kick.headers["Content-Location"]
    deadline = time.monotonic() + 60
    while (poll := client.get(status_url)).status_code == 202:
        assert time.monotonic() < deadline
        time.sleep(0.3)
    assert poll.status_code == 200, poll.text
    out = []
    for item in poll.json()["output"]:
        text = client.get(item["url"]).text
        assert SECRET not in text
        out += [json.loads(line) for line in text.splitlines() if line]
    return out


def test_export_honours_the_policy(w: World) -> None:
    drA = w.as_("drA")
    exported = {r["id"] for r in export(drA, "Observation")}
    expected = ids(search(drA, "Observation", _count="1000"))
    assert exported == expected and not exported & {"o2b", "o5s", "o10b", "o11old"}
    analyst = w.as_("analyst")
    patients = export(analyst, "Patient")
    assert len(patients) == search(analyst, "Patient", _summary="count")["total"]
    assert {p["id"] for p in patients} == ids(search(analyst, "Patient", _count="1000"))
    assert not {p["id"] for p in patients} & {r["id"] for r in world() if r["resourceType"] == "Patient"}
    assert all("name" not in p and p["birthDate"] == "1950" for p in patients)


def test_capability_statement_says_what_totals_mean(w: World) -> None:
    security = httpx.get(f"{w.base}/metadata").json()["rest"][0]["security"]
    assert "counts exactly what the caller may see" in security["description"]


def test_break_glass(w: World) -> None:
    emergency = w.as_("drC", purpose_of_use="ETREAT")
    assert status(emergency, "Patient/p1") == 403  # ETREAT alone opens nothing
    no_reason = w.as_("drC").get("Patient/p1", headers={"X-Break-Glass-Reason": "collapsed in A&E"})
    assert no_reason.status_code == 403 and "ETREAT" in no_reason.text
    assert emergency.get("Observation", params={"code": "8867-4"},
                         headers={"X-Break-Glass-Reason": "x"}).status_code == 400  # which patient?
    opened = emergency.get("Patient/p1", headers={"X-Break-Glass-Reason": "unconscious in A&E, no records"})
    assert opened.status_code == 200, opened.text
    assert ids(search(emergency, "Observation", patient="p1")) >= {"o1a", "o1b"}
    assert status(w.as_("drC"), "Patient/p1") == 403  # only under the emergency purpose
    assert status(emergency, "Patient/p2") == 403  # only that patient
    listing = subprocess.run([sys.executable, "-m", "fhir_server.cli", "policy", "break-glass", "--database", w.db,
                              "--patient", "p1", "--json"], capture_output=True, text=True, timeout=60)
    assert listing.returncode == 0, listing.stderr
    grants = json.loads(listing.stdout)
    assert len(grants) == 1 and grants[0]["reason"] == "unconscious in A&E, no records"
    assert "drC" in grants[0]["requester"]
    read = [a for a in grants[0]["accesses"] if "Observation" in a["url"]]
    assert read and {"Observation/o1a", "Observation/o1b"} <= set(read[0]["resources"])


def test_nesting_beyond_sqlite_limits_is_a_clear_400(w: World) -> None:
    response = w.as_("admin").get("Observation", params={
        "encounter.subject:Patient._has:CareTeam:patient:participant.name": "drB"})
    if w.db.startswith("sqlite"):
        assert response.status_code == 400 and "too deeply" in response.text
    else:
        assert response.status_code == 200


def test_administrators_are_audited(w: World) -> None:
    admin = w.as_("admin", sub="admin-alice")
    assert status(admin, "Observation/o2b") == 200
    assert ids(search(admin, "Observation", patient="p2")) == {"o2a", "o2b"}
    from consent.access_log import AccessLog
    from fhir_server.storage.engine import create_engine
    from fhir_server.storage.repository import Store
    engine = create_engine(w.db)
    log = AccessLog(Store(engine))
    deadline = time.monotonic() + 10
    while len(records := log.list(requester="admin-alice")) < 2:  # written in batches, within a second
        assert time.monotonic() < deadline
        time.sleep(0.2)
    engine.dispose()
    assert [r["url"] for r in records] == ["Observation?patient=p2", "Observation/o2b"]
    assert set(records[0]["resources"]) == {"Observation/o2a", "Observation/o2b"}
    assert records[1]["status"] == 200 and records[1]["roles"] == "admin"


def test_list_values_are_bound_as_one_string_each_database_reads_back(engine: Any) -> None:
    """The caller's lists (references, care teams, break-glass patients) are bound as one string in
    each database's own form; whatever they hold must come back as the same values."""
    odd = ["Practitioner/a", 'quo"te', "back\\slash", "comma,brace}{", " spaced ", "NULL", "", "Zoë/ünï"]
    sql = ("SELECT unnest(CAST(:v AS TEXT[]))" if engine.dialect.name == "postgresql"
           else "SELECT value FROM json_each(:v)")
    for values in (odd, [], ["CareTeam/one"]):
        with engine.connect() as conn:
            got = conn.execute(sa.text(sql), {"v": _list_string(values, engine.dialect.name)}).scalars().all()
        assert got == values

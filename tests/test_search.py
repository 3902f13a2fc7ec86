"""FHIR search end to end, through the ASGI app and a real uvicorn, on SQLite and PostgreSQL.

A small world of patients, practitioners, observations, care teams and care plans is PUT once per
database (PUT is idempotent); every expected result set is written out by hand.
"""
from __future__ import annotations

import uuid
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest

TAG = {"system": "urn:carebroker:test", "code": "search-world"}
WORLD = "_tag=urn:carebroker:test|search-world"
NHS = "https://fhir.nhs.uk/Id/nhs-number"
UCUM = "http://unitsofmeasure.org"
LOINC = "http://loinc.org"


def _r(rtype: str, rid: str, **body: Any) -> dict[str, Any]:
    return {"resourceType": rtype, "id": rid, "meta": {"tag": [TAG]}, **body}


def _ref(target: str) -> dict[str, str]:
    return {"reference": target}


WORLD_RESOURCES = [
    _r("Organization", "org-a", name="Larkspur Road Surgery",
       identifier=[{"system": "https://fhir.nhs.uk/Id/ods-organization-code", "value": "E85990"}]),
    _r("Organization", "org-b", name="Canal Side Practice",
       identifier=[{"system": "https://fhir.nhs.uk/Id/ods-organization-code", "value": "E85991"}]),
    _r("Practitioner", "pr-1", name=[{"family": "Jones", "given": ["Megan"]}],
       identifier=[{"system": "https://fhir.hl7.org.uk/Id/gmc-number", "value": "1111111"}]),
    _r("Practitioner", "pr-2", name=[{"family": "Smith", "given": ["Ravi"]}]),
    _r("Patient", "pat-1", name=[{"family": "Ó Brien", "given": ["Zoë"]}], gender="female",
       birthDate="1950-03-15", active=True, generalPractitioner=[_ref("Organization/org-a")],
       identifier=[{"system": NHS, "value": "9000000009"}, {"system": "urn:other", "value": "X1"}],
       address=[{"line": ["14 Larkspur Road"], "city": "London", "postalCode": "W13 8QT"}],
       telecom=[{"system": "phone", "value": "020 7946 0001"}, {"system": "email", "value": "zoe@example.com"}]),
    _r("Patient", "pat-2", name=[{"family": "Brien-Smith", "given": ["Adam"]}], gender="male",
       birthDate="1950-11-02", generalPractitioner=[_ref("Practitioner/pr-1")],
       identifier=[{"system": NHS, "value": "9000000017"}]),
    _r("Patient", "pat-3", name=[{"family": "Obrien", "given": ["Charles"]}], gender="male",
       birthDate="1962", identifier=[{"value": "no-system-3"}]),
    _r("Patient", "pat-4", name=[{"family": "Smith", "given": ["Ann"]}], gender="female",
       birthDate="1975-06", active=False, generalPractitioner=[_ref("Organization/org-b")],
       identifier=[{"system": NHS, "value": "9000000041"}]),
    _r("Patient", "pat-5", name=[{"family": "Zeta"}], gender="unknown"),
    _r("Observation", "obs-1", status="final", subject=_ref("Patient/pat-1"),
       code={"coding": [{"system": LOINC, "code": "8867-4", "display": "Heart rate"}]},
       category=[{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                              "code": "vital-signs"}]}],
       effectiveDateTime="2024-01-10T10:00:00Z",
       valueQuantity={"value": 72, "unit": "beats/min", "system": UCUM, "code": "/min"}),
    _r("Observation", "obs-2", status="final", subject=_ref("Patient/pat-1"),
       code={"coding": [{"system": LOINC, "code": "8867-4", "display": "Heart rate"}]},
       effectiveDateTime="2024-02-01T09:30:00Z",
       valueQuantity={"value": 110, "unit": "beats/min", "system": UCUM, "code": "/min"}),
    _r("Observation", "obs-3", status="amended", subject=_ref("Patient/pat-2"),
       code={"coding": [{"system": LOINC, "code": "15074-8", "display": "Glucose"}], "text": "Blood sugar"},
       effectiveDateTime="2023-12-24", valueQuantity={"value": 5.5, "unit": "mmol/L", "system": UCUM,
                                                      "code": "mmol/L"}),
    _r("Encounter", "enc-1", status="finished", subject=_ref("Patient/pat-1"),
       **{"class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"}},
       period={"start": "2024-01-01T09:00:00Z", "end": "2024-01-05T17:00:00Z"},
       participant=[{"individual": _ref("Practitioner/pr-1")}]),
    _r("Encounter", "enc-2", status="in-progress", subject=_ref("Patient/pat-2"),
       **{"class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"}},
       period={"start": "2023-05-01"}),
    _r("CareTeam", "ct-1", status="active", subject=_ref("Patient/pat-1"),
       participant=[{"member": _ref("Practitioner/pr-1")}, {"member": _ref("Organization/org-a")}]),
    _r("CareTeam", "ct-2", status="active", subject=_ref("Patient/pat-2"),
       participant=[{"member": _ref("Practitioner/pr-2")}]),
    _r("CarePlan", "cp-1", status="active", intent="plan", subject=_ref("Patient/pat-1"),
       careTeam=[_ref("CareTeam/ct-1")]),
    _r("CarePlan", "cp-2", status="completed", intent="plan", subject=_ref("Patient/pat-2"),
       careTeam=[_ref("CareTeam/ct-2")]),
    _r("RiskAssessment", "ra-1", status="final", subject=_ref("Patient/pat-1"),
       prediction=[{"probabilityDecimal": 0.25}]),
    _r("RiskAssessment", "ra-2", status="final", subject=_ref("Patient/pat-2"),
       prediction=[{"probabilityDecimal": 0.8}]),
]


@pytest.fixture
def world(api):  # type: ignore[no-untyped-def]
    for res in WORLD_RESOURCES:
        resp = api.put(f"{res['resourceType']}/{res['id']}", json=res)
        assert resp.status_code in (200, 201), resp.text
    return api


def bundle(api, query: str, status: int = 200, **kw: Any) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    resp = api.get(query, **kw)
    assert resp.status_code == status, f"{query}: {resp.status_code} {resp.text[:400]}"
    return resp.json()


def ids(api, query: str, **kw: Any) -> set[str]:  # type: ignore[no-untyped-def]
    """ids of the matches (search.mode=match) of a search restricted to the test world."""
    sep = "&" if "?" in query else "?"
    body = bundle(api, f"{query}{sep}{WORLD}&_count=100", **kw)
    assert body["resourceType"] == "Bundle" and body["type"] == "searchset"
    return {e["resource"]["id"] for e in body.get("entry", []) if e["search"]["mode"] == "match"}


# -- token ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("query, expected", [
    (f"Patient?identifier={NHS}|9000000009", {"pat-1"}),
    ("Patient?identifier=9000000017", {"pat-2"}),
    ("Patient?identifier=|no-system-3", {"pat-3"}),
    ("Patient?identifier=|9000000009", set()),
    (f"Patient?identifier={NHS}|", {"pat-1", "pat-2", "pat-4"}),
    ("Patient?identifier=urn:other|X1,9000000041", {"pat-1", "pat-4"}),
    ("Patient?gender=male", {"pat-2", "pat-3"}),
    ("Patient?gender:not=male", {"pat-1", "pat-4", "pat-5"}),
    ("Patient?active=true", {"pat-1"}),
    ("Patient?active:missing=true", {"pat-2", "pat-3", "pat-5"}),
    ("Patient?active:missing=false", {"pat-1", "pat-4"}),
    ("Patient?email=zoe@example.com", {"pat-1"}),
    ("Patient?phone=020 7946 0001", {"pat-1"}),
    (f"Observation?code={LOINC}|8867-4", {"obs-1", "obs-2"}),
    ("Observation?code:text=heart", {"obs-1", "obs-2"}),
    ("Observation?code:text=blood sug", {"obs-3"}),
    ("Observation?category=vital-signs", {"obs-1"}),
    ("Observation?status=final,amended&code=15074-8", {"obs-3"}),
    ("Patient?_id=pat-1,pat-5", {"pat-1", "pat-5"}),
])
def test_token(world, query: str, expected: set[str]) -> None:  # type: ignore[no-untyped-def]
    assert ids(world, query) == expected


# -- string --------------------------------------------------------------------------------------

@pytest.mark.parametrize("query, expected", [
    ("Patient?family=obrien", {"pat-3"}),
    ("Patient?family=ó brien", {"pat-1"}),
    ("Patient?family=O BRIEN", {"pat-1"}),  # case- and accent-insensitive
    ("Patient?family=Bri", {"pat-2"}),
    ("Patient?given=zoe", {"pat-1"}),
    ("Patient?name=smi", {"pat-4"}),
    ("Patient?name=ann,zeta", {"pat-4", "pat-5"}),
    ("Patient?family:exact=Smith", {"pat-4"}),
    ("Patient?family:exact=smith", set()),
    ("Patient?family:contains=smit", {"pat-2", "pat-4"}),
    ("Patient?family:contains=bri", {"pat-1", "pat-2", "pat-3"}),
    ("Patient?address-city=lon", {"pat-1"}),
    ("Patient?address-postalcode=w13", {"pat-1"}),
    ("Patient?address=14 lark", {"pat-1"}),
    ("Patient?address=larkspur", set()),  # starts-with, not contains
    ("Patient?family=smith&gender=female", {"pat-4"}),
    ("Patient?family:missing=true", set()),
])
def test_string(world, query: str, expected: set[str]) -> None:  # type: ignore[no-untyped-def]
    assert ids(world, query) == expected


# -- date ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("query, expected", [
    ("Patient?birthdate=1950", {"pat-1", "pat-2"}),
    ("Patient?birthdate=1950-03", {"pat-1"}),
    ("Patient?birthdate=eq1950-03-15", {"pat-1"}),
    ("Patient?birthdate=ne1950", {"pat-3", "pat-4"}),
    ("Patient?birthdate=lt1950-06-01", {"pat-1"}),
    ("Patient?birthdate=gt1962-06-01", {"pat-3", "pat-4"}),  # 1962 reaches beyond June 1962
    ("Patient?birthdate=ge1962", {"pat-3", "pat-4"}),
    ("Patient?birthdate=le1962", {"pat-1", "pat-2", "pat-3"}),
    ("Patient?birthdate=sa1950", {"pat-3", "pat-4"}),
    ("Patient?birthdate=eb1962", {"pat-1", "pat-2"}),
    ("Patient?birthdate=ge1950-01-01&birthdate=lt1951-01-01", {"pat-1", "pat-2"}),
    ("Patient?birthdate=1962-05-05", set()),  # a year-precise birth date is not within one day
    ("Patient?birthdate=ap1962-05-05", {"pat-3"}),
    ("Patient?birthdate:missing=true", {"pat-5"}),
    ("Encounter?date=2024-01-03", set()),  # the stay is longer than that day: eq needs containment
    ("Encounter?date=2024-01", {"enc-1"}),
    ("Encounter?date=ge2024-01-03", {"enc-1", "enc-2"}),  # enc-2 has no end: it is still going on
    ("Encounter?date=lt2023-06-01", {"enc-2"}),
    ("Observation?date=ge2024-01-10T10:00:00Z&date=le2024-01-31", {"obs-1"}),
    ("Observation?date=2024-01-10T11:00:00%2B01:00", {"obs-1"}),
])
def test_date(world, query: str, expected: set[str]) -> None:  # type: ignore[no-untyped-def]
    assert ids(world, query) == expected


# -- reference -----------------------------------------------------------------------------------

def test_reference_forms(world) -> None:  # type: ignore[no-untyped-def]
    assert ids(world, "Observation?subject=Patient/pat-1") == {"obs-1", "obs-2"}
    assert ids(world, "Observation?subject=pat-1") == {"obs-1", "obs-2"}
    assert ids(world, "Observation?subject:Patient=pat-2") == {"obs-3"}
    assert ids(world, "Observation?patient=Patient/pat-2,Patient/pat-1") == {"obs-1", "obs-2", "obs-3"}
    base = str(world.base_url).rstrip("/")
    assert ids(world, f"Observation?subject={base}/Patient/pat-1") == {"obs-1", "obs-2"}
    assert ids(world, "Patient?general-practitioner=Organization/org-a") == {"pat-1"}
    assert ids(world, "Patient?general-practitioner:Practitioner=pr-1") == {"pat-2"}
    assert ids(world, "Patient?general-practitioner:missing=true") == {"pat-3", "pat-5"}
    assert ids(world, "CareTeam?participant=Practitioner/pr-1") == {"ct-1"}
    assert ids(world, "CarePlan?care-team=CareTeam/ct-2") == {"cp-2"}
    bad = world.get("Patient?general-practitioner=Observation/obs-1")
    assert bad.status_code == 400 and "general-practitioner" in bad.json()["issue"][0]["diagnostics"]


def test_reference_identifier_modifier(api) -> None:  # type: ignore[no-untyped-def]
    api.put("Observation/obs-ident", json={"resourceType": "Observation", "id": "obs-ident", "status": "final",
                                           "code": {"text": "x"},
                                           "subject": {"identifier": {"system": NHS, "value": "9000000099"}}})
    found = api.get(f"Observation?subject:identifier={NHS}|9000000099").json()
    assert [e["resource"]["id"] for e in found["entry"]] == ["obs-ident"]
    found = api.get("Observation?subject:identifier=9000000099").json()
    assert [e["resource"]["id"] for e in found["entry"]] == ["obs-ident"]


# -- quantity, number, uri, common parameters ------------------------------------------------------

@pytest.mark.parametrize("query, expected", [
    (f"Observation?value-quantity=72|{UCUM}|/min", {"obs-1"}),
    ("Observation?value-quantity=gt100", {"obs-2"}),
    ("Observation?value-quantity=lt10||mmol/L", {"obs-3"}),
    ("Observation?value-quantity=5.5", {"obs-3"}),
    ("Observation?value-quantity=5.4", set()),
    ("Observation?value-quantity=ge72&value-quantity=le110", {"obs-1", "obs-2"}),
    ("Observation?value-quantity=ap70", {"obs-1"}),
    ("RiskAssessment?probability=0.25", {"ra-1"}),
    ("RiskAssessment?probability=gt0.5", {"ra-2"}),
    ("RiskAssessment?probability=le0.25", {"ra-1"}),
])
def test_quantity_and_number(world, query: str, expected: set[str]) -> None:  # type: ignore[no-untyped-def]
    assert ids(world, query) == expected


def test_uri_common_parameters_and_last_updated(api) -> None:  # type: ignore[no-untyped-def]
    def ids(api, query: str) -> set[str]:  # type: ignore[no-untyped-def]  # outside the tagged world
        return {e["resource"]["id"] for e in bundle(api, query).get("entry", [])}

    profile = "http://example.org/fhir/StructureDefinition/nwl-patient"
    body = {"resourceType": "Patient", "id": "uri-1", "meta": {
        "profile": [profile], "security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality",
                                                          "code": "R"}], "source": "http://feeds.example.org/gp"}}
    created = api.put("Patient/uri-1", json=body).json()
    assert ids(api, f"Patient?_profile={profile}") == {"uri-1"}
    assert ids(api, "Patient?_profile:below=http://example.org/fhir") == {"uri-1"}
    assert ids(api, "Patient?_profile:below=http://example.org/fhi") == set()
    assert ids(api, "Patient?_security=R") == {"uri-1"}
    assert ids(api, "Patient?_source=http://feeds.example.org/gp") == {"uri-1"}
    stamp = created["meta"]["lastUpdated"].replace("+", "%2B")
    assert "uri-1" in ids(api, f"Patient?_lastUpdated=ge{stamp}")
    assert "uri-1" not in ids(api, f"Patient?_lastUpdated=gt{stamp}")
    assert ids(api, f"Patient?_lastUpdated={stamp[:10]}&_id=uri-1") == {"uri-1"}
    assert ids(api, "Patient?_lastUpdated=lt2000&_id=uri-1") == set()


# -- chaining and _has -----------------------------------------------------------------------------

@pytest.mark.parametrize("query, expected", [
    ("Observation?subject:Patient.name=zoe", {"obs-1", "obs-2"}),
    ("Observation?subject.family=brien-smith", {"obs-3"}),
    ("Observation?patient.gender=male", {"obs-3"}),
    ("Patient?general-practitioner.identifier=E85990", {"pat-1"}),
    ("Patient?general-practitioner:Practitioner.family=jones", {"pat-2"}),
    ("CarePlan?care-team.participant=Practitioner/pr-2", {"cp-2"}),
    ("CarePlan?subject:Patient.general-practitioner.name=larkspur", {"cp-1"}),  # two levels
    ("Patient?_has:Observation:patient:code=8867-4", {"pat-1"}),
    ("Patient?_has:CareTeam:patient:participant=Practitioner/pr-1", {"pat-1"}),
    ("Patient?_has:Observation:subject:value-quantity=gt100", {"pat-1"}),
    ("Patient?_has:Observation:subject:value-quantity=gt500", set()),
    ("Practitioner?_has:CareTeam:participant:_has:CarePlan:care-team:status=completed", {"pr-2"}),
])
def test_chaining_and_has(world, query: str, expected: set[str]) -> None:  # type: ignore[no-untyped-def]
    assert ids(world, query) == expected


# -- include / revinclude ---------------------------------------------------------------------------

def entries_by_mode(body: dict[str, Any]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for e in body.get("entry", []):
        out.setdefault(e["search"]["mode"], set()).add(f"{e['resource']['resourceType']}/{e['resource']['id']}")
    return out


def test_include_revinclude_and_iterate(world) -> None:  # type: ignore[no-untyped-def]
    body = bundle(world, f"CarePlan?_id=cp-1&_include=CarePlan:care-team&{WORLD}")
    assert entries_by_mode(body) == {"match": {"CarePlan/cp-1"}, "include": {"CareTeam/ct-1"}}
    assert body["total"] == 1  # includes are not counted
    body = bundle(world, "CarePlan?_id=cp-1&_include=CarePlan:care-team&_include:iterate=CareTeam:participant")
    assert entries_by_mode(body)["include"] == {"CareTeam/ct-1", "Practitioner/pr-1", "Organization/org-a"}
    body = bundle(world, "CarePlan?_id=cp-1&_include=CarePlan:care-team&_include=CareTeam:participant")
    assert entries_by_mode(body)["include"] == {"CareTeam/ct-1"}  # without :iterate, one level only
    body = bundle(world, "CarePlan?_id=cp-1&_include=CarePlan:subject:Patient&_include=CarePlan:care-team:CareTeam")
    assert entries_by_mode(body)["include"] == {"CareTeam/ct-1", "Patient/pat-1"}
    body = bundle(world, "Patient?_id=pat-1&_revinclude=Observation:subject")
    assert entries_by_mode(body) == {"match": {"Patient/pat-1"},
                                     "include": {"Observation/obs-1", "Observation/obs-2"}}
    body = bundle(world, "Patient?_id=pat-2&_revinclude=CareTeam:subject&_revinclude:iterate=CarePlan:care-team")
    assert entries_by_mode(body)["include"] == {"CareTeam/ct-2", "CarePlan/cp-2"}
    body = bundle(world, "CarePlan?_id=cp-2&_include=*")
    assert entries_by_mode(body)["include"] == {"Patient/pat-2", "CareTeam/ct-2"}
    assert world.get("CarePlan?_include=CarePlan:nonsense").status_code == 400


# -- sorting, paging, totals, shaping -----------------------------------------------------------------

def test_sort(world) -> None:  # type: ignore[no-untyped-def]
    def order(query: str) -> list[str]:
        body = bundle(world, f"{query}&{WORLD}")
        return [e["resource"]["id"] for e in body["entry"] if e["search"]["mode"] == "match"]
    assert order("Patient?_sort=birthdate") == ["pat-1", "pat-2", "pat-3", "pat-4", "pat-5"]  # missing last
    assert order("Patient?_sort=-birthdate") == ["pat-4", "pat-3", "pat-2", "pat-1", "pat-5"]
    assert order("Patient?_sort=gender,-birthdate") == ["pat-4", "pat-1", "pat-3", "pat-2", "pat-5"]
    # normalised values: "brien-smith" < "o brien" < "obrien" < "smith" < "zeta"
    assert order("Patient?_sort=family") == ["pat-2", "pat-1", "pat-3", "pat-4", "pat-5"]
    assert order("Observation?_sort=-date") == ["obs-2", "obs-1", "obs-3"]
    assert order("Patient?_sort=_id&gender=male") == ["pat-2", "pat-3"]
    assert world.get("Patient?_sort=colour").status_code == 400


def test_paging_is_stable_while_others_write(api) -> None:  # type: ignore[no-untyped-def]
    run = uuid.uuid4().hex[:8]
    tag = f"urn:carebroker:test|{run}"
    meta = {"tag": [{"system": "urn:carebroker:test", "code": run}]}
    for i in range(7):
        api.put(f"Patient/page-{i}-{run}", json={"resourceType": "Patient", "id": f"page-{i}-{run}", "meta": meta,
                                                "birthDate": f"200{i}-01-01"})
    first = bundle(api, f"Patient?_tag={tag}&_sort=birthdate&_count=3")
    assert first["total"] == 7
    assert [e["resource"]["id"] for e in first["entry"]] == [f"page-{i}-{run}" for i in (0, 1, 2)]
    links = {link["relation"]: link["url"] for link in first["link"]}
    assert "previous" not in links
    # another client inserts a patient that sorts before the next page, and deletes one after it
    api.put(f"Patient/page-x-{run}", json={"resourceType": "Patient", "id": f"page-x-{run}",
                                           "birthDate": "2000-06-01", "meta": meta})
    api.delete(f"Patient/page-6-{run}")
    second = bundle(api, links["next"])
    assert [e["resource"]["id"] for e in second["entry"]] == [f"page-{i}-{run}" for i in (3, 4, 5)]
    assert "next" not in {lnk["relation"] for lnk in second["link"]}  # page-6 is gone: nothing after
    back = bundle(api, {lnk["relation"]: lnk["url"] for lnk in second["link"]}["previous"])
    assert [e["resource"]["id"] for e in back["entry"]] == [f"page-{i}-{run}" for i in ("x", 1, 2)]
    assert api.get(f"Patient?_tag={tag}&_cursor=garbage").status_code == 400


def test_count_total_and_summary(world) -> None:  # type: ignore[no-untyped-def]
    body = bundle(world, f"Patient?{WORLD}&_count=2")
    assert body["total"] == 5 and len(body["entry"]) == 2
    assert "total" not in bundle(world, f"Patient?{WORLD}&_total=none")
    assert bundle(world, f"Patient?{WORLD}&_total=estimate")["total"] == 5
    count = bundle(world, f"Patient?{WORLD}&_summary=count")
    assert count["total"] == 5 and "entry" not in count
    summary = bundle(world, f"Patient?_id=pat-1&_summary=true")["entry"][0]["resource"]
    assert "name" in summary and "telecom" in summary and "contact" not in summary
    assert {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED"} in summary["meta"]["tag"]
    elements = bundle(world, "Patient?_id=pat-1&_elements=gender,birthDate")["entry"][0]["resource"]
    assert set(elements) == {"resourceType", "id", "meta", "gender", "birthDate"}
    assert "text" not in bundle(world, "Patient?_id=pat-1&_summary=data")["entry"][0]["resource"]
    assert world.get("Patient?_summary=maybe").status_code == 400
    assert world.get("Patient?_count=abc").status_code == 400


# -- interaction forms ---------------------------------------------------------------------------------

def test_post_search_system_search_and_compartment(world) -> None:  # type: ignore[no-untyped-def]
    posted = world.post("Patient/_search", data={"family": "smith", "_tag": "urn:carebroker:test|search-world"},
                        headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert posted.status_code == 200
    assert {e["resource"]["id"] for e in posted.json()["entry"]} == {"pat-4"}
    system = bundle(world, f"?_type=Patient,Practitioner&_id=pat-1,pr-1&{WORLD}")
    assert {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in system["entry"]} == {
        "Patient/pat-1", "Practitioner/pr-1"}
    assert world.get("?_type=Robot").status_code == 400
    compartment = bundle(world, "Patient/pat-1/Observation")
    assert {e["resource"]["id"] for e in compartment["entry"]} >= {"obs-1", "obs-2"}
    assert "obs-3" not in {e["resource"]["id"] for e in compartment["entry"]}
    narrowed = bundle(world, "Patient/pat-1/Observation?value-quantity=gt100")
    assert {e["resource"]["id"] for e in narrowed["entry"]} == {"obs-2"}
    assert {e["resource"]["id"] for e in bundle(world, "Patient/pat-2/CarePlan")["entry"]} == {"cp-2"}
    assert world.get("Patient/pat-1/Organization").status_code == 404  # not in the Patient compartment


def test_unknown_parameters_lenient_and_strict(world) -> None:  # type: ignore[no-untyped-def]
    body = bundle(world, f"Patient?colour=blue&gender=male&{WORLD}")
    assert {e["resource"]["id"] for e in body["entry"] if e["search"]["mode"] == "match"} == {"pat-2", "pat-3"}
    self_link = next(link["url"] for link in body["link"] if link["relation"] == "self")
    assert "colour" not in self_link and "gender=male" in self_link
    outcome = [e for e in body["entry"] if e["search"]["mode"] == "outcome"]
    assert "colour" in outcome[0]["resource"]["issue"][0]["diagnostics"]
    strict = world.get("Patient?colour=blue", headers={"Prefer": "handling=strict"})
    assert strict.status_code == 400 and "colour" in strict.json()["issue"][0]["diagnostics"]


@pytest.mark.parametrize("query, name", [
    ("Patient?birthdate=1950-13-45", "birthdate"),
    ("Patient?birthdate=xx1950", "birthdate"),
    ("Observation?value-quantity=big", "value-quantity"),
    ("Patient?gender:fuzzy=male", "fuzzy"),
    ("Patient?active:missing=maybe", "active"),
    ("Patient?_has:Observation:subject", "_has"),
])
def test_malformed_values_name_the_parameter(world, query: str, name: str) -> None:  # type: ignore[no-untyped-def]
    resp = world.get(query)
    assert resp.status_code == 400, resp.text
    assert name in resp.json()["issue"][0]["diagnostics"]


def test_links_carry_the_search(world) -> None:  # type: ignore[no-untyped-def]
    body = bundle(world, f"Patient?{WORLD}&_count=2&_sort=birthdate")
    nxt = urlparse(next(link["url"] for link in body["link"] if link["relation"] == "next"))
    params = parse_qs(nxt.query)
    assert params["_count"] == ["2"] and params["_sort"] == ["birthdate"] and "_cursor" in params


def test_uri_above_and_count_cap(api) -> None:  # type: ignore[no-untyped-def]
    api.put("ValueSet/vs-above", json={"resourceType": "ValueSet", "id": "vs-above", "status": "active",
                                       "url": "http://example.org/fhir/ValueSet/nwl-ethnicity"})
    found = api.get("ValueSet?url:above=http://example.org/fhir/ValueSet/nwl-ethnicity/extra/part").json()
    assert [e["resource"]["id"] for e in found["entry"]] == ["vs-above"]
    assert "entry" not in api.get("ValueSet?url:above=http://example.org/other/ValueSet/nwl-ethnicity").json()
    capped = api.get("Patient?_count=100000&_total=none").json()
    assert len(capped.get("entry", [])) <= 1000


def test_official_examples_are_found_by_their_own_values(api, corpus) -> None:  # type: ignore[no-untyped-def]
    """Official R4 examples (as published) are indexed on write and found by typical searches."""
    import json
    folder = corpus / "hl7-fhir-r4-examples-clinical" / "examples"
    for name in ("Patient-example.json", "Observation-example.json", "Condition-example.json",
                 "CarePlan-example.json", "Encounter-example.json", "AllergyIntolerance-example.json"):
        res = json.loads((folder / name).read_text())
        assert api.put(f"{res['resourceType']}/{res['id']}", json=res).status_code in (200, 201)
    checks = [
        ("Patient?family=chalmers&birthdate=1974-12-25&identifier=urn:oid:1.2.36.146.595.217.0.1|12345", "example"),
        ("Observation?code=http://loinc.org|29463-7&subject=Patient/example&value-quantity=185||[lb_av]", "example"),
        ("Observation?date=2016-03-28&category=vital-signs", "example"),
        ("Condition?code=http://snomed.info/sct|39065001&severity=24484000", "example"),
        ("Encounter?status=in-progress&class=IMP", "example"),
        ("AllergyIntolerance?criticality=high&code=227493005", "example"),
    ]
    for query, expected in checks:
        body = api.get(query).json()
        assert expected in {e["resource"]["id"] for e in body.get("entry", [])}, query


def test_index_extraction_never_fails_on_official_examples(corpus) -> None:  # type: ignore[no-untyped-def]
    import json
    from conformance.validation import supported_resource_types
    from fhir_server.search.index import index_resource
    rows = 0
    for path in sorted((corpus / "hl7-fhir-r4-examples-clinical" / "examples").glob("*.json")):
        res = json.loads(path.read_text())
        if res["resourceType"] in supported_resource_types():
            rows += sum(len(v) for v in index_resource(res).values())
    assert rows > 7_000  # 7,640 rows from the 696 examples of supported types

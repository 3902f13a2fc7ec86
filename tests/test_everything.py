"""Patient $everything end to end, through the ASGI app and a real uvicorn, on SQLite and PostgreSQL.

Each test PUTs its own small world (ids carry a fresh suffix), so paging and totals can be checked
exactly even though the database is shared with other tests.
"""
from __future__ import annotations

import time
import uuid
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest

NHS = "https://fhir.nhs.uk/Id/nhs-number"


def _ref(target: str) -> dict[str, str]:
    return {"reference": target}


def world(api, s: str) -> dict[str, set[str]]:  # type: ignore[no-untyped-def]
    """PUT a patient with a compartment, another patient, and what they refer to. Returns the
    expected $everything content of each patient, as `Type/id` sets."""
    resources: list[dict[str, Any]] = [
        {"resourceType": "Organization", "id": f"org-{s}", "name": "Larkspur Road Surgery"},
        {"resourceType": "Organization", "id": f"hosp-{s}", "name": "Westbrook Hospital"},
        {"resourceType": "Location", "id": f"loc-{s}", "name": "Ward 4"},
        {"resourceType": "Practitioner", "id": f"pr-{s}", "name": [{"family": "Jones"}]},
        {"resourceType": "Practitioner", "id": f"pr-other-{s}", "name": [{"family": "Smith"}]},
        {"resourceType": "Practitioner", "id": f"pr-unrelated-{s}", "name": [{"family": "Nobody"}]},
        {"resourceType": "Medication", "id": f"med-{s}", "code": {"text": "Furosemide 40mg tablets"}},
        {"resourceType": "Patient", "id": f"pat-{s}", "identifier": [{"system": NHS, "value": "9434765919"}],
         "generalPractitioner": [_ref(f"Practitioner/pr-{s}")], "managingOrganization": _ref(f"Organization/org-{s}")},
        {"resourceType": "Patient", "id": f"other-{s}", "identifier": [{"system": NHS, "value": "4010232137"}]},
        {"resourceType": "Observation", "id": f"obs-other-{s}", "status": "final", "code": {"text": "BP"},
         "subject": _ref(f"Patient/other-{s}"), "performer": [_ref(f"Practitioner/pr-other-{s}")]},
        # refers to the other patient (focus) and to the other patient's observation (hasMember):
        # neither may come into this patient's $everything
        {"resourceType": "Observation", "id": f"obs-{s}", "status": "final", "code": {"text": "Heart rate"},
         "subject": _ref(f"Patient/pat-{s}"), "performer": [_ref(f"Practitioner/pr-{s}")],
         "focus": [_ref(f"Patient/other-{s}")], "hasMember": [_ref(f"Observation/obs-other-{s}")]},
        {"resourceType": "Encounter", "id": f"enc-{s}", "status": "finished",
         "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"},
         "subject": _ref(f"Patient/pat-{s}"), "location": [{"location": _ref(f"Location/loc-{s}")}],
         "serviceProvider": _ref(f"Organization/hosp-{s}")},
        {"resourceType": "RelatedPerson", "id": f"rp-{s}", "patient": _ref(f"Patient/pat-{s}"),
         "name": [{"family": "Okafor"}]},
        {"resourceType": "CareTeam", "id": f"ct-{s}", "status": "active", "subject": _ref(f"Patient/pat-{s}"),
         "participant": [{"member": _ref(f"Practitioner/pr-{s}")}, {"member": _ref(f"RelatedPerson/rp-{s}")}]},
        {"resourceType": "MedicationRequest", "id": f"mr-{s}", "status": "active", "intent": "order",
         "subject": _ref(f"Patient/pat-{s}"), "medicationReference": _ref(f"Medication/med-{s}")},
        {"resourceType": "Condition", "id": f"gone-{s}", "subject": _ref(f"Patient/pat-{s}"), "code": {"text": "x"}},
    ]
    for res in resources:
        resp = api.put(f"{res['resourceType']}/{res['id']}", json=res)
        assert resp.status_code in (200, 201), resp.text
    assert api.delete(f"Condition/gone-{s}").status_code == 204  # deleted: never in $everything
    return {
        "pat": {f"Patient/pat-{s}", f"Observation/obs-{s}", f"Encounter/enc-{s}", f"RelatedPerson/rp-{s}",
                f"CareTeam/ct-{s}", f"MedicationRequest/mr-{s}"},
        "pat-referenced": {f"Practitioner/pr-{s}", f"Organization/org-{s}", f"Organization/hosp-{s}",
                           f"Location/loc-{s}", f"Medication/med-{s}"},
        "other": {f"Patient/other-{s}", f"Observation/obs-other-{s}"},
        "other-referenced": {f"Practitioner/pr-other-{s}"},
    }


@pytest.fixture
def suffix() -> str:
    return uuid.uuid4().hex[:10]


def entries(bundle: dict[str, Any], mode: str | None = None) -> list[str]:
    return [f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in bundle.get("entry", [])
            if e["search"]["mode"] != "outcome" and (mode is None or e["search"]["mode"] == mode)]


def link(bundle: dict[str, Any], relation: str) -> str | None:
    return next((lk["url"] for lk in bundle["link"] if lk["relation"] == relation), None)


def get(api, url: str) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """GET a path or an absolute link (our links name the server's base URL)."""
    path = url.split("/fhir/", 1)[1] if "/fhir/" in url else url
    resp = api.get(path)
    assert resp.status_code == 200, resp.text
    assert resp.json()["type"] == "searchset"
    return resp.json()


def test_everything_is_the_compartment_and_what_it_refers_to(api, suffix: str) -> None:  # type: ignore[no-untyped-def]
    expected = world(api, suffix)
    bundle = get(api, f"Patient/pat-{suffix}/$everything")
    assert set(entries(bundle, "match")) == expected["pat"]
    assert set(entries(bundle, "include")) == expected["pat-referenced"]
    assert bundle["total"] == len(expected["pat"] | expected["pat-referenced"])
    assert len(entries(bundle)) == bundle["total"]  # each once
    # the other patient, their observation and their practitioner stay out, though referenced
    assert not set(entries(bundle)) & (expected["other"] | expected["other-referenced"])
    assert f"Practitioner/pr-unrelated-{suffix}" not in entries(bundle)
    other = get(api, f"Patient/other-{suffix}/$everything")
    assert set(entries(other)) == expected["other"] | expected["other-referenced"]
    assert link(bundle, "self").endswith(f"/Patient/pat-{suffix}/$everything")


def test_everything_by_post_takes_parameters(api, suffix: str) -> None:  # type: ignore[no-untyped-def]
    world(api, suffix)
    body = {"resourceType": "Parameters", "parameter": [{"name": "_type", "valueString": "Observation,Location"},
                                                        {"name": "_count", "valueInteger": 1}]}
    resp = api.post(f"Patient/pat-{suffix}/$everything", json=body)
    assert resp.status_code == 200, resp.text
    first = resp.json()
    assert first["total"] == 2 and len(entries(first)) == 1
    # the page links repeat the parameters as a GET
    nxt = link(first, "next")
    assert nxt is not None and parse_qs(urlparse(nxt).query)["_type"] == ["Observation,Location"]
    second = get(api, nxt)
    assert set(entries(first) + entries(second)) == {f"Observation/obs-{suffix}", f"Location/loc-{suffix}"}
    bad = api.post(f"Patient/pat-{suffix}/$everything", json={"resourceType": "Patient"})
    assert bad.status_code == 400


def test_type_filters_compartment_and_referenced_resources(api, suffix: str) -> None:  # type: ignore[no-untyped-def]
    world(api, suffix)
    bundle = get(api, f"Patient/pat-{suffix}/$everything?_type=Observation,Practitioner,Patient")
    assert set(entries(bundle)) == {f"Observation/obs-{suffix}", f"Practitioner/pr-{suffix}", f"Patient/pat-{suffix}"}
    assert bundle["total"] == 3
    assert api.get(f"Patient/pat-{suffix}/$everything?_type=Spaceship").status_code == 400


def test_since_keeps_what_changed(api, suffix: str) -> None:  # type: ignore[no-untyped-def]
    world(api, suffix)
    time.sleep(0.01)  # lastUpdated has millisecond precision: the world is strictly older
    changed = api.put(f"Encounter/enc-{suffix}", json={
        "resourceType": "Encounter", "id": f"enc-{suffix}", "status": "cancelled",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"},
        "subject": _ref(f"Patient/pat-{suffix}"), "serviceProvider": _ref(f"Organization/hosp-{suffix}")}).json()
    new_org = api.put(f"Organization/org-{suffix}", json={"resourceType": "Organization", "id": f"org-{suffix}",
                                                          "name": "Larkspur Road Surgery (renamed)"})
    assert new_org.status_code == 200
    since = changed["meta"]["lastUpdated"]
    bundle = get(api, f"Patient/pat-{suffix}/$everything?_since={since.replace('+', '%2B')}")
    assert set(entries(bundle)) == {f"Encounter/enc-{suffix}", f"Organization/org-{suffix}"}
    assert api.get(f"Patient/pat-{suffix}/$everything?_since=yesterday").status_code == 400


def test_paging_stays_right_while_others_write(api, suffix: str) -> None:  # type: ignore[no-untyped-def]
    expected = world(api, suffix)
    everything = expected["pat"] | expected["pat-referenced"]
    first = get(api, f"Patient/pat-{suffix}/$everything?_count=4")
    assert len(entries(first)) == 4 and link(first, "previous") is None
    seen = entries(first)
    # between pages: a new resource in the compartment, an update of one already seen and one not
    # yet seen, and a deletion of one not yet seen (that nothing else brought in refers to)
    touched, dropped = ["Encounter", f"enc-{suffix}"], f"CareTeam/ct-{suffix}"
    assert {"/".join(touched), dropped}.isdisjoint(seen)  # resources are paged in the order they were made
    created = api.post("Observation", json={"resourceType": "Observation", "status": "final", "code": {"text": "new"},
                                            "subject": _ref(f"Patient/pat-{suffix}")}).json()
    again = seen[-1].split("/")
    api.patch(f"{again[0]}/{again[1]}", json=[{"op": "add", "path": "/meta/tag", "value": [{"code": "seen"}]}],
              headers={"Content-Type": "application/json-patch+json"}).raise_for_status()
    api.patch(f"{touched[0]}/{touched[1]}", json=[{"op": "add", "path": "/meta/tag", "value": [{"code": "later"}]}],
              headers={"Content-Type": "application/json-patch+json"}).raise_for_status()
    assert api.delete(dropped).status_code == 204
    pages = [first]
    while (nxt := link(pages[-1], "next")) is not None:
        pages.append(get(api, nxt))
        seen += entries(pages[-1])
    assert len(seen) == len(set(seen)), "a resource came twice"
    assert set(seen) == everything - {dropped} | {f"Observation/{created['id']}"}
    assert f"Observation/{created['id']}" in entries(pages[-1])  # the newest comes last: keyset on pk
    assert pages[-1]["total"] == len(everything)  # one dropped, one created
    # previous from the last page gives the page before it
    assert len(pages) >= 3
    back = get(api, link(pages[-1], "previous"))  # type: ignore[arg-type]
    assert entries(back) == entries(pages[-2])


def test_type_level_with_ids(api, suffix: str) -> None:  # type: ignore[no-untyped-def]
    expected = world(api, suffix)
    one = get(api, f"Patient/$everything?_id=pat-{suffix}")
    assert set(entries(one)) == expected["pat"] | expected["pat-referenced"]
    both = get(api, f"Patient/$everything?_id=pat-{suffix},other-{suffix}&_count=1000")
    assert set(entries(both)) == set().union(*expected.values())
    assert both["total"] == len(set().union(*expected.values()))
    assert api.get(f"Patient/$everything?_id=pat-{suffix},nobody-{suffix}").status_code == 404
    posted = api.post("Patient/$everything", json={"resourceType": "Parameters",
                                                   "parameter": [{"name": "_id", "valueString": f"other-{suffix}"}]})
    assert set(entries(posted.json())) == expected["other"] | expected["other-referenced"]


def test_type_level_without_ids_pages_through_all_patients(api, suffix: str) -> None:  # type: ignore[no-untyped-def]
    expected = world(api, suffix)
    first = get(api, "Patient/$everything?_count=200")
    pages = [first]
    while (nxt := link(pages[-1], "next")) is not None:
        pages.append(get(api, nxt))
    seen = [e for page in pages for e in entries(page)]
    assert len(seen) == len(set(seen)) == first["total"]
    assert set().union(*expected.values()) <= set(seen)
    assert f"Practitioner/pr-unrelated-{suffix}" not in seen  # referred to by no one
    assert f"Condition/gone-{suffix}" not in seen


def test_unknown_and_deleted_patients(api, suffix: str) -> None:  # type: ignore[no-untyped-def]
    assert api.get(f"Patient/nobody-{suffix}/$everything").status_code == 404
    api.put(f"Patient/gone-{suffix}", json={"resourceType": "Patient", "id": f"gone-{suffix}"}).raise_for_status()
    assert api.delete(f"Patient/gone-{suffix}").status_code == 204
    gone = api.get(f"Patient/gone-{suffix}/$everything")
    assert gone.status_code == 410 and gone.json()["issue"][0]["code"] == "deleted"
    assert api.get(f"Observation/x-{suffix}/$everything").status_code == 404  # Patient only


def test_unknown_parameters_are_reported_or_refused(api, suffix: str) -> None:  # type: ignore[no-untyped-def]
    world(api, suffix)
    lenient = get(api, f"Patient/pat-{suffix}/$everything?start=2020-01-01")
    outcome = [e for e in lenient["entry"] if e["search"]["mode"] == "outcome"]
    assert "'start'" in outcome[0]["resource"]["issue"][0]["diagnostics"]
    assert "start" not in link(lenient, "self")  # type: ignore[operator]
    strict = api.get(f"Patient/pat-{suffix}/$everything?start=2020-01-01", headers={"Prefer": "handling=strict"})
    assert strict.status_code == 400


def test_capability_statement_lists_everything_for_patient_only(api) -> None:  # type: ignore[no-untyped-def]
    resources = {r["type"]: r for r in api.get("metadata").json()["rest"][0]["resource"]}
    names = {t: {op["name"] for op in r.get("operation", [])} for t, r in resources.items()}
    assert "everything" in names["Patient"] and "everything" not in names["Observation"]

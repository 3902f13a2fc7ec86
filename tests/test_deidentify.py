"""Unit tests of consent.deidentify: the analyst's pseudonymised view, on the official R4 examples (no database)."""
from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conformance.validation import validate_resource
from consent.deidentify import PSEUDED, Pseudonymiser, check_analyst_search, deidentify
from fhir_server.outcome import FhirError

KEY = b"analyst-view-test-key-0123456789"
PEOPLE = ("Patient", "Practitioner", "RelatedPerson", "Person")
CLINICAL = ("Observation", "Encounter", "Condition")
FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
PSEUDONYM = re.compile(r"[a-z2-7]{26}")


@pytest.fixture(scope="module")
def examples(corpus: Path) -> dict[str, dict[str, Any]]:
    """File stem (`Patient-example`) -> resource, for every person and clinical example of the types above."""
    folder = corpus / "hl7-fhir-r4-examples-clinical" / "examples"
    found = {p.stem: json.loads(p.read_text()) for t in PEOPLE + CLINICAL for p in sorted(folder.glob(f"{t}-*.json"))}
    assert len(found) >= 120, "the corpus holds 132 examples of these types"
    return found


@pytest.fixture(scope="module")
def pseudo() -> Pseudonymiser:
    return Pseudonymiser(KEY)


def nodes(value: Any, key: str = "") -> Iterator[tuple[str, Any]]:
    """(key it sits under, value) for every node of parsed JSON; list items sit under the list's key."""
    yield key, value
    if isinstance(value, dict):
        for k, v in value.items():
            yield from nodes(v, k)
    elif isinstance(value, list):
        for v in value:
            yield from nodes(v, key)


def strings(value: Any) -> Iterator[str]:
    return (v for _, v in nodes(value) if isinstance(v, str))


def personal_strings(resource: dict[str, Any]) -> set[str]:
    """Names, phone numbers/e-mails and address lines in a resource (at least 3 characters, so that
    an initial does not match a code)."""
    found: set[str] = set()
    for key, value in nodes(resource):
        if key == "name" and isinstance(value, dict):  # HumanName: these types have no string names
            found.update(strings({k: v for k, v in value.items() if k in ("family", "given", "text")}))
        elif key == "telecom" and isinstance(value, dict) and isinstance(value.get("value"), str):
            found.add(value["value"])
        elif key == "address" and isinstance(value, dict):
            found.update(strings({k: v for k, v in value.items() if k in ("line", "text")}))
    return {s for s in found if len(s) >= 3}


def identifier_values(resource: dict[str, Any]) -> list[tuple[str | None, str]]:
    return [(v.get("system"), v["value"]) for k, v in nodes(resource)
            if k == "identifier" and isinstance(v, dict) and isinstance(v.get("value"), str)]


def test_no_personal_data_is_left_anywhere(examples: dict[str, dict[str, Any]], pseudo: Pseudonymiser) -> None:
    failures = []
    for name, resource in examples.items():
        out = deidentify(resource, pseudo)
        text = json.dumps(out, ensure_ascii=False)
        leaked = sorted(s for s in personal_strings(resource) if s in text)
        left = sorted({k for k, v in nodes(out) if k in ("div", "telecom", "line", "note", "comment", "photo")
                       or k == "name" and isinstance(v, (dict, list))})
        references_with_display = [v for _, v in nodes(out)
                                   if isinstance(v, dict) and "reference" in v and "display" in v]
        if leaked or left or references_with_display or (out["resourceType"] == "Patient" and "contact" in out):
            failures.append(f"{name}: leaked {leaked}, elements {left}, references {references_with_display}")
    assert not failures, "\n".join(failures)
    assert personal_strings(examples["Patient-example"]) >= {"Chalmers", "Peter", "(03) 5555 6473", "534 Erewhon St"}


def test_every_example_still_validates_and_is_not_modified(examples: dict[str, dict[str, Any]],
                                                           pseudo: Pseudonymiser) -> None:
    failures = []
    for name, resource in examples.items():
        before = copy.deepcopy(resource)
        out = deidentify(resource, pseudo)
        assert resource == before, f"{name} was modified"
        try:
            validate_resource(out)  # raises FhirError listing every problem
        except FhirError as exc:
            failures.append(f"{name}: {exc}")
    assert not failures, "\n".join(failures)


def test_identifier_values_are_replaced_by_stable_pseudonyms(examples: dict[str, dict[str, Any]],
                                                              pseudo: Pseudonymiser) -> None:
    checked = 0
    for name, resource in examples.items():
        out = deidentify(resource, pseudo)
        assert out == deidentify(copy.deepcopy(resource), Pseudonymiser(KEY)), f"{name}: not stable"
        originals, replaced = identifier_values(resource), identifier_values(out)
        assert replaced == [(system, pseudo.identifier(system, value)) for system, value in originals], name
        assert not {v for _, v in originals} & {v for _, v in replaced}, name
        checked += len(originals)
    assert checked > 50
    # system, type, use and period stay; the assigner's display (a name) goes
    identifier = deidentify(examples["Patient-example"], pseudo)["identifier"][0]
    assert identifier["system"] == "urn:oid:1.2.36.146.595.217.0.1" and identifier["use"] == "usual"
    assert identifier["type"]["coding"][0]["code"] == "MR" and identifier["period"] == {"start": "2001-05-06"}
    assert "Acme Healthcare" not in json.dumps(identifier)


def test_the_same_identifier_has_the_same_pseudonym_in_a_resource_and_in_a_reference(
        examples: dict[str, dict[str, Any]], pseudo: Pseudonymiser) -> None:
    practitioner = examples["Practitioner-example"]
    observation = {**examples["Observation-example"],
                   "performer": [{"identifier": practitioner["identifier"][0], "display": "Dr Adam Careful"}]}
    performer = deidentify(observation, pseudo)["performer"][0]
    assert performer == {"identifier": deidentify(practitioner, pseudo)["identifier"][0]}
    assert performer["identifier"]["value"] != "23"


def test_a_patient_has_one_pseudonym_in_its_own_record_and_in_references(examples: dict[str, dict[str, Any]],
                                                                         pseudo: Pseudonymiser) -> None:
    patient = deidentify(examples["Patient-example"], pseudo)
    assert patient["id"] != "example" and FHIR_ID.fullmatch(patient["id"]) and PSEUDONYM.fullmatch(patient["id"])
    assert patient["id"] == pseudo.id("Patient", "example") != pseudo.id("Observation", "example")
    for name, element in [("Observation-example", "subject"), ("Condition-example", "subject"),
                          ("Encounter-example", "subject")]:
        assert deidentify(examples[name], pseudo)[element] == {"reference": f"Patient/{patient['id']}"}, name
    observation = deidentify(examples["Observation-example"], pseudo)
    assert observation["encounter"] == {"reference": f"Encounter/{pseudo.id('Encounter', 'example')}"}
    assert observation["id"] == pseudo.id("Observation", "example")


def test_another_key_gives_other_pseudonyms(examples: dict[str, dict[str, Any]], pseudo: Pseudonymiser) -> None:
    other = Pseudonymiser(b"another-key-for-another-project!")
    assert other.id("Patient", "example") != pseudo.id("Patient", "example")
    assert other.identifier("urn:oid:1.2", "12345") != pseudo.identifier("urn:oid:1.2", "12345")
    mine, theirs = deidentify(examples["Patient-example"], pseudo), deidentify(examples["Patient-example"], other)
    assert mine["id"] != theirs["id"] and mine["identifier"][0]["value"] != theirs["identifier"][0]["value"]
    # the system is part of an identifier's key; NUL-separated, so the split between the parts matters
    assert pseudo.identifier("urn:a", "1") != pseudo.identifier("urn:b", "1")
    assert pseudo.identifier("a|b", "c") != pseudo.identifier("a", "b|c")
    with pytest.raises(ValueError):
        Pseudonymiser(b"short")


def test_birth_and_death_dates_keep_only_the_year(examples: dict[str, dict[str, Any]], pseudo: Pseudonymiser) -> None:
    with_birth_date = [r for r in examples.values() if "birthDate" in r]
    assert len(with_birth_date) >= 20
    for resource in with_birth_date:
        assert deidentify(resource, pseudo)["birthDate"] == resource["birthDate"][:4]
    patient = deidentify(examples["Patient-example"], pseudo)
    assert patient["birthDate"] == "1974" and "_birthDate" not in patient  # the patient-birthTime extension
    dead = examples["Patient-pat3"]
    assert deidentify(dead, pseudo)["deceasedDateTime"] == dead["deceasedDateTime"][:4]
    assert deidentify(examples["Patient-example"], pseudo)["deceasedBoolean"] is False


def test_addresses_keep_town_and_postcode_district(examples: dict[str, dict[str, Any]], pseudo: Pseudonymiser) -> None:
    home = examples["Patient-example"]["address"][0]
    patient = {**examples["Patient-example"], "address": [
        {**home, "postalCode": "SW1A 1AA", "country": "GB"}, {**home, "postalCode": "W67HX"}]}
    first, second = deidentify(patient, pseudo)["address"]
    assert first == {"use": "home", "type": "both", "city": "PleasantVille", "district": "Rainbow", "state": "Vic",
                     "postalCode": "SW1A", "period": {"start": "1974-12-25"}, "country": "GB"}
    assert second["postalCode"] == "W6"


def test_organisations_keep_their_name_phone_and_address(corpus: Path, pseudo: Pseudonymiser) -> None:
    folder = corpus / "hl7-fhir-r4-examples-clinical" / "examples"
    organization = json.loads((folder / "Organization-f002.json").read_text())
    out = deidentify(organization, pseudo)
    for element in ("name", "telecom", "address"):
        assert out[element] == organization[element], element
    assert "text" not in out and out["id"] == pseudo.id("Organization", organization["id"])
    # a contact person at the organisation loses the name; the organisation's switchboard stays
    assert organization["contact"][0]["name"] and "name" not in out["contact"][0]
    assert out["contact"][0]["telecom"] == organization["contact"][0]["telecom"]


def test_reference_forms(pseudo: Pseudonymiser) -> None:
    contained_patient = {"resourceType": "Patient", "id": "p1", "name": [{"family": "Nobody"}],
                         "birthDate": "1990-01-02"}
    observation = {
        "resourceType": "Observation", "id": "o1", "status": "final", "code": {"text": "Weight"},
        "contained": [contained_patient], "subject": {"reference": "#p1", "display": "Nobody"},
        "basedOn": [{"reference": "https://other.example/fhir/ServiceRequest/sr-9"},
                    {"reference": "ServiceRequest/sr-9/_history/2"},
                    {"reference": "urn:uuid:0c3151bd-1cbf-4d64-b04d-cd9187a4c6e0", "type": "ServiceRequest"},
                    {"reference": "ServiceRequest?identifier=urn:oid:1.2|77"}],
        "performer": [{"display": "Dr Someone"}],
    }
    out = deidentify(observation, pseudo)
    sr = pseudo.id("ServiceRequest", "sr-9")
    assert out["basedOn"] == [{"reference": f"ServiceRequest/{sr}"}, {"reference": f"ServiceRequest/{sr}/_history/2"},
                              {"type": "ServiceRequest"},
                              {"extension": [{"url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason",
                                              "valueCode": "masked"}]}]
    assert out["subject"] == {"reference": "#p1"}
    assert out["performer"] == out["basedOn"][3:]  # a display-only reference says its target was masked
    # a contained resource keeps the id its container refers to, and loses the name like any other
    assert out["contained"] == [{"resourceType": "Patient", "id": "p1", "birthDate": "1990"}]
    validate_resource(out)


def test_meta_notes_and_free_text_extensions(examples: dict[str, dict[str, Any]], pseudo: Pseudonymiser) -> None:
    coded = {"url": "http://hl7.org/fhir/StructureDefinition/patient-religion", "valueCodeableConcept": {"coding": [
        {"system": "http://terminology.hl7.org/CodeSystem/v3-ReligiousAffiliation", "code": "1013",
         "display": "Christian (non-Catholic, non-specific)"}]}}
    patient = {
        "resourceType": "Patient", "id": "p2", "gender": "female",
        "meta": {"versionId": "3", "lastUpdated": "2024-05-01T10:00:00Z", "source": "https://gp.example/emis#9f2",
                 "security": [dict(PSEUDED)]},
        "extension": [coded,
                      {"url": "http://hl7.org/fhir/StructureDefinition/patient-mothersMaidenName",
                       "valueString": "Smith"},
                      {"url": "http://example.org/complex", "extension": [{"url": "alias", "valueString": "Smithy"}]},
                      {"url": "http://example.org/nickname", "valueHumanName": {"given": ["Smithy"]}}],
        "photo": [{"contentType": "image/jpeg", "data": "/9j/4AAQ"}],
    }
    out = deidentify(patient, pseudo)
    assert out["extension"] == [coded]
    assert out["meta"] == {"versionId": "3", "lastUpdated": "2024-05-01T10:00:00Z", "security": [PSEUDED]}
    assert deidentify(examples["Patient-example"], pseudo)["meta"] == {"security": [PSEUDED]}
    notes = [r for r in examples.values() if "note" in r]
    assert notes and all("note" not in deidentify(r, pseudo) for r in notes)
    # clinical terms are not free text about a person
    assert deidentify(examples["Condition-example"], pseudo)["code"] == examples["Condition-example"]["code"]


def test_bundle_entries_are_pseudonymised_as_resources(corpus: Path, pseudo: Pseudonymiser) -> None:
    folder = corpus / "hl7-fhir-r4-examples-clinical" / "examples"
    bundle = json.loads((folder / "Bundle-bundle-example.json").read_text())
    out = deidentify(bundle, pseudo)
    assert [e["resource"]["id"] for e in out["entry"]] == [pseudo.id("MedicationRequest", "3123"),
                                                           pseudo.id("Medication", "example")]
    assert not any("fullUrl" in e for e in out["entry"])  # it holds the real id
    assert all(PSEUDED in e["resource"]["meta"]["security"] for e in out["entry"])
    validate_resource(out)


@pytest.mark.parametrize("rtype, name, value", [
    ("Patient", "identifier", "https://fhir.nhs.uk/Id/nhs-number|9000000009"),
    ("Patient", "name", "Chalmers"),
    ("Patient", "address-postalcode", "SW1A"),
    ("Observation", "patient", "Patient/example"),
    ("Observation", "subject:Patient.name", "Chalmers"),
    ("Patient", "_has:Observation:patient:code", "1234-5"),
    ("Patient", "_id", "example"),
    ("Patient", "birthdate", "1974-12-25"),
    ("Observation", "_include", "Observation:patient"),
    ("Observation", "_revinclude", "Provenance:target"),
    ("Observation", "code:text", "weight"),
    ("Observation", "code:Patient.name", "Chalmers"),
    ("Observation", "subject.name", "Chalmers"),
    ("Observation", "_sort", "-date,_id"),
    ("Specimen", "accession", "X352356"),
    ("Observation", "no-such-parameter", "1"),
])
def test_analysts_may_not_search_by_what_singles_a_person_out(rtype: str, name: str, value: str) -> None:
    with pytest.raises(FhirError) as info:
        check_analyst_search(rtype, [("code", "http://loinc.org|29463-7"), ("_count", "10"), (name, value)]
                             if rtype == "Observation" else [("_count", "10"), (name, value)])
    assert info.value.status == 403
    assert [i.code for i in info.value.issues] == ["forbidden"]
    assert f"'{name}" in info.value.issues[0].diagnostics or f"'_sort={value}'" in info.value.issues[0].diagnostics


@pytest.mark.parametrize("rtype, params", [
    ("Observation", [("code", "http://loinc.org|29463-7"), ("status", "final"), ("date", "ge2020"),
                     ("value-quantity", "gt90|http://unitsofmeasure.org|kg"), ("_count", "50"), ("_sort", "-date,code"),
                     ("_lastUpdated", "ge2024-01-01"), ("category:not", "laboratory"),
                     ("code:below", "http://snomed.info/sct|27113001"), ("_summary", "count")]),
    ("Patient", [("gender", "female"), ("active", "true"), ("deceased", "true"), ("_total", "accurate")]),
    ("RiskAssessment", [("probability", "gt0.8")]),
])
def test_analysts_may_search_by_codes_quantities_and_dates(rtype: str, params: list[tuple[str, str]]) -> None:
    check_analyst_search(rtype, params)


def test_the_first_refused_parameter_is_named() -> None:
    with pytest.raises(FhirError) as info:
        check_analyst_search("Observation", [("code", "x"), ("subject", "Patient/1"), ("identifier", "x")])
    assert "'subject'" in info.value.issues[0].diagnostics

"""The demo population must be loadable as-is into a strict FHIR R4 server, front to back."""
import copy
import functools
import json
import re
import time
from collections import Counter
from collections.abc import Iterator
from importlib import resources
from typing import Any

import pytest
from fhir.resources.R4B import get_fhir_model_class

from conformance.nhs_number import NHS_NUMBER_SYSTEM, is_valid_nhs_number
from fhir_server.demo import demo_resources

SEEDS = (2026, 1, 99)
RELATIVE_REFERENCE = re.compile(r"^([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})$")


@functools.cache
def _demo(seed: int = 2026) -> tuple[dict, ...]:
    return tuple(demo_resources(seed))


@functools.cache
def _bindings() -> dict[str, frozenset[str]]:
    """Required bindings of the R4 package: element path -> allowed codes (same file the server uses)."""
    text = (resources.files("conformance") / "data" / "required-code-bindings.json").read_text()
    return {path: frozenset(b["codes"]) for path, b in json.loads(text)["bindings"].items()}


@functools.cache
def _element_class(cls: type, json_name: str) -> type | None:
    """Model class of a complex element (e.g. Address, PatientContact); None for primitives."""
    for name, info in cls.model_fields.items():
        if (info.alias or name) == json_name:
            found = re.search(r"abc\.(\w+)Type\b", str(info.annotation))
            return get_fhir_model_class(found.group(1)) if found else None
    raise KeyError(f"{cls.__name__} has no element {json_name}")


def _binding_errors(node: dict[str, Any], cls: type, path: str) -> Iterator[str]:
    """Walk the JSON with the binding table's paths: backbone elements extend the path
    (`Consent.provision.type`), data types restart it (`Address.use` wherever an Address is)."""
    for key, value in node.items():
        if key == "resourceType":
            continue
        element = f"{path}.{key}"
        child = _element_class(cls, key)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, dict):
                assert child is not None, element
                if child is cls:  # recursive backbone, e.g. Consent.provision.provision
                    child_path = path
                elif child.__name__ == cls.__name__ + key[0].upper() + key[1:]:
                    child_path = element
                else:
                    child_path = child.__name__
                yield from _binding_errors(item, child, child_path)
            elif element in _bindings() and item not in _bindings()[element]:
                yield f"{element} = {item!r}"


def _resource_binding_errors(resource: dict[str, Any]) -> list[str]:
    rtype = resource["resourceType"]
    return [f"{rtype}/{resource['id']}: {e}"
            for e in _binding_errors(resource, get_fhir_model_class(rtype), rtype)]


def _references(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str):
                yield value
            else:
                yield from _references(value)
    elif isinstance(node, list):
        for item in node:
            yield from _references(item)


def _codes(concept: dict[str, Any]) -> set[tuple[str, str]]:
    return {(c.get("system"), c.get("code")) for c in concept.get("coding", [])}


@pytest.mark.parametrize("seed", SEEDS)
def test_every_resource_validates_against_its_model(seed: int) -> None:
    for resource in _demo(seed):
        get_fhir_model_class(resource["resourceType"]).model_validate(resource)


@pytest.mark.parametrize("seed", SEEDS)
def test_coded_elements_use_required_binding_codes(seed: int) -> None:
    errors = [e for resource in _demo(seed) for e in _resource_binding_errors(resource)]
    assert errors == []


def test_binding_checker_finds_bad_codes_in_data_types_and_backbones() -> None:
    """Guards the checker: a walk that silently skipped data types would pass anything."""
    by_type = {r["resourceType"]: r for r in _demo()}
    patient = copy.deepcopy(by_type["Patient"])
    patient["address"][0]["use"] = "holiday"
    patient["telecom"][0]["system"] = "pigeon"
    consent = copy.deepcopy(by_type["Consent"])
    consent["provision"]["provision"] = [{"type": "maybe"}]
    statement = copy.deepcopy(next(r for r in _demo() if r["resourceType"] == "MedicationStatement"
                                   and "timing" in r["dosage"][0]))
    statement["dosage"][0]["timing"]["repeat"]["periodUnit"] = "fortnight"
    found = [e.split(": ", 1)[1] for r in (patient, consent, statement)
             for e in _resource_binding_errors(r)]
    assert sorted(found) == ["Address.use = 'holiday'", "Consent.provision.type = 'maybe'",
                             "ContactPoint.system = 'pigeon'", "Timing.repeat.periodUnit = 'fortnight'"]


@pytest.mark.parametrize("seed", SEEDS)
def test_ids_are_unique_per_type(seed: int) -> None:
    keys = Counter((r["resourceType"], r["id"]) for r in _demo(seed))
    assert [k for k, n in keys.items() if n > 1] == []
    assert all(RELATIVE_REFERENCE.match(f"{t}/{i}") for t, i in keys)


@pytest.mark.parametrize("seed", SEEDS)
def test_every_reference_points_to_an_earlier_resource(seed: int) -> None:
    seen: set[str] = set()
    for resource in _demo(seed):
        for reference in _references(resource):
            assert RELATIVE_REFERENCE.match(reference), reference
            assert reference in seen, f"{resource['resourceType']}/{resource['id']} -> {reference}"
        seen.add(f"{resource['resourceType']}/{resource['id']}")


@pytest.mark.parametrize("seed", SEEDS)
def test_every_patient_has_a_valid_test_range_nhs_number(seed: int) -> None:
    numbers = []
    for patient in (r for r in _demo(seed) if r["resourceType"] == "Patient"):
        values = [i["value"] for i in patient["identifier"] if i["system"] == NHS_NUMBER_SYSTEM]
        assert len(values) == 1, patient["id"]
        assert is_valid_nhs_number(values[0]), values[0]
        assert values[0].startswith("999"), values[0]  # NHS test range: never a real person
        numbers.append(values[0])
    assert len(numbers) == len(set(numbers))


def test_generation_is_deterministic() -> None:
    assert demo_resources() == demo_resources()
    assert demo_resources(7) == demo_resources(7)
    assert demo_resources(7) != demo_resources(8)


def test_generation_is_fast() -> None:
    start = time.perf_counter()
    demo_resources()
    assert time.perf_counter() - start < 1.0


def test_counts() -> None:
    counts = Counter(r["resourceType"] for r in _demo())
    assert counts["Patient"] >= 45
    assert 200 <= sum(counts.values()) <= 1000
    for rtype in ("Organization", "Practitioner", "PractitionerRole", "RelatedPerson", "CareTeam",
                  "CarePlan", "Encounter", "Condition", "Observation", "AllergyIntolerance",
                  "MedicationStatement", "Appointment"):
        assert counts[rtype] > 0, rtype


@pytest.mark.parametrize("seed", SEEDS)
def test_consents(seed: int) -> None:
    consents = [r for r in _demo(seed) if r["resourceType"] == "Consent"]
    optout = ("http://terminology.hl7.org/CodeSystem/v3-ActCode", "OPTOUT")
    optin = ("http://terminology.hl7.org/CodeSystem/v3-ActCode", "OPTIN")
    for consent in consents:
        assert _codes(consent["scope"]) == {
            ("http://terminology.hl7.org/CodeSystem/consentscope", "patient-privacy")}
        assert ("http://loinc.org", "59284-0") in _codes(consent["category"][0])
    opt_outs = [c for c in consents
                if optout in _codes(c["policyRule"]) and c["provision"]["type"] == "deny"]
    opt_ins = [c for c in consents
               if optin in _codes(c["policyRule"]) and c["provision"]["type"] == "permit"]
    ndop = [c for c in consents
            if any(("http://snomed.info/sct", "827241000000103") in _codes(cat)
                   for cat in c["category"])]
    assert len(opt_outs) >= 3
    assert len(ndop) == 1 and ndop[0] in opt_outs
    patients = {r["id"] for r in _demo(seed) if r["resourceType"] == "Patient"}
    assert len(opt_ins) > len(patients) / 2
    assert {c["patient"]["reference"].split("/")[1] for c in consents} == patients


def test_care_teams_span_several_organisations() -> None:
    roles = {r["id"]: r for r in _demo() if r["resourceType"] == "PractitionerRole"}
    for team in (r for r in _demo() if r["resourceType"] == "CareTeam"):
        orgs = set()
        for participant in team["participant"]:
            rtype, rid = participant["member"]["reference"].split("/")
            if rtype == "PractitionerRole":
                orgs.add(roles[rid]["organization"]["reference"])
            elif "onBehalfOf" in participant:
                orgs.add(participant["onBehalfOf"]["reference"])
            if "onBehalfOf" in participant:
                assert rtype == "Practitioner"  # R4 invariant ctm-1
        assert len(orgs) >= 2, team["id"]

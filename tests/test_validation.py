"""Unit tests of conformance.validation: structure, R4 required bindings, and the R4B-vs-R4 gaps."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from conformance.validation import required_bindings, supported_resource_types, validate_resource
from fhir_server.outcome import FhirError


def fails(resource: dict[str, Any]) -> FhirError:
    with pytest.raises(FhirError) as info:
        validate_resource(resource)
    return info.value


def test_required_bindings_shipped() -> None:
    bindings = required_bindings()
    assert len(bindings) > 300
    assert bindings["Patient.gender"] == {"male", "female", "other", "unknown"}


@pytest.mark.parametrize("resource, expression", [
    ({"resourceType": "Patient", "gender": "bogus"}, "Patient.gender"),
    ({"resourceType": "Patient", "telecom": [{"system": "pager2", "value": "1"}]}, "Patient.telecom[0].system"),
    ({"resourceType": "CarePlan", "status": "sleeping", "intent": "plan", "subject": {"reference": "Patient/1"}},
     "CarePlan.status"),
    ({"resourceType": "Consent", "status": "active", "scope": {"text": "x"}, "category": [{"text": "x"}],
      "provision": {"type": "deny", "provision": [{"type": "maybe"}]}}, "Consent.provision.provision[0].type"),
    ({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
      "valueQuantity": {"value": 1, "comparator": "~"}}, "Observation.valueQuantity.comparator"),
])
def test_required_binding_violations_are_422_with_expression(resource: dict[str, Any], expression: str) -> None:
    err = fails(resource)
    assert err.status == 422
    assert [i.expression for i in err.issues] == [expression]
    assert err.issues[0].code == "code-invalid"


def test_valid_codes_pass() -> None:
    validate_resource({"resourceType": "Consent", "status": "active", "scope": {"text": "x"},
                       "category": [{"text": "x"}], "provision": {"type": "deny", "provision": [{"type": "permit"}]}})


def test_structure_errors_are_400_and_name_elements() -> None:
    err = fails({"resourceType": "Patient", "birthDate": "2020-02-30x", "name": [{"given": "Ada"}], "colour": 1})
    assert err.status == 400
    assert {i.expression for i in err.issues} == {"Patient.birthDate", "Patient.name[0].given", "Patient.colour"}


def test_r4_id_length_is_64() -> None:
    validate_resource({"resourceType": "Patient", "id": "a" * 64})
    assert fails({"resourceType": "Patient", "id": "a" * 65}).status == 400


def test_r4_extension_forms_the_r4b_model_lacks_are_accepted() -> None:
    validate_resource({"resourceType": "Patient", "extension": [
        {"url": "http://example.org/a", "valueString": "x",
         "_valueString": {"extension": [{"url": "http://example.org/t", "valueString": "y"}]}},
        {"url": "http://example.org/b", "valueMeta": {"versionId": "1"}},
        {"url": "http://example.org/c", "valueUuid": "urn:uuid:123e4567-e89b-12d3-a456-426614174000"},
    ]})


@pytest.mark.parametrize("extension", [
    {"url": "http://example.org/a", "valueCodeableReference": {"concept": {"text": "x"}}},
    {"url": "http://example.org/a", "valueRatioRange": {}},
    {"url": "http://example.org/a", "valueUuid": "123e4567-e89b-12d3-a456-426614174000"},
    {"url": "http://example.org/a", "valueMeta": {"versionId": ["not", "a", "string"]}},
])
def test_r4b_only_or_malformed_extension_values_are_rejected(extension: dict[str, Any]) -> None:
    assert fails({"resourceType": "Patient", "modifierExtension": [extension]}).status == 400


@pytest.mark.parametrize("nested", ["MedicinalProduct", "Citation", "Evidence"])
def test_nested_resources_must_be_supported_r4_types(nested: str) -> None:
    err = fails({"resourceType": "Patient", "contained": [{"resourceType": nested, "id": "c1"}]})
    assert err.status == 400 and err.issues[0].expression == "Patient.contained[0]"


def test_unsupported_type_is_404() -> None:
    assert fails({"resourceType": "MedicinalProduct"}).status == 404
    assert "Evidence" not in supported_resource_types() and "Patient" in supported_resource_types()


def test_all_corpus_examples_of_supported_types_validate(corpus: Path) -> None:
    """Every official example of a supported type passes, but one that is invalid in R4 itself."""
    failures = set()
    for path in sorted((corpus / "hl7-fhir-r4-examples-clinical" / "examples").glob("*.json")):
        resource = json.loads(path.read_text())
        if resource["resourceType"] not in supported_resource_types():
            continue
        try:
            validate_resource(resource)
        except FhirError:
            failures.add(path.name)
    # Questionnaire-qs1 leaves out Questionnaire.item.linkId, which R4 requires (1..1).
    assert failures == {"Questionnaire-qs1.json"}


def test_bindings_inside_nested_elements_of_data_types() -> None:
    """Timing.repeat is an element of the Timing data type, not a type of its own."""
    err = fails({"resourceType": "MedicationStatement", "status": "active", "subject": {"reference": "Patient/1"},
                 "medicationCodeableConcept": {"text": "x"},
                 "dosage": [{"timing": {"repeat": {"frequency": 1, "period": 1, "periodUnit": "fortnight"}}}]})
    assert err.status == 422
    assert err.issues[0].expression == "MedicationStatement.dosage[0].timing.repeat.periodUnit"

"""$validate end to end, through the ASGI app and a real uvicorn, on SQLite and PostgreSQL.

R4 Resource-validate: 200 with an OperationOutcome whenever validation ran, valid or not; a 4xx only
when it could not run. The issues are those the write itself would report.
"""
from __future__ import annotations

import uuid
from typing import Any

import pytest

NHS = "https://fhir.nhs.uk/Id/nhs-number"
UK_CORE_PATIENT = "https://fhir.hl7.org.uk/StructureDefinition/UKCore-Patient"


def patient(nhs: str = "9434765919", **extra: Any) -> dict[str, Any]:
    return {"resourceType": "Patient", "identifier": [{"system": NHS, "value": nhs}],
            "name": [{"family": "Okafor"}], **extra}


def parameters(resource: dict[str, Any] | None = None, **primitives: str) -> dict[str, Any]:
    params: list[dict[str, Any]] = [{"name": k, "valueCode" if k == "mode" else "valueUri": v}
                                    for k, v in primitives.items()]
    if resource is not None:
        params.append({"name": "resource", "resource": resource})
    return {"resourceType": "Parameters", "parameter": params}


def outcome(resp) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    """The issues of a 200 $validate answer."""
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["resourceType"] == "OperationOutcome"
    return body["issue"]


def no_issues(resp) -> bool:  # type: ignore[no-untyped-def]
    issues = outcome(resp)
    return len(issues) == 1 and issues[0]["severity"] == "information"


def test_valid_resource_has_one_informational_issue(api) -> None:  # type: ignore[no-untyped-def]
    assert no_issues(api.post("Patient/$validate", json=patient()))
    assert no_issues(api.post("Patient/$validate", json=parameters(patient(), mode="create",
                                                                   profile=UK_CORE_PATIENT)))


def test_every_issue_is_listed_as_the_write_reports_it(api) -> None:  # type: ignore[no-untyped-def]
    body = patient("9434765918", gender="bogus", telecom=[{"system": "pager2", "value": "1"}])
    issues = outcome(api.post("Patient/$validate", json=body))
    assert [i["expression"] for i in issues] == [["Patient.gender"], ["Patient.telecom[0].system"],
                                                 ["Patient.identifier[0].value"]]
    assert all(i["severity"] == "error" for i in issues)
    write = api.post("Patient", json=body)
    assert write.status_code == 422 and write.json()["issue"] == issues
    # structure errors stop the binding check, but not the profile rules
    broken = patient("943476591", birthDate="1970-13-45", colour="blue")
    issues = outcome(api.post("Patient/$validate", json=broken))
    assert {i["expression"][0] for i in issues} == {"Patient.birthDate", "Patient.colour",
                                                    "Patient.identifier[0].value"}
    write = api.post("Patient", json=broken)
    assert write.status_code == 400 and write.json()["issue"] == issues


@pytest.mark.parametrize("value, words", [
    ("9434765918", "check digit"),
    ("943476591", "exactly 10 digits, not 9"),
    ("943 476 5919", "digits 0-9"),
    ("9434765035", "would be 10"),
])
def test_bad_nhs_number_is_explained(api, value: str, words: str) -> None:  # type: ignore[no-untyped-def]
    [issue] = outcome(api.post("Patient/$validate", json=patient(value)))
    assert issue["expression"] == ["Patient.identifier[0].value"] and issue["code"] == "value"
    assert words in issue["diagnostics"]
    assert value not in issue["diagnostics"]  # a personal identifier stays out of error messages


def test_validating_stores_nothing(api) -> None:  # type: ignore[no-untyped-def]
    family = f"Val{uuid.uuid4().hex[:10]}"
    assert no_issues(api.post("Patient/$validate", json=patient(name=[{"family": family}])))
    assert api.get("Patient", params={"family": family}).json()["total"] == 0


def test_mode_delete(api) -> None:  # type: ignore[no-untyped-def]
    rid = f"val-{uuid.uuid4().hex[:12]}"
    [missing] = outcome(api.post(f"Patient/{rid}/$validate", json=parameters(mode="delete")))
    assert missing["severity"] == "error" and missing["code"] == "not-found" and rid in missing["diagnostics"]
    [missing_too] = outcome(api.post(f"Patient/{rid}/$validate?mode=delete"))  # no body at all
    assert missing_too["code"] == "not-found"
    api.put(f"Patient/{rid}", json=patient(id=rid)).raise_for_status()
    assert no_issues(api.post(f"Patient/{rid}/$validate", json=parameters(mode="delete")))
    assert api.get(f"Patient/{rid}").status_code == 200  # still there


def test_mode_update(api) -> None:  # type: ignore[no-untyped-def]
    rid = f"val-{uuid.uuid4().hex[:12]}"
    [create] = outcome(api.post(f"Patient/{rid}/$validate", json=parameters(patient(id=rid), mode="update")))
    assert create["severity"] == "information" and "would create" in create["diagnostics"]
    api.put(f"Patient/{rid}", json=patient(id=rid)).raise_for_status()
    assert no_issues(api.post(f"Patient/{rid}/$validate?mode=update", json=patient(id=rid)))
    [wrong_id] = outcome(api.post(f"Patient/{rid}/$validate?mode=update", json=patient(id="someone-else")))
    assert wrong_id["severity"] == "error" and wrong_id["expression"] == ["Patient.id"]
    assert api.put(f"Patient/{rid}", json=patient(id="someone-else")).json()["issue"] == [wrong_id]


def test_get_validates_the_stored_resource(api) -> None:  # type: ignore[no-untyped-def]
    rid = f"val-{uuid.uuid4().hex[:12]}"
    assert api.get(f"Patient/{rid}/$validate").status_code == 404
    api.put(f"Patient/{rid}", json=patient(id=rid)).raise_for_status()
    assert no_issues(api.get(f"Patient/{rid}/$validate"))
    assert no_issues(api.get(f"Patient/{rid}/$validate", params={"mode": "update"}))
    assert api.delete(f"Patient/{rid}").status_code == 204
    assert api.get(f"Patient/{rid}/$validate").status_code == 410


@pytest.mark.parametrize("path, body, why", [
    ("Patient/$validate", b"{not json", "not valid JSON"),
    ("Patient/$validate", b'{"resourceType": "Observation", "status": "final", "code": {"text": "x"}}',
     "resourceType"),
    ("Patient/$validate", b'{"resourceType": "Parameters", "parameter": [{"name": "mode", "valueCode": "create"}]}',
     "needs a resource"),
    ("Patient/$validate?mode=update", b'{"resourceType": "Patient"}', "[id]/$validate"),
    ("Patient/x/$validate?mode=upsert", b'{"resourceType": "Patient", "id": "x"}', "'upsert'"),
    ("Patient/$validate?profile=http://example.org/StructureDefinition/Mine", b'{"resourceType": "Patient"}',
     "not known"),
])
def test_what_cannot_be_validated_is_400(api, path: str, body: bytes, why: str) -> None:  # type: ignore[no-untyped-def]
    resp = api.post(path, content=body, headers={"Content-Type": "application/fhir+json"})
    assert resp.status_code == 400, resp.text
    assert why in resp.json()["issue"][0]["diagnostics"]


def test_capability_statement_lists_validate(api) -> None:  # type: ignore[no-untyped-def]
    patient_entry = next(r for r in api.get("metadata").json()["rest"][0]["resource"] if r["type"] == "Patient")
    assert {"name": "validate", "definition": "http://hl7.org/fhir/OperationDefinition/Resource-validate"} \
        in patient_entry["operation"]

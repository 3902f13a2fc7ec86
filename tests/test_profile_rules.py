"""Profile rules (conformance/profiles.py) on every write: a Patient's NHS number must be 10 digits with
a valid Modulus 11 check digit, or the write is a 422 naming the element, and nothing is stored."""
from __future__ import annotations

import uuid
from typing import Any

import pytest
import sqlalchemy as sa

from conformance.profiles import profile_issues
from conformance.validation import validate_resource
from fhir_server.demo import demo_resources
from fhir_server.outcome import FhirError
from fhir_server.service.interactions import FhirService
from fhir_server.storage.repository import Store

NHS = "https://fhir.nhs.uk/Id/nhs-number"
VALID, WRONG_CHECK_DIGIT = "9434765919", "9434765918"
PATCH_CT = {"Content-Type": "application/json-patch+json"}


def patient(nhs: str, **extra: Any) -> dict[str, Any]:
    return {"resourceType": "Patient", "name": [{"family": "Okafor"}],
            "identifier": [{"system": "urn:other", "value": "X"}, {"system": NHS, "value": nhs}], **extra}


def assert_refused(resp, what: str = "check digit") -> None:  # type: ignore[no-untyped-def]
    assert resp.status_code == 422, resp.text
    [issue] = resp.json()["issue"]
    assert issue["expression"] == ["Patient.identifier[1].value"]
    assert what in issue["diagnostics"]


def stored_with_family(api, family: str) -> int:  # type: ignore[no-untyped-def]
    return int(api.get("Patient", params={"family": family}).json()["total"])


def test_create_and_conditional_create(api) -> None:  # type: ignore[no-untyped-def]
    family = f"Nhs{uuid.uuid4().hex[:10]}"
    assert_refused(api.post("Patient", json=patient(WRONG_CHECK_DIGIT, name=[{"family": family}])))
    assert_refused(api.post("Patient", json=patient("94347659", name=[{"family": family}])), "not 8")
    assert_refused(api.post("Patient", json=patient(WRONG_CHECK_DIGIT, name=[{"family": family}]),
                            headers={"If-None-Exist": f"family={family}"}))
    assert stored_with_family(api, family) == 0
    assert api.post("Patient", json=patient(VALID, name=[{"family": family}])).status_code == 201


def test_update_and_conditional_update(api) -> None:  # type: ignore[no-untyped-def]
    rid = f"nhs-{uuid.uuid4().hex[:12]}"
    assert_refused(api.put(f"Patient/{rid}", json=patient(WRONG_CHECK_DIGIT, id=rid)))
    assert api.get(f"Patient/{rid}").status_code == 404  # no update-as-create happened
    assert api.put(f"Patient/{rid}", json=patient(VALID, id=rid)).status_code == 201
    assert_refused(api.put(f"Patient/{rid}", json=patient("943476591X", id=rid)), "digits 0-9")
    assert_refused(api.put("Patient", params={"_id": rid}, json=patient(WRONG_CHECK_DIGIT)))
    current = api.get(f"Patient/{rid}").json()
    assert current["meta"]["versionId"] == "1" and current["identifier"][1]["value"] == VALID


def test_patch_and_conditional_patch(api) -> None:  # type: ignore[no-untyped-def]
    rid = f"nhs-{uuid.uuid4().hex[:12]}"
    api.put(f"Patient/{rid}", json=patient(VALID, id=rid)).raise_for_status()
    bad = [{"op": "replace", "path": "/identifier/1/value", "value": WRONG_CHECK_DIGIT}]
    assert_refused(api.patch(f"Patient/{rid}", json=bad, headers=PATCH_CT))
    assert_refused(api.patch("Patient", params={"_id": rid}, json=bad, headers=PATCH_CT))
    assert api.get(f"Patient/{rid}").json()["meta"]["versionId"] == "1"


def test_other_systems_and_types_are_not_checked(api) -> None:  # type: ignore[no-untyped-def]
    other = {"resourceType": "Patient", "identifier": [{"system": "urn:other", "value": WRONG_CHECK_DIGIT}]}
    assert api.post("Patient", json=other).status_code == 201
    # an NHS number in a logical reference is the referring system's claim, not a Patient record
    obs = {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
           "subject": {"identifier": {"system": NHS, "value": WRONG_CHECK_DIGIT}}}
    assert api.post("Observation", json=obs).status_code == 201


def test_bulk_put_refuses_the_whole_batch(engine: sa.Engine) -> None:
    service = FhirService(Store(engine))
    ids = [f"nhs-{uuid.uuid4().hex[:12]}" for _ in range(2)]
    batch = [patient(VALID, id=ids[0]), patient(WRONG_CHECK_DIGIT, id=ids[1])]
    for validate in (True, False):  # the fast path without structure validation still checks NHS numbers
        with pytest.raises(FhirError) as info:
            service.bulk_put(batch, validate=validate)
        assert info.value.status == 422
        assert [i.expression for i in info.value.issues] == ["Patient.identifier[1].value"]
    with engine.connect() as conn:
        found = conn.execute(sa.text("SELECT count(*) FROM resource WHERE id IN (:a, :b)"),
                             {"a": ids[0], "b": ids[1]}).scalar_one()
    assert found == 0


def test_rules_report_every_identifier_and_a_missing_value() -> None:
    issues = profile_issues({"resourceType": "Patient", "identifier": [
        {"system": NHS, "value": VALID}, {"system": NHS, "value": "123"}, {"system": NHS},
        {"system": NHS, "value": 9434765918},  # not a string: the structure check's to report
        "not an identifier"]})
    assert [(i.code, i.expression) for i in issues] == [("value", "Patient.identifier[1].value"),
                                                        ("required", "Patient.identifier[2].value")]
    with pytest.raises(FhirError) as info:
        validate_resource({"resourceType": "Patient", "identifier": [{"system": NHS, "value": 9434765918}]})
    assert info.value.status == 400 and len(info.value.issues) == 1


@pytest.mark.parametrize("seed", (2026, 1))
def test_demo_population_passes_the_rules(seed: int) -> None:
    assert [i for r in demo_resources(seed) for i in profile_issues(r)] == []

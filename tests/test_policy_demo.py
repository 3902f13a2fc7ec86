"""The demo population under the access policy: what its demo users see (in-process, both databases)."""
from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import Engine

from conformance.validation import supported_resource_types
from consent.facts import custodian_of
from consent.policy import PolicyDecisionPoint
from fhir_server.auth.demo import DEMO_USERS
from fhir_server.auth.principal import principal_from_claims
from fhir_server.demo import demo_resources
from fhir_server.service.interactions import FhirService
from fhir_server.storage.engine import create_engine
from fhir_server.storage.repository import Store
from conftest import Backends


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def demo(request: pytest.FixtureRequest, backends: Backends) -> tuple[FhirService, PolicyDecisionPoint, list[dict[str, Any]]]:
    engine: Engine = create_engine(backends.fresh_url(str(request.param)))
    service = FhirService(Store(engine))
    resources = demo_resources()
    service.bulk_put(resources)
    return service, PolicyDecisionPoint(service, frozenset(supported_resource_types())), resources


def visible(demo: tuple[FhirService, PolicyDecisionPoint, list[dict[str, Any]]], user: str, rtype: str) -> set[str]:
    service, pdp, _ = demo
    roles, fhir_user, org, patient = DEMO_USERS[user]
    claims = {"iss": "demo", "sub": user, "scope": "user/*.rs", "roles": list(roles), "fhirUser": fhir_user,
              "organization": org, "patient": patient}
    policy = pdp.for_principal(principal_from_claims({k: v for k, v in claims.items() if v}), "")
    page, found, _, _ = service.restricted(policy).search((rtype,), [], strict=True, base_url="", count=1000,
                                                          cursor=None, want_total=True)
    assert page.total == len(found)
    return {v.id for v in found}


def test_demo_gp_sees_their_practice_and_care_teams(demo: Any) -> None:
    resources = demo[2]
    practice = "Organization/org-e85990"
    registered = {r["id"] for r in resources if r["resourceType"] == "Patient"
                  and {"reference": practice} in [{"reference": g["reference"]} for g in r.get("generalPractitioner", [])]}
    in_teams = {r["subject"]["reference"].split("/")[1] for r in resources if r["resourceType"] == "CareTeam"
                and r["status"] == "active" and any(p.get("member", {}).get("reference") in
                                                     ("Practitioner/prac-001", practice) for p in r["participant"])}
    seen = visible(demo, "clinician", "Patient")
    assert registered and registered <= seen
    assert seen <= registered | in_teams
    opted_out = {r["patient"]["reference"].split("/")[1] for r in resources if r["resourceType"] == "Consent"
                 and r["policyRule"]["coding"][0]["code"] == "OPTOUT" and "purpose" not in r["provision"]}
    observations = visible(demo, "clinician", "Observation")
    for r in resources:
        if r["resourceType"] == "Observation" and r["id"] in observations:
            pid = r["subject"]["reference"].split("/")[1]
            assert pid in seen
            if pid in opted_out:
                assert custodian_of(r) == practice


def test_demo_roles(demo: Any) -> None:
    resources = demo[2]
    everyone = {r["id"] for r in resources if r["resourceType"] == "Patient"}
    assert visible(demo, "patient", "Patient") == {"pat-001"}
    assert visible(demo, "support", "Patient") <= everyone and visible(demo, "support", "Patient")
    analyst_sees = visible(demo, "analyst", "Patient")
    ndop = [r for r in resources if r["resourceType"] == "Consent"
            and any(c.get("code") == "827241000000103" for cat in r["category"] for c in cat["coding"])]
    assert len(analyst_sees) == len(everyone) - len(ndop) and not analyst_sees & everyone
    assert visible(demo, "ig-officer", "Consent") == {r["id"] for r in resources if r["resourceType"] == "Consent"}

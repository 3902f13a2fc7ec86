"""The official R4 examples of the first-class types: accepted on create, read back equal apart from meta."""
from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

FIRST_CLASS = ["Patient", "Practitioner", "PractitionerRole", "Organization", "RelatedPerson", "Encounter",
               "CareTeam", "CarePlan", "Consent", "Observation", "Condition", "AllergyIntolerance",
               "MedicationStatement", "Appointment", "AuditEvent", "Provenance"]
SERVER_META = ("versionId", "lastUpdated")


def by_value(text: str) -> dict[str, Any]:
    """Parse with exact decimals: PostgreSQL JSONB writes 1E-22 as 0.0000000000000000000001 (same value)."""
    return json.loads(text, parse_float=Decimal, parse_int=Decimal)


def examples(corpus: Path) -> list[Path]:
    folder = corpus / "hl7-fhir-r4-examples-clinical" / "examples"
    return sorted(p for t in FIRST_CLASS for p in folder.glob(f"{t}-*.json"))


def without_server_fields(resource: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in resource.items() if k not in ("id", "meta")}
    meta = {k: v for k, v in (resource.get("meta") or {}).items() if k not in SERVER_META}
    if meta:
        out["meta"] = meta
    return out


def test_every_first_class_example_round_trips(asgi_client, corpus: Path) -> None:  # type: ignore[no-untyped-def]
    files = examples(corpus)
    assert len(files) >= 190, "the corpus holds 195 first-class examples"
    types_seen = set()
    failures = []
    for path in files:
        text = path.read_text()
        original = json.loads(text)
        created = asgi_client.post(original["resourceType"], content=text,
                                   headers={"Content-Type": "application/fhir+json"})
        if created.status_code != 201:
            failures.append(f"{path.name}: {created.status_code} {created.text[:300]}")
            continue
        read = by_value(asgi_client.get(f"{original['resourceType']}/{created.json()['id']}").text)
        if without_server_fields(read) != without_server_fields(by_value(text)):
            failures.append(f"{path.name}: read back differs")
        types_seen.add(original["resourceType"])
    assert not failures, "\n".join(failures)
    assert types_seen == set(FIRST_CLASS)


@pytest.mark.parametrize("rtype", ["Patient", "CarePlan", "Observation"])
def test_examples_keep_their_ids_with_put(asgi_client, corpus: Path, rtype: str) -> None:  # type: ignore[no-untyped-def]
    for path in [p for p in examples(corpus) if p.name.startswith(f"{rtype}-")][:5]:
        original = json.loads(path.read_text())
        resp = asgi_client.put(f"{rtype}/{original['id']}", json=original)
        assert resp.status_code in (200, 201), resp.text
        assert without_server_fields(resp.json()) == without_server_fields(original)

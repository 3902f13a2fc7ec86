"""`carebroker load`: the Synthea Bulk Data sample with its conditional references, and rejects kept
for replay; run as the real command on fresh SQLite and PostgreSQL databases."""
from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from fhir_server.api.http import create_app
from fhir_server.storage.engine import create_engine
from fhir_server.storage.schema import resource_version

from conftest import AUTH, app_settings


def run_load(url: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fhir_server.cli", "load", "--database", url, "--quiet",
                           *map(str, args)], capture_output=True, text=True, timeout=600)


@pytest.fixture
def fresh(backends, backend: str):  # type: ignore[no-untyped-def]
    url = backends.fresh_url(backend)
    engine = create_engine(url)
    client = TestClient(create_app(app_settings(), engine), base_url="http://testserver/fhir/", headers=AUTH)
    yield url, engine, client
    engine.dispose()


def versions(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(resource_version)).scalar_one())


def test_loads_the_synthea_sample_completely(fresh, corpus: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url, engine, client = fresh
    folder = corpus / "synthea-bulk-10-patients" / "ndjson"
    expected: Counter[str] = Counter()
    conditional = 0
    for path in folder.glob("*.ndjson"):
        for line in path.read_text().splitlines():
            res = json.loads(line)
            if "resourceType" in res:
                expected[res["resourceType"]] += 1
                conditional += line.count('?identifier=')
    assert conditional > 7000  # the sample really leans on conditional references

    done = run_load(url, folder, "--rejects", tmp_path / "rejects")
    assert done.returncode == 0, done.stderr
    assert "skipped" in done.stderr and "log.ndjson" in done.stderr
    for rtype, n in expected.items():
        assert client.get(rtype, params={"_summary": "count"}).json()["total"] == n, rtype
    with engine.connect() as conn:
        contents = conn.execute(sa.select(resource_version.c.content)).scalars().all()
    assert len(contents) == sum(expected.values())
    assert not [c for c in contents if "?identifier=" in c]  # every conditional reference was resolved
    # ... to the right resource: an Encounter's practitioner is found by its NPI
    enc = next(json.loads(line) for line in (folder / "Encounter.000.ndjson").read_text().splitlines())
    npi_ref = enc["participant"][0]["individual"]["reference"]
    practitioner = client.get("Practitioner", params={"identifier": npi_ref.split("identifier=", 1)[1]}).json()
    prac_id = practitioner["entry"][0]["resource"]["id"]
    stored = client.get(f"Encounter/{enc['id']}").json()
    assert stored["participant"][0]["individual"]["reference"] == f"Practitioner/{prac_id}"
    found = client.get("Encounter", params={"participant": f"Practitioner/{prac_id}", "_count": 1000}).json()
    assert enc["id"] in {e["resource"]["id"] for e in found["entry"]}

    before = versions(engine)
    again = run_load(url, folder)
    assert again.returncode == 0, again.stderr
    assert versions(engine) == before  # loading the same data again changes nothing


def test_rejects_are_kept_for_replay(fresh, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url, engine, client = fresh
    data = tmp_path / "in"
    data.mkdir()
    good = {"resourceType": "Patient", "id": "ld-good", "gender": "female"}
    bad_code = {"resourceType": "Patient", "id": "ld-bad", "gender": "bogus"}
    dangling = {"resourceType": "Encounter", "id": "ld-enc", "status": "finished",
                "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
                "subject": {"reference": "Patient?identifier=urn:nobody|0"}}
    no_id = {"resourceType": "Patient", "name": [{"family": "Adeyemi"}]}
    lines = [json.dumps(good), "{not json", json.dumps(bad_code), json.dumps(dangling), json.dumps(no_id)]
    (data / "mixed.ndjson").write_text("\n".join(lines) + "\n")
    transaction = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:9d1c7c6e-1b7a-4e52-9a57-3c1d61f1e001",
         "resource": {"resourceType": "Patient", "identifier": [{"system": "urn:ld", "value": "tx"}]},
         "request": {"method": "POST", "url": "Patient"}},
        {"resource": {"resourceType": "Encounter", "status": "planned",
                      "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
                      "subject": {"reference": "urn:uuid:9d1c7c6e-1b7a-4e52-9a57-3c1d61f1e001"}},
         "request": {"method": "POST", "url": "Encounter"}}]}
    (data / "tx.json").write_text(json.dumps(transaction))

    done = run_load(url, data, "--rejects", tmp_path / "rejects")
    assert done.returncode == 1, done.stderr
    rejected = (tmp_path / "rejects" / "rejected.ndjson").read_text().splitlines()
    assert sorted(rejected) == sorted([lines[1], lines[2], lines[3]])  # as read, ready to load again
    errors = [json.loads(x) for x in (tmp_path / "rejects" / "errors.ndjson").read_text().splitlines()]
    by_line = {e["line"]: e for e in errors}
    assert by_line[2]["status"] == 400 and "JSON" in by_line[2]["error"]
    assert by_line[3]["status"] == 422 and "gender" in by_line[3]["error"]
    assert by_line[4]["status"] == 404 and "Patient?identifier=urn:nobody|0" in by_line[4]["error"]
    assert client.get("Patient/ld-good").status_code == 200
    assert client.get("Patient/ld-bad").status_code == 404
    assert client.get("Patient", params={"family": "Adeyemi"}).json()["total"] == 1
    tx = client.get("Patient", params={"identifier": "urn:ld|tx"}).json()["entry"][0]["resource"]
    assert client.get("Encounter", params={"subject": f"Patient/{tx['id']}"}).json()["total"] == 1

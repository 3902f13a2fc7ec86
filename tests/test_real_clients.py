"""Real clients against a real server (uvicorn): a FHIR client library, and concurrent writers."""
from __future__ import annotations

import threading
import uuid

import httpx
import pytest
from fhirpy import SyncFHIRClient
from fhirpy.base.exceptions import ResourceNotFound

from conftest import AUTH


def test_fhirpy_crud(server_url: str) -> None:
    client = SyncFHIRClient(server_url, authorization=AUTH["Authorization"])
    patient = client.resource("Patient", name=[{"family": "Nwosu", "given": ["Chidi"]}], gender="male",
                              identifier=[{"system": "https://fhir.nhs.uk/Id/nhs-number", "value": "9434765919"}])
    patient.save()
    assert patient.id and patient["meta"]["versionId"] == "1"

    fetched = client.reference("Patient", patient.id).to_resource()
    assert fetched["name"][0]["family"] == "Nwosu"

    fetched["birthDate"] = "1961-07-30"
    fetched.save()
    assert fetched["meta"]["versionId"] == "2"
    assert client.reference("Patient", patient.id).to_resource()["birthDate"] == "1961-07-30"

    fetched.delete()
    with pytest.raises(ResourceNotFound):
        client.reference("Patient", patient.id).to_resource()
    assert httpx.get(f"{server_url}/Patient/{patient.id}", headers=AUTH).status_code == 410


def test_no_lost_update_under_concurrent_writers(server_url: str) -> None:
    """Writers race read-modify-write cycles guarded by If-Match; every write that was acknowledged
    survives in the final resource, and the version count equals the acknowledged writes."""
    pid = f"race-{uuid.uuid4().hex[:8]}"
    base = {"resourceType": "Patient", "id": pid, "identifier": []}
    assert httpx.put(f"{server_url}/Patient/{pid}", json=base, headers=AUTH).status_code == 201
    writers, rounds = 6, 8
    acknowledged: list[str] = []
    conflicts = [0]
    lock = threading.Lock()

    def writer(n: int) -> None:
        with httpx.Client(base_url=server_url, timeout=30, headers=AUTH) as http:
            done = 0
            while done < rounds:
                current = http.get(f"/Patient/{pid}")
                body = current.json()
                tag = f"w{n}-{done}"
                body["identifier"] = body.get("identifier", []) + [{"system": "urn:race", "value": tag}]
                resp = http.put(f"/Patient/{pid}", json=body, headers={"If-Match": current.headers["etag"]})
                if resp.status_code == 200:
                    with lock:
                        acknowledged.append(tag)
                    done += 1
                else:
                    assert resp.status_code == 412, resp.text
                    with lock:
                        conflicts[0] += 1

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    final = httpx.get(f"{server_url}/Patient/{pid}", headers=AUTH).json()
    assert sorted(i["value"] for i in final["identifier"]) == sorted(acknowledged)
    assert len(acknowledged) == writers * rounds
    assert final["meta"]["versionId"] == str(1 + writers * rounds)
    assert conflicts[0] > 0, "the writers never actually raced"


def test_concurrent_conditional_creates_make_one_resource(server_url: str) -> None:
    value = uuid.uuid4().hex
    header = {"If-None-Exist": f"identifier=urn:cc|{value}", **AUTH}
    body = {"resourceType": "Patient", "identifier": [{"system": "urn:cc", "value": value}]}
    statuses: list[int] = []
    ids: set[str] = set()
    barrier = threading.Barrier(8)

    def go() -> None:
        barrier.wait()
        resp = httpx.post(f"{server_url}/Patient", json=body, headers=header, timeout=30)
        statuses.append(resp.status_code)
        ids.add(resp.json()["id"])

    threads = [threading.Thread(target=go) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(statuses) == [200] * 7 + [201]
    assert len(ids) == 1

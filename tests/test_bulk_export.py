"""Bulk Data export ($export, IG v2) end to end over HTTP, on SQLite and PostgreSQL: kick-off, status,
manifest, files; scoping by _type, _since, Patient and Group; the snapshot at the transaction time;
errors; cancel; and a job that survives the death of the server running it."""
from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from fhir_server.api.http import create_app
from fhir_server.service.export import BulkExport
from fhir_server.service.interactions import FhirService
from fhir_server.service.timefmt import now_us
from fhir_server.storage.engine import create_engine, migrate
from fhir_server.storage.repository import Store
from fhir_server.storage.schema import export_chunk, export_job

from conftest import AUTH, TEST_ISSUER, app_settings

ASYNC = {"Prefer": "respond-async", "Accept": "application/fhir+json"}
NDJSON = "application/fhir+ndjson"

Client = httpx.Client | TestClient
Key = tuple[str, str]


def kick_off(client: Client, path: str, **params: str) -> str:
    """Start an export; its status URL."""
    resp = client.get(path, params=params, headers=ASYNC)
    assert resp.status_code == 202, resp.text
    assert resp.json()["resourceType"] == "OperationOutcome"
    return resp.headers["content-location"]


def wait_manifest(client: Client, status_url: str, timeout: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        resp = client.get(status_url)
        if resp.status_code == 200:
            assert resp.headers["content-type"].startswith("application/json")
            return resp.json()
        assert resp.status_code == 202, resp.text
        assert resp.headers["x-progress"] and resp.headers["retry-after"].isdigit()
        time.sleep(0.05)
    raise AssertionError(f"export not done within {timeout} s")


def download(client: Client, manifest: dict[str, Any]) -> dict[Key, dict[str, Any]]:
    """Every exported resource by (type, id); fails on a resource exported twice or a wrong count."""
    found: dict[Key, dict[str, Any]] = {}
    for out in manifest["output"]:
        resp = client.get(out["url"], headers={"Accept": NDJSON})
        assert resp.status_code == 200, resp.text
        assert resp.headers["content-type"] == NDJSON
        assert int(resp.headers["content-length"]) == len(resp.content)
        lines = resp.content.split(b"\n")
        assert lines.pop() == b"", "NDJSON ends with a newline"
        assert len(lines) == out["count"], out
        for line in lines:
            res = json.loads(line)
            key = (res["resourceType"], res["id"])
            assert res["resourceType"] == out["type"]
            assert key not in found, f"{key} exported twice"
            found[key] = res
    return found


def exported(progress: str) -> int:
    """How many resources an X-Progress says are done ("1200 resources exported; ...")."""
    return int(progress.split()[0]) if progress[:1].isdigit() else 0


def export(client: Client, path: str, **params: str) -> dict[Key, dict[str, Any]]:
    return download(client, wait_manifest(client, kick_off(client, path, **params)))


def stored(store: Store) -> dict[Key, dict[str, Any]]:
    """Every live resource in the database, as stored."""
    out = {}
    for rows in store.live_batches(1000):
        for _, content in rows:
            res = json.loads(content)
            out[(res["resourceType"], res["id"])] = res
    return out


def create(client: Client, resource: dict[str, Any]) -> dict[str, Any]:
    resp = client.post(resource["resourceType"], json=resource)
    assert resp.status_code == 201, resp.text
    return resp.json()


def patient(family: str = "Okafor") -> dict[str, Any]:
    return {"resourceType": "Patient", "name": [{"family": family}], "gender": "female"}


def observation(pid: str) -> dict[str, Any]:
    return {"resourceType": "Observation", "status": "final", "code": {"text": "pulse"},
            "subject": {"reference": f"Patient/{pid}"}, "valueQuantity": {"value": 72.50, "unit": "/min"}}


def population(n: int, tag: str) -> list[dict[str, Any]]:
    """n patients with two Observations and an Encounter each, and their GP practice."""
    out: list[dict[str, Any]] = [{"resourceType": "Organization", "id": f"{tag}-org", "name": "Elm Grove Surgery"}]
    for i in range(n):
        pid = f"{tag}-p{i}"
        out.append({"resourceType": "Patient", "id": pid, "name": [{"family": f"Family{i}", "given": ["Ann"]}],
                    "gender": "female", "birthDate": f"19{i % 100:02d}-01-01",
                    "generalPractitioner": [{"reference": f"Organization/{tag}-org"}]})
        for j in range(2):
            out.append({**observation(pid), "id": f"{pid}-o{j}", "valueQuantity": {"value": i + j / 10, "unit": "kg"}})
        out.append({"resourceType": "Encounter", "id": f"{pid}-e", "status": "finished",
                    "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
                    "subject": {"reference": f"Patient/{pid}"}})
    return out


def fresh_url(backends, backend: str, tmp_path) -> str:  # type: ignore[no-untyped-def]
    """A new, empty, migrated database: tests that compare everything exported with everything stored."""
    url = f"sqlite:///{tmp_path / 'export.db'}" if backend == "sqlite" else backends.pg_schema_url()
    engine = create_engine(url)
    migrate(engine)
    FhirService(Store(engine)).reindex_if_needed()
    engine.dispose()
    return url


@pytest.fixture
def fresh(backends, backend: str, tmp_path) -> Iterator[tuple[TestClient, FhirService]]:  # type: ignore[no-untyped-def]
    """The app (with its export worker) on a database of its own, and the service over that database."""
    engine = create_engine(fresh_url(backends, backend, tmp_path))
    with TestClient(create_app(app_settings(), engine), base_url="http://testserver/fhir/", headers=AUTH) as client:
        yield client, FhirService(Store(engine))
    engine.dispose()


# -- the protocol -----------------------------------------------------------------------------------

def test_kick_off_poll_manifest_and_files(api) -> None:  # type: ignore[no-untyped-def]
    pat = create(api, patient())
    obs = create(api, observation(pat["id"]))
    status_url = kick_off(api, "$export", _type="Patient,Observation", _outputFormat="application/fhir+ndjson")
    assert "/$export-poll-status?" in status_url
    first = api.get(status_url)  # a job waits a moment after its transaction time before it starts
    assert first.status_code == 202 and first.headers["x-progress"] and first.headers["retry-after"] == "2"
    manifest = wait_manifest(api, status_url)
    assert set(manifest) >= {"transactionTime", "request", "requiresAccessToken", "output", "error"}
    assert manifest["request"].endswith("/$export?_type=Patient%2CObservation&_outputFormat=application%2Ffhir%2Bndjson")
    assert manifest["requiresAccessToken"] is True and manifest["error"] == []
    assert pat["meta"]["lastUpdated"] <= manifest["transactionTime"]
    assert {o["type"] for o in manifest["output"]} == {"Patient", "Observation"}
    assert all(o["url"].startswith("http") and o["count"] > 0 for o in manifest["output"])
    found = download(api, manifest)
    assert found[("Patient", pat["id"])] == pat and found[("Observation", obs["id"])] == obs
    assert {t for t, _ in found} == {"Patient", "Observation"}
    again = api.get(status_url)  # the manifest stays until the files expire
    assert again.status_code == 200 and again.json() == manifest and again.headers["expires"].endswith("GMT")


def test_the_export_operations_are_in_the_capability_statement(api) -> None:  # type: ignore[no-untyped-def]
    rest = api.get("metadata").json()["rest"][0]
    assert {"name": "export", "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export"} \
        in rest["operation"]
    by_type = {r["type"]: r.get("operation", []) for r in rest["resource"]}
    assert "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/patient-export" in \
        [o["definition"] for o in by_type["Patient"]]
    assert "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/group-export" in \
        [o["definition"] for o in by_type["Group"]]
    assert "export" not in [o["name"] for o in by_type["Observation"]]


def test_thousands_of_resources_exported_exactly_as_stored(fresh) -> None:  # type: ignore[no-untyped-def]
    client, service = fresh
    resources = population(1500, "big")  # 6,001 resources
    for i in range(0, len(resources), 1000):
        service.bulk_put(resources[i:i + 1000], validate=False)
    for i in range(0, 40, 4):  # some have later versions, some are deleted
        service.update("Patient", f"big-p{i}", {**resources[1 + 4 * i], "gender": "male"})
        service.delete("Observation", f"big-p{i + 1}-o0")
    expected = stored(service.store)
    assert len(expected) == 6001 - 10
    found = export(client, "$export")
    assert found == expected
    assert found[("Patient", "big-p0")]["meta"]["versionId"] == "2"
    assert ("Observation", "big-p1-o0") not in found


def test_large_resources_come_back_whole(fresh) -> None:  # type: ignore[no-untyped-def]
    """Resources of 400 KB: a few per chunk and per batch, each line whole."""
    client, service = fresh
    blob = base64.b64encode(bytes(range(256)) * 1200).decode()  # 409,600 characters
    service.bulk_put([{"resourceType": "Binary", "id": f"scan{i}", "contentType": "application/pdf",
                       "data": blob[i:] + blob[:i]} for i in range(12)], validate=False)
    found = export(client, "$export", _type="Binary")
    assert found == stored(service.store) and len(found) == 12


def test_type_and_since(api) -> None:  # type: ignore[no-untyped-def]
    before = create(api, patient("Before"))
    time.sleep(0.01)
    after = create(api, patient("After"))
    obs = create(api, observation(after["id"]))
    found = export(api, "$export", _type="Patient", _since=after["meta"]["lastUpdated"])
    assert ("Patient", after["id"]) in found and ("Patient", before["id"]) not in found
    assert {t for t, _ in found} == {"Patient"} and ("Observation", obs["id"]) not in found
    assert all(r["meta"]["lastUpdated"] >= after["meta"]["lastUpdated"] for r in found.values())
    only_obs = export(api, "$export", _type="Observation", _since=after["meta"]["lastUpdated"])
    assert ("Observation", obs["id"]) in only_obs and {t for t, _ in only_obs} == {"Observation"}


def test_patient_and_group_exports_are_scoped_to_their_patients(api) -> None:  # type: ignore[no-untyped-def]
    tag = uuid.uuid4().hex[:8]
    org = create(api, {"resourceType": "Organization", "name": f"Practice {tag}"})
    gp = create(api, {"resourceType": "Practitioner", "name": [{"family": f"Doctor{tag}"}]})
    p1, p2, p3 = (create(api, {**patient(f"{tag}{n}"), "managingOrganization": {"reference": f"Organization/{org['id']}"}})
                  for n in range(3))
    obs = {p["id"]: create(api, observation(p["id"]))["id"] for p in (p1, p2, p3)}
    group = create(api, {"resourceType": "Group", "type": "person", "actual": True, "member": [
        {"entity": {"reference": f"Patient/{p1['id']}"}}, {"entity": {"reference": f"Patient/{p2['id']}"}},
        {"entity": {"reference": f"Practitioner/{gp['id']}"}}]})
    members = api.get("Group", params={"member": f"Patient/{p1['id']}"}).json()
    assert [e["resource"]["id"] for e in members["entry"]] == [group["id"]]
    assert api.get("Group", params={"member": f"Patient/{p3['id']}"}).json()["total"] == 0

    in_group = export(api, f"Group/{group['id']}/$export")
    assert {k for k in in_group if k[0] == "Patient"} == {("Patient", p1["id"]), ("Patient", p2["id"])}
    assert {k for k in in_group if k[0] == "Observation"} == {("Observation", obs[p1["id"]]),
                                                             ("Observation", obs[p2["id"]])}
    assert ("Organization", org["id"]) not in in_group  # not in the Patient compartment
    assert set(in_group) <= {("Patient", p1["id"]), ("Patient", p2["id"]), ("Group", group["id"]),
                             ("Observation", obs[p1["id"]]), ("Observation", obs[p2["id"]])}
    only_patients = export(api, f"Group/{group['id']}/$export", _type="Patient")
    assert set(only_patients) == {("Patient", p1["id"]), ("Patient", p2["id"])}

    everyone = export(api, "Patient/$export", _type="Patient,Observation")
    assert {("Patient", p["id"]) for p in (p1, p2, p3)} <= set(everyone)
    assert {("Observation", o) for o in obs.values()} <= set(everyone)
    assert {t for t, _ in everyone} == {"Patient", "Observation"}
    assert "Organization" not in {t for t, _ in export(api, "Patient/$export", _since=org["meta"]["lastUpdated"])}


def test_writes_after_the_kick_off_are_not_exported(api) -> None:  # type: ignore[no-untyped-def]
    kept, changed, deleted = (create(api, patient(f"Snapshot{n}")) for n in range(3))
    group = create(api, {"resourceType": "Group", "type": "person", "actual": True,
                         "member": [{"entity": {"reference": f"Patient/{p['id']}"}} for p in (kept, changed, deleted)]})
    status_url = kick_off(api, f"Group/{group['id']}/$export")
    # the job starts a second after its transaction time: these writes are made before it reads anything
    later = create(api, observation(kept["id"]))
    assert api.put(f"Patient/{changed['id']}", json={**changed, "gender": "male"}).status_code == 200
    assert api.delete(f"Patient/{deleted['id']}").status_code == 204
    assert api.get(status_url).status_code == 202
    found = download(api, wait_manifest(api, status_url))
    assert found[("Patient", changed["id"])] == changed  # version 1, as it was
    assert found[("Patient", deleted["id"])] == deleted  # it still existed then
    assert found[("Patient", kept["id"])] == kept
    assert ("Observation", later["id"]) not in found
    assert set(found) == {("Patient", p["id"]) for p in (kept, changed, deleted)} | {("Group", group["id"])}
    # and a new export sees the present
    now = export(api, f"Group/{group['id']}/$export")
    assert now[("Patient", changed["id"])]["gender"] == "male" and ("Patient", deleted["id"]) not in now
    assert ("Observation", later["id"]) in now


@pytest.mark.parametrize("path,params,headers,status,says", [
    ("$export", {}, {}, 400, "respond-async"),
    ("$export", {"_outputFormat": "text/csv"}, ASYNC, 400, "_outputFormat"),
    ("$export", {"_typeFilter": "Patient?gender=female"}, ASYNC, 400, "_typeFilter"),
    ("$export", {"_elements": "id"}, ASYNC, 400, "_elements"),
    ("$export", {"includeAssociatedData": "LatestProvenanceResources"}, ASYNC, 400, "includeAssociatedData"),
    ("$export", {"_since": "yesterday"}, ASYNC, 400, "_since"),
    ("$export", {"_since": "2024-01-01T00:00:00"}, ASYNC, 400, "time zone"),
    ("$export", {"_type": "Patient,Nonsense"}, ASYNC, 400, "Nonsense"),
    ("Patient/$export", {"_type": "Organization"}, ASYNC, 400, "Organization"),
    ("Group/no-such-group/$export", {}, ASYNC, 404, "Group/no-such-group"),
    ("Observation/$export", {}, ASYNC, 404, "Observation"),
    ("$export-poll-status", {"_jobId": "no-such-job"}, {}, 404, "no-such-job"),
    ("$export-poll-status", {}, {}, 400, "_jobId"),
    ("$export-file", {"_jobId": "no-such-job", "_file": "0"}, {}, 404, "no-such-job"),
    ("$export-file", {"_jobId": "no-such-job", "_file": "x"}, {}, 400, "_file"),
])
def test_bad_requests(api, path: str, params: dict[str, str], headers: dict[str, str], status: int,  # type: ignore[no-untyped-def]
                      says: str) -> None:
    resp = api.get(path, params=params, headers=headers)
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["resourceType"] == "OperationOutcome" and says in body["issue"][0]["diagnostics"]


@pytest.mark.parametrize("output_format", ["application/fhir+ndjson", "application/ndjson", "ndjson"])
def test_output_formats_accepted(api, output_format: str) -> None:  # type: ignore[no-untyped-def]
    status_url = kick_off(api, "$export", _type="Organization", _outputFormat=output_format)
    assert api.delete(status_url).status_code == 202


def test_lenient_handling_ignores_unsupported_parameters(api) -> None:  # type: ignore[no-untyped-def]
    resp = api.get("$export", params={"_type": "Organization", "_typeFilter": "Organization?name=x"},
                   headers={**ASYNC, "Prefer": "respond-async, handling=lenient"})
    assert resp.status_code == 202, resp.text
    assert api.delete(resp.headers["content-location"]).status_code == 202


def test_cancel_removes_the_job_and_its_files(asgi_client, engine) -> None:  # type: ignore[no-untyped-def]
    api = asgi_client
    create(api, patient("Cancelled"))
    done_url = kick_off(api, "$export", _type="Patient")
    manifest = wait_manifest(api, done_url)
    job_id = done_url.rsplit("=", 1)[1]
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).where(export_chunk.c.job_id == job_id)).scalar_one() > 0
    cancelled = api.delete(done_url)
    assert cancelled.status_code == 202 and cancelled.json()["resourceType"] == "OperationOutcome"
    assert api.get(done_url).status_code == 404
    assert api.get(manifest["output"][0]["url"]).status_code == 404
    assert api.delete(done_url).status_code == 404
    running_url = kick_off(api, "$export")  # cancelled before or while it runs
    assert api.delete(running_url).status_code == 202
    time.sleep(2)  # the worker would have started by now
    assert api.get(running_url).status_code == 404
    with engine.connect() as conn:
        for url in (done_url, running_url):
            jid = url.rsplit("=", 1)[1]
            assert conn.execute(sa.select(sa.func.count()).where(export_chunk.c.job_id == jid)).scalar_one() == 0
            assert conn.execute(sa.select(sa.func.count()).where(export_job.c.id == jid)).scalar_one() == 0


def test_expired_jobs_are_removed_with_their_files(asgi_client, engine) -> None:  # type: ignore[no-untyped-def]
    api = asgi_client
    create(api, patient("Expiring"))
    status_url = kick_off(api, "$export", _type="Patient")
    manifest = wait_manifest(api, status_url)
    job_id = status_url.rsplit("=", 1)[1]
    exports = BulkExport(Store(engine), frozenset({"Patient"}))
    with engine.begin() as conn:  # as if its 24 hours were up
        conn.execute(export_job.update().where(export_job.c.id == job_id).values(expires=now_us() - 1))
    assert exports.remove_expired() >= 1
    assert api.get(status_url).status_code == 404
    assert api.get(manifest["output"][0]["url"]).status_code == 404
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).where(export_chunk.c.job_id == job_id)).scalar_one() == 0


def chunk_digests(engine: sa.Engine, job_id: str) -> dict[tuple[int, int], str]:
    with engine.connect() as conn:
        return {(r.file_no, r.part): hashlib.sha256(r.data).hexdigest() for r in conn.execute(
            sa.select(export_chunk.c.file_no, export_chunk.c.part, export_chunk.c.data)
            .where(export_chunk.c.job_id == job_id))}


def job_row(engine: sa.Engine, job_id: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(sa.select(export_job).where(export_job.c.id == job_id)).one()


def wait_progress(client: httpx.Client, status_url: str, beyond: int) -> None:
    """Until the job says it exported more than `beyond` resources (and is not done)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        progress = client.get(status_url)
        assert progress.status_code == 202, "the export finished before it could be interrupted"
        if exported(progress.headers["x-progress"]) > beyond:
            return
        time.sleep(0.02)
    raise AssertionError("the export made no progress")


@pytest.mark.slow
def test_export_survives_its_servers_stopping_and_dying(backends, backend: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A job whose server stops hands it back at once; one whose server dies is taken over when the
    lease runs out. Either way the next server goes on from the checkpoint: the chunks written
    before are kept as they are, and every resource is exported exactly once."""
    url = fresh_url(backends, backend, tmp_path)
    engine = create_engine(url)
    service = FhirService(Store(engine))
    resources = population(2500, "kill")
    for i in range(0, len(resources), 2000):
        service.bulk_put(resources[i:i + 2000], validate=False)
    expected = stored(service.store)
    small_chunks = {"CAREBROKER_EXPORT_CHUNK_BYTES": "4096"}  # many checkpoints, a slow job: time to stop it
    with httpx.Client(timeout=30, headers=AUTH) as client:
        first, base1 = backends.spawn_server(url, env=small_chunks)
        status_url = kick_off(client, f"{base1}/$export")
        job_id = status_url.rsplit("=", 1)[1]
        wait_progress(client, status_url, 0)
        first.terminate()  # a graceful stop: the job is handed back, the attempt not counted
        first.wait(30)
        stopped = job_row(engine, job_id)
        assert (stopped.status, stopped.owner, stopped.attempts) == ("queued", None, 0)
        assert 0 < stopped.exported < len(expected)
        before_stop = chunk_digests(engine, job_id)

        second, base2 = backends.spawn_server(url, env=small_chunks)
        wait_progress(client, status_url.replace(base1, base2), stopped.exported)
        second.kill()  # a crash: the lease is left to run out
        second.wait()
        killed = job_row(engine, job_id)
        assert killed.status == "running" and killed.attempts == 1 and stopped.exported < killed.exported < len(expected)
        before_kill = chunk_digests(engine, job_id)
        assert {k: before_kill[k] for k in before_stop} == before_stop

        _, base3 = backends.spawn_server(url, env=small_chunks)
        manifest = wait_manifest(client, status_url.replace(base1, base3))
        assert all(o["url"].startswith(base3) for o in manifest["output"])
        found = download(client, manifest)
    assert found == expected
    done = job_row(engine, job_id)
    assert done.status == "completed" and done.attempts == 2 and done.exported == len(expected)
    after = chunk_digests(engine, job_id)
    assert {k: after[k] for k in before_kill} == before_kill  # resumed, not redone
    engine.dispose()


def test_only_the_client_that_kicked_off_an_export_sees_it(api) -> None:  # type: ignore[no-untyped-def]
    create(api, patient())
    status_url = kick_off(api, "$export", _type="Patient")
    manifest = wait_manifest(api, status_url)
    other = {"Authorization": f"Bearer {TEST_ISSUER.token(sub='other-client', client_id='other-client')}"}
    for resp in (api.get(status_url, headers=other), api.get(manifest["output"][0]["url"], headers=other),
                 api.delete(status_url, headers=other)):
        assert resp.status_code == 404, resp.text  # the same answer as for a job that does not exist
    assert api.get(status_url).json() == manifest  # still there for its owner
    assert api.get(manifest["output"][0]["url"]).status_code == 200

"""Batch and transaction Bundles and conditional references, through HTTP on both databases."""
from __future__ import annotations

import base64
import threading
import uuid
from typing import Any

import httpx
import orjson

from conftest import AUTH

SYSTEM = "urn:carebroker:test:bundle"


def tag() -> str:
    return uuid.uuid4().hex[:12]


def patient(value: str, family: str = "Mensah") -> dict[str, Any]:
    return {"resourceType": "Patient", "identifier": [{"system": SYSTEM, "value": value}], "name": [{"family": family}]}


def encounter(subject: str, status: str = "finished") -> dict[str, Any]:
    return {"resourceType": "Encounter", "status": status, "subject": {"reference": subject},
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"}}


def entry(method: str, url: str, resource: dict[str, Any] | None = None, full_url: str | None = None,
          **request: str) -> dict[str, Any]:
    out: dict[str, Any] = {"request": {"method": method, "url": url, **request}}
    if resource is not None:
        out["resource"] = resource
    if full_url:
        out["fullUrl"] = full_url
    return out


def bundle(kind: str, *entries: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind, "entry": list(entries)}


def search(api, query: str) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    resp = api.get(query)
    assert resp.status_code == 200, resp.text
    return [e["resource"] for e in resp.json().get("entry", []) if e["search"]["mode"] == "match"]


def post(api, body: dict[str, Any], status: int = 200, **kw: Any) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    resp = api.post("", json=body, **kw)
    assert resp.status_code == status, resp.text
    return resp.json()


def test_transaction_creates_and_rewrites_urn_references(api) -> None:  # type: ignore[no-untyped-def]
    value, urn, oid = tag(), f"urn:uuid:{uuid.uuid4()}", "urn:oid:1.2.826.0.1.3680043.2.1"
    pat = patient(value)
    pat["text"] = {"status": "generated", "div": f'<div xmlns="http://www.w3.org/1999/xhtml"><a href="{urn}">me</a></div>'}
    team = {"resourceType": "CareTeam", "status": "active", "subject": {"reference": urn},
            "participant": [{"member": {"reference": oid}}]}
    out = post(api, bundle("transaction",
                           entry("POST", "Encounter", encounter(urn)),
                           entry("POST", "Patient", pat, urn),
                           entry("POST", "CareTeam", team),
                           entry("POST", "Practitioner", {"resourceType": "Practitioner", "name": [{"family": "Iqbal"}]}, oid)))
    assert out["type"] == "transaction-response"
    responses = [e["response"] for e in out["entry"]]
    assert [r["status"] for r in responses] == ["201 Created"] * 4
    for r in responses:
        assert r["etag"] == 'W/"1"' and r["lastModified"] and r["location"].endswith("/_history/1")
    enc_id, pat_id, team_id, prac_id = (r["location"].split("/")[1] for r in responses)
    assert api.get(f"Encounter/{enc_id}").json()["subject"]["reference"] == f"Patient/{pat_id}"
    stored_team = api.get(f"CareTeam/{team_id}").json()
    assert stored_team["subject"]["reference"] == f"Patient/{pat_id}"
    assert stored_team["participant"][0]["member"]["reference"] == f"Practitioner/{prac_id}"
    assert f'href="Patient/{pat_id}"' in api.get(f"Patient/{pat_id}").json()["text"]["div"]
    # the rewritten references are indexed: reference searches find them
    assert [e["id"] for e in search(api, f"Encounter?subject=Patient/{pat_id}")] == [enc_id]
    assert out["entry"][1]["fullUrl"].endswith(f"/Patient/{pat_id}")


def test_failing_entry_rolls_back_the_whole_transaction(api) -> None:  # type: ignore[no-untyped-def]
    value, urn = tag(), f"urn:uuid:{uuid.uuid4()}"
    existing = api.post("Patient", json=patient(tag())).json()
    doomed = api.post("Patient", json=patient(tag())).json()
    resp = api.post("", json=bundle(
        "transaction",
        entry("POST", "Patient", patient(value), urn),
        entry("PUT", f"Patient/{existing['id']}", {**existing, "name": [{"family": "Changed"}]}),
        entry("DELETE", f"Patient/{doomed['id']}"),
        entry("POST", "Encounter", encounter(urn, status="not-a-status"))))
    assert resp.status_code == 422, resp.text
    issue = resp.json()["issue"][0]
    assert issue["diagnostics"].startswith("Bundle.entry[3]: ") and "status" in issue["diagnostics"]
    assert issue["expression"] == ["Bundle.entry[3].resource.status"]
    assert search(api, f"Patient?identifier={SYSTEM}|{value}") == []
    current = api.get(f"Patient/{existing['id']}").json()
    assert current["meta"]["versionId"] == "1" and current["name"] == [{"family": "Mensah"}]
    assert api.get(f"Patient/{doomed['id']}").status_code == 200


def test_processing_order_delete_post_put_get(api) -> None:  # type: ignore[no-untyped-def]
    doomed = api.post("Patient", json=patient(tag())).json()
    kept = api.post("Patient", json=patient(tag())).json()
    value = tag()
    out = post(api, bundle(
        "transaction",
        entry("GET", f"Patient?identifier={SYSTEM}|{value}"),
        entry("PUT", f"Patient/{kept['id']}", {**kept, "name": [{"family": "Updated"}]}),
        entry("POST", "Patient", patient(value)),
        entry("GET", f"Patient/{kept['id']}"),
        entry("DELETE", f"Patient/{doomed['id']}")))
    statuses = [e["response"]["status"] for e in out["entry"]]
    assert statuses == ["200 OK", "200 OK", "201 Created", "200 OK", "204 No Content"]
    found = out["entry"][0]["resource"]  # GET ran last: it sees the POST
    assert found["total"] == 1 and found["entry"][0]["resource"]["identifier"][0]["value"] == value
    assert out["entry"][3]["resource"]["name"] == [{"family": "Updated"}]  # ... and the PUT
    assert api.get(f"Patient/{doomed['id']}").status_code == 410


def test_conditional_create_and_update_entries_resolve_references(api) -> None:  # type: ignore[no-untyped-def]
    value, other = tag(), tag()
    existing = api.post("Patient", json=patient(value)).json()
    urn1, urn2 = f"urn:uuid:{uuid.uuid4()}", f"urn:uuid:{uuid.uuid4()}"
    out = post(api, bundle(
        "transaction",
        entry("POST", "Patient", patient(value), urn1, ifNoneExist=f"identifier={SYSTEM}|{value}"),
        entry("PUT", f"Patient?identifier={SYSTEM}|{other}", patient(other, "Boateng"), urn2),
        entry("POST", "Encounter", encounter(urn1)),
        entry("POST", "Encounter", encounter(urn2))))
    statuses = [e["response"]["status"] for e in out["entry"]]
    assert statuses == ["200 OK", "201 Created", "201 Created", "201 Created"]
    assert out["entry"][0]["resource"]["id"] == existing["id"]
    new_id = out["entry"][1]["response"]["location"].split("/")[1]
    subjects = [out["entry"][i]["resource"]["subject"]["reference"] for i in (2, 3)]
    assert subjects == [f"Patient/{existing['id']}", f"Patient/{new_id}"]
    # the same conditional update again updates that resource instead of creating one
    again = post(api, bundle("transaction", entry("PUT", f"Patient?identifier={SYSTEM}|{other}",
                                                  patient(other, "Boateng-Asante"))))
    assert again["entry"][0]["response"]["status"] == "200 OK"
    assert again["entry"][0]["response"]["location"] == f"Patient/{new_id}/_history/2"


def test_conditional_references(api) -> None:  # type: ignore[no-untyped-def]
    value, fresh, twin = tag(), tag(), tag()
    pat = api.post("Patient", json=patient(value)).json()
    api.post("Patient", json=patient(twin))
    api.post("Patient", json=patient(twin))
    # in a plain create
    resp = api.post("Encounter", json=encounter(f"Patient?identifier={SYSTEM}|{value}"))
    assert resp.status_code == 201, resp.text
    assert resp.json()["subject"]["reference"] == f"Patient/{pat['id']}"
    assert [e["id"] for e in search(api, f"Encounter?subject=Patient/{pat['id']}")] == [resp.json()["id"]]
    # in a transaction, to a resource the same transaction creates conditionally
    out = post(api, bundle("transaction",
                           entry("POST", "Encounter", encounter(f"Patient?identifier={SYSTEM}|{fresh}")),
                           entry("POST", "Patient", patient(fresh), ifNoneExist=f"identifier={SYSTEM}|{fresh}")))
    made = out["entry"][1]["resource"]["id"]
    assert out["entry"][0]["resource"]["subject"]["reference"] == f"Patient/{made}"
    # no match, several matches: the whole transaction fails, naming the entry
    for ref, status in ((f"Patient?identifier={SYSTEM}|{tag()}", 404), (f"Patient?identifier={SYSTEM}|{twin}", 412)):
        marker = tag()
        resp = api.post("", json=bundle("transaction", entry("POST", "Patient", patient(marker)),
                                        entry("POST", "Encounter", encounter(ref))))
        assert resp.status_code == status, resp.text
        assert resp.json()["issue"][0]["diagnostics"].startswith("Bundle.entry[1]: ")
        assert ref in resp.json()["issue"][0]["diagnostics"]
        assert search(api, f"Patient?identifier={SYSTEM}|{marker}") == []


def test_transaction_refuses_writing_one_resource_twice_and_bad_bundles(api) -> None:  # type: ignore[no-untyped-def]
    pid = f"dup-{tag()}"
    resp = api.post("", json=bundle("transaction", entry("PUT", f"Patient/{pid}", {**patient(tag()), "id": pid}),
                                    entry("DELETE", f"Patient/{pid}")))
    assert resp.status_code == 400 and "Bundle.entry[0] and Bundle.entry[1]" in resp.text
    assert api.get(f"Patient/{pid}").status_code == 404
    assert api.post("", json=patient(tag())).status_code == 400
    assert api.post("", json={"resourceType": "Bundle", "type": "collection"}).status_code == 400
    resp = api.post("", json=bundle("transaction", {"resource": patient(tag())}))
    assert resp.status_code == 400 and resp.json()["issue"][0]["expression"] == ["Bundle.entry[0].request"]
    resp = api.post("", content=b"{not json", headers={"Content-Type": "application/fhir+json"})
    assert resp.status_code == 400


def test_if_match_and_patch_entries(api) -> None:  # type: ignore[no-untyped-def]
    pat = api.post("Patient", json=patient(tag())).json()
    stale = api.post("", json=bundle("transaction", entry("PUT", f"Patient/{pat['id']}", pat, ifMatch='W/"7"')))
    assert stale.status_code == 412
    patch = [{"op": "replace", "path": "/name/0/family", "value": "Patched"}]
    binary = {"resourceType": "Binary", "contentType": "application/json-patch+json",
              "data": base64.b64encode(orjson.dumps(patch)).decode()}
    out = post(api, bundle("transaction", entry("PATCH", f"Patient/{pat['id']}", binary, ifMatch='W/"1"')))
    assert out["entry"][0]["response"]["status"] == "200 OK"
    assert api.get(f"Patient/{pat['id']}").json()["name"][0]["family"] == "Patched"


def test_batch_entries_succeed_or_fail_on_their_own(api) -> None:  # type: ignore[no-untyped-def]
    value = tag()
    out = post(api, bundle(
        "batch",
        entry("POST", "Patient", patient(value)),
        entry("GET", f"Patient/missing-{tag()}"),
        entry("POST", "Encounter", encounter("Patient/x", status="bogus")),
        {"resource": patient(tag())},
        entry("GET", f"Patient?identifier={SYSTEM}|{value}")))
    assert out["type"] == "batch-response"
    statuses = [e["response"]["status"] for e in out["entry"]]
    assert statuses == ["201 Created", "404 Not Found", "422 Unprocessable Entity", "400 Bad Request", "200 OK"]
    for i in (1, 2, 3):
        outcome = out["entry"][i]["response"]["outcome"]
        assert outcome["resourceType"] == "OperationOutcome"
        assert outcome["issue"][0]["diagnostics"].startswith(f"Bundle.entry[{i}]: ")
    assert out["entry"][4]["resource"]["total"] == 1  # entries run in order: it sees entry 0
    assert len(search(api, f"Patient?identifier={SYSTEM}|{value}")) == 1


def test_prefer_minimal_leaves_resources_out(api) -> None:  # type: ignore[no-untyped-def]
    out = post(api, bundle("transaction", entry("POST", "Patient", patient(tag()))),
               headers={"Prefer": "return=minimal"})
    assert "resource" not in out["entry"][0] and out["entry"][0]["response"]["status"] == "201 Created"


def test_capability_statement_lists_transaction_and_batch(api) -> None:  # type: ignore[no-untyped-def]
    codes = [i["code"] for i in api.get("metadata").json()["rest"][0]["interaction"]]
    assert "transaction" in codes and "batch" in codes


def test_concurrent_conditional_creates_in_transactions_make_one_resource(server_url: str) -> None:
    value = tag()
    statuses: list[str] = []
    patient_ids: set[str] = set()
    subjects: set[str] = set()
    barrier = threading.Barrier(6)

    def go() -> None:
        urn = f"urn:uuid:{uuid.uuid4()}"
        body = bundle("transaction",
                      entry("POST", "Patient", patient(value), urn, ifNoneExist=f"identifier={SYSTEM}|{value}"),
                      entry("POST", "Encounter", encounter(urn)))
        barrier.wait()
        resp = httpx.post(server_url, json=body, timeout=60, headers=AUTH)
        assert resp.status_code == 200, resp.text
        out = resp.json()
        statuses.append(out["entry"][0]["response"]["status"])
        patient_ids.add(out["entry"][0]["resource"]["id"])
        subjects.add(out["entry"][1]["resource"]["subject"]["reference"])

    threads = [threading.Thread(target=go) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(statuses) == ["200 OK"] * 5 + ["201 Created"]
    assert len(patient_ids) == 1 and subjects == {f"Patient/{patient_ids.pop()}"}
    found = httpx.get(f"{server_url}/Patient", params={"identifier": f"{SYSTEM}|{value}"}, headers=AUTH).json()
    assert found["total"] == 1

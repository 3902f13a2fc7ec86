"""The RESTful interactions end to end, through the ASGI app and a real uvicorn, on SQLite and PostgreSQL."""
from __future__ import annotations

import random
import uuid
from email.utils import format_datetime
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from conformance.nhs_number import nhs_check_digit

FHIR_CT = "application/fhir+json; fhirVersion=4.0"
PATCH_CT = {"Content-Type": "application/json-patch+json"}


def patient(**extra: Any) -> dict[str, Any]:
    return {"resourceType": "Patient", "name": [{"family": "Okafor", "given": ["Ada"]}], "gender": "female",
            "birthDate": "1950-04-02", **extra}


def ident(value: str | None = None) -> dict[str, str]:
    return {"system": "https://fhir.nhs.uk/Id/nhs-number", "value": value or nhs_number()}


def nhs_number() -> str:
    """A random valid NHS number: the server refuses invalid ones, and conditional tests need fresh ones."""
    first_nine = f"{random.randrange(10 ** 9):09d}"
    check = nhs_check_digit(first_nine)
    return f"{first_nine}{check}" if check is not None else nhs_number()


def issues(resp) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    body = resp.json()
    assert body["resourceType"] == "OperationOutcome", body
    return body["issue"]


def create(api, resource: dict[str, Any], **kw: Any):  # type: ignore[no-untyped-def]
    resp = api.post(resource["resourceType"], json=resource, **kw)
    assert resp.status_code == 201, resp.text
    return resp


def test_create_read_roundtrip(api) -> None:  # type: ignore[no-untyped-def]
    resp = create(api, patient(identifier=[ident()]))
    body = resp.json()
    assert resp.headers["content-type"] == FHIR_CT
    assert body["meta"]["versionId"] == "1" and body["meta"]["lastUpdated"]
    assert resp.headers["etag"] == 'W/"1"'
    assert resp.headers["location"].endswith(f"/fhir/Patient/{body['id']}/_history/1")
    assert resp.headers["last-modified"].endswith("GMT")
    read = api.get(f"Patient/{body['id']}")
    assert read.status_code == 200 and read.json() == body
    assert read.headers["etag"] == 'W/"1"'


def test_create_ignores_client_id_and_server_sets_meta(api) -> None:  # type: ignore[no-untyped-def]
    body = create(api, patient(id="client-chosen", meta={"versionId": "99", "tag": [{"code": "x"}]})).json()
    assert body["id"] != "client-chosen"
    assert body["meta"]["versionId"] == "1" and body["meta"]["tag"] == [{"code": "x"}]


def test_update_versions_and_vread(api) -> None:  # type: ignore[no-untyped-def]
    pid = create(api, patient()).json()["id"]
    upd = api.put(f"Patient/{pid}", json=patient(id=pid, gender="male"))
    assert upd.status_code == 200 and upd.json()["meta"]["versionId"] == "2"
    assert upd.headers["etag"] == 'W/"2"'
    v1 = api.get(f"Patient/{pid}/_history/1")
    assert v1.status_code == 200 and v1.json()["gender"] == "female" and v1.json()["meta"]["versionId"] == "1"
    assert api.get(f"Patient/{pid}/_history/2").json()["gender"] == "male"
    assert api.get(f"Patient/{pid}/_history/3").status_code == 404
    assert api.get(f"Patient/{pid}/_history/x").status_code == 404


def test_update_without_change_makes_no_new_version(api) -> None:  # type: ignore[no-untyped-def]
    pid = create(api, patient()).json()["id"]
    again = api.put(f"Patient/{pid}", json=patient(id=pid))
    assert again.status_code == 200 and again.json()["meta"]["versionId"] == "1"


def test_update_as_create_with_client_id(api) -> None:  # type: ignore[no-untyped-def]
    pid = f"nwl-{uuid.uuid4().hex[:12]}"
    resp = api.put(f"Patient/{pid}", json=patient(id=pid))
    assert resp.status_code == 201 and resp.json()["id"] == pid
    assert resp.headers["location"].endswith(f"/Patient/{pid}/_history/1")


@pytest.mark.parametrize("bad_id", ["has space", "x" * 65, "a_b"])
def test_update_rejects_invalid_ids(api, bad_id: str) -> None:  # type: ignore[no-untyped-def]
    resp = api.put(f"Patient/{bad_id}", json=patient(id=bad_id))
    assert resp.status_code == 400
    assert "not a valid resource id" in issues(resp)[0]["diagnostics"]


def test_update_id_mismatch_is_400(api) -> None:  # type: ignore[no-untyped-def]
    pid = create(api, patient()).json()["id"]
    resp = api.put(f"Patient/{pid}", json=patient(id="other"))
    assert resp.status_code == 400 and issues(resp)[0]["expression"] == ["Patient.id"]
    assert api.put(f"Patient/{pid}", json=patient()).status_code == 400  # no id at all


def test_if_match(api) -> None:  # type: ignore[no-untyped-def]
    pid = create(api, patient()).json()["id"]
    ok = api.put(f"Patient/{pid}", json=patient(id=pid, gender="other"), headers={"If-Match": 'W/"1"'})
    assert ok.status_code == 200
    stale = api.put(f"Patient/{pid}", json=patient(id=pid, gender="male"), headers={"If-Match": 'W/"1"'})
    assert stale.status_code == 412 and issues(stale)[0]["code"] == "conflict"
    assert api.get(f"Patient/{pid}").json()["gender"] == "other"
    assert api.put(f"Patient/{pid}", json=patient(id=pid), headers={"If-Match": "nonsense"}).status_code == 400


def test_conditional_read(api) -> None:  # type: ignore[no-untyped-def]
    resp = create(api, patient())
    pid = resp.json()["id"]
    assert api.get(f"Patient/{pid}", headers={"If-None-Match": 'W/"1"'}).status_code == 304
    assert api.get(f"Patient/{pid}", headers={"If-None-Match": 'W/"7"'}).status_code == 200
    later = format_datetime(datetime.now(UTC) + timedelta(hours=1), usegmt=True)
    earlier = format_datetime(datetime.now(UTC) - timedelta(days=1), usegmt=True)
    assert api.get(f"Patient/{pid}", headers={"If-Modified-Since": later}).status_code == 304
    assert api.get(f"Patient/{pid}", headers={"If-Modified-Since": earlier}).status_code == 200
    assert api.get(f"Patient/{pid}", headers={"If-Modified-Since": resp.headers["last-modified"]}).status_code == 304


def test_delete_is_a_versioned_tombstone(api) -> None:  # type: ignore[no-untyped-def]
    pid = create(api, patient()).json()["id"]
    gone = api.delete(f"Patient/{pid}")
    assert gone.status_code == 204 and gone.headers["etag"] == 'W/"2"'
    read = api.get(f"Patient/{pid}")
    assert read.status_code == 410 and issues(read)[0]["code"] == "deleted"
    assert api.get(f"Patient/{pid}/_history/1").status_code == 200
    assert api.get(f"Patient/{pid}/_history/2").status_code == 410
    again = api.delete(f"Patient/{pid}")
    assert again.status_code == 200 and issues(again)[0]["severity"] == "information"
    hist = api.get(f"Patient/{pid}/_history").json()
    assert [e["request"]["method"] for e in hist["entry"]] == ["DELETE", "POST"]
    assert "resource" not in hist["entry"][0]
    back = api.put(f"Patient/{pid}", json=patient(id=pid))
    assert back.status_code == 201 and back.json()["meta"]["versionId"] == "3"


def test_delete_unknown_is_404(api) -> None:  # type: ignore[no-untyped-def]
    assert api.delete(f"Patient/{uuid.uuid4()}").status_code == 404
    assert api.get(f"Patient/{uuid.uuid4()}").status_code == 404


def test_delete_if_match(api) -> None:  # type: ignore[no-untyped-def]
    pid = create(api, patient()).json()["id"]
    assert api.delete(f"Patient/{pid}", headers={"If-Match": 'W/"5"'}).status_code == 412
    assert api.delete(f"Patient/{pid}", headers={"If-Match": 'W/"1"'}).status_code == 204


def test_json_patch(api) -> None:  # type: ignore[no-untyped-def]
    pid = create(api, patient()).json()["id"]
    ops = [{"op": "test", "path": "/gender", "value": "female"},
           {"op": "replace", "path": "/birthDate", "value": "1951-01-01"},
           {"op": "add", "path": "/telecom", "value": [{"system": "phone", "value": "020 7946 0000"}]}]
    resp = api.patch(f"Patient/{pid}", json=ops, headers=PATCH_CT)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["birthDate"] == "1951-01-01" and body["meta"]["versionId"] == "2"
    failed = api.patch(f"Patient/{pid}", json=[{"op": "test", "path": "/gender", "value": "male"}], headers=PATCH_CT)
    assert failed.status_code == 422
    invalid = api.patch(f"Patient/{pid}", json=[{"op": "replace", "path": "/gender", "value": "robot"}],
                        headers=PATCH_CT)
    assert invalid.status_code == 422 and issues(invalid)[0]["expression"] == ["Patient.gender"]
    retype = api.patch(f"Patient/{pid}", json=[{"op": "replace", "path": "/id", "value": "x"}], headers=PATCH_CT)
    assert retype.status_code == 422
    assert api.patch(f"Patient/{pid}", json={"op": "add"}, headers=PATCH_CT).status_code == 400
    assert api.patch(f"Patient/{pid}", json=ops, headers={"Content-Type": "application/fhir+json"}).status_code == 415
    stale = api.patch(f"Patient/{pid}", json=ops[1:], headers={**PATCH_CT, "If-Match": 'W/"1"'})
    assert stale.status_code == 412
    assert api.get(f"Patient/{pid}").json()["meta"]["versionId"] == "2"
    latest = api.get(f"Patient/{pid}/_history").json()["entry"][0]
    assert latest["request"] == {"method": "PATCH", "url": f"Patient/{pid}"}


def test_history_instance_paging_and_since(api) -> None:  # type: ignore[no-untyped-def]
    pid = create(api, patient()).json()["id"]
    for i in range(4):
        api.put(f"Patient/{pid}", json=patient(id=pid, birthDate=f"196{i}-01-01"))
    page1 = api.get(f"Patient/{pid}/_history", params={"_count": 2}).json()
    assert page1["type"] == "history" and page1["total"] == 5
    assert [e["resource"]["meta"]["versionId"] for e in page1["entry"]] == ["5", "4"]
    links = {link["relation"]: link["url"] for link in page1["link"]}
    page2 = api.get(links["next"]).json()
    assert [e["resource"]["meta"]["versionId"] for e in page2["entry"]] == ["3", "2"]
    # a write between pages does not shift later pages
    api.put(f"Patient/{pid}", json=patient(id=pid, birthDate="1999-09-09"))
    page3 = api.get({lnk["relation"]: lnk["url"] for lnk in page2["link"]}["next"]).json()
    assert [e["resource"]["meta"]["versionId"] for e in page3["entry"]] == ["1"]
    assert "next" not in {lnk["relation"] for lnk in page3["link"]}
    back = api.get({lnk["relation"]: lnk["url"] for lnk in page3["link"]}["previous"]).json()
    assert [e["resource"]["meta"]["versionId"] for e in back["entry"]] == ["3", "2"]
    since = page2["entry"][0]["resource"]["meta"]["lastUpdated"]
    recent = api.get(f"Patient/{pid}/_history", params={"_since": since}).json()
    assert {e["resource"]["meta"]["versionId"] for e in recent["entry"]} >= {"3", "4", "5", "6"}
    assert "1" not in {e["resource"]["meta"]["versionId"] for e in recent["entry"]}
    assert api.get(f"Patient/{pid}/_history", params={"_since": "yesterday"}).status_code == 400
    assert api.get(f"Patient/{uuid.uuid4()}/_history").status_code == 404


def test_history_type_and_system(api) -> None:  # type: ignore[no-untyped-def]
    start = datetime.now(UTC).isoformat()
    oid = create(api, {"resourceType": "Organization", "name": "Marylebone Health Centre"}).json()["id"]
    pid = create(api, patient()).json()["id"]
    orgs = api.get("Organization/_history", params={"_since": start}).json()
    assert [e["resource"]["id"] for e in orgs["entry"]] == [oid]
    assert orgs["entry"][0]["request"] == {"method": "POST", "url": "Organization"}
    assert orgs["entry"][0]["response"]["status"] == "201 Created"
    everything = api.get("_history", params={"_since": start}).json()
    assert [e["resource"]["id"] for e in everything["entry"]] == [pid, oid]


def test_prefer_return(api) -> None:  # type: ignore[no-untyped-def]
    minimal = api.post("Patient", json=patient(), headers={"Prefer": "return=minimal"})
    assert minimal.status_code == 201 and minimal.content == b"" and minimal.headers["location"]
    oo = api.post("Patient", json=patient(), headers={"Prefer": "return=OperationOutcome"})
    assert oo.status_code == 201 and oo.json()["resourceType"] == "OperationOutcome"
    rep = api.post("Patient", json=patient(), headers={"Prefer": "return=representation"})
    assert rep.json()["resourceType"] == "Patient"


def test_conditional_create(api) -> None:  # type: ignore[no-untyped-def]
    ident1 = ident()
    header = {"If-None-Exist": f"identifier={ident1['system']}|{ident1['value']}"}
    first = api.post("Patient", json=patient(identifier=[ident1]), headers=header)
    assert first.status_code == 201
    second = api.post("Patient", json=patient(identifier=[ident1]), headers=header)
    assert second.status_code == 200 and second.json()["id"] == first.json()["id"]
    # a second resource with the same identifier makes the criteria ambiguous
    create(api, patient(identifier=[ident1]))
    assert api.post("Patient", json=patient(identifier=[ident1]), headers=header).status_code == 412
    unknown = api.post("Patient", json=patient(), headers={"If-None-Exist": "colour=blue"})
    assert unknown.status_code == 400 and "colour" in issues(unknown)[0]["diagnostics"]
    # any search parameter works as a criterion, not only identifiers
    family = f"Fam{uuid.uuid4().hex[:8]}"
    header2 = {"If-None-Exist": f"family={family}&birthdate=1950-04-02"}
    made = api.post("Patient", json=patient(name=[{"family": family}]), headers=header2)
    again = api.post("Patient", json=patient(name=[{"family": family}]), headers=header2)
    assert made.status_code == 201 and again.status_code == 200 and again.json()["id"] == made.json()["id"]


def test_conditional_update(api) -> None:  # type: ignore[no-untyped-def]
    ident1 = ident()
    query = {"identifier": f"{ident1['system']}|{ident1['value']}"}
    made = api.put("Patient", params=query, json=patient(identifier=[ident1]))
    assert made.status_code == 201
    pid = made.json()["id"]
    upd = api.put("Patient", params=query, json=patient(identifier=[ident1], gender="male"))
    assert upd.status_code == 200 and upd.json()["id"] == pid and upd.json()["meta"]["versionId"] == "2"
    wrong_id = api.put("Patient", params=query, json=patient(id="someone-else", identifier=[ident1]))
    assert wrong_id.status_code == 400
    create(api, patient(identifier=[ident1]))
    assert api.put("Patient", params=query, json=patient(identifier=[ident1])).status_code == 412
    # no match, id given, id taken by a resource that does not match -> 409
    other = create(api, patient()).json()["id"]
    clash = api.put("Patient", params={"identifier": "urn:none|0"}, json=patient(id=other))
    assert clash.status_code == 409


def test_conditional_delete_and_patch(api) -> None:  # type: ignore[no-untyped-def]
    ident1 = ident()
    query = {"identifier": f"{ident1['system']}|{ident1['value']}"}
    pid = create(api, patient(identifier=[ident1])).json()["id"]
    patched = api.patch("Patient", params=query, json=[{"op": "replace", "path": "/gender", "value": "male"}],
                        headers=PATCH_CT)
    assert patched.status_code == 200 and patched.json()["id"] == pid
    assert api.delete("Patient", params=query).status_code == 204
    assert api.get(f"Patient/{pid}").status_code == 410
    none_left = api.delete("Patient", params=query)
    assert none_left.status_code == 200 and issues(none_left)[0]["severity"] == "information"
    create(api, patient(identifier=[ident1]))
    create(api, patient(identifier=[ident1]))
    assert api.delete("Patient", params=query).status_code == 412
    assert api.delete("Patient").status_code == 400  # no criteria: never "delete everything"


def test_token_forms_in_criteria(api) -> None:  # type: ignore[no-untyped-def]
    value = uuid.uuid4().hex
    pid = create(api, patient(identifier=[{"system": "urn:a", "value": value}])).json()["id"]
    for crit in (f"identifier={value}", f"identifier=urn:a|{value}", f"identifier=urn:b|x,urn:a|{value}",
                 f"_id={pid}"):
        resp = api.post("Patient", json=patient(), headers={"If-None-Exist": crit})
        assert resp.status_code == 200 and resp.json()["id"] == pid, crit
    assert api.post("Patient", json=patient(), headers={"If-None-Exist": f"identifier=|{value}"}).status_code == 201
    assert api.post("Patient", json=patient(), headers={"If-None-Exist": f"identifier=urn:b|{value}"}).status_code == 201


@pytest.mark.parametrize("body, status, code", [
    (b"{not json", 400, "structure"),
    (b"[1, 2]", 400, "structure"),
    (b'{"resourceType": "Observation", "status": "final", "code": {"text": "x"}}', 400, "invalid"),
    (b'{"resourceType": "Patient", "colour": "blue"}', 400, "structure"),
    (b'{"resourceType": "Patient", "birthDate": "1970-13-45"}', 400, "value"),
    (b'{"resourceType": "Patient", "gender": "bogus"}', 422, "code-invalid"),
])
def test_bad_input_gets_operation_outcome(api, body: bytes, status: int, code: str) -> None:  # type: ignore[no-untyped-def]
    resp = api.post("Patient", content=body, headers={"Content-Type": "application/fhir+json"})
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == FHIR_CT
    assert issues(resp)[0]["code"] == code


def test_invalid_structure_names_the_element(api) -> None:  # type: ignore[no-untyped-def]
    resp = api.post("Patient", json={"resourceType": "Patient", "name": [{"given": "Ada"}],
                                     "contact": [{"gender": "robot"}]})
    assert resp.status_code == 400
    assert ["Patient.name[0].given"] in [i.get("expression") for i in issues(resp)]
    binding = api.post("Patient", json={"resourceType": "Patient", "contact": [{"gender": "robot"}],
                                        "address": [{"use": "moon"}]})
    assert binding.status_code == 422
    assert {tuple(i["expression"]) for i in issues(binding)} == {("Patient.contact[0].gender",),
                                                                ("Patient.address[0].use",)}


def test_unknown_and_unsupported_types(api) -> None:  # type: ignore[no-untyped-def]
    assert api.get("Robot/1").status_code == 404
    assert api.post("Robot", json={"resourceType": "Robot"}).status_code == 404
    # an R4 type that R4B dropped: no model to validate with, so not served
    assert api.get("MedicinalProduct/1").status_code == 404


def test_content_types_and_formats(api) -> None:  # type: ignore[no-untyped-def]
    pid = create(api, patient()).json()["id"]
    assert api.post("Patient", content=b"<Patient/>", headers={"Content-Type": "application/fhir+xml"}).status_code == 415
    plain = api.post("Patient", json=patient(), headers={"Content-Type": "application/json"})
    assert plain.status_code == 201
    assert api.get(f"Patient/{pid}", params={"_format": "xml"}).status_code == 406
    assert api.get(f"Patient/{pid}", headers={"Accept": "application/fhir+xml"}).status_code == 406
    assert api.get(f"Patient/{pid}", params={"_format": "json"}).status_code == 200
    assert api.get(f"Patient/{pid}", headers={"Accept": "application/json"}).status_code == 200
    pretty = api.get(f"Patient/{pid}", params={"_pretty": "true"})
    assert pretty.text.startswith("{\n  ") and pretty.json() == api.get(f"Patient/{pid}").json()


def test_method_not_allowed_and_unknown_paths(api) -> None:  # type: ignore[no-untyped-def]
    resp = api.post("Patient/123", json=patient())
    assert resp.status_code == 405 and "GET" in resp.headers["allow"]
    assert api.get("Patient/1/_history/1/extra").status_code == 404
    base = api.delete("")  # the FHIR base itself is routed, not redirected
    assert base.status_code == 405 and issues(base)[0]["code"] == "not-supported"


def test_capability_statement(api) -> None:  # type: ignore[no-untyped-def]
    cs = api.get("metadata").json()
    assert cs["resourceType"] == "CapabilityStatement" and cs["fhirVersion"] == "4.0.1"
    assert cs["kind"] == "instance" and "application/fhir+json" in cs["format"]
    rest = cs["rest"][0]
    types = {r["type"]: r for r in rest["resource"]}
    for t in ("Patient", "CarePlan", "CareTeam", "Consent", "AuditEvent", "Provenance"):
        assert t in types
    assert "MedicinalProduct" not in types
    codes = {i["code"] for i in types["Patient"]["interaction"]}
    assert codes == {"read", "vread", "update", "patch", "delete", "history-instance", "history-type", "create",
                     "search-type"}
    assert types["Patient"]["versioning"] == "versioned-update"
    assert types["Patient"]["conditionalDelete"] == "single"
    assert {i["code"] for i in rest["interaction"]} == {"history-system", "search-system", "transaction", "batch"}
    params = {p["name"]: p["type"] for p in types["Patient"]["searchParam"]}
    assert params["birthdate"] == "date" and params["general-practitioner"] == "reference"
    assert params["_id"] == "token" and "Patient:general-practitioner" in types["Patient"]["searchInclude"]

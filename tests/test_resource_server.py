"""The resource server end to end: bearer tokens on /fhir, SMART scopes, patient compartments.

Real keys and real signed JWTs throughout (conftest's TEST_ISSUER, trusted by every app and server
of the session; a second issuer here with its JWKS served over loopback HTTP), through the ASGI app
and a real uvicorn, on SQLite and PostgreSQL.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from joserfc.jwk import ECKey, RSAKey

from fhir_server.api.http import create_app
from fhir_server.auth.principal import InvalidClaims, principal_from_claims
from fhir_server.auth.resource_server import (InvalidToken, ResourceServer, check_claims, organization_finder,
                                              parse_trusted_issuers)
from fhir_server.auth.smart_scopes import InvalidScope, parse_scope, parse_scopes
from fhir_server.service.interactions import FhirService
from fhir_server.storage.repository import Store

from conftest import TEST_ISSUER, JwksServer, TestIssuer, app_settings

LAB = "http://terminology.hl7.org/CodeSystem/observation-category|laboratory"
CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"


def send(api, method: str, path: str, token: str | None, **kw: Any) -> httpx.Response:  # type: ignore[no-untyped-def]
    """A request with `token` instead of the client's default one (None: no Authorization at all)."""
    req = api.build_request(method, path, **kw)
    del req.headers["authorization"]
    if token is not None:
        req.headers["authorization"] = f"Bearer {token}"
    return api.send(req)


def get(api, path: str, token: str | None, **params: Any) -> httpx.Response:  # type: ignore[no-untyped-def]
    return send(api, "GET", path, token, params=params)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def raw_jwt(header: dict[str, Any], claims: dict[str, Any], sign: Any = None) -> str:
    head = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    return f"{head}.{b64(sign(head.encode())) if sign else ''}"


def claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"iss": TEST_ISSUER.issuer, "aud": TEST_ISSUER.audience, "exp": now + 600, "iat": now,
            "sub": "x", "scope": "system/*.*", **extra}


# -- 401: no valid token ------------------------------------------------------------------------------

def test_no_token_is_401_with_a_bare_bearer_challenge(api) -> None:  # type: ignore[no-untyped-def]
    resp = get(api, "Patient", None)
    assert resp.status_code == 401
    assert resp.headers["www-authenticate"] == 'Bearer realm="carebroker"'
    assert resp.json()["resourceType"] == "OperationOutcome"
    for path in ("", "Patient/x", "_history", "Patient/x/$everything", "$export"):
        assert get(api, path, None).status_code == 401, path
    assert send(api, "POST", "Patient", None, json={"resourceType": "Patient"}).status_code == 401


def test_metadata_and_smart_configuration_need_no_token(api) -> None:  # type: ignore[no-untyped-def]
    assert get(api, "metadata", None).status_code == 200
    assert get(api, ".well-known/smart-configuration", None).status_code == 200


def _other_rsa() -> RSAKey:
    return RSAKey.generate_key(2048, parameters={"kid": TEST_ISSUER.key.kid})


def _invalid_tokens() -> dict[str, str]:
    now = int(time.time())
    public_pem = TEST_ISSUER.key.as_pem(private=False)
    return {
        "malformed": "not-a-jwt",
        "two-parts": "abc.def",
        "garbage-base64": "!!!.???.***",
        "bad-signature": TEST_ISSUER.token(key=_other_rsa()),
        "tampered-payload": (lambda t: t.split(".")[0] + "." + b64(json.dumps(claims(scope="system/*.*", sub="evil"))
                                                                    .encode()) + "." + t.split(".")[2])(TEST_ISSUER.token()),
        "expired": TEST_ISSUER.token(exp=now - 120, iat=now - 600),
        "nbf-in-the-future": TEST_ISSUER.token(nbf=now + 7200),  # still future after a slow suite
        "no-exp": TEST_ISSUER.token(exp=None),
        "wrong-aud": TEST_ISSUER.token(aud="https://elsewhere.example/fhir"),
        "no-aud": TEST_ISSUER.token(aud=None),
        "unknown-issuer": TEST_ISSUER.token(iss="https://evil.example"),
        "unknown-kid": TEST_ISSUER.token(key=RSAKey.generate_key(2048, parameters={"kid": "nobody"})),
        "alg-none": raw_jwt({"alg": "none", "typ": "JWT"}, claims()),
        "alg-none-with-kid": raw_jwt({"alg": "none", "kid": TEST_ISSUER.key.kid}, claims()),
        "hs256-public-key-as-secret": raw_jwt(
            {"alg": "HS256", "kid": TEST_ISSUER.key.kid}, claims(),
            lambda m: hmac.new(public_pem, m, hashlib.sha256).digest()),
        "rs256-token-labelled-es256": (lambda t: b64(json.dumps({"alg": "ES256", "kid": TEST_ISSUER.key.kid}).encode())
                                       + "." + ".".join(t.split(".")[1:]))(TEST_ISSUER.token()),
        "bad-purpose": TEST_ISSUER.token(purpose_of_use="not a code"),
    }


@pytest.mark.parametrize("case", list(_invalid_tokens()))
def test_invalid_tokens_are_401_invalid_token(api, case: str) -> None:  # type: ignore[no-untyped-def]
    token = _TOKENS[case]
    resp = get(api, "Patient", token, _count=1)
    assert resp.status_code == 401, (case, resp.text)
    challenge = resp.headers["www-authenticate"]
    assert challenge.startswith('Bearer realm="carebroker", error="invalid_token"'), challenge
    assert resp.json()["resourceType"] == "OperationOutcome"


_TOKENS = _invalid_tokens()


def test_not_a_bearer_header_is_401(api) -> None:  # type: ignore[no-untyped-def]
    req = api.build_request("GET", "Patient")
    req.headers["authorization"] = "Basic dXNlcjpwYXNz"
    resp = api.send(req)
    assert resp.status_code == 401 and 'error="invalid_token"' in resp.headers["www-authenticate"]


def test_clock_skew_within_the_leeway_is_accepted(api) -> None:  # type: ignore[no-untyped-def]
    now = int(time.time())
    assert get(api, "Patient", TEST_ISSUER.token(exp=now - 10), _count=1).status_code == 200
    assert get(api, "Patient", TEST_ISSUER.token(nbf=now + 10), _count=1).status_code == 200


def test_es256_and_rs384_tokens_are_accepted(backends, backend: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    idp = TestIssuer("https://ec.carebroker.test", "https://carebroker.test/fhir", tmp_path)
    idp.keys = [ECKey.generate_key("P-256", parameters={"kid": "ec-1"}),
                RSAKey.generate_key(2048, parameters={"kid": "rsa-384"})]
    idp.write_jwks()
    settings = app_settings(trusted_issuers=parse_trusted_issuers(json.dumps([idp.config()])))
    with TestClient(create_app(settings, backends.engine(backend)), base_url="http://testserver/fhir/") as client:
        ok = idp.token(alg="ES256", key=idp.keys[0])
        assert client.get("Patient", params={"_count": 1}, headers={"Authorization": f"Bearer {ok}"}).status_code == 200
        ok = idp.token(alg="RS384", key=idp.keys[1])
        assert client.get("Patient", params={"_count": 1}, headers={"Authorization": f"Bearer {ok}"}).status_code == 200
        # the conftest issuer is not trusted by this app
        assert client.get("Patient", headers={"Authorization": f"Bearer {TEST_ISSUER.token()}"}).status_code == 401


# -- JWKS over HTTP, rotation ----------------------------------------------------------------------------

def test_jwks_rotation_refetches_once_per_unknown_kid_and_never_floods(backends, backend: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    idp_server = JwksServer()
    try:
        idp = TestIssuer("https://rotating.carebroker.test", "https://carebroker.test/fhir", tmp_path)
        idp_server.keys = [RSAKey.generate_key(2048, parameters={"kid": "k1"})]
        config = [{"issuer": idp.issuer, "jwks": idp_server.url, "audience": idp.audience}]
        settings = app_settings(trusted_issuers=parse_trusted_issuers(json.dumps(config)), jwks_refresh_interval=1.0)
        with TestClient(create_app(settings, backends.engine(backend)), base_url="http://testserver/fhir/") as client:
            def status(token: str) -> int:
                return client.get("Patient", params={"_count": 1}, headers={"Authorization": f"Bearer {token}"}).status_code

            assert status(idp.token(key=idp_server.keys[0])) == 200
            assert idp_server.hits == 1
            assert status(idp.token(key=idp_server.keys[0])) == 200
            assert idp_server.hits == 1  # cached
            # the IdP rotates: k2 signs, k1 is still published
            k1, k2 = idp_server.keys[0], RSAKey.generate_key(2048, parameters={"kid": "k2"})
            idp_server.keys = [k2, k1]
            time.sleep(1.1)
            assert status(idp.token(key=k1)) == 200
            assert idp_server.hits == 1  # a known kid: no fetch
            assert status(idp.token(key=k2)) == 200
            assert idp_server.hits == 2  # k2 was unknown: one refetch
            # a flood of made-up kids: refused, and no more than one fetch per interval
            for i in range(20):
                assert status(idp.token(key=k2, header={"kid": f"bogus-{i}"})) == 401
            assert idp_server.hits == 2
            assert status(idp.token(key=k2)) == 200
    finally:
        idp_server.close()


# -- configuration and parsing (no server) -------------------------------------------------------------------

def test_trusted_issuer_configuration_is_checked(tmp_path) -> None:  # type: ignore[no-untyped-def]
    jwks = tmp_path / "jwks.json"
    jwks.write_text('{"keys": []}')
    ok = parse_trusted_issuers(json.dumps([
        {"issuer": "https://a", "jwks": "https://idp.example/jwks"},
        {"issuer": "https://b", "jwks": "http://127.0.0.1:9/jwks", "audience": "x"},
        {"issuer": "https://c", "jwks": str(jwks), "audience": ["x", "y"]},
    ]))
    assert [i.audience for i in ok] == [None, ("x",), ("x", "y")]
    config_file = tmp_path / "issuers.json"
    config_file.write_text(json.dumps([{"issuer": "https://a", "jwks": "https://idp.example/jwks"}]))
    assert parse_trusted_issuers(str(config_file))[0].issuer == "https://a"
    for bad in ([{"issuer": "https://a", "jwks": "http://idp.example/jwks"}],  # plain http off loopback
                [{"issuer": "https://a", "jwks": str(tmp_path / "missing.json")}],
                [{"issuer": "https://a"}], [{"jwks": "https://x"}], {"issuer": "x"}):
        with pytest.raises(ValueError):
            parse_trusted_issuers(json.dumps(bad))


def test_scope_parsing_v1_and_v2() -> None:
    def perms(text: str) -> str:
        scope = parse_scope(text)
        assert scope is not None
        return "".join(p for p in "cruds" if p in scope.permissions)

    assert perms("patient/Observation.read") == "rs"
    assert perms("user/*.write") == "cud"
    assert perms("system/*.*") == "cruds"
    assert perms("user/Patient.rs") == "rs"
    assert perms("user/Patient.cud") == "cud"
    assert perms("user/Patient.cruds") == "cruds"
    assert perms("user/Patient.s") == "s"
    granular = parse_scope(f"patient/Observation.rs?category={LAB}")
    assert granular is not None and granular.query == (("category", LAB),)
    for bad in ("patient/Observation.dus", "user/Patient.sr", "user/Patient.rr", "user/Patient.x",
                "user/observation.read", "user/Patient.read?x=1", "user/*.rs?category=x", "user/Patient.rs?",
                "system/Patient"):
        with pytest.raises(InvalidScope):
            parse_scope(bad)
    scopes, invalid = parse_scopes("openid fhirUser launch/patient offline_access patient/Observation.rs "
                                   "patient/Observation.dus")
    assert [s.text for s in scopes] == ["patient/Observation.rs"] and invalid == ("patient/Observation.dus",)


def test_principal_from_claims() -> None:
    p = principal_from_claims({"iss": "i", "sub": "s", "scope": "user/*.rs openid", "fhirUser":
                               "https://x.example/fhir/Practitioner/pr1", "roles": ["clinician", "nonsense"],
                               "organization": "Organization/o1", "purpose_of_use": "ETREAT", "exp": 5})
    assert p.fhir_user == "Practitioner/pr1" and p.roles == {"clinician"} and p.organization == "Organization/o1"
    assert p.emergency and p.purpose_of_use == "ETREAT" and len(p.scopes) == 1 and p.expires_at == 5
    assert principal_from_claims({"iss": "i", "scope": ""}).purpose_of_use == "TREAT"
    mapped = principal_from_claims({"iss": "i", "realm_access": {"roles": ["doctor", "admin"]}},
                                   role_claim="realm_access.roles", role_map={"doctor": "clinician"})
    assert mapped.roles == {"clinician", "admin"}
    pat = principal_from_claims({"iss": "i", "fhirUser": "Patient/p9", "purpose_of_use":
                                 {"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "HRESCH"}})
    assert pat.patient == "p9" and pat.purpose_of_use == "HRESCH"
    assert principal_from_claims({"iss": "i", "fhirUser": "Practitioner/a"},
                                 find_organization=lambda ref: "Organization/found").organization == "Organization/found"
    for bad in ({"fhirUser": "Observation/1"}, {"patient": 3}, {"purpose_of_use": "x y"}, {"scope": 5}):
        with pytest.raises(InvalidClaims):
            principal_from_claims({"iss": "i", **bad})


def test_claims_checks() -> None:
    now = time.time()
    base = {"iss": "i", "aud": ["a", "b"], "exp": now + 60}
    check_claims(base, "i", ("b",), now)
    for bad in ({"iss": "j"}, {"aud": "c"}, {"exp": now - 31}, {"exp": "soon"}, {"nbf": now + 31}):
        with pytest.raises(InvalidToken):
            check_claims({**base, **bad}, "i", ("a",), now)


def test_organization_found_from_the_practitioner_role(asgi_client, engine) -> None:  # type: ignore[no-untyped-def]
    api = asgi_client
    s = uuid.uuid4().hex[:8]
    for res in ({"resourceType": "Organization", "id": f"org-{s}", "name": "Larkspur"},
                {"resourceType": "Practitioner", "id": f"pr-{s}"},
                {"resourceType": "PractitionerRole", "id": f"role-{s}", "active": True,
                 "practitioner": {"reference": f"Practitioner/pr-{s}"}, "organization": {"reference": f"Organization/org-{s}"}}):
        assert api.put(f"{res['resourceType']}/{res['id']}", json=res).status_code in (200, 201)
    find = organization_finder(FhirService(Store(engine)))
    assert find(f"Practitioner/pr-{s}") == f"Organization/org-{s}"
    assert find(f"PractitionerRole/role-{s}") == f"Organization/org-{s}"
    assert find("Practitioner/nobody-here") is None
    server = ResourceServer(parse_trusted_issuers(json.dumps([TEST_ISSUER.config()])), find_organization=find)
    principal = server.authenticate(TEST_ISSUER.token("user/*.rs", fhirUser=f"Practitioner/pr-{s}"), "ignored")
    assert principal.organization == f"Organization/org-{s}" and principal.roles == {"admin"}


# -- scopes -------------------------------------------------------------------------------------------------

def world(api, s: str) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """Two patients with records, and what those refer to; ids carry `s`."""
    def obs(oid: str, pid: str, cat: str, code: str) -> dict[str, Any]:
        return {"resourceType": "Observation", "id": f"{oid}-{s}", "status": "final",
                "category": [{"coding": [{"system": CATEGORY, "code": cat}]}],
                "code": {"coding": [{"system": "urn:test", "code": f"{code}-{s}"}]},
                "subject": {"reference": f"Patient/{pid}-{s}"}, "performer": [{"reference": f"Practitioner/pr-{s}"}]}

    resources = [
        {"resourceType": "Practitioner", "id": f"pr-{s}", "name": [{"family": f"Jones{s}"}]},
        {"resourceType": "Patient", "id": f"a-{s}", "name": [{"family": f"Alpha{s}"}],
         "generalPractitioner": [{"reference": f"Practitioner/pr-{s}"}]},
        {"resourceType": "Patient", "id": f"b-{s}", "name": [{"family": f"Beta{s}"}],
         "generalPractitioner": [{"reference": f"Practitioner/pr-{s}"}]},
        obs("a-lab", "a", "laboratory", "hb"), obs("a-vital", "a", "vital-signs", "bp"),
        obs("b-lab", "b", "laboratory", "secret"), obs("b-vital", "b", "vital-signs", "bp"),
        {"resourceType": "Encounter", "id": f"b-enc-{s}", "status": "finished",
         "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
         "subject": {"reference": f"Patient/b-{s}"}},
        {"resourceType": "Task", "id": f"task-{s}", "status": "requested", "intent": "order",
         "for": {"reference": f"Patient/b-{s}"}},
    ]
    for res in resources:
        resp = api.put(f"{res['resourceType']}/{res['id']}", json=res)
        assert resp.status_code in (200, 201), resp.text
    return {"a": f"a-{s}", "b": f"b-{s}"}


def ids(bundle: dict[str, Any], mode: str | None = None) -> set[str]:
    return {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in bundle.get("entry", [])
            if "resource" in e and e["resource"]["resourceType"] != "OperationOutcome"
            and (mode is None or e.get("search", {}).get("mode") == mode)}


def test_read_without_search_and_search_without_read(api) -> None:  # type: ignore[no-untyped-def]
    s = uuid.uuid4().hex[:8]
    world(api, s)
    r_only, s_only = TEST_ISSUER.token("user/Patient.r"), TEST_ISSUER.token("user/Patient.s")
    assert get(api, f"Patient/a-{s}", r_only).status_code == 200
    assert get(api, f"Patient/a-{s}/_history/1", r_only).status_code == 200
    denied = get(api, "Patient", r_only, _id=f"a-{s}")
    assert denied.status_code == 403 and denied.json()["issue"][0]["code"] == "forbidden"
    assert 'error="insufficient_scope"' in denied.headers["www-authenticate"]
    assert get(api, f"Patient/a-{s}", s_only).status_code == 403
    assert ids(get(api, "Patient", s_only, _id=f"a-{s}").json()) == {f"Patient/a-{s}"}
    assert get(api, f"Observation/a-lab-{s}", r_only).status_code == 403  # another type


def test_write_does_not_imply_read_and_v1_v2_agree(api) -> None:  # type: ignore[no-untyped-def]
    s = uuid.uuid4().hex[:8]
    world(api, s)
    body = {"resourceType": "Patient", "id": f"a-{s}", "name": [{"family": f"Changed{s}"}]}
    for write in ("user/Patient.write", "user/Patient.cud", "system/Patient.u"):
        token = TEST_ISSUER.token(write)
        assert send(api, "PUT", f"Patient/a-{s}", token, json=body).status_code == 200, write
        assert get(api, f"Patient/a-{s}", token).status_code == 403, write
        assert get(api, "Patient", token, _id=f"a-{s}").status_code == 403, write
    for read in ("user/Patient.read", "user/Patient.rs", "patient/Patient.read"):
        token = TEST_ISSUER.token(read, patient=f"a-{s}")
        assert get(api, f"Patient/a-{s}", token).status_code == 200, read
        assert send(api, "PUT", f"Patient/a-{s}", token, json=body).status_code == 403, read
        assert send(api, "DELETE", f"Patient/a-{s}", token).status_code == 403, read
        assert send(api, "POST", "Patient", token, json={"resourceType": "Patient"}).status_code == 403, read
    wildcard = TEST_ISSUER.token("user/*.rs")
    assert get(api, f"Observation/a-lab-{s}", wildcard).status_code == 200
    assert get(api, "Practitioner", wildcard, _id=f"pr-{s}").status_code == 200
    assert send(api, "POST", "Patient", wildcard, json={"resourceType": "Patient"}).status_code == 403
    for useless in ("user/Patient.dus", "openid fhirUser", "launch/patient", ""):
        assert get(api, f"Patient/a-{s}", TEST_ISSUER.token(useless)).status_code == 403, useless


def test_granular_scope_filters_searches_and_reads(api) -> None:  # type: ignore[no-untyped-def]
    s = uuid.uuid4().hex[:8]
    world(api, s)
    token = TEST_ISSUER.token(f"user/Observation.rs?category={LAB}")
    found = get(api, "Observation", token, performer=f"Practitioner/pr-{s}", _total="accurate").json()
    assert ids(found) == {f"Observation/a-lab-{s}", f"Observation/b-lab-{s}"} and found["total"] == 2
    assert get(api, f"Observation/a-lab-{s}", token).status_code == 200
    assert get(api, f"Observation/a-vital-{s}", token).status_code == 404
    # a granular patient/ scope: the query AND the compartment
    token = TEST_ISSUER.token(f"patient/Observation.rs?category={LAB}", patient=f"a-{s}")
    found = get(api, "Observation", token, performer=f"Practitioner/pr-{s}").json()
    assert ids(found) == {f"Observation/a-lab-{s}"}
    # two scopes on a type: the union of what each grants
    token = TEST_ISSUER.token(f"user/Observation.rs?category={LAB} user/Observation.rs?code=urn:test|bp-{s}")
    found = get(api, "Observation", token, performer=f"Practitioner/pr-{s}").json()
    assert ids(found) == {f"Observation/{o}-{s}" for o in ("a-lab", "b-lab", "a-vital", "b-vital")}


# -- patient/ scopes: the patient's compartment only ---------------------------------------------------------

@pytest.fixture
def two_patients(api):  # type: ignore[no-untyped-def]
    s = uuid.uuid4().hex[:8]
    world(api, s)
    return s, TEST_ISSUER.token("patient/*.rs", patient=f"a-{s}", fhirUser=f"Patient/a-{s}", roles=["patient"])


def test_patient_scope_search_and_counts(api, two_patients) -> None:  # type: ignore[no-untyped-def]
    s, token = two_patients
    found = get(api, "Observation", token, performer=f"Practitioner/pr-{s}", _total="accurate").json()
    assert ids(found) == {f"Observation/a-lab-{s}", f"Observation/a-vital-{s}"} and found["total"] == 2
    counted = get(api, "Observation", token, performer=f"Practitioner/pr-{s}", _summary="count").json()
    assert counted["total"] == 2 and "entry" not in counted
    paged = get(api, "Observation", token, performer=f"Practitioner/pr-{s}", _count=1).json()
    assert paged["total"] == 2 and len(ids(paged)) == 1
    assert ids(get(api, "Patient", token, general_practitioner=f"Practitioner/pr-{s}").json()) == {f"Patient/a-{s}"}
    assert ids(get(api, "Encounter", token, subject=f"Patient/b-{s}").json()) == set()
    # compartment search of the other patient, and a system search
    assert ids(get(api, f"Patient/b-{s}/Observation", token).json()) == set()
    assert ids(get(api, f"Patient/a-{s}/Observation", token).json()) == {f"Observation/a-lab-{s}", f"Observation/a-vital-{s}"}
    system = get(api, "", token, _type="Observation,Patient", _lastUpdated="gt2000-01-01", _count=1000).json()
    assert ids(system) == {f"Patient/a-{s}", f"Observation/a-lab-{s}", f"Observation/a-vital-{s}"}
    # shared types are readable, types outside the compartment that are not are refused
    assert get(api, f"Practitioner/pr-{s}", token).status_code == 200
    assert get(api, f"Task/task-{s}", token).status_code == 403
    assert get(api, "Task", token).status_code == 403


def test_patient_scope_reads(api, two_patients) -> None:  # type: ignore[no-untyped-def]
    s, token = two_patients
    assert get(api, f"Patient/a-{s}", token).status_code == 200
    assert get(api, f"Observation/a-lab-{s}", token).status_code == 200
    for other in (f"Patient/b-{s}", f"Observation/b-lab-{s}", f"Observation/b-lab-{s}/_history/1",
                  f"Encounter/b-enc-{s}", f"Patient/b-{s}/_history", f"Observation/b-lab-{s}/_history"):
        resp = get(api, other, token)
        assert resp.status_code == 404, (other, resp.text)  # as if it did not exist
    no_patient = TEST_ISSUER.token("patient/*.rs")  # patient/ scopes without a patient: nothing
    assert get(api, f"Patient/a-{s}", no_patient).status_code == 403


def test_patient_scope_includes_chains_and_has(api, two_patients) -> None:  # type: ignore[no-untyped-def]
    s, token = two_patients
    inc = get(api, "Observation", token, performer=f"Practitioner/pr-{s}", _include="Observation:subject").json()
    assert ids(inc, "include") == {f"Patient/a-{s}"}
    rev = get(api, "Practitioner", token, _id=f"pr-{s}", _revinclude=["Observation:performer", "Patient:general-practitioner"]).json()
    assert ids(rev, "match") == {f"Practitioner/pr-{s}"}
    assert ids(rev, "include") == {f"Observation/a-lab-{s}", f"Observation/a-vital-{s}", f"Patient/a-{s}"}
    star = get(api, "Practitioner", token, _id=f"pr-{s}", _revinclude="*").json()
    assert not any(i.split("/")[1].startswith("b-") for i in ids(star))
    # chains and _has see only what the token may see
    chained = get(api, "Observation", token, **{"subject:Patient.name": f"Beta{s}"}).json()
    assert ids(chained) == set()
    has = get(api, "Practitioner", token, **{"_has:Observation:performer:code": f"urn:test|secret-{s}"}).json()
    assert ids(has) == set()  # only patient B has a 'secret' observation
    has = get(api, "Practitioner", token, **{"_has:Observation:performer:code": f"urn:test|hb-{s}"}).json()
    assert ids(has) == {f"Practitioner/pr-{s}"}
    admin = get(api, "Practitioner", TEST_ISSUER.token(), **{"_has:Observation:performer:code": f"urn:test|secret-{s}"}).json()
    assert ids(admin) == {f"Practitioner/pr-{s}"}


def test_patient_scope_history_and_everything(api, two_patients) -> None:  # type: ignore[no-untyped-def]
    s, token = two_patients
    history = get(api, "Observation/_history", token, _count=1000).json()
    assert not any(e["resource"]["id"].startswith("b-") and e["resource"]["id"].endswith(s)
                   for e in history.get("entry", []) if "resource" in e)
    assert {f"a-lab-{s}", f"a-vital-{s}"} <= {e["resource"]["id"] for e in history.get("entry", []) if "resource" in e}
    system = get(api, "_history", token, _count=1000).json()
    assert not any(e["resource"]["id"] in (f"b-{s}", f"b-lab-{s}", f"task-{s}") for e in system.get("entry", [])
                   if "resource" in e)
    mine = get(api, f"Patient/a-{s}/$everything", token).json()
    assert ids(mine) == {f"Patient/a-{s}", f"Observation/a-lab-{s}", f"Observation/a-vital-{s}", f"Practitioner/pr-{s}"}
    assert mine["total"] == 4
    assert get(api, f"Patient/b-{s}/$everything", token).status_code == 404
    every = get(api, "Patient/$everything", token, _count=1000).json()
    assert ids(every) == ids(mine)


# -- Bundles -------------------------------------------------------------------------------------------------

def test_batch_entries_are_checked_one_by_one(api, two_patients) -> None:  # type: ignore[no-untyped-def]
    s, token = two_patients
    batch = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": f"Observation/a-lab-{s}"}},
        {"request": {"method": "GET", "url": f"Observation/b-lab-{s}"}},
        {"request": {"method": "POST", "url": "Observation"},
         "resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                      "subject": {"reference": f"Patient/a-{s}"}}},
        {"request": {"method": "GET", "url": f"Observation?performer=Practitioner/pr-{s}"}},
    ]}
    resp = send(api, "POST", "", token, json=batch)
    assert resp.status_code == 200, resp.text
    statuses = [e["response"]["status"].split()[0] for e in resp.json()["entry"]]
    assert statuses == ["200", "404", "403", "200"]
    assert ids(resp.json()["entry"][3]["resource"]) == {f"Observation/a-lab-{s}", f"Observation/a-vital-{s}"}


def test_a_transaction_with_one_out_of_scope_entry_fails_whole(api, two_patients) -> None:  # type: ignore[no-untyped-def]
    s, _ = two_patients
    writer = TEST_ISSUER.token("patient/Observation.crus", patient=f"a-{s}")
    new_obs = {"resourceType": "Observation", "status": "final", "code": {"text": f"tx-{s}"},
               "subject": {"reference": f"Patient/a-{s}"}}
    tx = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "POST", "url": "Observation"}, "resource": new_obs},
        {"request": {"method": "PUT", "url": f"Patient/a-{s}"},
         "resource": {"resourceType": "Patient", "id": f"a-{s}"}},
    ]}
    resp = send(api, "POST", "", writer, json=tx)
    assert resp.status_code == 403, resp.text
    assert "Bundle.entry[1]" in resp.json()["issue"][0]["diagnostics"]
    # writing into another patient's compartment: refused too, and nothing was written either time
    tx["entry"] = [tx["entry"][0], {"request": {"method": "POST", "url": "Observation"},
                                    "resource": {**new_obs, "subject": {"reference": f"Patient/b-{s}"}}}]
    resp = send(api, "POST", "", writer, json=tx)
    assert resp.status_code == 403, resp.text
    admin = TEST_ISSUER.token()
    assert get(api, "Observation", admin, code=f"tx-{s}").json().get("total") == 0
    # within scope, the same transaction commits
    tx["entry"] = [tx["entry"][0]]
    assert send(api, "POST", "", writer, json=tx).status_code == 200
    assert get(api, "Observation", admin, **{"code:text": f"tx-{s}"}).json().get("total") == 1


def test_writes_stay_in_the_patients_compartment(api, two_patients) -> None:  # type: ignore[no-untyped-def]
    s, _ = two_patients
    writer = TEST_ISSUER.token("patient/Observation.cruds", patient=f"a-{s}")
    mine = {"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "subject": {"reference": f"Patient/a-{s}"}}
    assert send(api, "POST", "Observation", writer, json=mine).status_code == 201
    theirs = {**mine, "subject": {"reference": f"Patient/b-{s}"}}
    assert send(api, "POST", "Observation", writer, json=theirs).status_code == 403
    moved = {**theirs, "id": f"a-lab-{s}"}
    assert send(api, "PUT", f"Observation/a-lab-{s}", writer, json=moved).status_code == 403  # moving it out
    assert send(api, "PUT", f"Observation/b-lab-{s}", writer, json={**mine, "id": f"b-lab-{s}"}).status_code == 403
    assert send(api, "DELETE", f"Observation/b-lab-{s}", writer).status_code == 403
    assert get(api, f"Observation/b-lab-{s}", TEST_ISSUER.token()).json()["subject"]["reference"] == f"Patient/b-{s}"


def test_operations_need_their_scopes(api, two_patients) -> None:  # type: ignore[no-untyped-def]
    s, token = two_patients
    obs = {"resourceType": "Observation", "status": "final", "code": {"text": "x"}}
    assert send(api, "POST", "Observation/$validate", token, json=obs).status_code == 200  # read scope suffices
    assert send(api, "POST", "Observation/$validate", TEST_ISSUER.token("user/Patient.rs"), json=obs).status_code == 403
    headers = {"Prefer": "respond-async"}
    assert send(api, "GET", "$export", token, headers=headers).status_code == 403  # patient/ scopes do not export
    assert send(api, "GET", "$export", TEST_ISSUER.token("user/*.write"), headers=headers).status_code == 403
    bulk = TEST_ISSUER.token("system/Patient.read system/Observation.rs")
    assert send(api, "GET", "$export", bulk, headers=headers, params={"_type": "Encounter"}).status_code == 403
    kicked = send(api, "GET", "$export", bulk, headers=headers, params={"_type": "Patient"})
    assert kicked.status_code == 202, kicked.text
    send(api, "DELETE", kicked.headers["content-location"], bulk)


@pytest.mark.slow
def test_auth_off_is_an_explicit_serve_flag(backends) -> None:  # type: ignore[no-untyped-def]
    url = backends.url("sqlite")
    open_base = backends.start_server(url, "--auth", "off")
    assert httpx.get(f"{open_base}/Patient", params={"_count": 1}).status_code == 200
    closed_base = backends.start_server(url)
    assert httpx.get(f"{closed_base}/Patient", params={"_count": 1}).status_code == 401


def test_built_in_tokens_are_accepted_until_revoked(backends, backend: str) -> None:  # type: ignore[no-untyped-def]
    """A token of carebroker's own authorization server, used on /fhir of a real server: its scopes
    apply, and once revoked it is refused at once (the cached verification notwithstanding)."""
    from fhir_server.auth.server import AuthServer

    fhir = backends.server(backend)
    origin = fhir[: -len("/fhir")]
    client_id, secret = f"rs-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    AuthServer(Store(backends.engine(backend))).registry.add_client(
        client_id, scope=("system/Patient.rs",), secret=secret, roles=("integration",))
    with httpx.Client(timeout=30) as http:
        issued = http.post(f"{origin}/auth/token", data={"grant_type": "client_credentials", "scope": "system/Patient.rs"},
                           auth=(client_id, secret))
        assert issued.status_code == 200, issued.text
        bearer = {"Authorization": f"Bearer {issued.json()['access_token']}"}
        assert http.get(f"{fhir}/Patient", params={"_count": 1}, headers=bearer).status_code == 200
        assert http.get(f"{fhir}/Patient", params={"_count": 1}, headers=bearer).status_code == 200  # cached
        assert http.get(f"{fhir}/Observation", params={"_count": 1}, headers=bearer).status_code == 403
        revoked = http.post(f"{origin}/auth/revoke", data={"token": issued.json()["access_token"]},
                            auth=(client_id, secret))
        assert revoked.status_code == 200
        refused = http.get(f"{fhir}/Patient", params={"_count": 1}, headers=bearer)
        assert refused.status_code == 401 and 'error="invalid_token"' in refused.headers["www-authenticate"]

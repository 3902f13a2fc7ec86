"""SMART standalone launch against the built-in authorization server, driven by httpx through a real
`carebroker serve` on SQLite and PostgreSQL: GET /auth/authorize, post the login form, follow the
redirect, exchange the code with the PKCE verifier; then every refusal."""
from __future__ import annotations

import base64
import hashlib
import html
import re
import secrets
import uuid
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from fhir_server.auth.tokens import InvalidToken
from fhir_server.service.interactions import FhirService

from test_auth_server import Env, env, new_id, verify_with_jwks  # noqa: F401  (env is a fixture)

REDIRECT = "http://127.0.0.1:9/callback"
APP_SCOPE = ("openid", "fhirUser", "launch/patient", "patient/*.rs", "user/*.rs")


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


def app_client(env: Env, secret: str | None = None) -> str:
    client_id = new_id("app")
    env.auth.registry.add_client(client_id, scope=APP_SCOPE, redirect_uris=(REDIRECT, REDIRECT + "2"),
                                 secret=secret, name="Test App")
    return client_id


def user(env: Env, **kw: Any) -> str:
    username = new_id("u")
    env.auth.registry.add_user(username, "correct horse", **kw)
    return username


def patient(env: Env) -> str:
    pid = new_id("pat")
    FhirService(env.auth.store).update("Patient", pid, {"resourceType": "Patient", "id": pid,
                                                        "name": [{"family": "Okafor", "given": ["Ada"]}]})
    return pid


def authorize(env: Env, client_id: str, challenge: str, **overrides: str | None) -> httpx.Response:
    params: dict[str, str | None] = {
        "response_type": "code", "client_id": client_id, "redirect_uri": REDIRECT,
        "scope": "openid fhirUser launch/patient patient/*.rs", "state": "st-" + uuid.uuid4().hex,
        "aud": env.fhir, "code_challenge": challenge, "code_challenge_method": "S256", "nonce": "n-123"}
    params.update(overrides)
    return env.http.get(f"{env.origin}/auth/authorize", params={k: v for k, v in params.items() if v is not None})


def login(env: Env, page: httpx.Response, username: str, password: str = "correct horse",
          **fields: str) -> httpx.Response:
    """Fill in and post the login form as a browser would."""
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html"), page.text
    action = html.unescape(re.search(r'<form method="post" action="([^"]+)"', page.text).group(1))
    form = {html.unescape(n): html.unescape(v)
            for n, v in re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">', page.text)}
    return env.http.post(action, data={**form, "username": username, "password": password, **fields})


def redirect_params(resp: httpx.Response) -> dict[str, str]:
    assert resp.status_code in (302, 303), resp.text
    location = resp.headers["location"]
    assert location.startswith(REDIRECT + "?")
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


def exchange(env: Env, client_id: str | None, code: str, verifier: str, redirect_uri: str = REDIRECT,
             **kw: Any) -> httpx.Response:
    data = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri,
            "code_verifier": verifier}
    if client_id:
        data["client_id"] = client_id
    return env.http.post(env.token_url, data=data, **kw)


def get_code(env: Env, client_id: str, username: str, **login_fields: str) -> tuple[str, str]:
    verifier, challenge = pkce()
    page = authorize(env, client_id, challenge)
    params = redirect_params(login(env, page, username, **login_fields))
    return params["code"], verifier


def test_clinician_launch_with_patient_picker(env: Env) -> None:
    client_id = app_client(env)
    username = user(env, roles=("clinician",), fhir_user="Practitioner/prac-001",
                    organization="Organization/org-e85990")
    pid = patient(env)
    verifier, challenge = pkce()
    state = "state-" + uuid.uuid4().hex
    page = authorize(env, client_id, challenge, state=state)
    assert page.headers["cache-control"] == "no-store" and page.headers["x-frame-options"] == "DENY"
    assert 'name="password"' in page.text and 'name="patient"' in page.text and "Test App" in page.text
    # a staff user must choose an existing patient for launch/patient
    assert login(env, page, username).status_code == 400
    missing = login(env, page, username, patient="no-such-patient")
    assert missing.status_code == 400 and "no-such-patient" in missing.text
    wrong = login(env, page, username, password="wrong", patient=pid)
    assert wrong.status_code == 401 and "location" not in wrong.headers
    params = redirect_params(login(env, page, username, patient=pid))
    assert params["state"] == state and params["code"]

    resp = exchange(env, client_id, params["code"], verifier)
    assert resp.status_code == 200, resp.text
    assert resp.headers["cache-control"] == "no-store" and resp.headers["pragma"] == "no-cache"
    body = resp.json()
    assert body["patient"] == pid and body["token_type"] == "Bearer" and "refresh_token" not in body
    assert body["scope"] == "openid fhirUser launch/patient patient/*.rs"
    _, claims = verify_with_jwks(env, body["access_token"])
    assert claims["sub"] == username and claims["client_id"] == client_id and claims["aud"] == env.fhir
    assert claims["roles"] == ["clinician"] and claims["fhirUser"] == "Practitioner/prac-001"
    assert claims["organization"] == "Organization/org-e85990" and claims["patient"] == pid
    assert claims["exp"] - claims["iat"] <= 300
    assert env.auth.validate_access_token(body["access_token"], env.fhir)["patient"] == pid
    # the id_token: signed by the same issuer, for the app, with the nonce and an absolute fhirUser
    header, id_claims = verify_with_jwks(env, body["id_token"])
    assert header["alg"] == "RS256" and header["typ"] == "JWT"
    assert id_claims["iss"] == f"{env.origin}/auth" and id_claims["aud"] == client_id
    assert id_claims["sub"] == username and id_claims["nonce"] == "n-123"
    assert id_claims["fhirUser"] == f"{env.fhir}/Practitioner/prac-001"
    with pytest.raises(InvalidToken):  # an id_token is never an access token
        env.auth.validate_access_token(body["id_token"], env.fhir)


def test_patient_user_gets_their_own_record(env: Env) -> None:
    client_id = app_client(env)
    pid = patient(env)
    username = user(env, roles=("patient",), patient=pid)
    other = patient(env)
    code, verifier = get_code(env, client_id, username, patient=other)  # cannot pick someone else
    body = exchange(env, client_id, code, verifier).json()
    assert body["patient"] == pid
    _, claims = verify_with_jwks(env, body["access_token"])
    assert claims["roles"] == ["patient"] and claims["fhirUser"] == f"Patient/{pid}" and claims["patient"] == pid
    assert verify_with_jwks(env, body["id_token"])[1]["fhirUser"] == f"{env.fhir}/Patient/{pid}"


def _error(resp: httpx.Response, error: str, state: bool = True) -> None:
    params = redirect_params(resp)
    assert params["error"] == error, params
    assert ("state" in params) is state


def test_authorize_refusals(env: Env) -> None:
    client_id = app_client(env)
    verifier, challenge = pkce()
    plain = authorize(env, client_id, verifier, code_challenge_method="plain")
    _error(plain, "invalid_request")
    assert "plain" in redirect_params(plain)["error_description"]
    _error(authorize(env, client_id, challenge, code_challenge_method=None), "invalid_request")
    _error(authorize(env, client_id, None), "invalid_request")  # type: ignore[arg-type]
    _error(authorize(env, client_id, challenge, state=None), "invalid_request", state=False)
    _error(authorize(env, client_id, challenge, aud="https://other.example/fhir"), "invalid_request")
    _error(authorize(env, client_id, challenge, aud=None), "invalid_request")
    _error(authorize(env, client_id, challenge, response_type="token"), "unsupported_response_type")
    _error(authorize(env, client_id, challenge, scope="system/*.rs"), "invalid_scope")
    # never redirect to an unregistered URI, nor for an unknown client: an error page instead
    for resp in (authorize(env, client_id, challenge, redirect_uri="http://evil.example/cb"),
                 authorize(env, client_id, challenge, redirect_uri=None),
                 authorize(env, "no-such-client", challenge)):
        assert resp.status_code == 400 and "location" not in resp.headers
        assert resp.headers["content-type"].startswith("text/html")
    # the checks hold when the login form is posted back with altered fields too
    page = authorize(env, client_id, challenge)
    username = user(env, roles=("clinician",))
    tampered = login(env, page, username, code_challenge_method="plain")
    _error(tampered, "invalid_request")


def test_token_refusals(env: Env) -> None:
    client_id = app_client(env)
    username = user(env, roles=("patient",), patient=patient(env))
    # wrong verifier: refused, and the code is burnt
    code, verifier = get_code(env, client_id, username)
    bad = exchange(env, client_id, code, pkce()[0])
    assert bad.status_code == 400 and bad.json()["error"] == "invalid_grant"
    assert exchange(env, client_id, code, verifier).json()["error"] == "invalid_grant"
    # wrong redirect_uri (registered, but not the one the code was issued for)
    code, verifier = get_code(env, client_id, username)
    assert exchange(env, client_id, code, verifier, REDIRECT + "2").json()["error"] == "invalid_grant"
    # another client's code
    code, verifier = get_code(env, client_id, username)
    assert exchange(env, app_client(env), code, verifier).json()["error"] == "invalid_grant"
    # missing verifier
    code, verifier = get_code(env, client_id, username)
    resp = env.http.post(env.token_url, data={"grant_type": "authorization_code", "code": code,
                                              "redirect_uri": REDIRECT, "client_id": client_id})
    assert resp.status_code == 400 and resp.json()["error"] == "invalid_request"
    # reused code: refused, and the token the first exchange gave is revoked
    code, verifier = get_code(env, client_id, username)
    first = exchange(env, client_id, code, verifier)
    assert first.status_code == 200
    token = first.json()["access_token"]
    assert env.auth.validate_access_token(token, env.fhir)
    again = exchange(env, client_id, code, verifier)
    assert again.status_code == 400 and again.json()["error"] == "invalid_grant"
    with pytest.raises(InvalidToken, match="revoked"):
        env.auth.validate_access_token(token, env.fhir)
    # unknown code, unknown client
    assert exchange(env, client_id, "made-up", verifier).json()["error"] == "invalid_grant"
    assert exchange(env, "no-such-client", "made-up", verifier).status_code == 401


def test_confidential_app_must_authenticate(env: Env) -> None:
    client_id = app_client(env, secret="app-secret")
    username = user(env, roles=("patient",), patient=patient(env))
    code, verifier = get_code(env, client_id, username)
    unauthenticated = exchange(env, client_id, code, verifier)
    assert unauthenticated.status_code == 401 and unauthenticated.json()["error"] == "invalid_client"
    code, verifier = get_code(env, client_id, username)
    ok = exchange(env, None, code, verifier, auth=(client_id, "app-secret"))
    assert ok.status_code == 200, ok.text
    # a public app revokes its own token with just its client_id (RFC 7009 2.1)
    public = app_client(env)
    code, verifier = get_code(env, public, username)
    token = exchange(env, public, code, verifier).json()["access_token"]
    assert env.http.post(f"{env.origin}/auth/revoke", data={"token": token, "client_id": public}).status_code == 200
    with pytest.raises(InvalidToken, match="revoked"):
        env.auth.validate_access_token(token, env.fhir)


def test_demo_users_match_the_demo_population(backends: Any) -> None:
    """`serve --demo` registers users whose fhirUser/organization/patient are real demo resources,
    and the printed instructions name working endpoints; registering twice changes nothing."""
    from fhir_server.auth.demo import DEMO_APP, DEMO_BACKEND, DEMO_PASSWORD, DEMO_USERS, demo_instructions, register_demo
    from fhir_server.auth.registry import Registry
    from fhir_server.demo import demo_resources
    from fhir_server.storage.engine import create_engine
    from fhir_server.storage.repository import Store

    ids = {f"{r['resourceType']}/{r['id']}" for r in demo_resources()}
    engine = create_engine(backends.fresh_url("sqlite"))
    store = Store(engine)
    register_demo(store)
    register_demo(store)
    registry = Registry(store)
    assert {u.username for u in registry.users()} == set(DEMO_USERS)
    assert {r for u in registry.users() for r in u.roles} == {"clinician", "support", "ig-officer", "analyst",
                                                              "patient", "admin"}
    for u in registry.users():
        assert registry.authenticate_user(u.username, DEMO_PASSWORD) is not None
        for ref in (u.fhir_user, u.organization, f"Patient/{u.patient}" if u.patient else None):
            assert ref is None or ref in ids, ref
    assert registry.user("clinician").fhir_user.startswith("Practitioner/")
    assert registry.client(DEMO_APP).is_public and registry.client(DEMO_BACKEND).secret_hash
    text = demo_instructions("http://127.0.0.1:8080/fhir")
    assert "http://127.0.0.1:8080/auth/token" in text and "code_challenge_method=S256" in text
    engine.dispose()

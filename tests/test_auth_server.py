"""The built-in authorization server through real HTTP (a `carebroker serve` uvicorn process) on SQLite
and PostgreSQL, with real keys and really signed JWTs: SMART Backend Services, client_secret_basic,
introspection, revocation, key rotation, discovery and the CapabilityStatement's security."""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import ECKey, KeySet, RSAKey

from fhir_server.auth.server import AuthServer
from fhir_server.auth.tokens import InvalidToken
from fhir_server.storage.repository import Store

from conftest import Backends, JwksServer

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


@dataclass
class Env:
    """A running server on one backend, and an AuthServer over the same database (as another node)."""

    kind: str
    url: str  # database
    fhir: str  # FHIR base URL of the server
    http: httpx.Client
    auth: AuthServer

    @property
    def origin(self) -> str:
        return self.fhir[: -len("/fhir")]

    @property
    def token_url(self) -> str:
        return f"{self.origin}/auth/token"


@pytest.fixture
def env(backends: Backends, backend: str) -> Iterator[Env]:
    fhir = backends.server(backend)
    with httpx.Client(timeout=30) as client:
        yield Env(backend, backends.url(backend), fhir, client, AuthServer(Store(backends.engine(backend))))


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def backend_client(env: Env, alg: str = "RS384", **registration: Any) -> tuple[str, Any, str]:
    """A registered backend-services client: (client_id, its private key, kid)."""
    kid = new_id("kid")
    key = RSAKey.generate_key(2048) if alg.startswith("RS") else ECKey.generate_key("P-384")
    client_id = new_id("svc")
    registration.setdefault("scope", ("system/*.rs",))
    if "jku" not in registration:
        registration["jwks"] = {"keys": [{**key.as_dict(private=False), "kid": kid, "alg": alg}]}
    env.auth.registry.add_client(client_id, **registration)
    return client_id, key, kid


def assertion(key: Any, alg: str, client_id: str, aud: str, *, kid: str | None, exp_in: int = 120,
              jti: str | None = None, header: dict[str, Any] | None = None, **claims: Any) -> str:
    now = int(time.time())
    body = {"iss": client_id, "sub": client_id, "aud": aud, "exp": now + exp_in, "iat": now,
            "jti": jti or str(uuid.uuid4()), **claims}
    head = {"alg": alg, "typ": "JWT", **({"kid": kid} if kid else {}), **(header or {})}
    return jwt.encode(head, body, key, algorithms=[alg])


def token_request(env: Env, client_assertion: str, scope: str = "system/Patient.rs") -> httpx.Response:
    return env.http.post(env.token_url, data={"grant_type": "client_credentials", "scope": scope,
                                              "client_assertion_type": ASSERTION_TYPE,
                                              "client_assertion": client_assertion})


def verify_with_jwks(env: Env, token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and claims, the signature checked against the server's published JWKS."""
    jwks = env.http.get(f"{env.origin}/auth/jwks").json()
    decoded = jwt.decode(token, KeySet.import_key_set(jwks), algorithms=["RS256"])
    return decoded.header, decoded.claims


def b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


# -- SMART Backend Services -------------------------------------------------------------------------

@pytest.mark.parametrize("alg", ["RS384", "ES384"])
def test_backend_services_token(env: Env, alg: str) -> None:
    client_id, key, kid = backend_client(env, alg, scope=("system/*.rs", "system/Observation.cruds"),
                                         roles=("integration",), organization="Organization/org-rz9",
                                         fhir_user="Device/feed-1", purpose_of_use="TREAT")
    resp = token_request(env, assertion(key, alg, client_id, env.token_url, kid=kid),
                         "system/Patient.rs system/Observation.cud")
    assert resp.status_code == 200, resp.text
    assert resp.headers["cache-control"] == "no-store" and resp.headers["pragma"] == "no-cache"
    body = resp.json()
    assert body["token_type"] == "Bearer" and body["expires_in"] <= 300 and "refresh_token" not in body
    assert body["scope"] == "system/Patient.rs system/Observation.cud"
    header, claims = verify_with_jwks(env, body["access_token"])
    assert header["alg"] == "RS256" and header["typ"] == "at+jwt"
    assert claims["iss"] == f"{env.origin}/auth" and claims["aud"] == env.fhir
    assert claims["sub"] == client_id == claims["client_id"]
    assert 0 < claims["exp"] - claims["iat"] <= 300 and claims["jti"]
    assert claims["scope"] == body["scope"]
    assert claims["roles"] == ["integration"] and claims["organization"] == "Organization/org-rz9"
    assert claims["fhirUser"] == "Device/feed-1" and claims["purpose_of_use"] == "TREAT"
    # Another node (this process, same database) validates it with the function the resource server uses.
    assert env.auth.validate_access_token(body["access_token"], env.fhir)["jti"] == claims["jti"]
    with pytest.raises(InvalidToken):
        env.auth.validate_access_token(body["access_token"], "http://elsewhere.example/fhir")


def _refused(env: Env, resp: httpx.Response, words: str) -> None:
    assert resp.status_code == 401, resp.text
    assert resp.json()["error"] == "invalid_client"
    assert words in resp.json()["error_description"]
    assert resp.headers["cache-control"] == "no-store"


def test_backend_assertion_refusals(env: Env) -> None:
    client_id, key, kid = backend_client(env, "RS384")
    url = env.token_url
    _refused(env, token_request(env, assertion(key, "RS384", client_id, url, kid="not-" + kid)), "kid")
    _refused(env, token_request(env, assertion(key, "RS384", client_id, url, kid=None)), "kid")
    _refused(env, token_request(env, assertion(key, "RS384", client_id, url, kid=kid, exp_in=-60)), "expired")
    _refused(env, token_request(env, assertion(key, "RS384", client_id, url, kid=kid, exp_in=600)), "five minutes")
    _refused(env, token_request(env, assertion(key, "RS384", client_id, env.fhir, kid=kid)), "aud")
    _refused(env, token_request(env, assertion(key, "RS384", client_id, url, kid=kid, sub="someone-else")), "sub")
    other = RSAKey.generate_key(2048)  # right kid, wrong key
    _refused(env, token_request(env, assertion(other, "RS384", client_id, url, kid=kid)), "signature")
    _refused(env, token_request(env, assertion(key, "RS384", client_id, url, kid=kid,
                                               header={"jku": "http://127.0.0.1:9/jwks.json"})), "jku")
    # jti replay: the first use works, the second is refused, even though it is otherwise valid
    jti = str(uuid.uuid4())
    assert token_request(env, assertion(key, "RS384", client_id, url, kid=kid, jti=jti)).status_code == 200
    _refused(env, token_request(env, assertion(key, "RS384", client_id, url, kid=kid, jti=jti)), "jti")


def test_backend_assertion_algorithm_refusals(env: Env) -> None:
    client_id, key, kid = backend_client(env, "RS384")
    url = env.token_url
    now = int(time.time())
    claims = {"iss": client_id, "sub": client_id, "aud": url, "exp": now + 60, "jti": str(uuid.uuid4())}
    # HMAC keyed with the client's public key (the classic algorithm confusion) and `none`
    signing_input = f"{b64({'alg': 'HS256', 'kid': kid})}.{b64(claims)}"
    mac = hmac.new(key.as_pem(private=False), signing_input.encode(), hashlib.sha256).digest()
    hs = f"{signing_input}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"
    _refused(env, token_request(env, hs), "HS256")
    none = f"{b64({'alg': 'none', 'kid': kid})}.{b64({**claims, 'jti': str(uuid.uuid4())})}."
    _refused(env, token_request(env, none), "none")
    rs256 = jwt.encode({"alg": "RS256", "kid": kid}, {**claims, "jti": str(uuid.uuid4())}, key, algorithms=["RS256"])
    _refused(env, token_request(env, rs256), "RS256")
    _refused(env, token_request(env, "not-a-jwt"), "JWT")
    wrong_type = env.http.post(url, data={"grant_type": "client_credentials", "scope": "system/Patient.rs",
                                          "client_assertion_type": "urn:other", "client_assertion": hs})
    _refused(env, wrong_type, "client_assertion_type")


@pytest.fixture(scope="module")
def jwks_host() -> Iterator[JwksServer]:
    """A real HTTP server publishing a client's JWKS, as a client's jku would."""
    server = JwksServer()
    yield server
    server.close()


def test_backend_jku_only_if_registered(env: Env, jwks_host: JwksServer) -> None:
    base = jwks_host.base
    key, kid = ECKey.generate_key("P-384"), new_id("kid")
    jwks_host.keys = [{**key.as_dict(private=False), "kid": kid, "alg": "ES384"}]
    registered = f"{base}/registered/jwks.json"
    client_id, _, _ = backend_client(env, "ES384", jku=registered)
    url = env.token_url
    ok = token_request(env, assertion(key, "ES384", client_id, url, kid=kid, header={"jku": registered}))
    assert ok.status_code == 200, ok.text
    # no jku header: the registered URL is used
    assert token_request(env, assertion(key, "ES384", client_id, url, kid=kid)).status_code == 200
    # the same key set, but from a URL not registered for this client
    _refused(env, token_request(env, assertion(key, "ES384", client_id, url, kid=kid,
                                               header={"jku": f"{base}/other/jwks.json"})), "jku")


def test_scope_only_within_registration(env: Env) -> None:
    client_id, key, kid = backend_client(env, "RS384", scope=("system/Patient.rs", "system/Observation.read"))
    url = env.token_url
    resp = token_request(env, assertion(key, "RS384", client_id, url, kid=kid), "system/Patient.cruds")
    assert resp.status_code == 400 and resp.json()["error"] == "invalid_scope"
    resp = token_request(env, assertion(key, "RS384", client_id, url, kid=kid), "system/*.rs")
    assert resp.status_code == 400 and resp.json()["error"] == "invalid_scope"
    resp = token_request(env, assertion(key, "RS384", client_id, url, kid=kid),
                         "system/Patient.r system/Observation.rs system/Condition.rs system/Patient.cud")
    assert resp.status_code == 200
    assert resp.json()["scope"] == "system/Patient.r system/Observation.rs"  # only what is covered
    assert verify_with_jwks(env, resp.json()["access_token"])[1]["scope"] == "system/Patient.r system/Observation.rs"


def test_grant_type_errors(env: Env) -> None:
    resp = env.http.post(env.token_url, data={"grant_type": "password", "username": "x", "password": "y"})
    assert resp.status_code == 400 and resp.json()["error"] == "unsupported_grant_type"
    resp = env.http.post(env.token_url, data={"scope": "system/*.rs"})
    assert resp.status_code == 400 and resp.json()["error"] == "invalid_request"
    resp = env.http.post(env.token_url, json={"grant_type": "client_credentials"})
    assert resp.status_code == 400 and resp.json()["error"] == "invalid_request"
    resp = env.http.post(env.token_url, data={"grant_type": "client_credentials", "scope": "system/*.rs"})
    assert resp.status_code == 401 and resp.json()["error"] == "invalid_client"


# -- client_secret_basic ----------------------------------------------------------------------------

def test_client_secret_basic(env: Env) -> None:
    client_id = new_id("basic")
    env.auth.registry.add_client(client_id, scope=("system/*.rs",), secret="s3cret:with/odd+chars",
                                 roles=("integration",))
    data = {"grant_type": "client_credentials", "scope": "system/Patient.rs"}
    from urllib.parse import quote_plus
    ok = env.http.post(env.token_url, data=data, auth=(quote_plus(client_id), quote_plus("s3cret:with/odd+chars")))
    assert ok.status_code == 200, ok.text
    assert verify_with_jwks(env, ok.json()["access_token"])[1]["sub"] == client_id
    wrong = env.http.post(env.token_url, data=data, auth=(client_id, "wrong"))
    assert wrong.status_code == 401 and wrong.json()["error"] == "invalid_client"
    assert wrong.headers["www-authenticate"].startswith("Basic")
    # the secret in the body (client_secret_post) is not accepted
    posted = env.http.post(env.token_url, data={**data, "client_id": client_id, "client_secret": "s3cret:with/odd+chars"})
    assert posted.status_code == 401


def test_client_secret_basic_off_without_secret(env: Env) -> None:
    client_id, _, _ = backend_client(env, "RS384")  # registered with keys only
    resp = env.http.post(env.token_url, data={"grant_type": "client_credentials", "scope": "system/Patient.rs"},
                         auth=(client_id, ""))
    assert resp.status_code == 401 and "not enabled" in resp.json()["error_description"]
    resp = env.http.post(env.token_url, data={"grant_type": "client_credentials", "scope": "system/Patient.rs"},
                         auth=("nobody-" + client_id, "x"))
    assert resp.status_code == 401


# -- introspection and revocation ----------------------------------------------------------------

def _basic_client(env: Env, scope: tuple[str, ...] = ("system/*.rs",)) -> tuple[str, str]:
    client_id, secret = new_id("rs"), uuid.uuid4().hex
    env.auth.registry.add_client(client_id, scope=scope, secret=secret, roles=("integration",))
    return client_id, secret


def _token(env: Env, creds: tuple[str, str]) -> str:
    resp = env.http.post(env.token_url, data={"grant_type": "client_credentials", "scope": "system/Patient.rs"},
                         auth=creds)
    assert resp.status_code == 200, resp.text
    return str(resp.json()["access_token"])


def test_introspection_and_revocation(env: Env) -> None:
    creds = _basic_client(env)
    other = _basic_client(env)
    token = _token(env, creds)
    introspect = f"{env.origin}/auth/introspect"
    revoke = f"{env.origin}/auth/revoke"
    assert env.http.post(introspect, data={"token": token}).status_code == 401  # must authenticate
    info = env.http.post(introspect, data={"token": token}, auth=other)
    assert info.status_code == 200 and info.headers["cache-control"] == "no-store"
    body = info.json()
    assert body["active"] is True and body["client_id"] == creds[0] and body["scope"] == "system/Patient.rs"
    assert body["iss"] == f"{env.origin}/auth" and body["token_type"] == "Bearer"
    # another client may not revoke it
    assert env.http.post(revoke, data={"token": token}, auth=other).status_code == 400
    assert env.http.post(introspect, data={"token": token}, auth=other).json()["active"] is True
    # its own client may; then every node refuses it
    resp = env.http.post(revoke, data={"token": token, "token_type_hint": "access_token"}, auth=creds)
    assert resp.status_code == 200
    assert env.http.post(introspect, data={"token": token}, auth=other).json() == {"active": False}
    with pytest.raises(InvalidToken, match="revoked"):
        env.auth.validate_access_token(token, env.fhir)
    # revoking again, or revoking garbage, is fine (RFC 7009 2.2)
    assert env.http.post(revoke, data={"token": token}, auth=creds).status_code == 200
    assert env.http.post(revoke, data={"token": "garbage"}, auth=creds).status_code == 200
    # other tokens of the same client are untouched
    assert env.http.post(introspect, data={"token": _token(env, creds)}, auth=other).json()["active"] is True


def test_introspection_inactive_for_expired_and_foreign_tokens(env: Env) -> None:
    creds = _basic_client(env)
    introspect = f"{env.origin}/auth/introspect"
    good = verify_with_jwks(env, _token(env, creds))[1]
    signing = env.auth.keys.signing_key()  # the server's own key, from the shared database
    now = int(time.time())
    expired = jwt.encode({"alg": "RS256", "typ": "at+jwt", "kid": signing.kid},
                         {**good, "iat": now - 900, "exp": now - 600, "jti": str(uuid.uuid4())}, signing,
                         algorithms=["RS256"])
    foreign_key = RSAKey.generate_key(2048)
    foreign = jwt.encode({"alg": "RS256", "typ": "at+jwt", "kid": signing.kid}, {**good, "jti": str(uuid.uuid4())},
                         foreign_key, algorithms=["RS256"])
    wrong_aud = jwt.encode({"alg": "RS256", "typ": "at+jwt", "kid": signing.kid},
                           {**good, "aud": "https://other.example/fhir", "jti": str(uuid.uuid4())}, signing,
                           algorithms=["RS256"])
    not_at = jwt.encode({"alg": "RS256", "typ": "JWT", "kid": signing.kid}, {**good, "jti": str(uuid.uuid4())},
                        signing, algorithms=["RS256"])
    for token in (expired, foreign, wrong_aud, not_at, "garbage"):
        assert env.http.post(introspect, data={"token": token}, auth=creds).json() == {"active": False}
        with pytest.raises(InvalidToken):
            env.auth.validate_access_token(token, env.fhir)
    # small leeway: a token expired 5 s ago still passes, one expired a minute ago does not
    just = jwt.encode({"alg": "RS256", "typ": "at+jwt", "kid": signing.kid},
                      {**good, "exp": now - 5, "jti": str(uuid.uuid4())}, signing, algorithms=["RS256"])
    assert env.auth.validate_access_token(just, env.fhir)["exp"] == now - 5
    future = jwt.encode({"alg": "RS256", "typ": "at+jwt", "kid": signing.kid},
                        {**good, "nbf": now + 120, "jti": str(uuid.uuid4())}, signing, algorithms=["RS256"])
    with pytest.raises(InvalidToken):
        env.auth.validate_access_token(future, env.fhir)


# -- keys ---------------------------------------------------------------------------------------

def test_key_rotation(env: Env) -> None:
    creds = _basic_client(env)
    old_token = _token(env, creds)
    old_kid = verify_with_jwks(env, old_token)[0]["kid"]
    out = subprocess.run([sys.executable, "-m", "fhir_server.cli", "key", "rotate", "--database", env.url],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    jwks = env.http.get(f"{env.origin}/auth/jwks")
    assert jwks.headers["content-type"].startswith("application/jwk-set+json")
    kids = [k["kid"] for k in jwks.json()["keys"]]
    assert old_kid in kids and len(kids) >= 2
    assert all("d" not in k and k["kty"] == "RSA" and k["alg"] == "RS256" for k in jwks.json()["keys"])
    new_token = _token(env, creds)
    new_kid = verify_with_jwks(env, new_token)[0]["kid"]
    assert new_kid != old_kid and new_kid == kids[0] and new_kid in out.stdout
    introspect = f"{env.origin}/auth/introspect"
    for token in (old_token, new_token):
        assert env.http.post(introspect, data={"token": token}, auth=creds).json()["active"] is True
        assert env.auth.validate_access_token(token, env.fhir)["client_id"] == creds[0]


def test_key_published_until_its_tokens_expire(env: Env) -> None:
    """The retention rule itself, on the stored records: retired keys drop out after the last token
    they signed has expired (plus leeway), and the next rotation deletes them."""
    from fhir_server.auth.keys import RETIRED_KEY_PUBLISHED_FOR, KeyRecord
    now = int(time.time())
    fresh = KeyRecord("a", "RS256", {}, now - 1000, now - 10)
    stale = KeyRecord("b", "RS256", {}, now - 1000, now - RETIRED_KEY_PUBLISHED_FOR - 1)
    current = KeyRecord("c", "RS256", {}, now - 1000, None)
    assert fresh.published(now) and current.published(now) and not stale.published(now)
    assert RETIRED_KEY_PUBLISHED_FOR >= 300


def test_key_file(tmp_path: Any, backends: Backends) -> None:
    """CAREBROKER_AUTH_KEY_FILE: keys live in the file (mode 0600), not the database."""
    import sqlalchemy as sa
    from fastapi.testclient import TestClient
    from fhir_server.api.http import create_app
    from fhir_server.config import Settings
    from fhir_server.storage.engine import create_engine
    from fhir_server.storage.schema import auth_key

    url = backends.fresh_url("sqlite")
    key_file = tmp_path / "keys" / "carebroker-keys.json"
    engine = create_engine(url)
    with TestClient(create_app(Settings(auth_key_file=str(key_file)), engine)) as client:
        kid = client.get("/auth/jwks").json()["keys"][0]["kid"]
        assert json.loads(key_file.read_text())["keys"][0]["kid"] == kid
        assert key_file.stat().st_mode & 0o777 == 0o600
        AuthServer(Store(engine), str(key_file)).keys.rotate()
        kids = [k["kid"] for k in client.get("/auth/jwks").json()["keys"]]
        assert len(kids) == 2 and kids[1] == kid
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(auth_key)).scalar_one() == 0
    engine.dispose()


# -- discovery ----------------------------------------------------------------------------------

def test_smart_configuration(env: Env) -> None:
    resp = env.http.get(f"{env.fhir}/.well-known/smart-configuration", headers={"Accept": "application/fhir+xml"})
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("application/json")
    doc = resp.json()
    auth = f"{env.origin}/auth"
    assert doc["issuer"] == auth and doc["jwks_uri"] == f"{auth}/jwks"
    assert doc["authorization_endpoint"] == f"{auth}/authorize" and doc["token_endpoint"] == f"{auth}/token"
    assert doc["introspection_endpoint"] == f"{auth}/introspect" and doc["revocation_endpoint"] == f"{auth}/revoke"
    assert doc["code_challenge_methods_supported"] == ["S256"]
    assert set(doc["grant_types_supported"]) == {"authorization_code", "client_credentials"}
    assert {"private_key_jwt", "client_secret_basic"} <= set(doc["token_endpoint_auth_methods_supported"])
    assert doc["token_endpoint_auth_signing_alg_values_supported"] == ["RS384", "ES384"]
    assert doc["response_types_supported"] == ["code"]
    assert {"launch-standalone", "client-public", "client-confidential-symmetric", "client-confidential-asymmetric",
            "context-standalone-patient", "permission-v1", "permission-v2", "sso-openid-connect"} <= set(doc["capabilities"])
    assert {"openid", "fhirUser", "launch/patient"} <= set(doc["scopes_supported"])
    # every advertised endpoint is really there
    assert env.http.get(doc["jwks_uri"]).status_code == 200
    assert env.http.post(doc["token_endpoint"], data={}).status_code == 400
    oidc = env.http.get(f"{auth}/.well-known/openid-configuration").json()
    assert oidc["issuer"] == auth and oidc["id_token_signing_alg_values_supported"] == ["RS256"]


def test_capability_statement_security(env: Env) -> None:
    security = env.http.get(f"{env.fhir}/metadata").json()["rest"][0]["security"]
    coding = security["service"][0]["coding"][0]
    assert coding == {"system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                      "code": "SMART-on-FHIR", "display": "SMART-on-FHIR"}
    ext = security["extension"][0]
    assert ext["url"] == "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"
    uris = {e["url"]: e["valueUri"] for e in ext["extension"]}
    auth = f"{env.origin}/auth"
    assert uris == {"token": f"{auth}/token", "authorize": f"{auth}/authorize", "introspect": f"{auth}/introspect",
                    "revoke": f"{auth}/revoke"}


def test_public_base_url_names_the_issuer(backends: Backends) -> None:
    from fastapi.testclient import TestClient
    from fhir_server.api.http import create_app
    from fhir_server.config import Settings

    app = create_app(Settings(public_base_url="https://care.example.org/fhir"), backends.engine("sqlite"))
    with TestClient(app) as client:
        doc = client.get("/fhir/.well-known/smart-configuration").json()
        assert doc["issuer"] == "https://care.example.org/auth"
        assert doc["token_endpoint"] == "https://care.example.org/auth/token"
        uris = client.get("/fhir/metadata").json()["rest"][0]["security"]["extension"][0]["extension"]
        assert {"url": "token", "valueUri": "https://care.example.org/auth/token"} in uris


# -- CLI ----------------------------------------------------------------------------------------

def _cli(env: Env, *args: str) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([sys.executable, "-m", "fhir_server.cli", *args, "--database", env.url],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out


def test_cli_registers_clients_and_mints_tokens(env: Env, tmp_path: Any) -> None:
    key, kid = RSAKey.generate_key(2048), new_id("kid")
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(json.dumps({"keys": [{**key.as_dict(private=True), "kid": kid, "alg": "RS384"}]}))
    client_id = new_id("cli")
    out = _cli(env, "client", "add", client_id, "--jwks", str(jwks_file), "--scope", "system/*.rs",
               "--role", "integration", "--organization", "Organization/org-rz9")
    assert "private_key_jwt" in out.stdout
    stored = env.auth.registry.client(client_id)
    assert stored is not None and stored.jwks is not None and "d" not in stored.jwks["keys"][0]  # public half only
    resp = token_request(env, assertion(key, "RS384", client_id, env.token_url, kid=kid))
    assert resp.status_code == 200, resp.text
    assert client_id in _cli(env, "client", "list").stdout
    # `carebroker token` prints a token the server accepts for its FHIR base
    token = _cli(env, "token", client_id, "--scope", "system/Patient.rs", "--base-url", env.fhir).stdout.strip()
    claims = env.auth.validate_access_token(token, env.fhir)
    assert claims["client_id"] == client_id and claims["scope"] == "system/Patient.rs"
    assert claims["roles"] == ["integration"] and claims["organization"] == "Organization/org-rz9"
    introspected = env.http.post(f"{env.origin}/auth/introspect", data={"token": token},
                                 auth=_basic_client(env)).json()
    assert introspected["active"] is True
    # a user, then a bad role
    username = new_id("user")
    _cli(env, "user", "add", username, "--password", "pw-123456", "--role", "clinician",
         "--fhir-user", "Practitioner/prac-001", "--organization", "Organization/org-e85990")
    user = env.auth.registry.authenticate_user(username, "pw-123456")
    assert user is not None and user.roles == ("clinician",) and user.fhir_user == "Practitioner/prac-001"
    assert env.auth.registry.authenticate_user(username, "wrong") is None
    bad = subprocess.run([sys.executable, "-m", "fhir_server.cli", "user", "add", "x", "--password", "p",
                          "--role", "wizard", "--database", env.url], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0

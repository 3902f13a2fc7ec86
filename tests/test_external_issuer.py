"""carebroker trusting a real external OpenID provider, by configuration only.

The provider is the npm package `oidc-provider` 9.x (tests/idp/server.mjs, installed by scripts/test
with `npm ci --prefix tests/idp`), run by Node as a second process on a free loopback port. It issues
RS256 JWT access tokens for `client_credentials`, its client authenticating with `private_key_jwt`
(the client's RSA key is made here; its assertions are signed here with joserfc). A real
`carebroker serve` (SQLite) trusts it through `CAREBROKER_TRUSTED_ISSUERS` with its issuer and its
jwks_uri over loopback http, and the default audience: the FHIR base URL.

Node is required: without it these tests fail (they are never skipped).
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import RSAKey

from conftest import AUTH, TEST_ISSUER, Backends, free_port

IDP_DIR = Path(__file__).resolve().parent / "idp"
CLIENT_ID = "carebroker-backend-test"
SCOPE = "system/Patient.rs"
OTHER_AUDIENCE = "https://other-fhir.example.test/fhir"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


def claims_of(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and claims of a JWT, unverified (to check what the provider issued)."""
    head, body, _ = token.split(".")
    return tuple(json.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4))) for p in (head, body))  # type: ignore[return-value]


class Provider:
    """oidc-provider under Node on a fixed loopback port; `restart` makes it come back with a new
    signing key (the provider generates one at every start)."""

    def __init__(self, node: str, port: int, audiences: list[str], client_key: RSAKey, log: Path) -> None:
        self.node = node
        self.log = log
        self.port = port
        self.issuer = f"http://127.0.0.1:{port}"
        self.client_key = client_key
        self.env = {**os.environ, "IDP_PORT": str(port), "IDP_CLIENT_ID": CLIENT_ID,
                    "IDP_CLIENT_JWKS": json.dumps({"keys": [client_key.as_dict(private=False)]}),
                    "IDP_AUDIENCES": json.dumps(audiences), "IDP_SCOPES": SCOPE, "NODE_ENV": "test"}
        self.proc: subprocess.Popen[bytes] | None = None
        self.kid = ""
        self.discovery: dict[str, Any] = {}

    def start(self) -> None:
        """Start it and wait until it serves its discovery document (its output goes to `log`)."""
        self.log.write_text("")
        with self.log.open("w") as out:
            self.proc = subprocess.Popen([self.node, str(IDP_DIR / "server.mjs")], cwd=IDP_DIR, env=self.env,
                                         stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"oidc-provider exited ({self.proc.returncode}): {self.log.read_text()}")
            try:
                resp = httpx.get(f"{self.issuer}/.well-known/openid-configuration", timeout=2)
                if resp.status_code == 200:
                    self.discovery = resp.json()
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"oidc-provider did not serve its discovery document within 30 s: {self.log.read_text()}")
            time.sleep(0.1)
        keys = httpx.get(self.discovery["jwks_uri"], timeout=10).json()["keys"]
        assert len(keys) == 1 and keys[0]["kty"] == "RSA" and "d" not in keys[0]
        self.kid = keys[0]["kid"]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def token(self, resource: str | None = None, scope: str = SCOPE) -> str:
        """An access token from the provider's token endpoint, the client authenticating with a
        private_key_jwt assertion signed by its own key."""
        endpoint = self.discovery["token_endpoint"]
        now = int(time.time())
        assertion = jwt.encode({"alg": "RS256", "kid": self.client_key.kid},
                               {"iss": CLIENT_ID, "sub": CLIENT_ID, "aud": endpoint, "jti": uuid.uuid4().hex,
                                "iat": now, "exp": now + 60}, self.client_key, algorithms=["RS256"])
        form = {"grant_type": "client_credentials", "scope": scope, "client_assertion_type": ASSERTION_TYPE,
                "client_assertion": assertion}
        if resource is not None:
            form["resource"] = resource
        resp = httpx.post(endpoint, data=form, timeout=10)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["token_type"].lower() == "bearer" and body["scope"] == scope
        return str(body["access_token"])


class Setup:
    def __init__(self, provider: Provider, base: str) -> None:
        self.provider = provider
        self.base = base

    def get(self, path: str, token: str, **params: Any) -> httpx.Response:
        return httpx.get(f"{self.base}/{path}", params=params, timeout=30,
                         headers={"Authorization": f"Bearer {token}"})


@pytest.fixture(scope="module")
def external(backends: Backends, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    node = shutil.which("node")
    if node is None:
        pytest.fail("Node.js (20 or later) is needed for the external-issuer test: install it, then run "
                    "scripts/test (which runs `npm ci --prefix tests/idp`)")
    if not (IDP_DIR / "node_modules" / "oidc-provider").is_dir():
        pytest.fail("oidc-provider is not installed: run `npm ci --prefix tests/idp` (scripts/test does)")
    client_key = RSAKey.generate_key(2048, parameters={"kid": "client-1", "alg": "RS256", "use": "sig"},
                                     private=True)
    idp_port = free_port()
    issuer = f"http://127.0.0.1:{idp_port}"
    trusted = [TEST_ISSUER.config(), {"issuer": issuer, "jwks": f"{issuer}/jwks"}]  # audience: the FHIR base
    # JWKS refetch on an unknown kid without the 10 s throttle, so the key-rotation test needs no wait
    proc, base = backends.spawn_server(backends.fresh_url("sqlite"), env={
        "CAREBROKER_TRUSTED_ISSUERS": json.dumps(trusted), "CAREBROKER_JWKS_REFRESH_SECONDS": "0"})
    provider = Provider(node, idp_port, [base, OTHER_AUDIENCE], client_key,
                        tmp_path_factory.mktemp("idp") / "oidc-provider.log")
    try:
        provider.start()
        assert provider.discovery["issuer"] == issuer
        assert provider.discovery["jwks_uri"] == f"{issuer}/jwks"  # what carebroker was told to trust
        yield Setup(provider, base)
    finally:
        provider.stop()
        proc.terminate()
        proc.wait(10)


def test_provider_token_reads_and_searches(external: Setup) -> None:
    family = f"Ext{uuid.uuid4().hex[:8]}"
    created = httpx.post(f"{external.base}/Patient", headers=AUTH, timeout=30,
                         json={"resourceType": "Patient", "name": [{"family": family}]})
    assert created.status_code == 201, created.text
    pid = created.json()["id"]

    token = external.provider.token()
    header, claims = claims_of(token)
    assert header["alg"] == "RS256" and header["kid"] == external.provider.kid and header["typ"] == "at+jwt"
    assert claims["iss"] == external.provider.issuer and claims["aud"] == external.base
    assert claims["scope"] == SCOPE and claims["client_id"] == CLIENT_ID

    listed = external.get("Patient", token)
    assert listed.status_code == 200, listed.text
    assert listed.json()["resourceType"] == "Bundle"
    found = external.get("Patient", token, family=family)
    assert found.status_code == 200, found.text
    assert [e["resource"]["id"] for e in found.json()["entry"]] == [pid]
    assert external.get(f"Patient/{pid}", token).status_code == 200


def test_provider_token_without_write_scope_cannot_create(external: Setup) -> None:
    token = external.provider.token()
    resp = httpx.post(f"{external.base}/Patient", json={"resourceType": "Patient"}, timeout=30,
                      headers={"Authorization": f"Bearer {token}"})
    assert resp.status_code == 403, resp.text
    assert 'error="insufficient_scope"' in resp.headers["www-authenticate"]
    # and its scope is Patient only
    assert external.get("Observation", token).status_code == 403


def test_provider_token_for_another_audience_is_refused(external: Setup) -> None:
    token = external.provider.token(resource=OTHER_AUDIENCE)
    assert claims_of(token)[1]["aud"] == OTHER_AUDIENCE
    resp = external.get("Patient", token)
    assert resp.status_code == 401, resp.text
    assert 'error="invalid_token"' in resp.headers["www-authenticate"]
    assert "audience" in resp.json()["issue"][0]["diagnostics"]


def test_forged_token_under_the_providers_kid_is_refused(external: Setup) -> None:
    genuine = external.provider.token()
    header, claims = claims_of(genuine)
    forger = RSAKey.generate_key(2048, parameters={"kid": header["kid"]}, private=True)
    forged = jwt.encode(header, {**claims, "jti": uuid.uuid4().hex}, forger, algorithms=["RS256"])
    resp = external.get("Patient", forged)
    assert resp.status_code == 401, resp.text
    assert 'error="invalid_token"' in resp.headers["www-authenticate"]
    assert "signature" in resp.json()["issue"][0]["diagnostics"]


def test_provider_key_rotation_new_key_accepted_old_key_refused(external: Setup) -> None:
    """The provider restarts with a new key. A token under the new kid makes carebroker fetch the
    JWKS again (unknown kid); from then on the old key is gone from carebroker's key set too, and a
    token signed with it is refused. (Before that refetch carebroker still holds the old key: cached
    key sets are kept up to an hour unless an unknown kid turns up, by design.)"""
    provider = external.provider
    assert external.get("Patient", provider.token()).status_code == 200  # carebroker holds the current key
    old_kid = provider.kid
    old_token = provider.token()  # signed with the key about to go; never shown to carebroker yet
    provider.restart()  # same issuer, new signing key; the old one is no longer in its JWKS
    assert provider.kid != old_kid
    assert [k["kid"] for k in httpx.get(provider.discovery["jwks_uri"], timeout=10).json()["keys"]] == [provider.kid]

    new_token = provider.token()
    assert claims_of(new_token)[0]["kid"] == provider.kid
    resp = external.get("Patient", new_token)  # unknown kid: carebroker fetches the JWKS again
    assert resp.status_code == 200, resp.text

    resp = external.get("Patient", old_token)  # its key is now unknown to the provider and to carebroker
    assert resp.status_code == 401, resp.text
    assert 'error="invalid_token"' in resp.headers["www-authenticate"]
    assert f"no key '{old_kid}'" in resp.json()["issue"][0]["diagnostics"]

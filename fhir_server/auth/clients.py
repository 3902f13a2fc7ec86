"""Client authentication at the token, introspection and revocation endpoints.

- `private_key_jwt` (RFC 7523, SMART Backend Services): a client assertion signed RS384 or ES384 with a
  key of the client's registered JWKS (inline, or fetched from the one `jku` URL registered for it),
  chosen by `kid`; `iss` = `sub` = client_id, `aud` = our token endpoint, `exp` at most five minutes
  ahead, and a `jti` never seen before (remembered in the database until the assertion expires, so a
  replay to another node is refused too).
- `client_secret_basic` (RFC 6749 2.3.1): only for clients registered with a secret.
- `none`: a public client names itself with `client_id`; only where the caller allows it (the
  authorization code grant, where PKCE binds the code to the app instead).
"""
from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote_plus

import httpx
import orjson
import sqlalchemy as sa
from joserfc import jwk, jwt
from joserfc.errors import JoseError
from joserfc.jws import extract_compact

from fhir_server.auth.errors import invalid_client
from fhir_server.auth.policy import ASSERTION_ALGS, ASSERTION_MAX_LIFETIME, CLIENT_ASSERTION_TYPE, LEEWAY
from fhir_server.auth.registry import Client, Registry, verify_secret
from fhir_server.auth.urls import AuthUrls
from fhir_server.storage.repository import Store
from fhir_server.storage.schema import auth_assertion_jti

_KTY_FOR_ALG = {"RS384": ("RSA", None), "ES384": ("EC", "P-384")}
JKU_TIMEOUT = 5.0


class ClientAuthenticator:
    """Finds out which registered client is calling, or raises `invalid_client`."""

    def __init__(self, store: Store, registry: Registry) -> None:
        self.store = store
        self.registry = registry

    def authenticate(self, form: Mapping[str, str], authorization: str | None, urls: AuthUrls, *,
                     allow_public: bool = False) -> Client:
        if authorization and authorization.lower().startswith("basic "):
            return self._basic(authorization[6:].strip())
        if "client_assertion" in form or "client_assertion_type" in form:
            if form.get("client_assertion_type") != CLIENT_ASSERTION_TYPE:
                raise invalid_client(f"client_assertion_type must be {CLIENT_ASSERTION_TYPE}")
            client = self.verify_assertion(form.get("client_assertion", ""), urls)
            if form.get("client_id") not in (None, client.client_id):
                raise invalid_client("client_id does not match the client assertion")
            return client
        if "client_secret" in form:
            raise invalid_client("client_secret_post is not supported: send the secret with HTTP Basic")
        client_id = form.get("client_id")
        if allow_public and client_id:
            client = self.registry.client(client_id)
            if client is None:
                raise invalid_client("unknown client")
            if not client.is_public:
                raise invalid_client("this client is registered with credentials and must authenticate")
            return client
        raise invalid_client("client authentication required (private_key_jwt or client_secret_basic)")

    def _basic(self, encoded: str) -> Client:
        try:
            client_id, _, secret = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise invalid_client("malformed HTTP Basic credentials", basic=True) from None
        client_id, secret = unquote_plus(client_id), unquote_plus(secret)
        client = self.registry.client(client_id)
        if client is None or client.secret_hash is None:
            raise invalid_client("client_secret_basic is not enabled for this client", basic=True)
        if not verify_secret(secret, client.secret_hash):
            raise invalid_client("wrong client secret", basic=True)
        return client

    def verify_assertion(self, assertion: str, urls: AuthUrls) -> Client:
        """RFC 7523 client authentication, with the SMART Backend Services rules."""
        try:
            parts = extract_compact(assertion.encode("ascii"))
            header, claims = parts.protected, parts.payload
        except (JoseError, ValueError, UnicodeError):
            raise invalid_client("client_assertion is not a signed JWT") from None
        alg = header.get("alg")
        if alg not in ASSERTION_ALGS:
            raise invalid_client(f"client_assertion alg {alg!r} is not accepted (use {' or '.join(ASSERTION_ALGS)})")
        try:  # read only to find the client and its keys; nothing is trusted before the signature
            payload = orjson.loads(claims)
        except orjson.JSONDecodeError:
            raise invalid_client("client_assertion payload is not JSON") from None
        if not isinstance(payload, dict):
            raise invalid_client("client_assertion payload is not a JSON object")
        client_id = payload.get("iss")
        if not isinstance(client_id, str) or payload.get("sub") != client_id:
            raise invalid_client("client_assertion iss and sub must both be the client_id")
        client = self.registry.client(client_id)
        if client is None:
            raise invalid_client("unknown client")
        key = self._key(client, header, alg)
        try:
            verified = jwt.decode(assertion, key, algorithms=[alg]).claims
        except JoseError:
            raise invalid_client("client_assertion signature does not verify") from None
        self._check_claims(verified, urls)
        self._remember_jti(client.client_id, verified["jti"], int(verified["exp"]))
        return client

    def _key(self, client: Client, header: dict[str, Any], alg: str) -> jwk.Key:
        jku = header.get("jku")
        if jku is not None:
            if jku != client.jku:
                raise invalid_client("jku is not the JWKS URL registered for this client")
            jwks = _fetch_jwks(jku)
        elif client.jwks is not None:
            jwks = client.jwks
        elif client.jku is not None:
            jwks = _fetch_jwks(client.jku)
        else:
            raise invalid_client("no public keys are registered for this client")
        kid = header.get("kid")
        if not kid:
            raise invalid_client("client_assertion header has no kid")
        kty, crv = _KTY_FOR_ALG[alg]
        for entry in jwks.get("keys", []):
            if entry.get("kid") == kid and entry.get("kty") == kty and (crv is None or entry.get("crv") == crv):
                if entry.get("alg") not in (None, alg):
                    continue
                try:
                    return jwk.import_key({k: v for k, v in entry.items() if k != "key_ops"})
                except (JoseError, ValueError, TypeError):
                    raise invalid_client(f"registered key {kid!r} cannot be used") from None
        raise invalid_client(f"no registered {alg} key has kid {kid!r}")

    def _check_claims(self, claims: dict[str, Any], urls: AuthUrls) -> None:
        now = int(time.time())
        aud = claims.get("aud")
        if not (aud == urls.token or isinstance(aud, list) and urls.token in aud):
            raise invalid_client(f"client_assertion aud must be the token endpoint {urls.token}")
        exp = claims.get("exp")
        if not isinstance(exp, (int, float)) or isinstance(exp, bool):
            raise invalid_client("client_assertion has no exp")
        if exp <= now - LEEWAY:
            raise invalid_client("client_assertion has expired")
        if exp > now + ASSERTION_MAX_LIFETIME + LEEWAY:
            raise invalid_client("client_assertion exp is more than five minutes ahead")
        for name in ("nbf", "iat"):
            value = claims.get(name)
            if isinstance(value, (int, float)) and value > now + LEEWAY:
                raise invalid_client(f"client_assertion {name} is in the future")
        if not isinstance(claims.get("jti"), str) or not claims["jti"]:
            raise invalid_client("client_assertion has no jti")

    def _remember_jti(self, client_id: str, jti: str, expires_at: int) -> None:
        """Insert-or-refuse in one write transaction: a jti is accepted exactly once, whichever node
        sees it."""
        now = int(time.time())
        try:
            with self.store.writing() as conn:
                conn.execute(auth_assertion_jti.delete().where(auth_assertion_jti.c.expires_at < now - LEEWAY))
                seen = conn.execute(sa.select(auth_assertion_jti.c.jti).where(
                    auth_assertion_jti.c.client_id == client_id, auth_assertion_jti.c.jti == jti)).first()
                if seen is None:
                    conn.execute(auth_assertion_jti.insert().values(client_id=client_id, jti=jti,
                                                                    expires_at=expires_at + LEEWAY))
        except sa.exc.IntegrityError:  # a concurrent request with the same jti committed first
            seen = True
        if seen is not None:
            raise invalid_client("client_assertion jti has been used before")


def _fetch_jwks(url: str) -> dict[str, Any]:
    try:
        resp = httpx.get(url, timeout=JKU_TIMEOUT, follow_redirects=False)
        resp.raise_for_status()
        jwks = resp.json()
    except (httpx.HTTPError, ValueError) as exc:
        raise invalid_client(f"the client's JWKS could not be fetched from {url}: {exc}") from None
    if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list):
        raise invalid_client(f"{url} did not return a JWK Set")
    return jwks

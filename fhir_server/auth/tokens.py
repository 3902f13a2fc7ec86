"""Access tokens and id_tokens of the built-in issuer: issuing, validating, revoking, introspecting.

Access tokens are RFC 9068 JWTs (`typ: at+jwt`) signed with carebroker's current key, lifetime
ACCESS_TOKEN_LIFETIME, never refreshed. Revocation is by `jti`, kept in the database until the token
would have expired anyway, so every node refuses a revoked token.
"""
from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jws import extract_compact

from fhir_server.auth.keys import SIGNING_ALG, SigningKeys
from fhir_server.auth.policy import ACCESS_TOKEN_LIFETIME, ACCESS_TOKEN_TYP, ID_TOKEN_LIFETIME, LEEWAY
from fhir_server.auth.urls import AuthUrls
from fhir_server.storage.repository import Store
from fhir_server.storage.schema import auth_revoked


def new_jti() -> str:
    return secrets.token_urlsafe(24)


class InvalidToken(Exception):
    """The token is not a valid, current, unrevoked access token of this issuer (the reason says why,
    for logs: a client is told only `invalid_token`)."""


@dataclass(frozen=True)
class TokenSubject:
    """Who a token is issued for, with carebroker's claims from their registration."""

    sub: str
    roles: tuple[str, ...] = ()
    fhir_user: str | None = None
    organization: str | None = None
    purpose_of_use: str | None = None
    patient: str | None = None  # launch context

    def claims(self) -> dict[str, Any]:
        out: dict[str, Any] = {"roles": list(self.roles)}
        for name, value in (("fhirUser", self.fhir_user), ("organization", self.organization),
                            ("purpose_of_use", self.purpose_of_use), ("patient", self.patient)):
            if value:
                out[name] = value
        return out


class Tokens:
    """Issues and checks the built-in issuer's tokens."""

    def __init__(self, store: Store, keys: SigningKeys) -> None:
        self.store = store
        self.keys = keys

    def issue_access_token(self, urls: AuthUrls, principal: TokenSubject, client_id: str, scope: list[str],
                           jti: str | None = None) -> tuple[str, dict[str, Any]]:
        """The signed token and its claims (`jti` chosen beforehand when it must be recorded first)."""
        now = int(time.time())
        claims = {"iss": urls.issuer, "sub": principal.sub, "aud": urls.fhir_base, "exp": now + ACCESS_TOKEN_LIFETIME,
                  "iat": now, "jti": jti or new_jti(), "scope": " ".join(scope), "client_id": client_id,
                  **principal.claims()}
        return self._sign(claims, ACCESS_TOKEN_TYP), claims

    def issue_id_token(self, urls: AuthUrls, principal: TokenSubject, client_id: str, nonce: str | None) -> str:
        """OpenID Connect id_token; `fhirUser` is an absolute URL, as SMART App Launch requires."""
        now = int(time.time())
        claims: dict[str, Any] = {"iss": urls.issuer, "sub": principal.sub, "aud": client_id,
                                  "exp": now + ID_TOKEN_LIFETIME, "iat": now, "auth_time": now}
        if principal.fhir_user:
            claims["fhirUser"] = f"{urls.fhir_base}/{principal.fhir_user}"
        if nonce:
            claims["nonce"] = nonce
        return self._sign(claims, "JWT")

    def _sign(self, claims: dict[str, Any], typ: str) -> str:
        key = self.keys.signing_key()
        return jwt.encode({"alg": SIGNING_ALG, "typ": typ, "kid": key.kid}, claims, key, algorithms=[SIGNING_ALG])

    def validate_access_token(self, token: str, fhir_base_url: str, *, leeway: int = LEEWAY) -> dict[str, Any]:
        """The claims of a valid access token issued by carebroker for this FHIR base; else InvalidToken.

        Checks: RS256 signature by a published key (current, or retired but still in the JWKS), `typ`
        at+jwt, `iss` this server's issuer, `aud` the FHIR base, `exp`/`nbf`/`iat` with `leeway`
        seconds of clock skew, and that its `jti` has not been revoked. For the resource server.
        """
        urls = AuthUrls.for_fhir_base(fhir_base_url)
        try:
            header = extract_compact(token.encode("ascii")).protected
        except (JoseError, ValueError, UnicodeError) as exc:
            raise InvalidToken(f"not a JWS: {exc}") from None
        if header.get("alg") != SIGNING_ALG:
            raise InvalidToken(f"algorithm {header.get('alg')!r} is not {SIGNING_ALG}")
        if header.get("typ") != ACCESS_TOKEN_TYP:
            raise InvalidToken(f"typ {header.get('typ')!r} is not {ACCESS_TOKEN_TYP}")
        key = self.keys.verification_key(str(header.get("kid")))
        if key is None:
            raise InvalidToken(f"kid {header.get('kid')!r} is not a published key")
        try:
            claims = jwt.decode(token, key, algorithms=[SIGNING_ALG]).claims
            jwt.JWTClaimsRegistry(
                leeway=leeway, iss={"essential": True, "value": urls.issuer},
                aud={"essential": True, "value": urls.fhir_base}, exp={"essential": True},
                jti={"essential": True}, sub={"essential": True}).validate(claims)
        except (JoseError, ValueError) as exc:
            raise InvalidToken(str(exc) or type(exc).__name__) from None
        if self.is_revoked(claims["jti"]):
            raise InvalidToken("revoked")
        return claims

    def is_revoked(self, jti: str) -> bool:
        with self.store.single_read() as conn:
            return conn.execute(sa.select(auth_revoked.c.jti).where(auth_revoked.c.jti == jti)).first() is not None

    def revoke(self, jti: str, expires_at: int) -> None:
        """Remember `jti` as revoked until `expires_at` (after that the token is refused as expired)."""
        now = int(time.time())
        with self.store.writing() as conn:
            conn.execute(auth_revoked.delete().where(auth_revoked.c.expires_at < now - LEEWAY))
            if conn.execute(sa.select(auth_revoked.c.jti).where(auth_revoked.c.jti == jti)).first() is None:
                conn.execute(auth_revoked.insert().values(jti=jti, expires_at=expires_at))

    def introspect(self, token: str, fhir_base_url: str) -> dict[str, Any]:
        """RFC 7662: `{"active": false}` for anything not currently valid, else the claims."""
        try:
            claims = self.validate_access_token(token, fhir_base_url)
        except InvalidToken:
            return {"active": False}
        return {"active": True, "token_type": "Bearer", **claims}

    def unverified_claims_if_ours(self, token: str) -> dict[str, Any] | None:
        """For revocation: the claims of a token signed by one of our published keys, expired or not
        (revoking it is then harmless); None for anything else."""
        try:
            header = extract_compact(token.encode("ascii")).protected
            key = self.keys.verification_key(str(header.get("kid")))
            if key is None or header.get("alg") != SIGNING_ALG:
                return None
            return dict(jwt.decode(token, key, algorithms=[SIGNING_ALG]).claims)
        except (JoseError, ValueError, UnicodeError):
            return None

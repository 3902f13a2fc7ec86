"""The resource server: every /fhir request carries a bearer JWT from a trusted issuer, or is refused.

Trusted issuers come from `CAREBROKER_TRUSTED_ISSUERS` (a JSON list, or the path of a JSON file
holding one) of `{"issuer", "jwks", "audience"?, "roles_claim"?, "role_map"?}`; `jwks` is an https
URL, an http URL on the loopback interface, or a file path. carebroker's own authorization server is
trusted as well once it is configured (`builtin`).

A token is accepted when its header names an asymmetric algorithm we allow (RS256, RS384, ES256,
ES384: never `none`, never HMAC, whose "secret" an attacker could take from the published key), its
`iss` is trusted, its signature verifies with that issuer's key of the named `kid`, its `aud`
includes the expected audience (default: the FHIR base URL), and `exp`/`nbf` hold with 30 s of
leeway. Key sets are cached; a `kid` not in the cache makes one refetch, at most once per
`refresh_interval` per issuer, so a flood of made-up kids cannot hammer the identity provider.
Verified tokens are cached until they expire (bounded), so the signature is checked once per token.
"""
from __future__ import annotations

import base64
import ipaddress
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, KeySet, RSAKey

from fhir_server.auth.principal import InvalidClaims, Principal, principal_from_claims

log = logging.getLogger("carebroker.auth")

ALGORITHMS = ("RS256", "RS384", "ES256", "ES384")
LEEWAY = 30  # seconds of clock skew tolerated on exp and nbf
JWKS_TIMEOUT = 5.0
JWKS_MAX_AGE = 3600.0  # a cached key set is refetched (on use) after this long anyway
TOKEN_CACHE_SIZE = 10_000
_KEY_TYPES = {"RS": "RSA", "ES": "EC"}


class InvalidToken(Exception):
    """Missing, malformed, expired or foreign token: a 401 with this description."""


@dataclass(frozen=True)
class TrustedIssuer:
    issuer: str
    jwks: str  # https URL, loopback http URL, or file path
    audience: tuple[str, ...] | None = None  # None: the FHIR base URL
    roles_claim: str | None = None  # None: the server's default (`roles`)
    role_map: tuple[tuple[str, str], ...] = ()


def parse_trusted_issuers(raw: str) -> tuple[TrustedIssuer, ...]:
    """`CAREBROKER_TRUSTED_ISSUERS`: a JSON list, or the path of a file holding one. Raises
    ValueError naming what is wrong, so a misconfigured server refuses to start."""
    text = raw.strip()
    if not text.startswith("["):
        path = Path(text).expanduser()
        if not path.is_file():
            raise ValueError(f"CAREBROKER_TRUSTED_ISSUERS: '{text}' is neither a JSON list nor a file")
        text = path.read_text()
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"CAREBROKER_TRUSTED_ISSUERS is not valid JSON: {exc}") from None
    if not isinstance(items, list):
        raise ValueError("CAREBROKER_TRUSTED_ISSUERS must be a JSON list of issuer objects")
    issuers = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("issuer"), str) or not item["issuer"]:
            raise ValueError(f"CAREBROKER_TRUSTED_ISSUERS[{i}]: needs an 'issuer' string")
        jwks = item.get("jwks")
        if not isinstance(jwks, str) or not jwks:
            raise ValueError(f"CAREBROKER_TRUSTED_ISSUERS[{i}]: needs a 'jwks' URL or file path")
        check_jwks_location(jwks, f"CAREBROKER_TRUSTED_ISSUERS[{i}]")
        audience = item.get("audience")
        if isinstance(audience, str):
            audience = (audience,)
        elif isinstance(audience, list) and all(isinstance(a, str) for a in audience):
            audience = tuple(audience)
        elif audience is not None:
            raise ValueError(f"CAREBROKER_TRUSTED_ISSUERS[{i}]: 'audience' must be a string or list of strings")
        role_map = item.get("role_map") or {}
        if not isinstance(role_map, dict):
            raise ValueError(f"CAREBROKER_TRUSTED_ISSUERS[{i}]: 'role_map' must be an object")
        issuers.append(TrustedIssuer(item["issuer"], jwks, audience, item.get("roles_claim"),
                                     tuple(sorted((str(k), str(v)) for k, v in role_map.items()))))
    return tuple(issuers)


def check_jwks_location(jwks: str, where: str) -> None:
    """https anywhere; http only on loopback (a key set fetched in the clear could be swapped)."""
    parts = urlsplit(jwks)
    if parts.scheme == "https":
        return
    if parts.scheme == "http":
        host = parts.hostname or ""
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ValueError(f"{where}: JWKS over plain http is only allowed on loopback, not '{jwks}'")
        return
    if parts.scheme and len(parts.scheme) > 1:
        raise ValueError(f"{where}: JWKS '{jwks}' is neither an https URL nor a file path")
    if not Path(jwks).expanduser().is_file():
        raise ValueError(f"{where}: JWKS file '{jwks}' does not exist")


class KeySetSource:
    """One issuer's JWKS, cached; refetched on an unknown kid at most once per `refresh_interval`."""

    def __init__(self, location: str, refresh_interval: float) -> None:
        self.location = location
        self.refresh_interval = refresh_interval
        self._keys: dict[str, RSAKey | ECKey] = {}
        self._fetched_at: float | None = None  # monotonic time of the last fetch attempt
        self._lock = threading.Lock()
        self.fetches = 0

    def key(self, kid: str | None) -> RSAKey | ECKey | None:
        keys = self._keys
        stale = self._fetched_at is None or time.monotonic() - self._fetched_at > JWKS_MAX_AGE
        if not stale and kid is not None and kid in keys:
            return keys[kid]
        with self._lock:
            due = self._fetched_at is None or time.monotonic() - self._fetched_at >= self.refresh_interval
            if due and (stale or kid not in self._keys):
                self._refresh()
            keys = self._keys
        if kid is None:  # a key set with one key needs no kid
            return next(iter(keys.values())) if len(keys) == 1 else None
        return keys.get(kid)

    def _refresh(self) -> None:
        self._fetched_at = time.monotonic()
        self.fetches += 1
        try:
            if urlsplit(self.location).scheme in ("http", "https"):
                resp = httpx.get(self.location, timeout=JWKS_TIMEOUT, headers={"Accept": "application/json"})
                resp.raise_for_status()
                data = resp.json()
            else:
                data = json.loads(Path(self.location).expanduser().read_text())
        except (httpx.HTTPError, OSError, ValueError) as exc:
            log.warning("JWKS %s could not be fetched: %s (keeping the %d cached keys)", self.location, exc,
                        len(self._keys))
            return
        keys: dict[str, RSAKey | ECKey] = {}
        for raw in data.get("keys", []) if isinstance(data, dict) else []:
            if not isinstance(raw, dict) or raw.get("kty") not in ("RSA", "EC") or raw.get("use", "sig") != "sig":
                continue  # symmetric keys are never accepted from a key set
            try:
                key = KeySet.import_key_set({"keys": [_public(raw)]}).keys[0]
            except (JoseError, ValueError, TypeError) as exc:
                log.warning("JWKS %s: key %r skipped: %s", self.location, raw.get("kid"), exc)
                continue
            keys[str(raw.get("kid") or key.thumbprint())] = key  # type: ignore[assignment]
        self._keys = keys


def _public(raw: dict[str, Any]) -> dict[str, Any]:
    private = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}
    return {k: v for k, v in raw.items() if k not in private}


@dataclass
class BuiltinIssuer:
    """carebroker's own authorization server, as the resource server sees it: its issuer for a FHIR
    base URL, a function that validates one of its tokens for a FHIR base completely (signature
    with current or retired keys, iss, aud, exp, revocation) returning the claims or raising
    InvalidToken, and the revocation check alone (run on every use of a cached token)."""

    issuer_for: Callable[[str], str]
    validate: Callable[[str, str], Mapping[str, Any]]
    is_revoked: Callable[[str], bool]


def builtin_issuer(auth: Any) -> BuiltinIssuer:
    """The adapter to auth/server.AuthServer (the built-in authorization server)."""
    from fhir_server.auth.tokens import InvalidToken as BuiltinInvalidToken
    from fhir_server.auth.urls import AuthUrls

    def validate(token: str, fhir_base: str) -> Mapping[str, Any]:
        try:
            return auth.validate_access_token(token, fhir_base)
        except BuiltinInvalidToken as exc:
            raise InvalidToken(str(exc)) from None

    return BuiltinIssuer(lambda base: AuthUrls.for_fhir_base(base).issuer, validate, auth.tokens.is_revoked)


@dataclass
class _Cached:
    principal: Principal
    expires: float


@dataclass
class ResourceServer:
    """Validates bearer tokens into principals."""

    issuers: tuple[TrustedIssuer, ...]
    builtin: BuiltinIssuer | None = None
    role_claim: str = "roles"
    refresh_interval: float = 10.0
    find_organization: Callable[[str], str | None] | None = None
    _sources: dict[str, KeySetSource] = field(default_factory=dict)
    _cache: OrderedDict[tuple[str, str], _Cached] = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._by_issuer = {i.issuer: i for i in self.issuers}
        for i in self.issuers:
            self._sources[i.issuer] = KeySetSource(i.jwks, self.refresh_interval)

    def source(self, issuer: str) -> KeySetSource:
        return self._sources[issuer]

    def cached(self, token: str, audience: str) -> Principal | None:
        """The principal of a token verified before and not yet expired (no I/O: safe on the event loop)."""
        hit = self._cache.get((token, audience))
        if hit is None:
            return None
        revoked = hit.principal.builtin and self.builtin is not None and hit.principal.token_id is not None \
            and self.builtin.is_revoked(hit.principal.token_id)
        if hit.expires <= time.time() or revoked:
            with self._lock:
                self._cache.pop((token, audience), None)
            return None
        return hit.principal

    def authenticate(self, token: str, audience: str) -> Principal:
        """Validate `token` for `audience` (the FHIR base URL); its principal, or InvalidToken."""
        if (hit := self.cached(token, audience)) is not None:
            return hit
        claims, issuer = self._verify(token, audience)
        try:
            principal = principal_from_claims(
                claims, builtin=issuer is None,
                role_claim=(issuer.roles_claim or self.role_claim) if issuer else "roles",
                role_map=dict(issuer.role_map) if issuer else None, find_organization=self.find_organization)
        except InvalidClaims as exc:
            raise InvalidToken(str(exc)) from None
        if issuer is None and principal.token_id is None:
            return principal  # a built-in token with no jti could not be checked for revocation later
        exp = float(claims["exp"]) + (LEEWAY if issuer is not None else 0)
        with self._lock:
            self._cache[(token, audience)] = _Cached(principal, exp)
            while len(self._cache) > TOKEN_CACHE_SIZE:
                self._cache.popitem(last=False)
        return principal

    def _verify(self, token: str, audience: str) -> tuple[Mapping[str, Any], TrustedIssuer | None]:
        header, payload = _unverified(token)
        iss = payload.get("iss")
        if self.builtin is not None and iss == self.builtin.issuer_for(audience):
            return self.builtin.validate(token, audience), None
        issuer = self._by_issuer.get(iss) if isinstance(iss, str) else None
        if issuer is None:
            raise InvalidToken(f"tokens from issuer {iss!r} are not trusted here")
        alg = header.get("alg")
        if alg not in ALGORITHMS:
            raise InvalidToken(f"algorithm {alg!r} is not accepted (use one of {', '.join(ALGORITHMS)})")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise InvalidToken("the kid header is not a string")
        key = self._sources[issuer.issuer].key(kid)
        if key is None:
            raise InvalidToken(f"no key {kid!r} in the key set of {iss}")
        if key.key_type != _KEY_TYPES[alg[:2]]:
            raise InvalidToken(f"key {kid!r} is not a {_KEY_TYPES[alg[:2]]} key, as {alg} needs")
        try:
            claims = jwt.decode(token, key, algorithms=[alg]).claims
        except (JoseError, ValueError) as exc:
            raise InvalidToken(f"the signature does not verify: {exc}") from None
        check_claims(claims, issuer.issuer, issuer.audience or (audience,))
        return claims, issuer


def _unverified(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and payload, not yet trusted: only to find the issuer and the key."""
    parts = token.split(".")
    if len(parts) != 3:
        raise InvalidToken("the token is not a JWS compact serialization (header.payload.signature)")
    try:
        header, payload = (json.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4))) for p in parts[:2])
    except (ValueError, UnicodeDecodeError):
        raise InvalidToken("the token's header or payload is not base64url JSON") from None
    if not isinstance(header, dict) or not isinstance(payload, dict):
        raise InvalidToken("the token's header or payload is not a JSON object")
    return header, payload


def check_claims(claims: Mapping[str, Any], issuer: str, audiences: tuple[str, ...],
                 now: float | None = None) -> None:
    """iss, aud, exp (required) and nbf, with LEEWAY seconds of clock skew."""
    now = time.time() if now is None else now
    if claims.get("iss") != issuer:
        raise InvalidToken("iss does not match")
    aud = claims.get("aud")
    auds = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
    wanted = {a.rstrip("/") for a in audiences}
    if not any(isinstance(a, str) and a.rstrip("/") in wanted for a in auds):
        raise InvalidToken(f"the token is for audience {aud!r}, not {' or '.join(sorted(wanted))}")
    exp = claims.get("exp")
    if not isinstance(exp, (int, float)) or isinstance(exp, bool):
        raise InvalidToken("the token has no exp")
    if exp + LEEWAY <= now:
        raise InvalidToken("the token has expired")
    nbf = claims.get("nbf")
    if nbf is not None and (not isinstance(nbf, (int, float)) or nbf - LEEWAY > now):
        raise InvalidToken("the token is not valid yet (nbf)")


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer ...` header; None when there is none; InvalidToken
    when the header is there but not a bearer token."""
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise InvalidToken("the Authorization header is not 'Bearer <token>'")
    return token.strip()


def organization_finder(service: Any) -> Callable[[str], str | None]:
    """For principals whose token names no organisation: the organisation of the user's
    PractitionerRole (`fhirUser` a PractitionerRole, or a Practitioner with an active role; the
    first by id when there are several), looked up through the service layer."""
    from fhir_server import jsonfmt
    from fhir_server.outcome import FhirError

    def find(fhir_user: str) -> str | None:
        rtype, _, rid = fhir_user.partition("/")
        try:
            if rtype == "PractitionerRole":
                roles = [service.read(rtype, rid)]
            elif rtype == "Practitioner":
                _, roles, _, _ = service.search(
                    ("PractitionerRole",), [("practitioner", fhir_user), ("active:not", "false"), ("_sort", "_id")],
                    strict=True, base_url="", count=20, cursor=None, want_total=False)
            else:
                return None
        except FhirError:
            return None
        for version in roles:
            org = (jsonfmt.loads(version.content).get("organization") or {}).get("reference")
            if isinstance(org, str) and org.startswith("Organization/"):
                return org
        return None

    return find

"""Where the built-in authorization server lives, derived from the public FHIR base URL.

The FHIR base is `<origin>/fhir` (CAREBROKER_BASE_URL, else the request's own URL); the issuer is
`<origin>/auth`, so tokens, discovery and the CapabilityStatement always name the same URLs as the
FHIR endpoint clients actually use.
"""
from __future__ import annotations

from dataclasses import dataclass

AUTH_PATH = "/auth"
FHIR_PATH = "/fhir"


@dataclass(frozen=True)
class AuthUrls:
    fhir_base: str  # the access tokens' audience
    issuer: str

    @classmethod
    def for_fhir_base(cls, fhir_base: str) -> "AuthUrls":
        fhir_base = fhir_base.rstrip("/")
        origin = fhir_base[: -len(FHIR_PATH)] if fhir_base.endswith(FHIR_PATH) else fhir_base
        return cls(fhir_base, origin + AUTH_PATH)

    @property
    def authorize(self) -> str:
        return f"{self.issuer}/authorize"

    @property
    def token(self) -> str:
        """Also the `aud` a client assertion must carry (RFC 7523, SMART Backend Services)."""
        return f"{self.issuer}/token"

    @property
    def introspect(self) -> str:
        return f"{self.issuer}/introspect"

    @property
    def revoke(self) -> str:
        return f"{self.issuer}/revoke"

    @property
    def jwks(self) -> str:
        return f"{self.issuer}/jwks"

"""Who is asking: one typed object built from a validated access token's claims.

The router carries it (on `FhirRequest.principal`) to every interaction; the scope checks here and
the consent rules (roles, organisation, purpose of use) read it and nothing else of the token.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fhir_server.auth.policy import ROLES  # carebroker's roles (the consent issue decides what each may see)
from fhir_server.auth.smart_scopes import SmartScope, parse_scopes

DEFAULT_PURPOSE = "TREAT"  # v3 PurposeOfUse
EMERGENCY_PURPOSE = "ETREAT"
PURPOSE_OF_USE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
_CODE = re.compile(r"[A-Z][A-Z0-9_-]{1,31}")
_REFERENCE = re.compile(r"(?:.*/)?([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})")
FHIR_USER_TYPES = frozenset({"Practitioner", "PractitionerRole", "Patient", "RelatedPerson", "Person"})


class InvalidClaims(ValueError):
    """Claims carebroker cannot make a principal of (a malformed fhirUser, patient, purpose...)."""


@dataclass(frozen=True)
class Principal:
    """The caller, as the token says. References are relative (`Practitioner/123`)."""

    issuer: str
    subject: str | None
    client_id: str | None
    scopes: tuple[SmartScope, ...]
    scope: str  # the scope claim as sent
    fhir_user: str | None = None  # Practitioner/PractitionerRole/Patient/RelatedPerson reference
    patient: str | None = None  # launch context: the patient id patient/ scopes are bound to
    roles: frozenset[str] = frozenset()
    organization: str | None = None  # Organization reference (claim, or from the user's PractitionerRole)
    purpose_of_use: str = DEFAULT_PURPOSE
    builtin: bool = False  # issued by carebroker's own authorization server
    token_id: str | None = None  # jti
    expires_at: int | None = None  # exp, seconds since the epoch

    @property
    def emergency(self) -> bool:
        return self.purpose_of_use == EMERGENCY_PURPOSE

    def has_role(self, role: str) -> bool:
        return role in self.roles


def claim_path(claims: Mapping[str, Any], name: str) -> Any:
    """A claim by name, or by a dotted path into nested objects (`realm_access.roles`)."""
    if name in claims:
        return claims[name]
    value: Any = claims
    for part in name.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def principal_from_claims(claims: Mapping[str, Any], *, builtin: bool = False, role_claim: str = "roles",
                          role_map: Mapping[str, str] | None = None,
                          find_organization: Callable[[str], str | None] | None = None) -> Principal:
    """The principal of validated claims. `role_map` maps the issuer's role names to carebroker's
    (names that are carebroker roles map to themselves; others are dropped); `find_organization`
    finds the organisation of a `fhirUser` that has none in the token (a PractitionerRole lookup)."""
    scope_claim = claims.get("scope", claims.get("scp", ""))
    if isinstance(scope_claim, list):  # some IdPs (Azure AD `scp`, Okta) send a list
        scope_claim = " ".join(str(s) for s in scope_claim)
    if not isinstance(scope_claim, str):
        raise InvalidClaims("the scope claim is not a string")
    scopes, _invalid = parse_scopes(scope_claim)
    fhir_user = _reference(claims.get("fhirUser"), "fhirUser", FHIR_USER_TYPES)
    patient = claims.get("patient")
    if patient is not None:
        if not isinstance(patient, str) or not (m := _REFERENCE.fullmatch(f"Patient/{patient.split('/')[-1]}")):
            raise InvalidClaims("the patient claim is not a Patient id")
        patient = m.group(2)
    if patient is None and fhir_user and fhir_user.startswith("Patient/"):
        patient = fhir_user.split("/", 1)[1]  # a patient user is their own launch context
    roles = _roles(claim_path(claims, role_claim), role_map or {})
    organization = _reference(claims.get("organization"), "organization", frozenset({"Organization"}))
    if organization is None and fhir_user and find_organization is not None:
        organization = find_organization(fhir_user)
    purpose = _purpose(claims.get("purpose_of_use"))
    client_id = claims.get("client_id", claims.get("azp"))
    exp = claims.get("exp")
    return Principal(
        issuer=str(claims.get("iss", "")), subject=_str(claims.get("sub")), client_id=_str(client_id),
        scopes=scopes, scope=scope_claim, fhir_user=fhir_user, patient=patient, roles=roles,
        organization=organization, purpose_of_use=purpose, builtin=builtin, token_id=_str(claims.get("jti")),
        expires_at=int(exp) if isinstance(exp, (int, float)) else None)


def _str(value: Any) -> str | None:
    return str(value) if isinstance(value, (str, int)) else None


def _reference(value: Any, claim: str, types: frozenset[str]) -> str | None:
    """`Practitioner/1` or an absolute URL ending so -> `Practitioner/1`."""
    if value is None:
        return None
    if isinstance(value, dict):  # a Reference object
        value = value.get("reference")
    m = _REFERENCE.fullmatch(value) if isinstance(value, str) else None
    if m is None or m.group(1) not in types:
        raise InvalidClaims(f"the {claim} claim is not a reference to one of {', '.join(sorted(types))}")
    return f"{m.group(1)}/{m.group(2)}"


def _roles(value: Any, role_map: Mapping[str, str]) -> frozenset[str]:
    if value is None:
        return frozenset()
    items = value.split() if isinstance(value, str) else value if isinstance(value, list) else []
    out = set()
    for item in items:
        if not isinstance(item, str):
            continue
        mapped = role_map.get(item, item)
        if mapped in ROLES:
            out.add(mapped)
    return frozenset(out)


def _purpose(value: Any) -> str:
    """A v3 PurposeOfUse code: a code string, a Coding, or a list of either (the first)."""
    if value is None:
        return DEFAULT_PURPOSE
    if isinstance(value, list):
        if not value:
            return DEFAULT_PURPOSE
        value = value[0]
    if isinstance(value, dict):
        value = value.get("code")
    if not isinstance(value, str) or not _CODE.fullmatch(value.upper()):
        raise InvalidClaims("the purpose_of_use claim is not a v3 PurposeOfUse code")
    return value.upper()

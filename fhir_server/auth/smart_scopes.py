"""SMART on FHIR resource scopes, v1 and v2, parsed into what they permit.

    patient/Observation.read      v1: read = search and read (`rs`)
    user/*.write                  v1: write = create, update, delete (`cud`); `*` = all five
    system/Patient.rs             v2: a subset of `cruds`, letters in that order, each at most once
    patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory
                                  v2 granular: only resources matching the query

`r` (read by id) and `s` (search) are separate: `r` without `s` cannot search, and no write letter
implies read. Scopes that name no resource (`openid`, `fhirUser`, `launch/patient`,
`offline_access`, ...) grant no FHIR access and are kept out; resource scopes that do not parse
(`patient/Observation.dus`, `user/observation.read`) are reported as invalid and grant nothing.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qsl

CONTEXTS = ("patient", "user", "system")
PERMISSIONS = "cruds"
V1 = {"read": frozenset("rs"), "write": frozenset("cud"), "*": frozenset(PERMISSIONS)}
_SCOPE = re.compile(r"(patient|user|system)/(\*|[A-Z][A-Za-z]{0,63})\.([A-Za-z*]+)(\?.*)?")
_V2 = re.compile(r"c?r?u?d?s?")


class InvalidScope(ValueError):
    """A resource scope that does not parse."""


@dataclass(frozen=True)
class SmartScope:
    """One resource scope: context (patient, user or system), resource type (or `*`), the
    interactions it permits (letters of `cruds`) and, for a granular v2 scope, its query."""

    context: str
    resource_type: str
    permissions: frozenset[str]
    query: tuple[tuple[str, str], ...] = ()
    text: str = ""

    def covers(self, rtype: str, permission: str) -> bool:
        return permission in self.permissions and self.resource_type in ("*", rtype)


def parse_scope(text: str) -> SmartScope | None:
    """A resource scope, or None for a scope that names no resource (openid, launch/patient, ...).
    Raises InvalidScope for something shaped like a resource scope that is not one."""
    if "/" not in text or text.startswith(("launch/", "http://", "https://")) or \
            text.split("/", 1)[0] not in CONTEXTS:
        return None
    m = _SCOPE.fullmatch(text)
    if m is None:
        raise InvalidScope(f"'{text}' is not a SMART resource scope (context/Type.permissions)")
    context, rtype, perms, query = m.groups()
    if perms in V1:
        if query:
            raise InvalidScope(f"'{text}': a query is only allowed on SMART v2 (.cruds) scopes")
        permissions = V1[perms]
    elif perms and _V2.fullmatch(perms):
        permissions = frozenset(perms)
    else:
        raise InvalidScope(f"'{text}': '.{perms}' is neither read, write, * nor letters of 'cruds' in that order")
    parsed_query: tuple[tuple[str, str], ...] = ()
    if query:
        parsed_query = tuple(parse_qsl(query[1:], keep_blank_values=True))
        if not parsed_query or any(not k for k, _ in parsed_query):
            raise InvalidScope(f"'{text}': the query after '?' is empty or malformed")
        if rtype == "*":
            raise InvalidScope(f"'{text}': a granular scope must name a resource type")
    return SmartScope(context, rtype, permissions, parsed_query, text)


def parse_scopes(text: str) -> tuple[tuple[SmartScope, ...], tuple[str, ...]]:
    """A space-separated scope string: (resource scopes, invalid scope texts)."""
    scopes: list[SmartScope] = []
    invalid: list[str] = []
    for item in text.split():
        try:
            scope = parse_scope(item)
        except InvalidScope:
            invalid.append(item)
            continue
        if scope is not None:
            scopes.append(scope)
    return tuple(scopes), tuple(invalid)

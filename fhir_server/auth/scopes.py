"""Which requested scopes a client may be granted, given the scopes it is registered for.

A requested SMART resource scope is granted when a registered one covers it: same context
(patient/user/system), the same resource type or `*`, and no more permissions (v1 `read` = v2 `rs`,
`write` = `cud`, `*` = `cruds`); a granular registered scope (`?category=...`) covers only itself.
Other scopes (`openid`, `fhirUser`, `launch/patient`) are granted only if registered verbatim.
Enforcing scopes on FHIR requests is the resource server's job, not this module's.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

_RESOURCE_SCOPE = re.compile(r"^(patient|user|system)/(\*|[A-Z][A-Za-z]*)\.([a-z*]+)(\?.*)?$")
_V1 = {"read": frozenset("rs"), "write": frozenset("cud"), "*": frozenset("cruds")}
_V2_ORDER = "cruds"


@dataclass(frozen=True)
class ResourceScope:
    context: str
    resource_type: str
    permissions: frozenset[str]
    query: str | None


def parse_resource_scope(scope: str) -> ResourceScope | None:
    """None when `scope` is not a well-formed SMART v1/v2 resource scope."""
    m = _RESOURCE_SCOPE.match(scope)
    if m is None:
        return None
    context, rtype, perms, query = m.groups()
    if perms in _V1:
        permissions = _V1[perms]
    elif perms and all(c in _V2_ORDER for c in perms) and list(perms) == sorted(set(perms), key=_V2_ORDER.index):
        permissions = frozenset(perms)
    else:
        return None  # e.g. `.dus`: letters out of order, or repeated
    return ResourceScope(context, rtype, permissions, query[1:] if query else None)


def covers(registered: str, requested: str) -> bool:
    if registered == requested:
        return True
    have, want = parse_resource_scope(registered), parse_resource_scope(requested)
    if have is None or want is None:
        return False
    return (have.context == want.context and have.resource_type in ("*", want.resource_type)
            and want.permissions <= have.permissions and (have.query is None or have.query == want.query))


def grant(requested: Iterable[str], registered: Iterable[str]) -> list[str]:
    """The requested scopes the registration covers, in the order asked, without duplicates."""
    registered = list(registered)
    return [s for s in dict.fromkeys(requested) if any(covers(r, s) for r in registered)]

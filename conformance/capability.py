"""The CapabilityStatement, generated from what the server really routes.

Interactions come from the router's route table, so a claim here is always backed by a handler.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from conformance.search_parameters import for_type
from conformance.validation import r4_resource_types

SOFTWARE_VERSION = "0.1.0"


class RouteInfo(Protocol):
    interaction: str  # `$name` for an operation
    level: str
    shape: str
    types: frozenset[str] | None


# The canonical definitions of the operations carebroker implements: (name, resource type or None
# for the system level) -> URL; a name without a type-specific entry uses its (name, None) one.
OPERATION_DEFINITIONS = {
    ("everything", None): "http://hl7.org/fhir/OperationDefinition/Patient-everything",
    ("validate", None): "http://hl7.org/fhir/OperationDefinition/Resource-validate",
    ("export", None): "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export",
    ("export", "Patient"): "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/patient-export",
    ("export", "Group"): "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/group-export",
}


def capability_statement(routes: Iterable[RouteInfo], types: Sequence[str], base_url: str,
                         searchable_kinds: frozenset[str], security: dict[str, Any] | None = None) -> dict[str, Any]:
    """`searchable_kinds`: the search-parameter types the engine implements (composite is not one);
    `security`: the `rest.security` element (how clients get tokens), if any."""
    routes = list(routes)
    operations = [r for r in routes if r.interaction.startswith("$")]
    routes = [r for r in routes if not r.interaction.startswith("$")]
    type_interactions = sorted({r.interaction for r in routes if r.level in ("type", "instance", "compartment")},
                               key=_INTERACTION_ORDER.index)
    system_interactions = list(dict.fromkeys(r.interaction for r in routes
                                             if r.level == "system" and r.interaction != "capabilities"))
    conditional = {(r.interaction, r.level) for r in routes if r.level == "type"}
    resource_entry = {
        "interaction": [{"code": code} for code in type_interactions],
        "versioning": "versioned-update",
        "readHistory": True,
        "updateCreate": True,
        "conditionalCreate": True,
        "conditionalRead": "full-support",
        "conditionalUpdate": ("update", "type") in conditional,
        "conditionalDelete": "single" if ("delete", "type") in conditional else "not-supported",
    }
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-23",
        "publisher": "carebroker",
        "kind": "instance",
        "software": {"name": "carebroker", "version": SOFTWARE_VERSION},
        "implementation": {"description": "carebroker FHIR R4 server", "url": base_url},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "patchFormat": ["application/json-patch+json"],
        "rest": [{
            "mode": "server",
            **({"security": security} if security else {}),
            "documentation": (f"{len(types)} of the {len(r4_resource_types())} R4 resource types are supported "
                              "(R4 types without a fhir.resources R4B model are not)."),
            "resource": [{"type": t, **resource_entry, **_search_entry(t, searchable_kinds),
                          **_operations([r for r in operations if r.level != "system" and
                                         (r.types is None or t in r.types)], t)} for t in types],
            "interaction": [{"code": code} for code in system_interactions],
            **_operations([r for r in operations if r.level == "system"], None),
        }],
    }


def _operations(routes: list[RouteInfo], rtype: str | None) -> dict[str, Any]:
    """`operation` entries, one per operation name (a name may be routed by several methods/levels)."""
    names = list(dict.fromkeys(r.interaction[1:] for r in routes))
    if not names:
        return {}
    return {"operation": [{"name": n, "definition": OPERATION_DEFINITIONS.get((n, rtype))
                           or OPERATION_DEFINITIONS[(n, None)]} for n in names]}


def _search_entry(rtype: str, kinds: frozenset[str]) -> dict[str, Any]:
    params = [p for p in for_type(rtype).values() if p.type in kinds and (p.expression or p.code.startswith("_"))]
    references = sorted(p.code for p in params if p.type == "reference")
    return {
        "searchInclude": ["*"] + [f"{rtype}:{code}" for code in references],
        "searchRevInclude": ["*"],
        "searchParam": [{"name": p.code, "definition": p.url, "type": p.type} for p in
                        sorted(params, key=lambda p: p.code)],
    }


_INTERACTION_ORDER = ["read", "vread", "update", "patch", "delete", "history-instance", "history-type",
                      "create", "search-type"]

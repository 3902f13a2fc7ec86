"""The CapabilityStatement, generated from what the server really routes.

Interactions come from the router's route table, so a claim here is always backed by a handler.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from conformance.validation import r4_resource_types

SOFTWARE_VERSION = "0.1.0"


class RouteInfo(Protocol):
    interaction: str
    level: str
    shape: str


def capability_statement(routes: Iterable[RouteInfo], types: Sequence[str], base_url: str) -> dict[str, Any]:
    routes = list(routes)
    type_interactions = sorted({r.interaction for r in routes if r.level in ("type", "instance")},
                               key=_INTERACTION_ORDER.index)
    system_interactions = [r.interaction for r in routes if r.level == "system" and r.interaction != "capabilities"]
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
        "searchParam": [
            {"name": "_id", "type": "token", "documentation": "Used in conditional interactions"},
            {"name": "identifier", "type": "token",
             "documentation": "Used in conditional interactions, for types that have an identifier element"},
        ],
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
            "documentation": (f"{len(types)} of the {len(r4_resource_types())} R4 resource types are supported "
                              "(R4 types without a fhir.resources R4B model are not)."),
            "resource": [{"type": t, **resource_entry} for t in types],
            "interaction": [{"code": code} for code in system_interactions],
        }],
    }


_INTERACTION_ORDER = ["read", "vread", "update", "patch", "delete", "history-instance", "history-type",
                      "create", "search-type"]

"""The messages the FHIR router speaks: a FHIR interaction request in, a response out.

Kept apart from the router so that Bundle processing, which builds requests for its entries and
hands them back to the router, can use them without importing the router.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import orjson

from fhir_server.outcome import Issue, operation_outcome

if TYPE_CHECKING:
    from fhir_server.auth.principal import Principal

FHIR_JSON = "application/fhir+json"
JSON_PATCH = "application/json-patch+json"


@dataclass
class FhirRequest:
    """A FHIR interaction request. `path` is relative to the FHIR base (`Patient/1/_history/2`)."""

    method: str
    path: str
    params: list[tuple[str, str]] = field(default_factory=list)
    headers: Mapping[str, str] = field(default_factory=dict)  # lower-case names
    body: bytes | None = None
    base_url: str = "http://localhost/fhir"
    # Set only by Bundle processing: the entry's resource, already parsed, and the id a transaction
    # chose for a resource it creates (references to it were rewritten before it was written).
    resource: Any = None
    assigned_id: str | None = None
    # Who asks (from the validated access token); None only when token checks are off. Bundle
    # entries carry the Bundle's.
    principal: Principal | None = None
    # The access policy decided for the principal when the request started (consent/policy.py);
    # Bundle entries carry the Bundle's.
    policy: Any = None

    def param(self, name: str) -> str | None:
        return next((v for k, v in self.params if k == name), None)

    @property
    def query(self) -> str:
        return urlencode(self.params)

    def prefer(self, key: str) -> str | None:
        """One token of the Prefer header, e.g. prefer('return') -> 'minimal'."""
        for part in self.headers.get("prefer", "").split(","):
            name, _, value = part.strip().partition("=")
            if name.strip() == key:
                return value.strip().strip('"')
        return None


@dataclass
class FhirResponse:
    status: int
    body: bytes | None = None  # compact FHIR JSON
    headers: dict[str, str] = field(default_factory=dict)
    # A body too large to hold (a bulk export file): its pieces, produced one at a time in the
    # thread pool as they are sent. Its Content-Type (and Content-Length, if known) go in `headers`.
    stream: Iterator[bytes] | None = None


def json_response(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> FhirResponse:
    return FhirResponse(status, orjson.dumps(body), headers or {})


def outcome_response(status: int, issues: list[Issue], headers: dict[str, str] | None = None) -> FhirResponse:
    return json_response(status, operation_outcome(issues), headers)

"""The FHIR router: a FHIR request in, a FHIR response out, no HTTP framework in sight.

The HTTP adapter (api/http.py) turns Starlette requests into `FhirRequest`s; batch and transaction
Bundles can call the same router for each entry. The route table is also what the
CapabilityStatement is generated from, so the server never claims an interaction it does not route.
"""
from __future__ import annotations

import functools
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import parse_qsl, urlencode

import orjson

from fhir_server import jsonfmt
from conformance.capability import capability_statement
from conformance.search_parameters import patient_compartment
from conformance.validation import model_class, supported_resource_types
from fhir_server.api.bundle import process_bundle
from fhir_server.auth.discovery import rest_security
from fhir_server.auth.urls import AuthUrls
from fhir_server.api.messages import FHIR_JSON, JSON_PATCH, FhirRequest, FhirResponse, json_response, outcome_response
from fhir_server.auth.access import Access, forbidden
from consent.policy import BREAK_GLASS_HEADER, PolicyDecisionPoint, RequestPolicy
from consent.rules import POLICY_SUMMARY
from fhir_server.outcome import FhirError, Issue, error, operation_outcome
from fhir_server.search.engine import Page
from fhir_server.search.params import UNITS
from fhir_server.service.export import CHUNK_BYTES, NDJSON, BulkExport, export_manifest, export_progress
from fhir_server.service.interactions import FhirService, HistoryPage, Result
from fhir_server.service.timefmt import now_us, parse_http_date, parse_instant, to_http_date, to_instant
from fhir_server.storage.repository import Version

Handler = Callable[["FhirRouter", FhirRequest, list[str]], FhirResponse]


@dataclass(frozen=True)
class Route:
    """One routed interaction: HTTP method + path shape -> handler; `interaction` names it in the
    CapabilityStatement (`level` is system, type or instance)."""

    method: str
    shape: str
    interaction: str  # a REST interaction code, or `$name` for an operation
    level: str
    handler: Handler
    types: frozenset[str] | None = None  # the resource types it applies to; None: all


class FhirRouter:
    """Dispatches FHIR requests to the service layer and shapes FHIR responses."""

    def __init__(self, service: FhirService, default_page_size: int = 50, max_page_size: int = 1000,
                 export_chunk_bytes: int = CHUNK_BYTES) -> None:
        self.service = service
        self.default_page_size = default_page_size
        self.max_page_size = max_page_size
        self.types = frozenset(supported_resource_types())
        self.pdp = PolicyDecisionPoint(service, self.types)
        self.exports = BulkExport(service.store, self.types, export_chunk_bytes, self.pdp.for_export)

    @staticmethod
    def is_single_row_read(req: FhirRequest) -> bool:
        """read or vread: one primary-key lookup, cheap enough to run without a thread hand-off."""
        if req.method != "GET":
            return False
        parts = req.path.strip("/").split("/")
        return len(parts) == 2 and not parts[1].startswith(("_", "$")) or len(parts) == 4 and parts[2] == "_history"

    def handle(self, req: FhirRequest) -> FhirResponse:
        """One request, with the principal's policy decided at its start and completed at its end."""
        try:
            if req.principal is not None and req.policy is None:
                req.policy = self.pdp.for_principal(req.principal, req.base_url, req.headers.get(BREAK_GLASS_HEADER),
                                                    _patient_of(req))
            response = self._dispatch(req)
        except FhirError as exc:
            response = outcome_response(exc.status, exc.issues, exc.headers)
        if isinstance(req.policy, RequestPolicy):
            self.pdp.complete(req.policy, req.method, req.path.strip("/") + (f"?{req.query}" if req.params else ""),
                              response.status)
        return response

    def _dispatch(self, req: FhirRequest) -> FhirResponse:
        route, parts = self._route(req)
        self._authorize(req, route, parts)
        return route.handler(self, req, parts)

    def _route(self, req: FhirRequest) -> tuple[Route, list[str]]:
        parts = [p for p in req.path.strip("/").split("/") if p]
        shape = _shape(parts)
        if shape.startswith("{type}") and parts[0] not in self.types:
            raise error(404, "not-supported", f"Resource type '{parts[0]}' is not supported by this server")
        candidates = [r for r in ROUTES if r.shape == shape]
        if not candidates:
            raise error(404, "not-found", f"No FHIR interaction at '{req.path}'")
        for route in candidates:
            if route.method == req.method:
                if route.types is not None and parts[0] not in route.types:
                    raise error(404, "not-supported", f"{route.interaction} is not defined for {parts[0]}")
                return route, parts
        allowed = ", ".join(sorted({r.method for r in candidates}))
        raise FhirError(405, [Issue("not-supported", f"{req.method} is not allowed here (allowed: {allowed})")],
                        headers={"Allow": allowed})

    # -- authorization --------------------------------------------------------------------------
    # The principal's SMART scopes decide which interactions it may use (403 otherwise); the
    # service, restricted to the rows they reach, does the rest (patient compartments, granular
    # scopes), inside its queries.

    @staticmethod
    def _access(req: FhirRequest) -> Access | None:
        """The principal's scopes, as its request policy holds them."""
        return req.policy.access if isinstance(req.policy, RequestPolicy) else None

    def _svc(self, req: FhirRequest) -> FhirService:
        """The service as this request's principal may use it."""
        policy: RequestPolicy | None = req.policy
        if policy is None or policy.unrestricted and not policy.audited:
            return self.service
        return self.service.restricted(policy)

    def _authorize_entry(self, req: FhirRequest) -> None:
        """A Bundle entry's interaction-level check, before a transaction runs any entry."""
        route, parts = self._route(req)
        self._authorize(req, route, parts)

    def _authorize(self, req: FhirRequest, route: Route, parts: list[str]) -> None:
        """403 unless the principal's scopes and roles allow this interaction on its type(s)."""
        kind = route.interaction
        scopes = self._access(req)
        if scopes is None or kind in ("capabilities", "transaction", "batch"):
            return  # a Bundle's entries are checked one by one
        access = _Gate(scopes, req.policy, "search-compartment" if route.level == "compartment" else kind)
        rtype = parts[0] if route.shape.startswith("{type}") else ""
        conditional = route.level == "type"
        if kind in ("read", "vread", "history-instance"):
            access.require("r", rtype)
        elif kind == "search-type":
            target = parts[2] if route.level == "compartment" else rtype
            if target in self.types:  # an unknown one is the handler's 404
                access.require("s", target)
        elif kind == "history-type":
            access.require("s", rtype)
        elif kind in ("search-system", "history-system"):
            self._require_types(req, access, "s")
        elif kind == "create":
            access.require("cs" if req.headers.get("if-none-exist") else "c", rtype)
        elif kind in ("update", "patch"):
            access.require("us" if conditional else "u", rtype)
        elif kind == "delete":
            access.require("ds" if conditional else "d", rtype)
        elif kind == "$everything":
            access.require("s", "Patient")
            self._require_types(req, access, "s")
        elif kind == "$validate":
            access.require_any("rcu", rtype)
        elif kind == "$export":
            self._authorize_export(req, access, route, parts)
        else:
            raise forbidden(f"{kind} is not covered by SMART scopes here")

    def _require_types(self, req: FhirRequest, access: _Gate, permission: str) -> None:
        """Every type `_type` names must be allowed; without `_type`, at least one (the others
        are left out of the search)."""
        raw = req.param("_type")
        if raw:
            for t in (t.strip() for t in raw.split(",")):
                if t in self.types:
                    access.require(permission, t)
        elif not access.permitted_types(permission, self.types):
            raise forbidden("The access token allows no resource type to be searched")

    def _authorize_export(self, req: FhirRequest, access: _Gate, route: Route, parts: list[str]) -> None:
        """Bulk Data: `system/` or `user/` read scopes (v1 `.read`, v2 `.rs`) for each exported type;
        `patient/` scopes do not export. Status, files and cancel need some such scope too."""
        if route.handler in (FhirRouter.export_status, FhirRouter.export_cancel, FhirRouter.export_file):
            if not access.permitted_types("r", self.types, bulk=True):
                raise forbidden("Bulk Data needs system/ or user/ read scopes")
            return
        if route.level == "instance":
            access.require("r", "Group", bulk=True)
        raw = req.param("_type")
        if raw:
            for t in (t.strip() for t in raw.split(",") if t.strip()):
                if t in self.types:
                    access.require("rs", t, bulk=True)
        elif not self._export_types(req, route.level):
            raise forbidden("The access token allows no resource type to be exported (system/ or user/ read scopes)")

    def _export_types(self, req: FhirRequest, level: str) -> list[str]:
        """The types an export without `_type` holds: those the principal may bulk-read."""
        scopes = self._access(req)
        candidates = self.types if level == "system" else frozenset(patient_compartment()) & self.types
        if scopes is None:
            return sorted(candidates)
        access = _Gate(scopes, req.policy, "$export")
        return [t for t in sorted(candidates) if access.permits("r", t, bulk=True) and access.permits("s", t, bulk=True)]

    # -- handlers -------------------------------------------------------------------------------

    def metadata(self, req: FhirRequest, parts: list[str]) -> FhirResponse:
        security = rest_security(AuthUrls.for_fhir_base(req.base_url))
        security["description"] += " " + POLICY_SUMMARY
        return json_response(200, capability_statement(ROUTES, sorted(self.types), req.base_url,
                                                       frozenset(k for k in UNITS if not k.startswith("_")), security))

    def read(self, req: FhirRequest, parts: list[str]) -> FhirResponse:
        version = self._svc(req).read(parts[0], parts[1])
        if (tag := req.headers.get("if-none-match")) and _etag_matches(tag, version.version_id):
            return FhirResponse(304, None, _version_headers(req, version))
        if (since := req.headers.get("if-modified-since")) and (when := parse_http_date(since)) is not None:
            if version.last_updated // 1_000_000 * 1_000_000 <= when:
                return FhirResponse(304, None, _version_headers(req, version))
        return self._resource_response(200, req, version, location=False)

    def vread(self, req: FhirRequest, parts: list[str]) -> FhirResponse:
        return self._resource_response(200, req, self._svc(req).vread(parts[0], parts[1], parts[3]), location=False)

    # Bulk Data export (IG v2): a kick-off answers with a status URL; the status URL, once the job
    # is done, with a manifest of file URLs. The work is done by service/export.py's worker.

    def export_system(self, req: FhirRequest, parts: list[str]) -> FhirResponse:
        return self._export_kick_off(req, "system", None)

    def export_patients(self, req: FhirRequest, parts: list[str]) -> FhirResponse:
        return self._export_kick_off(req, "patient", None)

    def export_group(self, req: FhirRequest, parts: list[str]) -> FhirResponse:
        return self._export_kick_off(req, "group", parts[1])

    def _export_kick_off(self, req: FhirRequest, level: str, group_id: str | None) -> FhirResponse:
        if req.prefer("respond-async") is None:
            raise error(400, "not-supported", "$export runs asynchronously: send 'Prefer: respond-async'")
        request = f"{req.base_url}/{req.path.strip('/')}" + (f"?{req.query}" if req.params else "")
        if req.principal is not None and not req.param("_type"):  # only the types the token may export
            req = replace(req, params=[*req.params, ("_type", ",".join(self._export_types(req, level)))])
        job_id = self.exports.kick_off(level, group_id, req.params, request, req.prefer("handling") == "lenient",
                                       _requester(req), req.policy.principal_json() if req.policy else None)
        status_url = f"{req.base_url}/$export-poll-status?{urlencode({'_jobId': job_id})}"
        return outcome_response(202, [Issue("informational", f"Export started; its status is at {status_url}",
                                            severity="information")], {"Content-Location": status_url})

    def export_status(self, req: FhirRequest, parts: list[str]) -> FhirResponse:
        job, files = self.exports.status(_job_id(req), _requester(req))
        if job.status == "failed":
            return outcome_response(500, [Issue("exception", f"The export failed: {job.error}")])
        if job.status != "completed":
            return FhirResponse(202, None, {"X-Progress": export_progress(job), "Retry-After": "2"})
        return json_response(200, export_manifest(job, files, req.base_url, req.principal is not None),
                             {"Content-Type": "application/json", "Expires": to_http_date(job.expires)})

    def export_cancel(self, req: FhirRequest, parts: list[str]) -> FhirResponse:
        self.exports.cancel(_job_id(req), _requester(req))
        return outcome_response(202, [Issue("informational", "Export cancelled; its files are deleted",
                                            severity="information")])

    def export_file(self, req: FhirRequest, parts: list[str]) -> FhirResponse:
        number = req.param("_file") or ""
        if not number.isdigit():
            raise error(400, "invalid", f"Parameter '_file': '{number}' is not a file number")
        size, chunks = self.exports.file(_job_id(req), int(number), _requester(req))
        return FhirResponse(200, None, {"Content-Type": NDJSON, "Content-Length": str(size)}, stream=chunks)

    def create(self, req: FhirRequest, parts: list[str]) -> FhirResponse:
        if req.query and any(k not in ("_format", "_pretty") for k, _ in req.params):
            raise error(400, "not-supported", "POST to a type takes no search parameters (use If-None-Exist)")
        result = self._svc(req).create(parts[0], self._body(req), req.headers.get("if-none-exist"), req.assigned_id)
        return self._write_response(req, result)

    def update(self, req: FhirRequest, parts: list[str]) -> FhirResponse:
        return self._write_response(req, self._svc(req).update(parts[0], parts[1], self._body(req),
                                                             req.headers.get("if-match")))

    def conditional_update(self, req: FhirRequest, parts: list[str]) -> FhirResponse:
        return self._write_response(req, self._svc(req).conditional_update(
            parts[0], self._criteria(req), self._body(req), req.headers.get("if-match"), req.assigned_id))

    def patch(self, req: FhirRequest, parts: list[str]) -> FhirResponse:
        return self._write_response(req, self._svc(req).patch(parts[0], parts[1], self._patch_body(req),
                                                            req.headers.get("if-match")))

    def conditional_patch(self, req: FhirRequest, parts: list[str]) -> FhirResponse:
        return self._write_response(req, self._svc(req).conditional_patch(
            parts[0], self._criteria(req), self._patch_body(req), req.headers.get("if-match")))

    def delete(self, req: FhirRequest, parts: list[str]) -> FhirResponse:
        return self._delete_response(self._svc(req).delete(parts[0], parts[1], req.headers.get("if-match")))

    def conditional_delete(self, req: FhirRequest, parts: list[str]) -> FhirResponse:
        return self._delete_response(self._svc(req).conditional_delete(parts[0], self._criteria(req)))

    def search_type(self, req: FhirRequest, parts: list[str]) -> FhirResponse:
        return self._search(req, (parts[0],))

    def search_type_post(self, req: FhirRequest, parts: list[str]) -> FhirResponse:
        return self._search(_with_form(req), (parts[0],))

    def search_system(self, req: FhirRequest, parts: list[str]) -> FhirResponse:
        return self._search(req, self._system_types(req))

    def search_system_post(self, req: FhirRequest, parts: list[str]) -> FhirResponse:
        form = _with_form(req)
        return self._search(form, self._system_types(form))

    def search_compartment(self, req: FhirRequest, parts: list[str]) -> FhirResponse:
        if parts[0] != "Patient":
            raise error(404, "not-supported", f"Compartment search is supported for Patient, not {parts[0]}")
        if parts[2] not in self.types:
            raise error(404, "not-supported", f"Resource type '{parts[2]}' is not supported by this server")
        return self._search(req, (parts[2],), compartment=parts[1])

    def bundle(self, req: FhirRequest, parts: list[str]) -> FhirResponse:
        """POST [base]: a batch or transaction Bundle, whose entries come back through this router."""
        return json_response(200, process_bundle(self._dispatch, self._svc(req), req, self._body(req),
                                                 authorize=self._authorize_entry))

    def history_instance(self, req: FhirRequest, parts: list[str]) -> FhirResponse:
        return self._history(req, parts[0], parts[1])

    def history_type(self, req: FhirRequest, parts: list[str]) -> FhirResponse:
        return self._history(req, parts[0], None)

    def history_system(self, req: FhirRequest, parts: list[str]) -> FhirResponse:
        return self._history(req, None, None)

    def everything(self, req: FhirRequest, parts: list[str]) -> FhirResponse:
        """Patient/[id]/$everything, and Patient/$everything for the patients of `_id` (a comma list)
        or all of them. POSTed Parameters join the URL's, so page links repeat them as a GET."""
        if req.method == "POST":
            primitives, _ = _parameters(self._body(req)) if req.body else ([], {})
            req = replace(req, params=[*req.params, *primitives], body=None)
        known = {"_since", "_type", "_count", "_cursor", "_format", "_pretty", *(("_id",) if len(parts) == 2 else ())}
        ignored = list(dict.fromkeys(k for k, _ in req.params if k not in known))
        if ignored and req.prefer("handling") == "strict":
            raise error(400, "not-supported", f"Unknown $everything parameter(s): {', '.join(ignored)}")
        if len(parts) == 3:
            patients: list[str] | None = [parts[1]]
        else:
            ids = [i.strip() for k, v in req.params if k == "_id" for i in v.split(",") if i.strip()]
            patients = ids or None
        since = parse_instant(s, "_since") if (s := req.param("_since")) else None
        page, members, referenced = self._svc(req).everything(patients, self._system_types(req), since,
                                                            self._page_size(req), req.param("_cursor"))
        return json_response(200, search_bundle(req, page, members, referenced, ignored, None, []))

    def validate(self, req: FhirRequest, parts: list[str]) -> FhirResponse:
        """[type]/$validate and [type]/[id]/$validate: 200 with every issue found whenever validation
        ran, valid or not; a 4xx only when it could not run (R4 Resource-validate)."""
        rid = parts[1] if len(parts) == 3 else None
        resource: Any = None
        if req.method == "POST" and req.body:
            body = self._body(req)
            if isinstance(body, dict) and body.get("resourceType") == "Parameters" and parts[0] != "Parameters":
                primitives, resources = _parameters(body)
                req = replace(req, params=[*req.params, *primitives])
                resource = resources.get("resource")
            else:
                resource = body
        mode, profile = req.param("mode"), req.param("profile")
        if mode != "delete":
            if resource is None and req.method == "GET" and rid is not None:
                stored = self._svc(req).read(parts[0], rid)
                assert stored.content is not None  # a deletion is a 410 from read()
                resource = jsonfmt.loads(stored.content)
            elif resource is None:
                raise error(400, "required", "$validate needs a resource (the body, or a Parameters 'resource')")
        issues = self._svc(req).validate(parts[0], rid, resource, mode, profile)
        return outcome_response(200, issues or [Issue("informational", "Validation found no issues",
                                                      severity="information")])

    # -- helpers --------------------------------------------------------------------------------

    def _system_types(self, req: FhirRequest) -> tuple[str, ...]:
        raw = req.param("_type")
        if not raw:
            scopes = self._access(req)
            if scopes is None:
                return tuple(sorted(self.types))
            return _Gate(scopes, req.policy, "search-system").permitted_types("s", sorted(self.types))
        types = tuple(t.strip() for t in raw.split(",") if t.strip())
        unknown = [t for t in types if t not in self.types]
        if unknown:
            raise error(400, "not-supported", f"Parameter '_type': unknown resource type(s) {', '.join(unknown)}")
        return types

    def _search(self, req: FhirRequest, types: tuple[str, ...], compartment: str | None = None) -> FhirResponse:
        strict = req.prefer("handling") == "strict"
        summary = req.param("_summary")
        if summary not in (None, "true", "false", "text", "data", "count"):
            raise error(400, "invalid", f"Parameter '_summary': '{summary}' is not true, false, text, data or count")
        total_mode = req.param("_total") or "accurate"
        if total_mode not in ("none", "estimate", "accurate"):
            raise error(400, "invalid", f"Parameter '_total': '{total_mode}' is not none, estimate or accurate")
        count = 0 if summary == "count" else self._page_size(req)
        if isinstance(req.policy, RequestPolicy):
            req.policy.check_search(types, req.params)
        page, matches, included, ignored = self._svc(req).search(
            types, req.params, strict=strict, base_url=req.base_url, count=count, cursor=req.param("_cursor"),
            want_total=summary == "count" or total_mode != "none", compartment=compartment)
        elements = [e.strip() for e in (req.param("_elements") or "").split(",") if e.strip()]
        return json_response(200, search_bundle(req, page, matches, included, ignored, summary, elements))

    def _history(self, req: FhirRequest, rtype: str | None, rid: str | None) -> FhirResponse:
        since = parse_instant(s, "_since") if (s := req.param("_since")) else None
        count = max(1, self._page_size(req))
        before = _cursor(req.param("_before"), "_before")
        after = _cursor(req.param("_after"), "_after")
        page = self._svc(req).history(rtype, rid, since, count, before, after)
        return json_response(200, history_bundle(req, page))

    def _page_size(self, req: FhirRequest) -> int:
        raw = req.param("_count")
        if raw is None:
            return self.default_page_size
        if not raw.isdigit():
            raise error(400, "invalid", f"Parameter '_count': '{raw}' is not a non-negative integer")
        return min(int(raw), self.max_page_size)

    @staticmethod
    def _criteria(req: FhirRequest) -> str:
        criteria = [(k, v) for k, v in req.params if k not in ("_format", "_pretty")]
        if not criteria:
            raise error(400, "invalid", "A conditional interaction needs search criteria in the URL")
        return urlencode(criteria)

    @staticmethod
    def _body(req: FhirRequest) -> Any:
        if req.resource is not None:
            return req.resource
        ctype = req.headers.get("content-type", FHIR_JSON).split(";")[0].strip().lower()
        if ctype not in (FHIR_JSON, "application/json"):
            raise error(415, "not-supported", f"Content-Type '{ctype}' is not supported; send {FHIR_JSON}")
        return _parse_json(req.body)

    @staticmethod
    def _patch_body(req: FhirRequest) -> Any:
        ctype = req.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != JSON_PATCH:
            raise error(415, "not-supported", f"PATCH takes a JSON Patch document ({JSON_PATCH}), not '{ctype}'")
        patch = _parse_json(req.body)
        if not isinstance(patch, list) or not all(isinstance(op, dict) and "op" in op and "path" in op
                                                  for op in patch):
            raise error(400, "structure", "A JSON Patch document is an array of operations with 'op' and 'path'")
        return patch

    def _write_response(self, req: FhirRequest, result: Result) -> FhirResponse:
        version = result.version
        assert version is not None
        prefer = req.prefer("return") or "representation"
        if prefer == "minimal":
            return FhirResponse(result.status, None, _version_headers(req, version, location=True))
        if prefer == "OperationOutcome":
            issues = result.issues or [Issue("informational", f"{version.type}/{version.id} version "
                                             f"{version.version_id} stored", severity="information")]
            return FhirResponse(result.status, orjson.dumps(operation_outcome(issues)),
                                _version_headers(req, version, location=True))
        return self._resource_response(result.status, req, version, location=True)

    @staticmethod
    def _delete_response(result: Result) -> FhirResponse:
        headers = {"ETag": f'W/"{result.version.version_id}"'} if result.version else {}
        if result.issues:
            return FhirResponse(200, orjson.dumps(operation_outcome(result.issues)), headers)
        return FhirResponse(204, None, headers)

    @staticmethod
    def _resource_response(status: int, req: FhirRequest, version: Version, location: bool) -> FhirResponse:
        assert version.content is not None
        return FhirResponse(status, version.content.encode(), _version_headers(req, version, location))


def _parameters(body: Any) -> tuple[list[tuple[str, str]], dict[str, Any]]:
    """An operation's Parameters body: (primitive values as URL parameters would give them, resources by name)."""
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        raise error(400, "invalid", "An operation's body must be a Parameters resource", expression="resourceType")
    primitives: list[tuple[str, str]] = []
    resources: dict[str, Any] = {}
    for i, param in enumerate(body.get("parameter") or []):
        name = param.get("name") if isinstance(param, dict) else None
        values = [v for k, v in param.items() if k.startswith("value")] if isinstance(name, str) else []
        if isinstance(name, str) and "resource" in param:
            resources[name] = param["resource"]
        elif len(values) == 1 and isinstance(values[0], (str, int, float, bool)):
            value = values[0]
            primitives.append((name, str(value).lower() if isinstance(value, bool) else str(value)))
        else:
            raise error(400, "invalid", f"Parameters.parameter[{i}] is not a named primitive value or resource",
                        expression=f"Parameters.parameter[{i}]")
    return primitives, resources


def _with_form(req: FhirRequest) -> FhirRequest:
    """POST [type]/_search: the form body's parameters join those of the URL."""
    ctype = req.headers.get("content-type", "").split(";")[0].strip().lower()
    if req.body and ctype != "application/x-www-form-urlencoded":
        raise error(415, "not-supported", "POST _search takes application/x-www-form-urlencoded parameters")
    form = parse_qsl((req.body or b"").decode(), keep_blank_values=True)
    return replace(req, params=[*req.params, *form], path=req.path.rsplit("/_search", 1)[0], body=None)


class _Gate:
    """A principal's SMART scopes and its roles' rules, asked together: every check passes both."""

    def __init__(self, scopes: Access, policy: RequestPolicy | None, interaction: str) -> None:
        self.scopes, self.policy, self.interaction = scopes, policy, interaction

    def require(self, permissions: str, rtype: str, bulk: bool = False) -> None:
        self.scopes.require(permissions, rtype, bulk)
        if self.policy is not None:
            self.policy.require(self.interaction, rtype)

    def require_any(self, permissions: str, rtype: str) -> None:
        self.scopes.require_any(permissions, rtype)
        if self.policy is not None:
            self.policy.require(self.interaction, rtype)

    def permits(self, permission: str, rtype: str, bulk: bool = False) -> bool:
        return self.scopes.permits(permission, rtype, bulk) and (
            self.policy is None or self.policy.allows(self.interaction, rtype))

    def permitted_types(self, permission: str, types: Iterable[str], bulk: bool = False) -> tuple[str, ...]:
        return tuple(t for t in types if self.permits(permission, t, bulk))


def _patient_of(req: FhirRequest) -> str | None:
    """The one patient a request is about, if it names one: `Patient/[id]...`, or a `patient` or
    `subject` search parameter naming a single Patient (break-glass opens access to them)."""
    parts = req.path.strip("/").split("/")
    if parts[0] == "Patient" and len(parts) > 1 and not parts[1].startswith(("_", "$")):
        return parts[1]
    for name, value in req.params:
        base = name.split(":", 1)[0]
        if base in ("patient", "subject") and "," not in value:
            ref = value.rstrip("/").split("/")
            if len(ref) == 1 and base == "patient" or len(ref) >= 2 and ref[-2] == "Patient":
                return ref[-1]
    return None


def _job_id(req: FhirRequest) -> str:
    if not (job_id := req.param("_jobId")):
        raise error(400, "required", "Parameter '_jobId' is required")
    return job_id


def _requester(req: FhirRequest) -> str | None:
    """Who is asking, as the export job records it: the token's issuer and subject (or client)."""
    p = req.principal
    return None if p is None else f"{p.issuer}|{p.subject or p.client_id}"


def _shape(parts: list[str]) -> str:
    """Path shape for routing: `Patient/1/_history` -> `{type}/{id}/_history`; operation names
    (`$everything`) and `_`-words stay literal."""
    if not parts:
        return ""
    if parts[0] in ("metadata", "_history", "_search") or parts[0].startswith("$"):
        return "/".join(parts)
    out = ["{type}"]
    for i, p in enumerate(parts[1:], start=1):
        if p.startswith("$") and i == len(parts) - 1 and i <= 2:
            out.append(p)
        elif i == 1:
            out.append(p if p in ("_history", "_search") else "{id}")
        elif i == 2:
            out.append(p if p == "_history" else "{ctype}" if p[:1].isupper() else "{?}")
        elif i == 3 and parts[2] == "_history":
            out.append("{vid}")
        else:
            out.append("{?}")
    return "/".join(out)


def _version_headers(req: FhirRequest, version: Version, location: bool = False) -> dict[str, str]:
    headers = {"ETag": f'W/"{version.version_id}"', "Last-Modified": to_http_date(version.last_updated)}
    if location:
        headers["Location"] = f"{req.base_url}/{version.type}/{version.id}/_history/{version.version_id}"
    return headers


def _etag_matches(header: str, version_id: int) -> bool:
    return any(t.strip() == "*" or t.strip().removeprefix("W/").strip('"') == str(version_id)
               for t in header.split(","))


def _parse_json(body: bytes | None) -> Any:
    if not body:
        raise error(400, "structure", "The request has no body")
    try:
        return jsonfmt.loads(body)
    except ValueError as exc:
        raise error(400, "structure", f"The body is not valid JSON: {exc}") from None


def _cursor(raw: str | None, name: str) -> int | None:
    if raw is None:
        return None
    if not raw.isdigit():
        raise error(400, "invalid", f"Parameter '{name}': '{raw}' is not a valid page position")
    return int(raw)


SUBSETTED = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED"}
ALWAYS_KEPT = frozenset({"resourceType", "id", "meta"})


def search_bundle(req: FhirRequest, page: Page, matches: list[Version], included: list[Version],
                  ignored: list[str], summary: str | None, elements: list[str]) -> dict[str, Any]:
    """A searchset Bundle. The self link shows only the parameters the search used."""
    dropped = set(ignored) | {"_cursor"}
    kept = [(k, v) for k, v in req.params if k not in dropped]
    page_url = f"{req.base_url}/{req.path.strip('/')}".rstrip("/")
    links = [{"relation": "self", "url": page_url + (f"?{urlencode(kept)}" if kept else "")}]
    for relation, cursor in (("next", page.next_cursor), ("previous", page.previous_cursor)):
        if cursor:
            links.append({"relation": relation, "url": f"{page_url}?{urlencode(kept + [('_cursor', cursor)])}"})
    entries: list[dict[str, Any]] = []
    if summary != "count":
        for mode, versions in (("match", matches), ("include", included)):
            for v in versions:
                entries.append({"fullUrl": f"{req.base_url}/{v.type}/{v.id}",
                                "resource": _shaped(v, summary, elements), "search": {"mode": mode}})
    if ignored:
        outcome = operation_outcome([Issue("not-supported", f"Search parameter '{name}' is not known here and "
                                           "was ignored", severity="warning") for name in ignored])
        entries.append({"resource": outcome, "search": {"mode": "outcome"}})
    bundle: dict[str, Any] = {"resourceType": "Bundle", "id": str(uuid.uuid4()),
                              "meta": {"lastUpdated": to_instant(now_us())}, "type": "searchset"}
    if page.total is not None:
        bundle["total"] = page.total
    bundle["link"] = links
    if entries:
        bundle["entry"] = entries
    return bundle


def _shaped(v: Version, summary: str | None, elements: list[str]) -> Any:
    """The stored JSON as is, or reduced for `_summary`/`_elements` (and then tagged SUBSETTED)."""
    assert v.content is not None
    if summary in (None, "false") and not elements:
        return orjson.Fragment(v.content)
    full = jsonfmt.loads(v.content)
    if summary == "data":
        full.pop("text", None)
        return _subsetted(full)
    if summary == "text":
        keep = ALWAYS_KEPT | {"text"}
    elif summary == "true":
        keep = ALWAYS_KEPT | summary_elements(v.type)
    else:
        keep = ALWAYS_KEPT | set(elements)
    return _subsetted({k: val for k, val in full.items() if k in keep})


def _subsetted(resource: dict[str, Any]) -> Any:
    meta = dict(resource.get("meta") or {})
    meta["tag"] = [*meta.get("tag", []), SUBSETTED]
    resource["meta"] = meta
    return orjson.Fragment(jsonfmt.dumps(resource))


@functools.cache
def summary_elements(rtype: str) -> frozenset[str]:
    """The elements R4 marks as part of the summary (from the models' summary flags)."""
    cls = model_class(rtype)
    fields = cls.model_fields.items() if cls else ()
    return frozenset(info.alias or name for name, info in fields
                     if isinstance(info.json_schema_extra, dict) and info.json_schema_extra.get("summary_element_property"))


_STATUS_TEXT = {"POST": "201 Created", "PUT": "200 OK", "PATCH": "200 OK", "DELETE": "204 No Content"}


def history_bundle(req: FhirRequest, page: HistoryPage) -> dict[str, Any]:
    """A history Bundle; entries embed the stored JSON untouched (orjson.Fragment)."""
    entries = []
    for v in page.versions:
        entry: dict[str, Any] = {"fullUrl": f"{req.base_url}/{v.type}/{v.id}"}
        if v.content is not None:
            entry["resource"] = orjson.Fragment(v.content)
        status = "201 Created" if v.method == "PUT" and v.version_id == 1 else _STATUS_TEXT[v.method]
        entry["request"] = {"method": v.method, "url": v.type if v.method == "POST" else f"{v.type}/{v.id}"}
        entry["response"] = {"status": status, "etag": f'W/"{v.version_id}"',
                             "lastModified": to_instant(v.last_updated)}
        entries.append(entry)
    keep = [(k, v) for k, v in req.params if k not in ("_before", "_after")]
    page_url = f"{req.base_url}/{req.path.strip('/')}".rstrip("/")
    links = [{"relation": "self", "url": page_url + (f"?{urlencode(req.params)}" if req.params else "")}]
    if page.versions and page.has_more:
        links.append({"relation": "next", "url": f"{page_url}?{urlencode(keep + [('_before', page.versions[-1].seq)])}"})
    if page.versions and (req.param("_before") or req.param("_after")):
        links.append({"relation": "previous",
                      "url": f"{page_url}?{urlencode(keep + [('_after', page.versions[0].seq)])}"})
    bundle: dict[str, Any] = {"resourceType": "Bundle", "id": str(uuid.uuid4()),
                              "meta": {"lastUpdated": to_instant(now_us())}, "type": "history"}
    if page.total is not None:
        bundle["total"] = page.total
    bundle["link"] = links
    bundle["entry"] = entries
    return bundle


ROUTES: tuple[Route, ...] = (
    Route("GET", "metadata", "capabilities", "system", FhirRouter.metadata),
    Route("GET", "$export", "$export", "system", FhirRouter.export_system),
    Route("GET", "{type}/$export", "$export", "type", FhirRouter.export_patients, types=frozenset({"Patient"})),
    Route("GET", "{type}/{id}/$export", "$export", "instance", FhirRouter.export_group, types=frozenset({"Group"})),
    Route("GET", "$export-poll-status", "$export", "system", FhirRouter.export_status),
    Route("DELETE", "$export-poll-status", "$export", "system", FhirRouter.export_cancel),
    Route("GET", "$export-file", "$export", "system", FhirRouter.export_file),
    Route("GET", "", "search-system", "system", FhirRouter.search_system),
    Route("POST", "_search", "search-system", "system", FhirRouter.search_system_post),
    Route("GET", "{type}", "search-type", "type", FhirRouter.search_type),
    Route("POST", "{type}/_search", "search-type", "type", FhirRouter.search_type_post),
    Route("GET", "{type}/{id}/{ctype}", "search-type", "compartment", FhirRouter.search_compartment),
    Route("GET", "_history", "history-system", "system", FhirRouter.history_system),
    Route("POST", "", "transaction", "system", FhirRouter.bundle),
    Route("POST", "", "batch", "system", FhirRouter.bundle),
    Route("POST", "{type}", "create", "type", FhirRouter.create),
    Route("PUT", "{type}", "update", "type", FhirRouter.conditional_update),
    Route("PATCH", "{type}", "patch", "type", FhirRouter.conditional_patch),
    Route("DELETE", "{type}", "delete", "type", FhirRouter.conditional_delete),
    Route("GET", "{type}/_history", "history-type", "type", FhirRouter.history_type),
    Route("GET", "{type}/{id}", "read", "instance", FhirRouter.read),
    Route("PUT", "{type}/{id}", "update", "instance", FhirRouter.update),
    Route("PATCH", "{type}/{id}", "patch", "instance", FhirRouter.patch),
    Route("DELETE", "{type}/{id}", "delete", "instance", FhirRouter.delete),
    Route("GET", "{type}/{id}/_history", "history-instance", "instance", FhirRouter.history_instance),
    Route("GET", "{type}/{id}/_history/{vid}", "vread", "instance", FhirRouter.vread),
    Route("GET", "{type}/$everything", "$everything", "type", FhirRouter.everything, types=frozenset({"Patient"})),
    Route("POST", "{type}/$everything", "$everything", "type", FhirRouter.everything, types=frozenset({"Patient"})),
    Route("GET", "{type}/{id}/$everything", "$everything", "instance", FhirRouter.everything,
          types=frozenset({"Patient"})),
    Route("POST", "{type}/{id}/$everything", "$everything", "instance", FhirRouter.everything,
          types=frozenset({"Patient"})),
    Route("POST", "{type}/$validate", "$validate", "type", FhirRouter.validate),
    Route("POST", "{type}/{id}/$validate", "$validate", "instance", FhirRouter.validate),
    Route("GET", "{type}/{id}/$validate", "$validate", "instance", FhirRouter.validate),
)

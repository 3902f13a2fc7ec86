"""Batch and transaction Bundles (`POST [base]`): each entry becomes a `FhirRequest` that the router
handles like any other, so an entry behaves exactly as the same request sent on its own.

A transaction runs every entry in one database transaction (`FhirService.atomically`). First the
ids of the resources it will create are chosen (conditional creates and updates are resolved now,
holding their criteria locked until commit), and `fullUrl`s (`urn:uuid:`, `urn:oid:` or absolute)
and in-Bundle conditional references are rewritten to them; then the entries run in the order the
spec gives (DELETE, POST, PUT/PATCH, GET/HEAD). The first failure rolls everything back and the
error names the entry. A batch runs each entry on its own and reports each outcome.
"""
from __future__ import annotations

import base64
import binascii
import logging
import uuid
from collections.abc import Callable
from dataclasses import replace
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl

import orjson

from fhir_server.api.messages import FHIR_JSON, JSON_PATCH, FhirRequest, FhirResponse, outcome_response
from fhir_server.outcome import FhirError, Issue, error
from fhir_server.service.interactions import FhirService
from fhir_server.service.references import rewrite_references
from fhir_server.service.timefmt import parse_http_date, to_instant

log = logging.getLogger("carebroker")

# request.method -> its place in transaction processing order (HEAD is answered as GET, bodiless).
PROCESSING_ORDER = {"DELETE": 0, "POST": 1, "PUT": 2, "PATCH": 2, "GET": 3, "HEAD": 3}
# Bundle.entry.request elements -> the HTTP headers they stand for.
REQUEST_HEADERS = {"ifNoneMatch": "if-none-match", "ifModifiedSince": "if-modified-since",
                   "ifMatch": "if-match", "ifNoneExist": "if-none-exist"}
Dispatch = Callable[[FhirRequest], FhirResponse]
Entry = tuple[FhirRequest, str | None]  # an entry's request and its fullUrl


def process_bundle(dispatch: Dispatch, service: FhirService, req: FhirRequest, bundle: Any,
                   authorize: Callable[[FhirRequest], None] | None = None) -> dict[str, Any]:
    """The response Bundle for a batch or transaction. `dispatch` runs one entry's request and
    raises FhirError if it fails: a transaction stops there, a batch records it and goes on.
    `authorize` raises (403) for an entry the caller's scopes do not allow: a transaction checks
    every entry before it runs any, so one out-of-scope entry fails it whole, naming the entry."""
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise error(400, "invalid", "POST to the base takes a Bundle of type batch or transaction",
                    expression="resourceType")
    kind = bundle.get("type")
    if kind not in ("batch", "transaction"):
        raise error(400, "invalid", f"Bundle.type must be batch or transaction, not {kind!r}",
                    expression="Bundle.type")
    raw_entries = bundle.get("entry") or []
    if not isinstance(raw_entries, list):
        raise error(400, "structure", "Bundle.entry must be an array", expression="Bundle.entry")
    if kind == "transaction":
        entries = [_named(i, lambda: _entry(i, raw, req)) for i, raw in enumerate(raw_entries)]
        if authorize is not None:
            for i, (entry, _) in enumerate(entries):
                _named(i, lambda: authorize(entry))
        responses = service.atomically(lambda: _transaction(dispatch, service, entries),
                                       weight=len(entries))
    else:
        responses = []
        for i, raw in enumerate(raw_entries):
            try:
                responses.append(dispatch(_entry(i, raw, req)[0]))
            except FhirError as exc:
                failed = _named_error(i, exc)
                responses.append(outcome_response(failed.status, failed.issues, failed.headers))
            except Exception:  # one broken entry must not lose the others' answers
                log.exception("unhandled error in Bundle.entry[%d]", i)
                responses.append(outcome_response(500, [Issue("exception", f"Bundle.entry[{i}]: internal "
                                                              "server error; the event was logged")]))
    return {"resourceType": "Bundle", "id": str(uuid.uuid4()), "type": f"{kind}-response",
            "entry": [_response_entry(r, req.base_url) for r in responses]}


def _entry(i: int, raw: Any, outer: FhirRequest) -> Entry:
    request = raw.get("request") if isinstance(raw, dict) else None
    if not isinstance(request, dict):
        raise error(400, "required", "The entry has no request", expression=f"Bundle.entry[{i}].request")
    method, url = request.get("method"), request.get("url")
    if method not in PROCESSING_ORDER:
        raise error(400, "invalid", f"request.method {method!r} is not one of {', '.join(PROCESSING_ORDER)}",
                    expression=f"Bundle.entry[{i}].request.method")
    if not isinstance(url, str) or not url.strip():
        raise error(400, "required", "The entry has no request.url", expression=f"Bundle.entry[{i}].request.url")
    url = url.strip().removeprefix(outer.base_url).lstrip("/")
    path, _, query = url.partition("?")
    if not path:
        raise error(400, "not-supported", "A Bundle entry cannot address the base itself",
                    expression=f"Bundle.entry[{i}].request.url")
    headers = {name: str(request[key]) for key, name in REQUEST_HEADERS.items() if request.get(key)}
    if prefer := outer.headers.get("prefer"):
        headers["prefer"] = prefer
    resource, body = raw.get("resource"), None
    if method == "PATCH":
        body = _patch_document(i, resource)
        headers["content-type"], resource = JSON_PATCH, None
    elif method in ("POST", "PUT"):
        if not isinstance(resource, dict):
            raise error(400, "required", f"A {method} entry needs a resource", expression=f"Bundle.entry[{i}].resource")
        headers["content-type"] = FHIR_JSON
    else:
        resource = None
    full_url = raw.get("fullUrl") if isinstance(raw.get("fullUrl"), str) else None
    return FhirRequest("GET" if method == "HEAD" else method, path, parse_qsl(query, keep_blank_values=True),
                       headers, body, outer.base_url, resource=resource, principal=outer.principal,
                       policy=outer.policy), full_url


def _patch_document(i: int, resource: Any) -> bytes:
    """A PATCH entry carries its JSON Patch as a Binary (FHIRPath Patch Parameters are not supported)."""
    if not isinstance(resource, dict) or resource.get("resourceType") != "Binary" \
            or resource.get("contentType") != JSON_PATCH:
        raise error(415, "not-supported", f"A PATCH entry needs a Binary with contentType {JSON_PATCH}",
                    expression=f"Bundle.entry[{i}].resource")
    try:
        return base64.b64decode(resource.get("data") or "", validate=True)
    except (binascii.Error, ValueError):
        raise error(400, "invalid", "Binary.data is not valid base64",
                    expression=f"Bundle.entry[{i}].resource.data") from None


def _transaction(dispatch: Dispatch, service: FhirService, parsed: list[Entry]) -> list[FhirResponse]:
    """One attempt (a retry after a concurrent write starts again from the parsed entries)."""
    entries = [(replace(req), full_url) for req, full_url in parsed]
    targets = _choose_targets(service, entries)
    for req, _ in entries:
        if req.resource is not None:
            req.resource = _rewrite(req.resource, targets)
    responses: list[Any] = [None] * len(entries)
    order = sorted(range(len(entries)), key=lambda i: PROCESSING_ORDER[entries[i][0].method])
    for i in order:
        responses[i] = _named(i, lambda: dispatch(entries[i][0]))
    return responses


def _choose_targets(service: FhirService, entries: list[Entry]) -> dict[str, str]:
    """Decide which resource each writing entry ends up as, before anything is written; returns the
    references to rewrite (fullUrl or in-Bundle conditional reference -> `Type/id`). Also refuses a
    Bundle that writes the same resource twice."""
    targets: dict[str, str] = {}
    written: dict[str, int] = {}
    for i, (req, full_url) in enumerate(entries):
        parts = req.path.split("/")
        rtype, target = parts[0], None
        if req.method == "POST" and len(parts) == 1:
            query = (req.headers.get("if-none-exist") or "").split("?", 1)[-1]
            found = _named(i, lambda: _unique(service, rtype, query)) if query else None
            if found is None:
                req.assigned_id = str(uuid.uuid4())
            target = f"{rtype}/{found or req.assigned_id}"
            if query:
                targets[f"{rtype}?{query}"] = target
        elif req.method in ("PUT", "PATCH", "DELETE") and len(parts) == 2:
            target = req.path
        elif req.method == "PUT" and len(parts) == 1:
            found = _named(i, lambda: _unique(service, rtype, req.query))
            body_id = req.resource.get("id") if isinstance(req.resource, dict) else None
            if found is None and body_id is None:
                req.assigned_id = str(uuid.uuid4())
            target = f"{rtype}/{found or body_id or req.assigned_id}"
        if target is None:
            continue
        if target in written:
            raise error(400, "processing", f"Bundle.entry[{written[target]}] and Bundle.entry[{i}] both write "
                        f"{target}; a transaction may write a resource once", expression=f"Bundle.entry[{i}]")
        written[target] = i
        if full_url and req.method in ("POST", "PUT"):
            targets[full_url] = target
    return targets


def _unique(service: FhirService, rtype: str, query: str) -> str | None:
    """The id of the one resource matching `query`, None if none; locked until commit."""
    ids = service.conditional_ids(rtype, query, lock=True)
    if len(ids) > 1:
        raise error(412, "multiple-matches", f"'{rtype}?{query}' matches more than one {rtype}")
    return ids[0] if ids else None


def _rewrite(resource: dict[str, Any], targets: dict[str, str]) -> dict[str, Any]:
    """References to other entries -> their `Type/id`; placeholders in the narrative's links too."""
    out = rewrite_references(resource, lambda ref: targets.get(ref, ref))
    div = (out.get("text") or {}).get("div")
    if isinstance(div, str) and "urn:" in div:
        new = div
        for placeholder, target in targets.items():
            if placeholder.startswith("urn:"):
                new = new.replace(f'"{placeholder}"', f'"{target}"')
        if new != div:
            out = {**out, "text": {**out["text"], "div": new}}
    return out


def _named(i: int, step: Callable[[], Any]) -> Any:
    try:
        return step()
    except FhirError as exc:
        raise _named_error(i, exc) from None


def _named_error(i: int, exc: FhirError) -> FhirError:
    """The same error, its issues saying which entry failed."""
    issues = []
    for issue in exc.issues:
        expression = issue.expression or ""
        if not expression.startswith("Bundle."):
            rest = expression.split(".", 1)[1] if "." in expression else ""
            expression = f"Bundle.entry[{i}]" + (f".resource.{rest}" if rest else "")
        prefix = f"Bundle.entry[{i}]: "
        diagnostics = issue.diagnostics if issue.diagnostics.startswith(prefix) else prefix + issue.diagnostics
        issues.append(Issue(issue.code, diagnostics, issue.severity, expression))
    return FhirError(exc.status, issues, exc.headers)


def _response_entry(resp: FhirResponse, base_url: str) -> dict[str, Any]:
    """Bundle.entry for one entry's response: status, location, etag, lastModified and the body as
    `resource` or, for an OperationOutcome, `response.outcome`."""
    response: dict[str, Any] = {"status": f"{resp.status} {HTTPStatus(resp.status).phrase}"}
    headers = {k.lower(): v for k, v in resp.headers.items()}
    if location := headers.get("location"):
        response["location"] = location.removeprefix(base_url + "/")
    if etag := headers.get("etag"):
        response["etag"] = etag
    if (modified := headers.get("last-modified")) and (when := parse_http_date(modified)) is not None:
        response["lastModified"] = to_instant(when)
    entry: dict[str, Any] = {}
    if location:
        entry["fullUrl"] = f"{base_url}/{response['location'].split('/_history/')[0]}"
    if resp.body:
        body = orjson.Fragment(resp.body)
        if resp.body.startswith(b'{"resourceType":"OperationOutcome"'):
            response["outcome"] = body
        else:
            entry["resource"] = body
    entry["response"] = response
    return entry

"""HTTP adapter: Starlette/FastAPI requests in, FHIR router out. Content negotiation lives here only.

The FHIR base is `/fhir`. Responses are `application/fhir+json; fhirVersion=4.0`; `_pretty=true`
indents them; XML is politely refused (406).
"""
from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import orjson
import sqlalchemy as sa
from fastapi import FastAPI, Request, Response
from starlette.concurrency import run_in_threadpool

from fhir_server.api.router import FhirRequest, FhirResponse, FhirRouter, outcome_response
from fhir_server.config import Settings
from fhir_server.outcome import Issue
from fhir_server.service.interactions import FhirService
from fhir_server.storage.engine import create_engine
from fhir_server.storage.repository import Store

log = logging.getLogger("carebroker")

FHIR_BASE = "/fhir"
CONTENT_TYPE = "application/fhir+json; fhirVersion=4.0"
JSON_FORMATS = frozenset({"json", "application/json", "application/fhir+json", "application/json+fhir"})
XML_FORMATS = frozenset({"xml", "text/xml", "application/xml", "application/fhir+xml", "application/xml+fhir"})
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]


def create_app(settings: Settings, engine: sa.Engine | None = None) -> FastAPI:
    """The ASGI application. Pass `engine` to share one (tests); otherwise one is made from settings."""
    engine = engine or create_engine(settings.database_url)
    router = FhirRouter(FhirService(Store(engine)), settings.default_page_size, settings.max_page_size)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        engine.dispose()

    app = FastAPI(title="carebroker", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.router = router

    async def fhir_endpoint(request: Request) -> Response:
        not_acceptable = _negotiate(request)
        if not_acceptable is not None:
            return _to_http(not_acceptable, pretty=False)
        base = settings.public_base_url or f"{request.url.scheme}://{request.url.netloc}{FHIR_BASE}"
        body = await request.body() if request.method in ("POST", "PUT", "PATCH") else None
        freq = FhirRequest(method=request.method, path=request.path_params.get("path", ""),
                           params=request.query_params.multi_items(), headers=request.headers,
                           body=body, base_url=base.rstrip("/"))
        try:
            fresp = await run_in_threadpool(router.handle, freq)
        except Exception:  # noqa: BLE001 - a client always gets an OperationOutcome, never a stack trace
            log.exception("unhandled error in %s %s", request.method, request.url.path)
            fresp = outcome_response(500, [Issue("exception", "Internal server error; the event was logged")])
        return _to_http(fresp, pretty=request.query_params.get("_pretty") == "true")

    app.add_api_route(FHIR_BASE, fhir_endpoint, methods=METHODS, include_in_schema=False)
    app.add_api_route(FHIR_BASE + "/{path:path}", fhir_endpoint, methods=METHODS, include_in_schema=False)
    return app


def _negotiate(request: Request) -> FhirResponse | None:
    """None when we can answer in JSON; otherwise the 406 to send."""
    fmt = request.query_params.get("_format")
    if fmt is not None:
        fmt = fmt.split(";")[0].strip().lower()
        if fmt in JSON_FORMATS:
            return None
        return outcome_response(406, [Issue("not-supported", f"_format '{fmt}' is not supported; "
                                            "carebroker speaks FHIR JSON")])
    accept = request.headers.get("accept")
    if not accept:
        return None
    kinds = {a.split(";")[0].strip().lower() for a in accept.split(",")}
    if kinds & XML_FORMATS and not kinds - XML_FORMATS:
        return outcome_response(406, [Issue("not-supported", "carebroker answers in application/fhir+json only")])
    return None


def _to_http(fresp: FhirResponse, pretty: bool) -> Response:
    body = fresp.body
    if body is not None and pretty:
        body = orjson.dumps(orjson.loads(body), option=orjson.OPT_INDENT_2)
    headers = dict(fresp.headers)
    if body is None:
        return Response(status_code=fresp.status, headers=headers)
    return Response(content=body, status_code=fresp.status, headers=headers, media_type=CONTENT_TYPE)

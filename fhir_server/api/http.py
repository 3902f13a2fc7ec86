"""HTTP adapter: ASGI requests in, FHIR router out. Content negotiation lives here only.

The FHIR base `/fhir` is a plain ASGI app mounted in the FastAPI application: a FHIR request
needs none of FastAPI's per-route machinery, and the read path is the one users hit hardest.
Single-row reads run inline on the event loop (a primary-key lookup is shorter than a thread
hand-off); everything else runs in the thread pool so a long history page never stalls other requests.
Responses are `application/fhir+json; fhirVersion=4.0`; `_pretty=true` indents them; XML gets 406.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qsl

import orjson
import sqlalchemy as sa
from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from fhir_server.api.router import FhirRequest, FhirResponse, FhirRouter, outcome_response
from fhir_server.auth.endpoints import auth_routes
from fhir_server.auth.server import AuthServer
from fhir_server.config import Settings
from fhir_server.outcome import Issue
from fhir_server.service.export import ExportWorker
from fhir_server.service.interactions import FhirService
from fhir_server.storage.engine import create_engine
from fhir_server.storage.repository import Store

log = logging.getLogger("carebroker")

FHIR_BASE = "/fhir"
CONTENT_TYPE = b"application/fhir+json; fhirVersion=4.0"
JSON_FORMATS = frozenset({"json", "application/json", "application/fhir+json", "application/json+fhir"})
XML_FORMATS = frozenset({"xml", "text/xml", "application/xml", "application/fhir+xml", "application/xml+fhir"})
WITH_BODY = frozenset({"POST", "PUT", "PATCH"})


def create_app(settings: Settings, engine: sa.Engine | None = None) -> FastAPI:
    """The ASGI application. Pass `engine` to share one (tests); otherwise one is made from settings."""
    engine = engine or create_engine(settings.database_url)
    router = FhirRouter(FhirService(Store(engine)), settings.default_page_size, settings.max_page_size,
                        settings.export_chunk_bytes)
    export_worker = ExportWorker(router.exports)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        export_worker.start()
        yield
        await run_in_threadpool(export_worker.stop)
        engine.dispose()

    app = FastAPI(title="carebroker", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.router = router
    # The built-in authorization server (/auth) and SMART discovery, routed ahead of the /fhir mount.
    app.state.auth = AuthServer(router.service.store, settings.auth_key_file)
    app.router.routes.extend(auth_routes(app.state.auth, settings.public_base_url))
    endpoint = FhirEndpoint(router, settings.public_base_url)
    app.router.routes.append(Route(FHIR_BASE, endpoint))  # the base itself (system interactions)
    app.mount(FHIR_BASE, endpoint)
    return app


class FhirEndpoint:
    """The FHIR REST API as an ASGI app: translate HTTP to `FhirRequest` and back."""

    def __init__(self, router: FhirRouter, public_base_url: str | None) -> None:
        self.router = router
        self.public_base_url = public_base_url.rstrip("/") if public_base_url else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = Headers(scope=scope)
        params = parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True)
        refused = _negotiate(params, headers)
        if refused is not None:
            await _send(send, refused, pretty=False)
            return
        method = scope["method"]
        root = scope.get("root_path") or FHIR_BASE  # empty when the base itself is requested
        path = scope["path"][len(root):] if scope["path"].startswith(root) else scope["path"]
        body = await _read_body(receive) if method in WITH_BODY else None
        req = FhirRequest(method=method, path=path, params=params, headers=headers, body=body,
                          base_url=self.public_base_url or _base_url(scope, headers, root))
        try:
            if self.router.is_single_row_read(req):
                resp = self.router.handle(req)
            else:
                resp = await run_in_threadpool(self.router.handle, req)
        except Exception:  # a client always gets an OperationOutcome, never a stack trace
            log.exception("unhandled error in %s %s", method, scope["path"])
            resp = outcome_response(500, [Issue("exception", "Internal server error; the event was logged")])
        if resp.stream is not None:
            await _send_stream(receive, send, resp)
        else:
            await _send(send, resp, pretty=any(k == "_pretty" and v == "true" for k, v in params))


def _base_url(scope: Scope, headers: Headers, root: str) -> str:
    host = headers.get("host") or "{}:{}".format(*scope.get("server") or ("localhost", 80))
    return f"{scope.get('scheme', 'http')}://{host}{root}"


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


def _negotiate(params: list[tuple[str, str]], headers: Headers) -> FhirResponse | None:
    """None when we can answer in JSON; otherwise the 406 to send."""
    fmt = next((v for k, v in params if k == "_format"), None)
    if fmt is not None:
        fmt = fmt.split(";")[0].strip().lower()
        if fmt in JSON_FORMATS:
            return None
        return outcome_response(406, [Issue("not-supported", f"_format '{fmt}' is not supported; "
                                            "carebroker speaks FHIR JSON")])
    accept = headers.get("accept")
    if not accept:
        return None
    kinds = {a.split(";")[0].strip().lower() for a in accept.split(",")}
    if kinds & XML_FORMATS and not kinds - XML_FORMATS:
        return outcome_response(406, [Issue("not-supported", "carebroker answers in application/fhir+json only")])
    return None


async def _send(send: Send, resp: FhirResponse, pretty: bool) -> None:
    body = resp.body
    if body is not None and pretty:
        body = orjson.dumps(orjson.loads(body), option=orjson.OPT_INDENT_2)
    raw: list[tuple[bytes, bytes]] = [(k.lower().encode("latin-1"), v.encode("latin-1"))
                                      for k, v in resp.headers.items()]
    if body is not None and "Content-Type" not in resp.headers:
        raw.append((b"content-type", CONTENT_TYPE))
    raw.append((b"content-length", str(len(body or b"")).encode()))
    start: dict[str, Any] = {"type": "http.response.start", "status": resp.status, "headers": raw}
    await send(start)
    await send({"type": "http.response.body", "body": body or b""})


async def _send_stream(receive: Receive, send: Send, resp: FhirResponse) -> None:
    """A streamed body: each piece is made in the thread pool (it reads the database) and sent before
    the next is made, so memory holds one piece. Stops when the client goes away; an error half-way
    aborts the connection, so a client never takes a cut-short body for a whole one."""
    assert resp.stream is not None
    gone = asyncio.Event()

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        gone.set()

    watcher = asyncio.create_task(watch())
    try:
        await send({"type": "http.response.start", "status": resp.status,
                    "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in resp.headers.items()]})
        while not gone.is_set() and (piece := await run_in_threadpool(next, resp.stream, None)) is not None:
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    finally:
        watcher.cancel()

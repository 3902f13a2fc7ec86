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
from fhir_server.auth.principal import Principal
from fhir_server.auth.endpoints import auth_routes
from fhir_server.auth.server import AuthServer
from fhir_server.auth.resource_server import (InvalidToken, ResourceServer, bearer_token, builtin_issuer,
                                              organization_finder)
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
        await run_in_threadpool(router.pdp.access_log.stop)
        engine.dispose()

    app = FastAPI(title="carebroker", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.router = router
    # The built-in authorization server (/auth) and SMART discovery, routed ahead of the /fhir mount.
    app.state.auth = AuthServer(router.service.store, settings.auth_key_file)
    app.router.routes.extend(auth_routes(app.state.auth, settings.public_base_url))
    endpoint = FhirEndpoint(router, settings.public_base_url, resource_server(settings, router, app.state.auth))
    app.router.routes.append(Route(FHIR_BASE, endpoint))  # the base itself (system interactions)
    app.mount(FHIR_BASE, endpoint)
    return app


def resource_server(settings: Settings, router: FhirRouter, auth: AuthServer) -> ResourceServer | None:
    """Token checks for /fhir, on unless settings say otherwise (and then loudly): tokens of the
    built-in authorization server (`auth`) and of the trusted issuers."""
    if not settings.auth_enabled:
        log.warning("AUTHENTICATION IS OFF: every /fhir request is served without a token, with full access. "
                    "Never run like this with real data.")
        return None
    return ResourceServer(settings.trusted_issuers, builtin=builtin_issuer(auth), role_claim=settings.role_claim,
                          refresh_interval=settings.jwks_refresh_interval,
                          find_organization=organization_finder(router.service))


# Served without a token: the CapabilityStatement and SMART discovery.
OPEN_PATHS = frozenset({"metadata", ".well-known/smart-configuration"})
REALM = 'Bearer realm="carebroker"'


class FhirEndpoint:
    """The FHIR REST API as an ASGI app: translate HTTP to `FhirRequest` and back."""

    def __init__(self, router: FhirRouter, public_base_url: str | None, auth: ResourceServer | None = None) -> None:
        self.router = router
        self.public_base_url = public_base_url.rstrip("/") if public_base_url else None
        self.auth = auth

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
        base_url = self.public_base_url or _base_url(scope, headers, root)
        principal = None
        if self.auth is not None and path.strip("/") not in OPEN_PATHS:
            principal, refused = await self._authenticate(headers, base_url)
            if refused is not None:
                await _send(send, refused, pretty=False)
                return
        body = await _read_body(receive) if method in WITH_BODY else None
        req = FhirRequest(method=method, path=path, params=params, headers=headers, body=body,
                          base_url=base_url, principal=principal)
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

    async def _authenticate(self, headers: Headers, base_url: str) -> tuple[Principal | None, FhirResponse | None]:
        """The principal of the request's bearer token, or the 401 to send (RFC 6750: no error
        code when there is no token at all; `invalid_token` when there is a bad one). A token seen
        before is answered from the cache on the event loop; a new one is verified in the thread
        pool (it may fetch a key set)."""
        assert self.auth is not None
        try:
            token = bearer_token(headers.get("authorization"))
            if token is None:
                return None, outcome_response(401, [Issue("login", "This server needs an OAuth2 bearer token "
                                                          "(Authorization: Bearer <token>)")],
                                              {"WWW-Authenticate": REALM})
            principal = self.auth.cached(token, base_url)
            if principal is None:
                principal = await run_in_threadpool(self.auth.authenticate, token, base_url)
            return principal, None
        except InvalidToken as exc:
            reason = "".join(c for c in str(exc) if " " <= c <= "~" and c not in '"\\')[:200]
            return None, outcome_response(401, [Issue("security", f"The access token was refused: {reason}")],
                                          {"WWW-Authenticate": f'{REALM}, error="invalid_token", '
                                                               f'error_description="{reason}"'})
        except Exception:  # a key set or database failing: an OperationOutcome, never a stack trace
            log.exception("the access token could not be checked")
            return None, outcome_response(500, [Issue("exception", "The access token could not be checked; "
                                                      "the event was logged")])


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

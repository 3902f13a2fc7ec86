"""HTTP for the built-in authorization server, under /auth, and the SMART discovery document.

Token, introspection and revocation requests are `application/x-www-form-urlencoded` (RFC 6749 3.2);
answers are JSON, errors RFC 6749 5.2 JSON, and nothing here may be cached (`no-store`). The routes
are plain Starlette routes; the work runs in the thread pool (it reads the database and hashes).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from fhir_server.auth.authorize import (AuthorizePageError, RedirectError, check_authorization_request,
                                        error_page, login_page, with_query)
from fhir_server.auth.discovery import openid_configuration, smart_configuration
from fhir_server.auth.errors import OAuthError
from fhir_server.auth.server import AuthServer
from fhir_server.auth.urls import AUTH_PATH, FHIR_PATH, AuthUrls

log = logging.getLogger("carebroker.auth")

NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
# The login page must not be framed (clickjacking) or cached.
PAGE_HEADERS = {**NO_STORE, "X-Frame-Options": "DENY", "Content-Security-Policy": "frame-ancestors 'none'",
                "Referrer-Policy": "no-referrer"}
FORM = "application/x-www-form-urlencoded"


def auth_routes(auth: AuthServer, public_base_url: str | None) -> list[Route]:
    """The /auth routes and the discovery document; the latter must be placed before the /fhir mount."""
    ep = _Endpoints(auth, public_base_url.rstrip("/") if public_base_url else None)
    return [
        Route(f"{FHIR_PATH}/.well-known/smart-configuration", ep.smart_configuration, methods=["GET"]),
        Route(f"{AUTH_PATH}/.well-known/openid-configuration", ep.openid_configuration, methods=["GET"]),
        Route(f"{AUTH_PATH}/jwks", ep.jwks, methods=["GET"]),
        Route(f"{AUTH_PATH}/authorize", ep.authorize, methods=["GET", "POST"]),
        Route(f"{AUTH_PATH}/token", ep.token, methods=["POST"]),
        Route(f"{AUTH_PATH}/introspect", ep.introspect, methods=["POST"]),
        Route(f"{AUTH_PATH}/revoke", ep.revoke, methods=["POST"]),
    ]


class _Endpoints:
    def __init__(self, auth: AuthServer, public_base_url: str | None) -> None:
        self.auth = auth
        self.public_base_url = public_base_url

    def urls(self, request: Request) -> AuthUrls:
        """From CAREBROKER_BASE_URL, else from the request (as the FHIR endpoint does)."""
        if self.public_base_url:
            return AuthUrls.for_fhir_base(self.public_base_url)
        host = request.headers.get("host") or f"{request.url.hostname}:{request.url.port}"
        return AuthUrls.for_fhir_base(f"{request.url.scheme}://{host}{FHIR_PATH}")

    async def smart_configuration(self, request: Request) -> Response:
        """JSON whatever the Accept header says: SMART clients send all sorts."""
        return JSONResponse(smart_configuration(self.urls(request)))

    async def openid_configuration(self, request: Request) -> Response:
        return JSONResponse(openid_configuration(self.urls(request)))

    async def jwks(self, request: Request) -> Response:
        # Short caching: clients re-fetch on an unknown kid, and a rotated key appears at once anyway.
        return JSONResponse(await run_in_threadpool(self.auth.keys.jwks), headers={"Cache-Control": "max-age=60"},
                            media_type="application/jwk-set+json")

    async def token(self, request: Request) -> Response:
        return await self._form_call(request, self.auth.token)

    async def introspect(self, request: Request) -> Response:
        return await self._form_call(request, self.auth.introspect)

    async def revoke(self, request: Request) -> Response:
        return await self._form_call(request, self.auth.revoke)

    async def _form_call(self, request: Request, fn: Callable[..., dict[str, Any] | None]) -> Response:
        try:
            form = await _form(request)
            result = await run_in_threadpool(fn, form, request.headers.get("authorization"), self.urls(request))
        except OAuthError as exc:
            if exc.error == "invalid_client":
                log.info("%s refused: %s", request.url.path, exc.description)
            return JSONResponse({"error": exc.error, "error_description": exc.description}, exc.status,
                                headers={**NO_STORE, **exc.headers})
        if result is None:
            return Response(status_code=200, headers=NO_STORE)
        return JSONResponse(result, headers=NO_STORE)

    async def authorize(self, request: Request) -> Response:
        """GET: check the request, show the login page. POST: the login form, then redirect to the app
        with `code` and `state`."""
        urls = self.urls(request)
        if request.method == "GET":
            params = dict(request.query_params)
        else:
            try:
                params = await _form(request)
            except OAuthError as exc:
                return HTMLResponse(error_page(exc.description), 400, headers=PAGE_HEADERS)
        try:
            req = await run_in_threadpool(check_authorization_request, params, self.auth.registry, urls)
        except AuthorizePageError as exc:
            return HTMLResponse(error_page(str(exc)), 400, headers=PAGE_HEADERS)
        except RedirectError as exc:
            return RedirectResponse(exc.location, 303 if request.method == "POST" else 302, headers=NO_STORE)
        if request.method == "GET":
            return HTMLResponse(login_page(req, params, urls.authorize), headers=PAGE_HEADERS)
        username = params.get("username", "")
        code, problem = await run_in_threadpool(self.auth.login, req, username, params.get("password", ""),
                                                params.get("patient"))
        if code is None:
            status = 401 if problem and problem.startswith("Wrong") else 400
            return HTMLResponse(login_page(req, params, urls.authorize, problem, username), status,
                                headers=PAGE_HEADERS)
        return RedirectResponse(with_query(req.redirect_uri, {"code": code, "state": req.state}), 303,
                                headers=NO_STORE)


async def _form(request: Request) -> dict[str, str]:
    """The form body; a parameter sent twice is an error (RFC 6749 3.1, 3.2)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != FORM:
        raise OAuthError("invalid_request", f"the body must be {FORM}")
    pairs = parse_qsl((await request.body()).decode("utf-8", "replace"), keep_blank_values=True)
    form: dict[str, str] = {}
    for name, value in pairs:
        if name in form:
            raise OAuthError("invalid_request", f"parameter {name!r} is repeated")
        form[name] = value
    return form

"""SMART standalone launch: the authorization request, the login page, and authorization codes.

The authorization request is checked twice, when the login page is shown and when it is posted
back (the page carries the request in hidden fields, so nothing is kept between the two), and the
checks follow RFC 6749 4.1.2.1: an unknown client or a redirect_uri not registered for it is shown
as an error page (never redirected to), anything else is sent back to the app's redirect_uri.

Codes are random, stored only as SHA-256 hashes, live CODE_LIFETIME seconds, are bound to the
client, the redirect_uri and the PKCE S256 challenge, and are single-use: a second exchange is
refused and revokes the token the first one gave (RFC 6749 4.1.2).
"""
from __future__ import annotations

import hashlib
import hmac
import html
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlencode

import sqlalchemy as sa
from authlib.oauth2.rfc7636 import create_s256_code_challenge

from fhir_server.auth.errors import OAuthError
from fhir_server.auth.policy import ACCESS_TOKEN_LIFETIME, CODE_LIFETIME, LEEWAY
from fhir_server.auth.registry import Client, Registry
from fhir_server.auth.scopes import grant
from fhir_server.auth.urls import AuthUrls
from fhir_server.storage.repository import Store
from fhir_server.storage.schema import auth_code, auth_revoked

# RFC 7636 4.1/4.2: a verifier is 43-128 unreserved characters; an S256 challenge is 43 base64url.
_VERIFIER = re.compile(r"^[A-Za-z0-9\-._~]{43,128}$")
_S256_CHALLENGE = re.compile(r"^[A-Za-z0-9\-_]{43}$")
# The authorization request parameters carried through the login form.
REQUEST_PARAMS = ("response_type", "client_id", "redirect_uri", "scope", "state", "aud", "code_challenge",
                  "code_challenge_method", "nonce", "patient")


class AuthorizePageError(Exception):
    """Not safe to redirect (unknown client or unregistered redirect_uri): show this to the user."""


class RedirectError(Exception):
    """An error to send to the app's redirect_uri (RFC 6749 4.1.2.1)."""

    def __init__(self, redirect_uri: str, state: str | None, error: str, description: str) -> None:
        super().__init__(description)
        self.location = with_query(redirect_uri, {"error": error, "error_description": description,
                                                  **({"state": state} if state else {})})


@dataclass(frozen=True)
class AuthorizationRequest:
    client: Client
    redirect_uri: str
    scope: list[str]  # already cut down to what the client may be granted
    state: str
    code_challenge: str
    nonce: str | None
    patient_hint: str | None  # a `patient` parameter: preselects the patient for launch/patient

    @property
    def wants_patient(self) -> bool:
        return "launch/patient" in self.scope

    def hidden_fields(self, params: Mapping[str, str]) -> str:
        return "".join(f'<input type="hidden" name="{name}" value="{html.escape(params[name])}">'
                       for name in REQUEST_PARAMS if name in params and name != "patient")


def check_authorization_request(params: Mapping[str, str], registry: Registry, urls: AuthUrls) -> AuthorizationRequest:
    client_id = params.get("client_id")
    client = registry.client(client_id) if client_id else None
    if client is None:
        raise AuthorizePageError("Unknown client_id: this application is not registered with carebroker.")
    redirect_uri = params.get("redirect_uri")
    if not redirect_uri or redirect_uri not in client.redirect_uris:
        raise AuthorizePageError("The redirect_uri is not one registered for this application.")
    state = params.get("state")

    def fail(error: str, description: str) -> RedirectError:
        return RedirectError(redirect_uri, state, error, description)

    if params.get("response_type") != "code":
        raise fail("unsupported_response_type", "only response_type=code is supported")
    if not state:
        raise fail("invalid_request", "state is required")
    if params.get("launch"):
        raise fail("invalid_request", "EHR launch is not supported; use standalone launch (launch/patient)")
    if (params.get("aud") or "").rstrip("/") != urls.fhir_base:
        raise fail("invalid_request", f"aud must be the FHIR base URL {urls.fhir_base}")
    method = params.get("code_challenge_method")
    if method != "S256":
        raise fail("invalid_request", "PKCE is required with code_challenge_method=S256 (plain is refused)")
    challenge = params.get("code_challenge") or ""
    if not _S256_CHALLENGE.match(challenge):
        raise fail("invalid_request", "code_challenge must be a base64url SHA-256 (43 characters)")
    granted = grant((params.get("scope") or "").split(), client.scope)
    if not granted:
        raise fail("invalid_scope", "none of the requested scopes is allowed for this application")
    return AuthorizationRequest(client, redirect_uri, granted, state, challenge, params.get("nonce") or None,
                                params.get("patient") or None)


def with_query(uri: str, params: Mapping[str, str]) -> str:
    return uri + ("&" if "?" in uri else "?") + urlencode(params)


@dataclass(frozen=True)
class CodeGrant:
    """What an exchanged code was issued for."""

    username: str
    scope: list[str]
    nonce: str | None
    patient: str | None


def _hash(code: str) -> str:
    return hashlib.sha256(code.encode()).hexdigest()


class AuthorizationCodes:
    def __init__(self, store: Store) -> None:
        self.store = store

    def issue(self, req: AuthorizationRequest, username: str, patient: str | None) -> str:
        code = secrets.token_urlsafe(32)
        now = int(time.time())
        with self.store.writing() as conn:
            conn.execute(auth_code.delete().where(auth_code.c.expires_at < now - ACCESS_TOKEN_LIFETIME - LEEWAY))
            conn.execute(auth_code.insert().values(
                code_hash=_hash(code), client_id=req.client.client_id, redirect_uri=req.redirect_uri,
                username=username, scope=" ".join(req.scope), code_challenge=req.code_challenge, nonce=req.nonce,
                patient=patient, expires_at=now + CODE_LIFETIME))
        return code

    def redeem(self, code: str, client_id: str, redirect_uri: str, code_verifier: str, token_jti: str) -> CodeGrant:
        """Exchange `code` once; `token_jti` names the token about to be issued for it, so that a
        replay of the code can revoke it. Any mismatch burns the code (no guessing the verifier)."""
        now = int(time.time())
        with self.store.writing() as conn:
            if self.store.is_postgres:
                row = conn.execute(sa.select(auth_code).where(auth_code.c.code_hash == _hash(code))
                                   .with_for_update()).first()
            else:
                row = conn.execute(sa.select(auth_code).where(auth_code.c.code_hash == _hash(code))).first()
            if row is None:
                problem = "unknown authorization code"
            elif row.token_jti is not None:
                if conn.execute(sa.select(auth_revoked.c.jti).where(auth_revoked.c.jti == row.token_jti)).first() is None:
                    conn.execute(auth_revoked.insert().values(jti=row.token_jti, expires_at=row.token_expires_at))
                conn.execute(auth_code.update().where(auth_code.c.code_hash == row.code_hash)
                             .values(token_jti=None, expires_at=0))
                problem = "authorization code already used (the token it gave is revoked)"
            elif row.expires_at < now:
                problem = "authorization code expired"
            elif row.client_id != client_id:
                problem = "authorization code was issued to another client"
            elif row.redirect_uri != redirect_uri:
                problem = "redirect_uri does not match the authorization request"
            elif not _VERIFIER.match(code_verifier) or not hmac.compare_digest(
                    create_s256_code_challenge(code_verifier), row.code_challenge):
                problem = "code_verifier does not match the code_challenge"
            else:
                problem = None
            if row is not None and problem is None:
                conn.execute(auth_code.update().where(auth_code.c.code_hash == row.code_hash).values(
                    token_jti=token_jti, token_expires_at=now + ACCESS_TOKEN_LIFETIME))
            elif row is not None and row.token_jti is None and row.expires_at != 0:
                conn.execute(auth_code.update().where(auth_code.c.code_hash == row.code_hash).values(expires_at=0))
        if problem is not None:
            raise OAuthError("invalid_grant", problem)
        assert row is not None
        return CodeGrant(row.username, row.scope.split(), row.nonce, row.patient)


# -- the login page --------------------------------------------------------------------------------

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>carebroker: sign in</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{{font-family:system-ui,sans-serif;max-width:28em;margin:3em auto;padding:0 1em}}
label{{display:block;margin:.8em 0 .2em}}input[type=text],input[type=password]{{width:100%;padding:.4em}}
button{{margin-top:1.2em;padding:.5em 1.5em}}.error{{color:#a00}}.scopes{{color:#555;font-size:.9em}}</style>
</head><body>
<h1>Sign in to carebroker</h1>
<p><strong>{client}</strong> asks for access to:</p>
<p class="scopes">{scopes}</p>
{error}
<form method="post" action="{action}">
{hidden}
<label for="username">Username</label><input type="text" id="username" name="username" value="{username}" autofocus required>
<label for="password">Password</label><input type="password" id="password" name="password" required>
{patient}
<button type="submit">Sign in</button>
</form></body></html>"""

_PATIENT_FIELD = """<label for="patient">Patient id (staff: the patient to open; patients get their own record)</label>
<input type="text" id="patient" name="patient" value="{value}">"""


def login_page(req: AuthorizationRequest, params: Mapping[str, str], action: str, error: str | None = None,
               username: str = "") -> str:
    patient = (_PATIENT_FIELD.format(value=html.escape(params.get("patient") or req.patient_hint or ""))
               if req.wants_patient else "")
    return _PAGE.format(client=html.escape(req.client.name or req.client.client_id),
                        scopes=html.escape(" ".join(req.scope)), action=html.escape(action),
                        hidden=req.hidden_fields(params), username=html.escape(username), patient=patient,
                        error=f'<p class="error">{html.escape(error)}</p>' if error else "")


def error_page(message: str) -> str:
    return ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>carebroker: error</title></head>"
            f"<body><h1>Cannot sign in</h1><p>{html.escape(message)}</p></body></html>")

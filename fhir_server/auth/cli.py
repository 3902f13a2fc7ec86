"""`carebroker client|user|key|token`: register clients and users of the built-in authorization
server, rotate its signing key, and mint a token for scripts. They write to the database directly,
so whoever runs them needs the database URL, as for `serve`."""
from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from pathlib import Path
from typing import Any

from joserfc.errors import JoseError
from joserfc.jwk import import_key

from fhir_server.auth.errors import OAuthError
from fhir_server.auth.policy import ROLES
from fhir_server.auth.registry import Client
from fhir_server.auth.server import AuthServer
from fhir_server.auth.urls import AuthUrls
from fhir_server.config import Settings
from fhir_server.storage.repository import Store

COMMANDS = frozenset({"client", "user", "key", "token"})
DEFAULT_FHIR_BASE = "http://127.0.0.1:8080/fhir"


def add_parsers(sub: Any) -> None:
    """Add the auth commands to the `carebroker` argument parser."""
    client = sub.add_parser("client", help="register OAuth clients of the built-in authorization server")
    client_sub = client.add_subparsers(dest="action", required=True)
    add = client_sub.add_parser("add", help="register (or replace) a client")
    add.add_argument("client_id")
    add.add_argument("--scope", required=True, help="space-separated scopes it may be granted, e.g. 'system/*.rs'")
    add.add_argument("--jwks", type=Path, help="JWKS file with its public keys (private_key_jwt)")
    add.add_argument("--jwks-url", help="the one JWKS URL (jku) it may use (private_key_jwt)")
    add.add_argument("--secret", help="a client secret: enables client_secret_basic for it "
                                      "(or set CAREBROKER_CLIENT_SECRET)")
    add.add_argument("--redirect-uri", action="append", default=[], help="for the authorization code flow "
                                                                          "(repeatable; matched exactly)")
    add.add_argument("--role", action="append", default=[], choices=ROLES)
    add.add_argument("--fhir-user", help="e.g. Device/feed-1")
    add.add_argument("--organization", help="e.g. Organization/org-rz9")
    add.add_argument("--purpose-of-use", help="v3 PurposeOfUse code (default TREAT at the resource server)")
    add.add_argument("--name", help="shown on the login page")
    add.add_argument("--database")
    client_sub.add_parser("list", help="list registered clients").add_argument("--database")

    user = sub.add_parser("user", help="register users who log in at /auth/authorize")
    user_sub = user.add_subparsers(dest="action", required=True)
    uadd = user_sub.add_parser("add", help="register (or replace) a user")
    uadd.add_argument("username")
    uadd.add_argument("--password", help="(else $CAREBROKER_USER_PASSWORD, else asked for)")
    uadd.add_argument("--role", action="append", required=True, choices=ROLES)
    uadd.add_argument("--fhir-user", help="e.g. Practitioner/prac-001 (patients: Patient/<id> by default)")
    uadd.add_argument("--organization", help="e.g. Organization/org-e85990")
    uadd.add_argument("--patient", help="a patient user's own Patient id")
    uadd.add_argument("--purpose-of-use")
    uadd.add_argument("--database")
    user_sub.add_parser("list", help="list registered users").add_argument("--database")

    key = sub.add_parser("key", help="the authorization server's signing keys")
    key_sub = key.add_subparsers(dest="action", required=True)
    key_sub.add_parser("rotate", help="make a new signing key; the old one stays published until its "
                                      "tokens expire").add_argument("--database")
    key_sub.add_parser("list", help="list published keys").add_argument("--database")

    token = sub.add_parser("token", help="print an access token for a registered client (scripts, demos)")
    token.add_argument("client_id")
    token.add_argument("--scope", help="default: every scope the client is registered for")
    token.add_argument("--base-url", help=f"the FHIR base URL the token is for (default: $CAREBROKER_BASE_URL "
                                          f"or {DEFAULT_FHIR_BASE})")
    token.add_argument("--database")


def run(args: argparse.Namespace, store: Store, settings: Settings) -> int:
    auth = AuthServer(store, settings.auth_key_file)
    try:
        return _COMMANDS[(args.command, getattr(args, "action", None))](args, auth, settings)
    except (ValueError, OAuthError) as exc:
        print(f"carebroker {args.command}: {exc}", file=sys.stderr)
        return 2


def _client_add(args: argparse.Namespace, auth: AuthServer, settings: Settings) -> int:
    jwks = _public_jwks(json.loads(args.jwks.read_text())) if args.jwks else None
    secret = args.secret or os.environ.get("CAREBROKER_CLIENT_SECRET")
    client = auth.registry.add_client(
        args.client_id, scope=tuple(args.scope.split()), redirect_uris=tuple(args.redirect_uri),
        roles=tuple(args.role), name=args.name, jwks=jwks, jku=args.jwks_url, secret=secret,
        fhir_user=args.fhir_user, organization=args.organization, purpose_of_use=args.purpose_of_use)
    print(_describe_client(client))
    return 0


def _public_jwks(jwks: dict[str, Any]) -> dict[str, Any]:
    """Only the public half of each key is kept, whatever the file holds."""
    keys = []
    for entry in jwks.get("keys", []):
        try:
            public = import_key(entry).as_dict(private=False)
        except (JoseError, ValueError, TypeError) as exc:
            raise ValueError(f"key {entry.get('kid')!r} in the JWKS cannot be read: {exc}") from None
        keys.append({**public, **{k: entry[k] for k in ("kid", "alg", "use") if k in entry}})
    return {"keys": keys}


def _describe_client(c: Client) -> str:
    auth = ", ".join(m for m, on in (("private_key_jwt (inline JWKS)", c.jwks), (f"private_key_jwt (jku {c.jku})", c.jku),
                                     ("client_secret_basic", c.secret_hash)) if on) or "public (PKCE)"
    return (f"{c.client_id}: {auth}; scope {' '.join(c.scope)}; roles {' '.join(c.roles) or '-'}"
            + (f"; redirect_uris {' '.join(c.redirect_uris)}" if c.redirect_uris else ""))


def _client_list(args: argparse.Namespace, auth: AuthServer, settings: Settings) -> int:
    for client in auth.registry.clients():
        print(_describe_client(client))
    return 0


def _user_add(args: argparse.Namespace, auth: AuthServer, settings: Settings) -> int:
    password = args.password or os.environ.get("CAREBROKER_USER_PASSWORD")
    if not password:
        if not sys.stdin.isatty():
            raise ValueError("give --password or $CAREBROKER_USER_PASSWORD")
        password = getpass.getpass(f"password for {args.username}: ")
    user = auth.registry.add_user(args.username, password, roles=tuple(args.role), fhir_user=args.fhir_user,
                                  organization=args.organization, patient=args.patient,
                                  purpose_of_use=args.purpose_of_use)
    print(f"{user.username}: roles {' '.join(user.roles)}; fhirUser {user.fhir_user or '-'}; "
          f"organization {user.organization or '-'}")
    return 0


def _user_list(args: argparse.Namespace, auth: AuthServer, settings: Settings) -> int:
    for u in auth.registry.users():
        print(f"{u.username}: roles {' '.join(u.roles)}; fhirUser {u.fhir_user or '-'}; "
              f"organization {u.organization or '-'}{'' if u.active else ' (inactive)'}")
    return 0


def _key_rotate(args: argparse.Namespace, auth: AuthServer, settings: Settings) -> int:
    auth.keys.ensure_current()
    new = auth.keys.rotate()
    print(f"new signing key {new.kid}; retired keys stay in the JWKS until their tokens have expired")
    return 0


def _key_list(args: argparse.Namespace, auth: AuthServer, settings: Settings) -> int:
    auth.keys.ensure_current()
    for r in auth.keys.published():
        print(f"{r.kid} {r.alg} {'current' if r.retired_at is None else 'retired'}")
    return 0


def _token(args: argparse.Namespace, auth: AuthServer, settings: Settings) -> int:
    client = auth.registry.client(args.client_id)
    if client is None:
        raise ValueError(f"no client {args.client_id!r} is registered")
    scope = list(client.scope) if args.scope is None else auth.grant_scope(args.scope, client)
    urls = AuthUrls.for_fhir_base(args.base_url or settings.public_base_url or DEFAULT_FHIR_BASE)
    print(auth.client_access_token(client, scope, urls))
    return 0


_COMMANDS = {
    ("client", "add"): _client_add, ("client", "list"): _client_list,
    ("user", "add"): _user_add, ("user", "list"): _user_list,
    ("key", "rotate"): _key_rotate, ("key", "list"): _key_list,
    ("token", None): _token,
}

"""Registered clients and users of the built-in authorization server, in the database.

Secrets and passwords are stored only as scrypt hashes (memory-hard, in the standard library), with
a per-entry salt and the cost parameters in the stored string so they can be raised later.
"""
from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from fhir_server.auth.policy import ROLES
from fhir_server.storage.repository import Store
from fhir_server.storage.schema import auth_client, auth_user

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2 ** 14, 8, 1


def hash_secret(secret: str) -> str:
    """`scrypt$n$r$p$salt$hash` (base64url parts)."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(secret.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_secret(secret: str, stored: str) -> bool:
    """Constant-time comparison; any malformed stored value simply fails."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.urlsafe_b64decode(digest + "==")
        actual = hashlib.scrypt(secret.encode(), salt=base64.urlsafe_b64decode(salt + "=="), n=int(n), r=int(r),
                                p=int(p), dklen=len(expected))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


@functools.cache
def _dummy_hash() -> str:
    """Checked against for an unknown name, so that it takes as long as a wrong password."""
    return hash_secret(secrets.token_urlsafe(16))


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _words(text: str | None) -> tuple[str, ...]:
    return tuple(w for w in (text or "").split() if w)


def check_roles(roles: tuple[str, ...]) -> None:
    if unknown := [r for r in roles if r not in ROLES]:
        raise ValueError(f"unknown role(s) {', '.join(unknown)}; carebroker roles are {', '.join(ROLES)}")


@dataclass(frozen=True)
class Client:
    """An OAuth client: a backend service (JWKS or secret), or an app doing the authorization code flow
    (public without credentials, confidential with them)."""

    client_id: str
    scope: tuple[str, ...]
    redirect_uris: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()
    name: str | None = None
    jwks: dict[str, Any] | None = None
    jku: str | None = None
    secret_hash: str | None = field(default=None, repr=False)
    fhir_user: str | None = None
    organization: str | None = None
    purpose_of_use: str | None = None

    @property
    def is_public(self) -> bool:
        """No way to authenticate: may only use the authorization code flow (with PKCE)."""
        return not (self.jwks or self.jku or self.secret_hash)


@dataclass(frozen=True)
class User:
    """A person who can log in at /auth/authorize."""

    username: str
    password_hash: str = field(repr=False)
    roles: tuple[str, ...]
    fhir_user: str | None = None
    organization: str | None = None
    patient: str | None = None  # for patient users: their own Patient id
    purpose_of_use: str | None = None
    active: bool = True


class Registry:
    """Reads and writes clients and users; registration replaces an existing entry of the same id."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def client(self, client_id: str) -> Client | None:
        with self.store.single_read() as conn:
            row = conn.execute(sa.select(auth_client).where(auth_client.c.client_id == client_id)).first()
        if row is None:
            return None
        return Client(row.client_id, _words(row.scope), _words(row.redirect_uris), _words(row.roles), row.name,
                      json.loads(row.jwks) if row.jwks else None, row.jku, row.secret_hash, row.fhir_user,
                      row.organization, row.purpose_of_use)

    def user(self, username: str) -> User | None:
        with self.store.single_read() as conn:
            row = conn.execute(sa.select(auth_user).where(auth_user.c.username == username)).first()
        if row is None:
            return None
        return User(row.username, row.password_hash, _words(row.roles), row.fhir_user, row.organization,
                    row.patient, row.purpose_of_use, bool(row.active))

    def authenticate_user(self, username: str, password: str) -> User | None:
        user = self.user(username)
        if user is None or not user.active:
            verify_secret(password, _dummy_hash())
            return None
        return user if verify_secret(password, user.password_hash) else None

    def clients(self) -> list[Client]:
        with self.store.single_read() as conn:
            ids = conn.execute(sa.select(auth_client.c.client_id).order_by(auth_client.c.client_id)).scalars().all()
        return [c for i in ids if (c := self.client(i))]

    def users(self) -> list[User]:
        with self.store.single_read() as conn:
            names = conn.execute(sa.select(auth_user.c.username).order_by(auth_user.c.username)).scalars().all()
        return [u for n in names if (u := self.user(n))]

    def add_client(self, client_id: str, *, scope: tuple[str, ...], redirect_uris: tuple[str, ...] = (),
                   roles: tuple[str, ...] = (), name: str | None = None, jwks: dict[str, Any] | None = None,
                   jku: str | None = None, secret: str | None = None, fhir_user: str | None = None,
                   organization: str | None = None, purpose_of_use: str | None = None) -> Client:
        check_roles(roles)
        if jwks is not None:
            if not isinstance(jwks.get("keys"), list) or any("kid" not in k for k in jwks["keys"]):
                raise ValueError("the JWKS must be {\"keys\": [...]} and every key must have a kid")
            if any(k.get("d") for k in jwks["keys"]):
                raise ValueError("the JWKS holds a private key: register only the public keys")
        values = dict(name=name, jwks=json.dumps(jwks) if jwks is not None else None, jku=jku,
                      secret_hash=hash_secret(secret) if secret else None, scope=" ".join(scope),
                      redirect_uris=" ".join(redirect_uris), roles=" ".join(roles), fhir_user=fhir_user,
                      organization=organization, purpose_of_use=purpose_of_use)
        self._upsert(auth_client, auth_client.c.client_id, client_id, values)
        client = self.client(client_id)
        assert client is not None
        return client

    def add_user(self, username: str, password: str, *, roles: tuple[str, ...], fhir_user: str | None = None,
                 organization: str | None = None, patient: str | None = None,
                 purpose_of_use: str | None = None) -> User:
        check_roles(roles)
        if "patient" in roles and not patient:
            raise ValueError("a patient user needs their Patient id (--patient)")
        if patient and not fhir_user:
            fhir_user = f"Patient/{patient}"
        values = dict(password_hash=hash_secret(password), roles=" ".join(roles), fhir_user=fhir_user,
                      organization=organization, patient=patient, purpose_of_use=purpose_of_use, active=True)
        self._upsert(auth_user, auth_user.c.username, username, values)
        user = self.user(username)
        assert user is not None
        return user

    def _upsert(self, table: sa.Table, key: sa.Column, value: str, values: dict[str, Any]) -> None:
        with self.store.writing() as conn:
            if self.store.is_postgres:
                conn.execute(sa.text(f"LOCK TABLE {table.name} IN SHARE ROW EXCLUSIVE MODE"))
            if conn.execute(sa.select(key).where(key == value)).first():
                conn.execute(table.update().where(key == value).values(**values))
            else:
                conn.execute(table.insert().values({key.name: value, **values, "created_at": int(time.time())}))

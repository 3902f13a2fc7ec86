"""carebroker's own signing keys: kept in the database (or a key file), created on first use, rotated
by `carebroker key rotate`.

RS256 is the signing algorithm: OpenID Connect makes RS256 the one id_token algorithm every relying
party must accept, every JWT library and external resource server verifies it, and RSA verification
(the hot path: every FHIR request will check a token) is several times faster than ECDSA's.

Rotation makes a new current key and marks the old one retired; a retired key stays in the JWKS (and
keeps verifying) until every token it signed has expired, then it is dropped. Nodes share nothing but
the database (or the file), so the current key is read from there whenever a token is signed, and the
verification keys are cached briefly and re-read when a token names a kid not yet seen.
"""
from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import sqlalchemy as sa
from joserfc.jwk import RSAKey

from fhir_server.auth.policy import ACCESS_TOKEN_LIFETIME, ID_TOKEN_LIFETIME, LEEWAY
from fhir_server.storage.repository import Store
from fhir_server.storage.schema import auth_key

SIGNING_ALG = "RS256"
KEY_SIZE = 2048
# A retired key signs nothing new; its last tokens are valid this much longer.
RETIRED_KEY_PUBLISHED_FOR = max(ACCESS_TOKEN_LIFETIME, ID_TOKEN_LIFETIME) + LEEWAY
# How long a node trusts its cached verification keys before reading them again.
CACHE_SECONDS = 60


@dataclass(frozen=True)
class KeyRecord:
    """One signing key as stored: the private JWK (with its kid) and when it stopped signing."""

    kid: str
    alg: str
    private_jwk: dict[str, Any]
    created_at: int
    retired_at: int | None

    def published(self, now: int) -> bool:
        return self.retired_at is None or self.retired_at + RETIRED_KEY_PUBLISHED_FOR > now

    def key(self) -> RSAKey:
        return RSAKey.import_key(self.private_jwk)


def new_key_record(now: int) -> KeyRecord:
    """A fresh RSA key; its kid is its RFC 7638 thumbprint, so it names the key and nothing else."""
    key = RSAKey.generate_key(KEY_SIZE)
    kid = key.thumbprint()
    return KeyRecord(kid, SIGNING_ALG, {**key.as_dict(private=True), "kid": kid, "alg": SIGNING_ALG, "use": "sig"},
                     now, None)


# Given the stored records, the records to store instead (None: leave them as they are).
Change = Callable[[list[KeyRecord]], "list[KeyRecord] | None"]


class KeyBackend(Protocol):
    """Where the keys live. `change` runs a function on the stored records under a lock that every
    node respects, and stores what it returns: creation and rotation cannot race."""

    def records(self) -> list[KeyRecord]: ...

    def change(self, fn: Change) -> list[KeyRecord]: ...


class DatabaseKeys:
    """Keys in the `auth_key` table: every node of a deployment sees the same keys."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def records(self) -> list[KeyRecord]:
        with self.store.single_read() as conn:
            rows = conn.execute(sa.select(auth_key).order_by(auth_key.c.created_at)).all()
        return [_record(r) for r in rows]

    def change(self, fn: Change) -> list[KeyRecord]:
        with self.store.writing() as conn:
            if self.store.is_postgres:  # SQLite's BEGIN IMMEDIATE already excludes other writers
                conn.exec_driver_sql("LOCK TABLE auth_key IN SHARE ROW EXCLUSIVE MODE")
            before = [_record(r) for r in conn.execute(sa.select(auth_key).order_by(auth_key.c.created_at)).all()]
            after = fn(before)
            if after is None:
                return before
            old = {r.kid: r for r in before}
            new = {r.kid: r for r in after}
            for kid in old.keys() - new.keys():
                conn.execute(auth_key.delete().where(auth_key.c.kid == kid))
            for kid, rec in new.items():
                if kid not in old:
                    conn.execute(auth_key.insert().values(kid=kid, alg=rec.alg, private_jwk=json.dumps(rec.private_jwk),
                                                          created_at=rec.created_at, retired_at=rec.retired_at))
                elif old[kid].retired_at != rec.retired_at:
                    conn.execute(auth_key.update().where(auth_key.c.kid == kid).values(retired_at=rec.retired_at))
            return after


def _record(row: Any) -> KeyRecord:
    return KeyRecord(row.kid, row.alg, json.loads(row.private_jwk), row.created_at, row.retired_at)


class FileKeys:
    """Keys in a JSON file (CAREBROKER_AUTH_KEY_FILE), for deployments that keep secrets out of the
    database; nodes sharing it must share the file. Written whole and atomically, mode 0600."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def records(self) -> list[KeyRecord]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        return [KeyRecord(k["kid"], k["alg"], k["private_jwk"], k["created_at"], k.get("retired_at"))
                for k in data["keys"]]

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(f"{self.path}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def change(self, fn: Change) -> list[KeyRecord]:
        with self._locked():
            before = self.records()
            after = fn(before)
            if after is None:
                return before
            tmp = self.path.with_name(self.path.name + ".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump({"keys": [{"kid": r.kid, "alg": r.alg, "private_jwk": r.private_jwk,
                                     "created_at": r.created_at, "retired_at": r.retired_at} for r in after]}, f)
            os.replace(tmp, self.path)
            return after


class SigningKeys:
    """The key set of the built-in issuer: sign with the current key, verify with any published one."""

    def __init__(self, backend: KeyBackend) -> None:
        self.backend = backend
        self._lock = threading.Lock()
        self._cache: dict[str, RSAKey] = {}
        self._loaded_at = 0.0

    @classmethod
    def for_settings(cls, store: Store, key_file: str | None) -> "SigningKeys":
        return cls(FileKeys(Path(key_file)) if key_file else DatabaseKeys(store))

    def ensure_current(self) -> KeyRecord:
        """The current signing key, made if there is none yet (first start)."""
        current = _current(self.backend.records())
        if current is not None:
            return current

        def create(records: list[KeyRecord]) -> list[KeyRecord] | None:
            return None if _current(records) else [*records, new_key_record(int(time.time()))]
        current = _current(self.backend.change(create))
        assert current is not None
        return current

    def rotate(self) -> KeyRecord:
        """A new current key; the old one retires, published until its tokens have expired. Keys
        retired long enough ago are deleted."""
        now = int(time.time())

        def rotate(records: list[KeyRecord]) -> list[KeyRecord]:
            kept = [r if r.retired_at is not None else KeyRecord(r.kid, r.alg, r.private_jwk, r.created_at, now)
                    for r in records if r.published(now)]
            return [*kept, new_key_record(now)]
        current = _current(self.backend.change(rotate))
        assert current is not None
        self._loaded_at = 0.0
        return current

    def signing_key(self) -> RSAKey:
        """Read from the store each time: another node (or the CLI) may have rotated it."""
        return self.ensure_current().key()

    def published(self) -> list[KeyRecord]:
        now = int(time.time())
        return [r for r in self.backend.records() if r.published(now)]

    def jwks(self) -> dict[str, Any]:
        """The public JWK Set served at /auth/jwks (current key first)."""
        self.ensure_current()
        records = sorted(self.published(), key=lambda r: (r.retired_at is not None, -r.created_at))
        return {"keys": [{**r.key().as_dict(private=False), "kid": r.kid, "alg": r.alg, "use": "sig"}
                         for r in records]}

    def verification_key(self, kid: str) -> RSAKey | None:
        """The published key with that kid, from a short-lived cache re-read on an unknown kid (at
        most once a second, so forged kids cannot hammer the store)."""
        now = time.monotonic()
        key = self._cache.get(kid)
        if key is not None and now - self._loaded_at < CACHE_SECONDS:
            return key
        if now - self._loaded_at < 1.0:
            return key
        with self._lock:
            self._cache = {r.kid: RSAKey.import_key({k: v for k, v in r.private_jwk.items() if k not in _PRIVATE})
                           for r in self.published()}
            self._loaded_at = now
        return self._cache.get(kid)


_PRIVATE = frozenset({"d", "p", "q", "dp", "dq", "qi"})


def _current(records: list[KeyRecord]) -> KeyRecord | None:
    return next((r for r in reversed(records) if r.retired_at is None), None)

"""Shared fixtures: both databases for real, the app in-process (ASGI) and under a real uvicorn.

PostgreSQL is required, not optional: if it cannot be reached the PostgreSQL tests fail loudly.
Each test session works in its own PostgreSQL schema and SQLite file, dropped afterwards.

/fhir needs a bearer token: every client made here sends one by default, signed by TEST_ISSUER (a
real RSA key whose JWKS is in a temporary file) that every app and server trusts, with
`system/*.*` scopes and the admin role. Tests calling httpx themselves send AUTH (headers).
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey

from fhir_server.api.http import create_app
from fhir_server.auth.resource_server import parse_trusted_issuers
from fhir_server.config import Settings
from fhir_server.service.interactions import FhirService
from fhir_server.storage.engine import create_engine, migrate
from fhir_server.storage.repository import Store

PG_URL = os.environ.get("CAREBROKER_TEST_PG_URL", "postgresql+psycopg://127.0.0.1:5432/test")
BACKENDS = ["sqlite", "postgresql"]
CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"


class TestIssuer:
    """An identity provider for tests: real keys, a JWKS file, tokens signed for real. `jwks_path`
    is what servers are told to trust (rewrite it to rotate keys)."""

    __test__ = False  # not a test class

    def __init__(self, issuer: str, audience: str, folder: Path) -> None:
        self.issuer = issuer
        self.audience = audience
        self.jwks_path = folder / f"jwks-{uuid.uuid4().hex[:8]}.json"
        self.keys: list[RSAKey | ECKey] = [RSAKey.generate_key(2048, parameters={"kid": "rsa-1"}, private=True)]
        self.write_jwks()

    @property
    def key(self) -> RSAKey | ECKey:
        return self.keys[0]

    def write_jwks(self) -> None:
        self.jwks_path.write_text(json.dumps({"keys": [k.as_dict(private=False) for k in self.keys]}))

    def config(self, **extra: object) -> dict[str, object]:
        return {"issuer": self.issuer, "jwks": str(self.jwks_path), "audience": self.audience, **extra}

    def token(self, scope: str = "system/*.*", *, lifetime: int = 86400, alg: str = "RS256",
              key: RSAKey | ECKey | None = None, header: dict[str, object] | None = None, **claims: object) -> str:
        """A signed access token; claims given as None are left out."""
        now = int(time.time())
        body: dict[str, object] = {"iss": self.issuer, "sub": "test-client", "aud": self.audience,
                                   "iat": now, "exp": now + lifetime, "jti": uuid.uuid4().hex,
                                   "scope": scope, "roles": ["admin"], "client_id": "test-client"}
        body.update(claims)
        key = key or self.key
        head = {"alg": alg, "typ": "at+jwt", "kid": key.kid, **(header or {})}
        return jwt.encode(head, {k: v for k, v in body.items() if v is not None}, key, algorithms=[alg])


_ISSUER_DIR = Path(tempfile.mkdtemp(prefix="carebroker-test-issuer-"))
atexit.register(shutil.rmtree, _ISSUER_DIR, True)
TEST_ISSUER = TestIssuer("https://issuer.carebroker.test", "https://carebroker.test/fhir", _ISSUER_DIR)
TRUSTED_ISSUERS_JSON = json.dumps([TEST_ISSUER.config()])
TOKEN = TEST_ISSUER.token()
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def app_settings(**overrides: object) -> Settings:
    """Settings for an in-process app that trusts TEST_ISSUER."""
    return Settings(**{"trusted_issuers": parse_trusted_issuers(TRUSTED_ISSUERS_JSON), **overrides})  # type: ignore[arg-type]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: starts extra processes")


@pytest.fixture(scope="session")
def corpus() -> Path:
    if not CORPUS.is_dir():
        pytest.fail(f"the shared corpus is missing at {CORPUS}")
    return CORPUS


class JwksServer:
    """A JWKS endpoint on loopback (an IdP's jwks_uri, a client's jku), counting fetches. `keys`
    holds joserfc keys (served public) or JWK dicts (served as they are); any path serves them."""

    def __init__(self) -> None:
        self.keys: list[Any] = []
        self.hits = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                outer.hits += 1
                keys = [k if isinstance(k, dict) else k.as_dict(private=False) for k in outer.keys]
                body = json.dumps({"keys": keys}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.url = f"{self.base}/jwks"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class Backends:
    """Databases, apps and servers for each backend, made on first use and kept for the session."""

    def __init__(self, tmp: pytest.TempPathFactory) -> None:
        self.tmp = tmp
        self._cache: dict[tuple[str, str], object] = {}
        self._cleanup: list = []

    def _once(self, key: tuple[str, str], make):  # type: ignore[no-untyped-def]
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def url(self, kind: str) -> str:
        return self._once(("url", kind), lambda: self.fresh_url(kind))  # type: ignore[return-value]

    def engine(self, kind: str) -> sa.Engine:
        def make() -> sa.Engine:
            eng = create_engine(self.url(kind))
            self._cleanup.append(eng.dispose)
            return eng
        return self._once(("engine", kind), make)  # type: ignore[return-value]

    def asgi(self, kind: str) -> TestClient:
        def make() -> TestClient:
            client = TestClient(create_app(app_settings(), self.engine(kind)), base_url="http://testserver/fhir/",
                                headers=AUTH)
            client.__enter__()
            self._cleanup.append(lambda: client.__exit__(None, None, None))
            return client
        return self._once(("asgi", kind), make)  # type: ignore[return-value]

    def server(self, kind: str) -> str:
        """A real `carebroker serve` process (uvicorn) on a free port; its FHIR base URL."""
        return self._once(("server", kind), lambda: self.start_server(self.url(kind)))  # type: ignore[return-value]

    def http(self, kind: str) -> httpx.Client:
        def make() -> httpx.Client:
            client = httpx.Client(base_url=self.server(kind) + "/", timeout=30, headers=AUTH)
            self._cleanup.append(client.close)
            return client
        return self._once(("http", kind), make)  # type: ignore[return-value]

    def start_server(self, url: str, *extra: str) -> str:
        return self.spawn_server(url, *extra)[1]

    def spawn_server(self, url: str, *extra: str,
                     env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], str]:
        """A `carebroker serve` on `url` (stopped at the end of the session, if still running): its
        process, for tests that stop it themselves, and its FHIR base URL."""
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "fhir_server.cli", "serve", "--port", str(port), "--database", url,
             "--log-level", "warning", *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env={**os.environ, "CAREBROKER_TRUSTED_ISSUERS": TRUSTED_ISSUERS_JSON, **(env or {})})
        self._cleanup.append(lambda: (proc.terminate(), proc.wait(10)))
        base = f"http://127.0.0.1:{port}/fhir"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"server exited: {proc.stdout.read().decode() if proc.stdout else ''}")
            try:
                if httpx.get(f"{base}/metadata", timeout=1).status_code == 200:
                    return proc, base
            except httpx.TransportError:
                time.sleep(0.1)
        pytest.fail("server did not start within 60 s")

    def fresh_url(self, kind: str) -> str:
        """A new, empty, migrated database of that kind (for tests that count everything in it)."""
        if kind == "sqlite":
            url = f"sqlite:///{self.tmp.mktemp('sqlite') / 'carebroker.db'}"
        else:
            url = self.pg_schema_url()
        migrate_url(url)
        return url

    def pg_schema_url(self) -> str:
        """A new, empty PostgreSQL schema (dropped at the end of the session)."""
        schema = f"cbtest_{uuid.uuid4().hex[:10]}"
        admin = sa.create_engine(PG_URL)
        try:
            with admin.begin() as conn:
                conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
        except sa.exc.OperationalError as exc:
            pytest.fail(f"PostgreSQL is not reachable at {PG_URL}: {exc}")

        def drop() -> None:
            with admin.begin() as conn:
                conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
            admin.dispose()
        self._cleanup.insert(0, drop)  # runs last: after engines and servers are gone
        return f"{PG_URL}?options=-csearch_path%3D{schema}"

    def close(self) -> None:
        for fn in reversed(self._cleanup):
            fn()


def migrate_url(url: str) -> None:
    engine = create_engine(url)
    migrate(engine)
    FhirService(Store(engine)).reindex_if_needed()
    engine.dispose()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def backends(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backends]:
    b = Backends(tmp_path_factory)
    yield b
    b.close()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def engine(backends: Backends, backend: str) -> sa.Engine:
    return backends.engine(backend)


@pytest.fixture
def asgi_client(backends: Backends, backend: str) -> TestClient:
    return backends.asgi(backend)


@pytest.fixture
def server_url(backends: Backends, backend: str) -> str:
    return backends.server(backend)


@pytest.fixture(params=[(t, b) for b in BACKENDS for t in ("asgi", "http")], ids=lambda p: f"{p[0]}-{p[1]}")
def api(request: pytest.FixtureRequest, backends: Backends) -> httpx.Client | TestClient:
    """The same test through the in-process app and through a real uvicorn server, on both databases."""
    transport, kind = request.param
    return backends.asgi(kind) if transport == "asgi" else backends.http(kind)

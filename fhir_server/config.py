"""Runtime settings, from the command line or the environment (CAREBROKER_*)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

DEFAULT_DATABASE_URL = "sqlite:///carebroker.db"
# Set only by `carebroker serve --auth off` for its worker processes (not a setting to use directly).
AUTH_OFF_ENV = "_CAREBROKER_AUTH_OFF"


def normalise_database_url(url: str) -> str:
    """Let people write `postgresql://...`: carebroker speaks to PostgreSQL through psycopg 3."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


@dataclass(frozen=True)
class Settings:
    """What a server node needs to know; nodes share nothing but the database."""

    database_url: str = DEFAULT_DATABASE_URL
    # Public base URL of the FHIR endpoint when behind a proxy; else taken from each request.
    public_base_url: str | None = None
    default_page_size: int = 50
    max_page_size: int = 1000
    # NDJSON per stored chunk of a bulk export file: what a resumed export redoes at most.
    export_chunk_bytes: int = 1 << 20
    # Resource server: every /fhir request needs a valid bearer token (off only by an explicit flag).
    auth_enabled: bool = True
    # External issuers whose JWTs are accepted (auth/resource_server.TrustedIssuer), from
    # CAREBROKER_TRUSTED_ISSUERS (a JSON list, or the path of a JSON file with one).
    trusted_issuers: tuple[Any, ...] = ()
    # The claim holding the caller's roles (a dotted path for nested claims: realm_access.roles).
    role_claim: str = "roles"
    # Least seconds between two fetches of an issuer's JWKS triggered by unknown kids.
    jwks_refresh_interval: float = 10.0
    # The authorization server's signing keys in this JSON file instead of the database.
    auth_key_file: str | None = None

    @classmethod
    def from_env(cls, **overrides: object) -> "Settings":
        """Environment first, explicit overrides (e.g. CLI flags) win."""
        values: dict[str, object] = {}
        if url := os.environ.get("CAREBROKER_DATABASE_URL"):
            values["database_url"] = url
        if base := os.environ.get("CAREBROKER_BASE_URL"):
            values["public_base_url"] = base
        if chunk := os.environ.get("CAREBROKER_EXPORT_CHUNK_BYTES"):
            values["export_chunk_bytes"] = int(chunk)
        if key_file := os.environ.get("CAREBROKER_AUTH_KEY_FILE"):
            values["auth_key_file"] = key_file
        if os.environ.get(AUTH_OFF_ENV) == "by --auth off":
            values["auth_enabled"] = False
        if issuers := os.environ.get("CAREBROKER_TRUSTED_ISSUERS"):
            from fhir_server.auth.resource_server import parse_trusted_issuers
            values["trusted_issuers"] = parse_trusted_issuers(issuers)
        if role_claim := os.environ.get("CAREBROKER_ROLE_CLAIM"):
            values["role_claim"] = role_claim
        if refresh := os.environ.get("CAREBROKER_JWKS_REFRESH_SECONDS"):
            values["jwks_refresh_interval"] = float(refresh)
        values.update({k: v for k, v in overrides.items() if v is not None})
        values["database_url"] = normalise_database_url(str(values.get("database_url", DEFAULT_DATABASE_URL)))
        return cls(**values)  # type: ignore[arg-type]

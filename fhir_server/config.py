"""Runtime settings, from the command line or the environment (CAREBROKER_*)."""
from __future__ import annotations

import os
from dataclasses import dataclass

DEFAULT_DATABASE_URL = "sqlite:///carebroker.db"


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
        values.update({k: v for k, v in overrides.items() if v is not None})
        values["database_url"] = normalise_database_url(str(values.get("database_url", DEFAULT_DATABASE_URL)))
        return cls(**values)  # type: ignore[arg-type]

"""OAuth 2.0 error responses (RFC 6749 5.2): a code from the spec, a human description, a status."""
from __future__ import annotations


class OAuthError(Exception):
    """Answered as `{"error": ..., "error_description": ...}` with `status` (401 for invalid_client)."""

    def __init__(self, error: str, description: str, status: int = 400,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(f"{error}: {description}")
        self.error = error
        self.description = description
        self.status = status
        self.headers = headers or {}


def invalid_client(description: str, basic: bool = False) -> OAuthError:
    """401; with `WWW-Authenticate: Basic` when the client tried HTTP Basic, as RFC 6749 asks."""
    return OAuthError("invalid_client", description, 401,
                      {"WWW-Authenticate": 'Basic realm="carebroker"'} if basic else None)

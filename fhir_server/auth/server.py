"""The built-in authorization server: the grants, introspection and revocation, without HTTP.

`AuthServer.validate_access_token` is what the resource server calls to check a carebroker token.
The endpoints (auth/endpoints.py) translate HTTP to these calls and back.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fhir_server.auth.authorize import AuthorizationCodes, AuthorizationRequest
from fhir_server.auth.clients import ClientAuthenticator
from fhir_server.auth.errors import OAuthError
from fhir_server.auth.keys import SigningKeys
from fhir_server.auth.policy import ACCESS_TOKEN_LIFETIME
from fhir_server.auth.registry import Client, Registry, User
from fhir_server.auth.scopes import grant
from fhir_server.auth.tokens import InvalidToken, TokenSubject, Tokens, new_jti
from fhir_server.auth.urls import AuthUrls
from fhir_server.storage.repository import Store


class AuthServer:
    """Everything the built-in issuer knows lives in the database (or the key file): any node can
    answer any request."""

    def __init__(self, store: Store, key_file: str | None = None) -> None:
        self.store = store
        self.registry = Registry(store)
        self.keys = SigningKeys.for_settings(store, key_file)
        self.tokens = Tokens(store, self.keys)
        self.clients = ClientAuthenticator(store, self.registry)
        self.codes = AuthorizationCodes(store)

    def validate_access_token(self, token: str, fhir_base_url: str) -> dict[str, Any]:
        """The claims of a valid, unrevoked carebroker access token for `fhir_base_url`; raises
        `fhir_server.auth.tokens.InvalidToken` otherwise. See `Tokens.validate_access_token`."""
        return self.tokens.validate_access_token(token, fhir_base_url)

    # -- token endpoint --------------------------------------------------------------------------

    def token(self, form: Mapping[str, str], authorization: str | None, urls: AuthUrls) -> dict[str, Any]:
        grant_type = form.get("grant_type")
        if grant_type == "client_credentials":
            return self._client_credentials(form, authorization, urls)
        if grant_type == "authorization_code":
            return self._authorization_code(form, authorization, urls)
        if not grant_type:
            raise OAuthError("invalid_request", "grant_type is required")
        raise OAuthError("unsupported_grant_type", f"grant_type {grant_type!r} is not supported "
                         "(authorization_code, client_credentials)")

    def _client_credentials(self, form: Mapping[str, str], authorization: str | None,
                            urls: AuthUrls) -> dict[str, Any]:
        """SMART Backend Services (private_key_jwt), or client_secret_basic for simple integrations."""
        client = self.clients.authenticate(form, authorization, urls)
        scope = self.grant_scope(form.get("scope"), client)
        token = self.client_access_token(client, scope, urls)
        return {"access_token": token, "token_type": "Bearer", "expires_in": ACCESS_TOKEN_LIFETIME,
                "scope": " ".join(scope)}

    @staticmethod
    def grant_scope(requested: str | None, client: Client) -> list[str]:
        """Only what the registration covers; the response says what was granted (RFC 6749 5.1)."""
        if not requested or not requested.split():
            raise OAuthError("invalid_scope", "scope is required")
        scope = grant(requested.split(), client.scope)
        if not scope:
            raise OAuthError("invalid_scope", "none of the requested scopes is allowed for this client")
        return scope

    def client_access_token(self, client: Client, scope: list[str], urls: AuthUrls) -> str:
        """An access token for a registered client acting as itself (Backend Services, `carebroker token`)."""
        subject = TokenSubject(client.client_id, client.roles, client.fhir_user, client.organization,
                               client.purpose_of_use)
        return self.tokens.issue_access_token(urls, subject, client.client_id, scope)[0]

    def _authorization_code(self, form: Mapping[str, str], authorization: str | None,
                            urls: AuthUrls) -> dict[str, Any]:
        client = self.clients.authenticate(form, authorization, urls, allow_public=True)
        missing = [p for p in ("code", "redirect_uri", "code_verifier") if not form.get(p)]
        if missing:
            raise OAuthError("invalid_request", f"{', '.join(missing)} required")
        jti = new_jti()
        granted = self.codes.redeem(form["code"], client.client_id, form["redirect_uri"], form["code_verifier"], jti)
        user = self.registry.user(granted.username)
        if user is None or not user.active:
            raise OAuthError("invalid_grant", "the user is no longer active")
        principal = user_subject(user, granted.patient)
        token, _ = self.tokens.issue_access_token(urls, principal, client.client_id, granted.scope, jti)
        response: dict[str, Any] = {"access_token": token, "token_type": "Bearer",
                                    "expires_in": ACCESS_TOKEN_LIFETIME, "scope": " ".join(granted.scope)}
        if granted.patient and "launch/patient" in granted.scope:
            response["patient"] = granted.patient
        if "openid" in granted.scope:
            id_principal = principal if "fhirUser" in granted.scope else TokenSubject(principal.sub)
            response["id_token"] = self.tokens.issue_id_token(urls, id_principal, client.client_id, granted.nonce)
        return response

    # -- login -----------------------------------------------------------------------------------

    def login(self, req: AuthorizationRequest, username: str, password: str,
              patient: str | None) -> tuple[str | None, str | None]:
        """(code, None) once the user is who they say and the launch context is settled, else
        (None, what to tell them). Patient users get their own record as launch context; others name
        the patient (a `patient` parameter or the field on the login page), which must exist."""
        user = self.registry.authenticate_user(username, password)
        if user is None:
            return None, "Wrong username or password."
        context = None
        if req.wants_patient:
            context = user.patient or (patient or "").strip() or None
            if context is None:
                return None, "Choose the patient to open (launch/patient was requested)."
            if not self.patient_exists(context):
                return None, f"There is no Patient with id {context!r}."
        return self.codes.issue(req, user.username, context), None

    def patient_exists(self, patient_id: str) -> bool:
        with self.store.single_read() as conn:
            version = self.store.current(conn, "Patient", patient_id)
        return version is not None and not version.deleted

    # -- introspection and revocation ------------------------------------------------------------

    def introspect(self, form: Mapping[str, str], authorization: str | None, urls: AuthUrls) -> dict[str, Any]:
        """RFC 7662, for any authenticated (confidential) client."""
        self.clients.authenticate(form, authorization, urls)
        if not form.get("token"):
            raise OAuthError("invalid_request", "token is required")
        return self.tokens.introspect(form["token"], urls.fhir_base)

    def revoke(self, form: Mapping[str, str], authorization: str | None, urls: AuthUrls) -> None:
        """RFC 7009: a client revokes its own tokens; unknown or foreign-issuer tokens are ignored
        (answered 200, as the RFC says), another client's token is refused."""
        client = self.clients.authenticate(form, authorization, urls, allow_public=True)
        if not form.get("token"):
            raise OAuthError("invalid_request", "token is required")
        claims = self.tokens.unverified_claims_if_ours(form["token"])
        if claims is None or not isinstance(claims.get("jti"), str):
            return
        if claims.get("client_id") != client.client_id:
            raise OAuthError("unauthorized_client", "a client may revoke only tokens issued to it")
        self.tokens.revoke(claims["jti"], int(claims.get("exp", 0)))


def user_subject(user: User, patient: str | None) -> TokenSubject:
    return TokenSubject(user.username, user.roles, user.fhir_user, user.organization, user.purpose_of_use, patient)


__all__ = ["AuthServer", "InvalidToken"]

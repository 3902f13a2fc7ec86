"""What clients discover about the built-in authorization server: the SMART configuration
(`/fhir/.well-known/smart-configuration`), an OpenID Provider configuration for id_token consumers,
and the CapabilityStatement's `rest.security`."""
from __future__ import annotations

from typing import Any

from fhir_server.auth.keys import SIGNING_ALG
from fhir_server.auth.policy import ASSERTION_ALGS, AUTH_METHODS, GRANT_TYPES
from fhir_server.auth.urls import AuthUrls

SCOPES_SUPPORTED = [
    "openid", "fhirUser", "launch/patient",
    "patient/*.read", "patient/*.rs", "patient/*.cruds",
    "user/*.read", "user/*.write", "user/*.rs", "user/*.cruds",
    "system/*.read", "system/*.write", "system/*.rs", "system/*.cruds",
]
CAPABILITIES = [
    "launch-standalone", "client-public", "client-confidential-symmetric", "client-confidential-asymmetric",
    "context-standalone-patient", "permission-patient", "permission-user", "permission-v1", "permission-v2",
    "sso-openid-connect",
]
OAUTH_URIS = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"
RESTFUL_SECURITY_SERVICE = "http://terminology.hl7.org/CodeSystem/restful-security-service"


def _server_metadata(urls: AuthUrls) -> dict[str, Any]:
    """What the SMART and the OpenID discovery documents both say about this server."""
    return {
        "issuer": urls.issuer,
        "jwks_uri": urls.jwks,
        "authorization_endpoint": urls.authorize,
        "token_endpoint": urls.token,
        "introspection_endpoint": urls.introspect,
        "revocation_endpoint": urls.revoke,
        "grant_types_supported": list(GRANT_TYPES),
        "token_endpoint_auth_methods_supported": list(AUTH_METHODS),
        "token_endpoint_auth_signing_alg_values_supported": list(ASSERTION_ALGS),
        "scopes_supported": SCOPES_SUPPORTED,
        "response_types_supported": ["code"],
        "code_challenge_methods_supported": ["S256"],
    }


def smart_configuration(urls: AuthUrls) -> dict[str, Any]:
    """SMART App Launch 2.x discovery document."""
    return {**_server_metadata(urls), "capabilities": CAPABILITIES}


def openid_configuration(urls: AuthUrls) -> dict[str, Any]:
    """OpenID Provider metadata at `<issuer>/.well-known/openid-configuration`."""
    return {**_server_metadata(urls), "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": [SIGNING_ALG],
            "claims_supported": ["iss", "sub", "aud", "exp", "iat", "auth_time", "nonce", "fhirUser"]}


def rest_security(urls: AuthUrls) -> dict[str, Any]:
    """CapabilityStatement.rest.security: SMART-on-FHIR, with the oauth-uris extension."""
    return {
        "extension": [{"url": OAUTH_URIS, "extension": [
            {"url": "token", "valueUri": urls.token},
            {"url": "authorize", "valueUri": urls.authorize},
            {"url": "introspect", "valueUri": urls.introspect},
            {"url": "revoke", "valueUri": urls.revoke},
        ]}],
        "cors": False,
        "service": [{"coding": [{"system": RESTFUL_SECURITY_SERVICE, "code": "SMART-on-FHIR",
                                 "display": "SMART-on-FHIR"}],
                     "text": "OAuth2 using SMART-on-FHIR profile (see http://docs.smarthealthit.org)"}],
        "description": f"OAuth2 bearer tokens from the built-in authorization server at {urls.issuer} "
                       "(SMART App Launch standalone, SMART Backend Services); discovery at "
                       f"{urls.fhir_base}/.well-known/smart-configuration.",
    }

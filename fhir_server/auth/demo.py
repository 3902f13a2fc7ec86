"""Demo users and clients matching the demo population (fhir_server/demo.py), registered by
`carebroker serve --demo`. Their passwords and secrets are printed: demo use only."""
from __future__ import annotations

from urllib.parse import urlencode

from authlib.oauth2.rfc7636 import create_s256_code_challenge

from fhir_server.auth.registry import Registry
from fhir_server.auth.urls import AuthUrls
from fhir_server.storage.repository import Store

DEMO_PASSWORD = "carebroker-demo"
DEMO_APP = "demo-app"
DEMO_BACKEND = "demo-backend"
DEMO_BACKEND_SECRET = "demo-backend-secret"
DEMO_REDIRECT = "http://127.0.0.1:8765/callback"
# A fixed PKCE pair so the printed URL and curl command work as they are (never do this in an app).
DEMO_VERIFIER = "carebroker-demo-code-verifier-0123456789-abcdefghijklmnop"

# username -> (roles, fhirUser, organization, patient); ids from fhir_server/demo.py: prac-001 is a GP
# at Larkspur Road Surgery (org-e85990), pat-001 is registered there; org-rz9 is the acute trust.
DEMO_USERS = {
    "clinician": (("clinician",), "Practitioner/prac-001", "Organization/org-e85990", None),
    "support": (("support",), None, "Organization/org-e85990", None),
    "ig-officer": (("ig-officer",), None, "Organization/org-rz9", None),
    "analyst": (("analyst",), None, "Organization/org-rz9", None),
    "patient": (("patient",), "Patient/pat-001", None, "pat-001"),
    "admin": (("admin",), None, None, None),
}
APP_SCOPES = ("openid", "fhirUser", "launch/patient", "patient/*.read", "patient/*.rs", "user/*.read", "user/*.rs",
              "user/*.cruds")


def register_demo(store: Store) -> None:
    """Idempotent: registering again replaces the entries with the same values."""
    registry = Registry(store)
    for username, (roles, fhir_user, org, patient) in DEMO_USERS.items():
        registry.add_user(username, DEMO_PASSWORD, roles=roles, fhir_user=fhir_user, organization=org,
                          patient=patient)
    registry.add_client(DEMO_APP, name="carebroker demo app", scope=APP_SCOPES, redirect_uris=(DEMO_REDIRECT,))
    registry.add_client(DEMO_BACKEND, name="carebroker demo integration", scope=("system/*.read", "system/*.rs"),
                        roles=("integration",), secret=DEMO_BACKEND_SECRET, organization="Organization/org-rz9")


def demo_instructions(fhir_base: str) -> str:
    urls = AuthUrls.for_fhir_base(fhir_base)
    authorize = urls.authorize + "?" + urlencode({
        "response_type": "code", "client_id": DEMO_APP, "redirect_uri": DEMO_REDIRECT, "state": "demo",
        "scope": "openid fhirUser launch/patient patient/*.rs", "aud": urls.fhir_base,
        "code_challenge": create_s256_code_challenge(DEMO_VERIFIER), "code_challenge_method": "S256"})
    users = ", ".join(DEMO_USERS)
    return f"""carebroker demo sign-in (demo credentials only):
  users {users}; password {DEMO_PASSWORD!r} for each
  backend token:  curl -u {DEMO_BACKEND}:{DEMO_BACKEND_SECRET} -d grant_type=client_credentials -d 'scope=system/*.rs' {urls.token}
  or:             carebroker token {DEMO_BACKEND} --base-url {urls.fhir_base}
  app login:      open {authorize}
                  sign in (e.g. as 'patient'); the browser then goes to {DEMO_REDIRECT}?code=...; exchange the code:
                  curl -d grant_type=authorization_code -d client_id={DEMO_APP} -d redirect_uri={DEMO_REDIRECT} -d code_verifier={DEMO_VERIFIER} -d code=CODE {urls.token}
  first request:  curl -H "Authorization: Bearer $TOKEN" {urls.fhir_base}/Patient/pat-001
  discovery:      {urls.fhir_base}/.well-known/smart-configuration"""

"""The numbers and names the built-in authorization server commits to, in one place (discovery
advertises them, the endpoints enforce them)."""
from __future__ import annotations

ACCESS_TOKEN_LIFETIME = 300  # seconds; SMART Backend Services: at most five minutes
ID_TOKEN_LIFETIME = 300
CODE_LIFETIME = 60  # an authorization code is exchanged at once by the app that asked for it
ASSERTION_MAX_LIFETIME = 300  # a client assertion's exp at most five minutes ahead
LEEWAY = 15  # clock skew tolerated on exp/nbf/iat

# Client assertion algorithms SMART Backend Services requires servers to support.
ASSERTION_ALGS = ("RS384", "ES384")
CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ACCESS_TOKEN_TYP = "at+jwt"  # RFC 9068: an access token can never pass for an id_token

ROLES = ("clinician", "support", "ig-officer", "analyst", "integration", "patient", "admin")
GRANT_TYPES = ("authorization_code", "client_credentials")
AUTH_METHODS = ("private_key_jwt", "client_secret_basic", "none")

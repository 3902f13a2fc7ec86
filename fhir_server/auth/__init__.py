"""The built-in OAuth 2.0 / SMART on FHIR authorization server (under /auth) and its discovery.

For the resource server: `AuthServer.validate_access_token(token, fhir_base_url) -> claims`, raising
`InvalidToken`; the app's instance is `app.state.auth`.
"""

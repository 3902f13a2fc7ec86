"""Authorisation, opt-out and audit: the policy decision point every read and write asks (arrives with the consent issues)."""

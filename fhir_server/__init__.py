"""carebroker FHIR R4 server: HTTP API, FHIR interactions, search and storage."""

"""HL7v2 and CSV feeds mapped into FHIR resources (arrives with the feed issues)."""

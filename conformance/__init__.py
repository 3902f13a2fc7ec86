"""Conformance: what carebroker claims (CapabilityStatement) and checks (validation) about FHIR R4.

R4 ids are at most 64 characters; fhir.resources allows 255. The limit is read when a model class is
built, so it is set here, before any model is imported (see r4b_vs_r4.md).
"""
import fhir_core.constraints

fhir_core.constraints.TYPES_ID_MAX_LENGTH = 64

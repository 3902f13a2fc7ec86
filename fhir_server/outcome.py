"""FHIR errors as values: every failure in carebroker becomes an OperationOutcome with an HTTP status.

Layers below the API raise `FhirError`; the router turns it into a response, so no layer needs to
know about HTTP to say *why* something failed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# OperationOutcome.issue.code values (http://hl7.org/fhir/issue-type) used by the server.
ISSUE_CODES = frozenset({
    "invalid", "structure", "required", "value", "invariant", "security", "login", "unknown",
    "expired", "forbidden", "suppressed", "processing", "not-supported", "duplicate",
    "multiple-matches", "not-found", "deleted", "too-long", "code-invalid", "extension",
    "too-costly", "business-rule", "conflict", "transient", "lock-error", "no-store",
    "exception", "timeout", "incomplete", "throttled", "informational",
})


@dataclass(frozen=True)
class Issue:
    """One OperationOutcome.issue: what went wrong and, where known, which element (FHIRPath)."""

    code: str
    diagnostics: str
    severity: str = "error"
    expression: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"severity": self.severity, "code": self.code, "diagnostics": self.diagnostics}
        if self.expression:
            out["expression"] = [self.expression]
        return out


@dataclass
class FhirError(Exception):
    """A failed FHIR interaction: the HTTP status and the issues explaining it."""

    status: int
    issues: list[Issue] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.status}: " + "; ".join(i.diagnostics for i in self.issues)


def error(status: int, code: str, diagnostics: str, expression: str | None = None) -> FhirError:
    """Shorthand for the common single-issue error."""
    return FhirError(status, [Issue(code, diagnostics, expression=expression)])


def operation_outcome(issues: list[Issue]) -> dict[str, Any]:
    """The OperationOutcome resource for a list of issues."""
    return {"resourceType": "OperationOutcome", "issue": [i.to_json() for i in issues]}

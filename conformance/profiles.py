"""Profile rules: the checks carebroker enforces beyond base R4, each one entry in `PROFILE_RULES`.

Base R4 lets an identifier hold any string; the profiles the server's users work to do not (an NHS
number with a wrong check digit matches the wrong person, or no one). Every write and `$validate`
apply every rule of the resource's type, whether or not the resource claims the profile in
`meta.profile`: a wrong NHS number is wrong in any profile.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from conformance.nhs_number import NHS_NUMBER_SYSTEM, nhs_number_problem
from fhir_server.outcome import Issue

UK_CORE_PATIENT = "https://fhir.hl7.org.uk/StructureDefinition/UKCore-Patient"
CORE_PROFILE = "http://hl7.org/fhir/StructureDefinition/{}"


@dataclass(frozen=True)
class IdentifierRule:
    """Identifiers of `system` in `resource_type.element` must have a value that `problem` accepts
    (`problem` says what is wrong, or None). `profile` is the profile that states the rule."""

    profile: str
    resource_type: str
    system: str
    problem: Callable[[str], str | None]
    element: str = "identifier"

    def issues(self, resource: dict[str, Any]) -> list[Issue]:
        found = []
        identifiers = resource.get(self.element)
        for i, ident in enumerate(identifiers if isinstance(identifiers, list) else ()):
            if not isinstance(ident, dict) or ident.get("system") != self.system:
                continue
            where = f"{self.resource_type}.{self.element}[{i}].value"
            value = ident.get("value")
            if value is None:
                found.append(Issue("required", f"{where}: an identifier of system {self.system} needs a value",
                                   expression=where))
            elif isinstance(value, str) and (problem := self.problem(value)):
                found.append(Issue("value", f"{where}: {problem}", expression=where))
            # a value that is not a string is a structure error, reported by the structure check
        return found


PROFILE_RULES: tuple[IdentifierRule, ...] = (
    IdentifierRule(UK_CORE_PATIENT, "Patient", NHS_NUMBER_SYSTEM, nhs_number_problem),
)


def profile_issues(resource: dict[str, Any]) -> list[Issue]:
    """Every rule of `PROFILE_RULES` that `resource` (parsed JSON, any shape) breaks."""
    rtype = resource.get("resourceType")
    return [issue for rule in PROFILE_RULES if rule.resource_type == rtype for issue in rule.issues(resource)]


def known_profiles(rtype: str) -> frozenset[str]:
    """Profiles a resource of `rtype` can be validated against here: the core one and those with rules."""
    return frozenset({CORE_PROFILE.format(rtype), *(r.profile for r in PROFILE_RULES if r.resource_type == rtype)})

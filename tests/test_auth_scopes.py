"""Which requested scopes a registration covers (fhir_server/auth/scopes.py): SMART v1 and v2 forms."""
from __future__ import annotations

import pytest

from fhir_server.auth.scopes import covers, grant, parse_resource_scope


@pytest.mark.parametrize("registered, requested, expected", [
    ("system/*.rs", "system/Patient.rs", True),
    ("system/*.rs", "system/Patient.r", True),
    ("system/*.rs", "system/Patient.read", True),  # v1 read = v2 rs
    ("system/*.read", "system/Observation.s", True),
    ("system/*.rs", "system/Patient.cruds", False),
    ("system/*.rs", "user/Patient.rs", False),  # another context
    ("system/Patient.rs", "system/Observation.rs", False),
    ("system/Patient.rs", "system/*.rs", False),  # a wildcard is more than one type
    ("user/*.write", "user/Patient.cud", True),
    ("user/*.write", "user/Patient.r", False),  # write does not imply read
    ("user/*.*", "user/Encounter.cruds", True),
    ("patient/Observation.rs?category=laboratory", "patient/Observation.rs?category=laboratory", True),
    ("patient/Observation.rs?category=laboratory", "patient/Observation.rs", False),
    ("patient/Observation.rs", "patient/Observation.rs?category=vital-signs", True),
    ("openid", "openid", True),
    ("launch/patient", "launch", False),
    ("user/*.cruds", "user/Patient.dus", False),  # letters out of order: not a scope at all
])
def test_covers(registered: str, requested: str, expected: bool) -> None:
    assert covers(registered, requested) is expected


@pytest.mark.parametrize("scope", ["user/Patient.dus", "user/Patient.rr", "user/Patient.x", "user/Patient.",
                                   "other/Patient.rs", "user/patient.rs"])
def test_malformed_scopes(scope: str) -> None:
    assert parse_resource_scope(scope) is None


def test_grant_keeps_order_and_drops_the_rest() -> None:
    assert grant("openid system/Patient.rs fhirUser system/Patient.rs system/Observation.c".split(),
                 ["system/*.rs", "openid"]) == ["openid", "system/Patient.rs"]

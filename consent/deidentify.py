"""The de-identified view for secondary use: what users with the role `analyst` get from search and Bulk $export.

Analysts plan services; they need what happened to whom, not who. Patients are pseudonymous, not
anonymous: every resource id and identifier value is replaced by a keyed pseudonym (HMAC-SHA256), so
the same patient has the same pseudonym in every response and export, and across restarts with the
same key, but no one without the key can turn a pseudonym back into an NHS number or an id.
Names, contact details, address lines, photos and free-text notes go; a birth date keeps its year
and a postcode its district. Clinical codes, their display text and the clinical values stay.

`RULES` says what happens to which element: one line per rule, keyed by a data type (wherever it
occurs), by `*.element` (any element of that name) or by a full path (`Patient.contact`). The engine
walks the JSON alongside the R4B model classes, which tell it each element's type, so a HumanName
or an Identifier is found wherever it sits (a backbone element, an extension value, a contained
resource). Resources without a model cannot be stored here (validation refuses them); inside one,
only the name and path rules would apply.
"""
from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from fhir_core.types import FhirBase

from conformance.search_parameters import SearchParameter, for_type
from conformance.validation import model_class, r4_resource_types
from fhir_server.outcome import error

PSEUDED = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "PSEUDED",
           "display": "pseudonymized"}
# Organisations are not people: their names, phone numbers and addresses are public and stay.
ORGANISATIONAL = frozenset({"Organization", "Location", "HealthcareService", "Endpoint"})
# A literal reference, relative or absolute, optionally to a version: [base/]Type/id[/_history/vid].
LITERAL_REFERENCE = re.compile(r"(?:.*/)?([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(/_history/[A-Za-z0-9\-.]{1,64})?")
R4_TYPES = frozenset(r4_resource_types())
RESOURCE = get_fhir_model_class("Resource")  # the type of `contained`, `Bundle.entry.resource`, ...
# Data absent because it was hidden: what a reference FHIR requires (Condition.subject) is left as.
MASKED = {"url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason", "valueCode": "masked"}
META_KEPT = frozenset({"versionId", "lastUpdated", "profile", "security", "tag"})  # not `source`: names a system
ADDRESS_KEPT = frozenset({"id", "extension", "use", "type", "city", "district", "state", "country", "period"})
FREE_TEXT_VALUES = ("valueString", "valueMarkdown")


class Pseudonymiser:
    """Keyed pseudonyms. Without a key, a hash of an NHS number (10 digits, one a check digit) is
    reversed by hashing all billion of them; with HMAC the key is needed to compute any pseudonym."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("the pseudonym key needs at least 16 bytes: a short key can be guessed")
        self._key = key

    def _pseudonym(self, *parts: str) -> str:
        # NUL separates the parts (FHIR strings cannot hold it), so ("a|b", "c") and ("a", "b|c") differ;
        # 26 base32 characters (130 bits, lower case) are a valid FHIR id.
        digest = hmac.new(self._key, "\0".join(parts).encode(), hashlib.sha256).digest()
        return base64.b32encode(digest).decode().lower()[:26]

    def id(self, rtype: str, rid: str) -> str:
        """Pseudonym of a resource id: keyed on the type too, as ids are unique only within a type."""
        return self._pseudonym("id", rtype, rid)

    def identifier(self, system: str | None, value: str) -> str:
        """Pseudonym of an Identifier value, keyed on its system: the same NHS number gives the same
        pseudonym wherever it appears (Patient.identifier, Reference.identifier)."""
        return self._pseudonym("identifier", system or "", value)


@dataclass(frozen=True)
class _Context:
    pseudo: Pseudonymiser
    rtype: str  # the (possibly contained) resource being walked


Rule = Callable[[Any, _Context], Any]  # an element's value (already walked) -> its new value, None to remove it


def postcode_district(postcode: str) -> str | None:
    """The outward code of a UK postcode ("SW1A 1AA", "W67HX" -> "SW1A", "W6"): the inward code (the
    last 3 characters) narrows a district of thousands of households to a few addresses. Written with
    a space, the part before it (which is also the area part of most other countries' postcodes)."""
    parts = postcode.upper().split()
    return (parts[0] if len(parts) > 1 else "".join(parts)[:-3]) or None


def _drop(value: Any, ctx: _Context) -> None:
    return None


def _year(value: Any, ctx: _Context) -> Any:
    return value[:4] if isinstance(value, str) else value


def _unless_organisational(rule: Rule) -> Rule:
    return lambda value, ctx: value if ctx.rtype in ORGANISATIONAL else rule(value, ctx)


def _address(address: dict[str, Any], ctx: _Context) -> dict[str, Any]:
    """A person's address down to town and postcode district: enough to plan services by area."""
    postcode = address.get("postalCode")
    district = postcode_district(postcode) if isinstance(postcode, str) else None
    return {k: district if k == "postalCode" else v for k, v in address.items()
            if k in ADDRESS_KEPT or k == "postalCode" and district}


def _identifier(identifier: dict[str, Any], ctx: _Context) -> dict[str, Any]:
    """The kind of identifier (system, type, use) stays, so an analyst can count patients with an NHS number."""
    if not isinstance(value := identifier.get("value"), str):
        return identifier
    return {**identifier, "value": ctx.pseudo.identifier(identifier.get("system"), value)}


def _reference(reference: dict[str, Any], ctx: _Context) -> dict[str, Any]:
    """A literal reference points at the target's pseudonym (relative: the base URL names the source
    system); a local `#` one stays. Others go: a `urn:uuid:` means nothing once the Bundle is gone, a
    conditional one (`Patient?identifier=...`) holds an identifier. `display` is a person's name.
    One with nothing left says its target was masked, which keeps a required reference valid."""
    out = {k: v for k, v in reference.items() if k not in ("reference", "display")}
    target = reference.get("reference")
    if isinstance(target, str) and target.startswith("#"):
        out["reference"] = target
    elif isinstance(target, str) and (m := LITERAL_REFERENCE.fullmatch(target)) and m[1] in R4_TYPES:
        out["reference"] = f"{m[1]}/{ctx.pseudo.id(m[1], m[2])}{m[3] or ''}"
    return out or {"extension": [dict(MASKED)]}


def _extension(extension: dict[str, Any], ctx: _Context) -> dict[str, Any] | None:
    """Free-text extensions go (mother's maiden name, notes); coded ones stay. So does one left with
    neither a value nor sub-extensions (its value was a name or a phone number): FHIR needs one of them."""
    if any(k in extension for k in FREE_TEXT_VALUES):
        return None
    return extension if "extension" in extension or any(k.startswith("value") for k in extension) else None


def _meta(meta: dict[str, Any], ctx: _Context) -> dict[str, Any]:
    return {k: v for k, v in meta.items() if k in META_KEPT}


RULES: dict[str, Rule] = {
    "Narrative": _drop,  # the resource's human-readable summary repeats the name, address, ...
    "HumanName": _drop,  # people's names only: Organization.name and Location.name are strings
    "Annotation": _drop,  # notes are free text
    "*.comment": _drop,
    "*.photo": _drop,
    "ContactPoint": _unless_organisational(_drop),
    "Address": _unless_organisational(_address),
    "Identifier": _identifier,
    "Reference": _reference,
    "Extension": _extension,  # and modifierExtension
    "Meta": _meta,
    "Patient.contact": _drop,  # next of kin: other people's details
    "*.birthDate": _year,  # Patient, Practitioner, RelatedPerson, Person
    "*._birthDate": _drop,  # the patient-birthTime extension holds the exact time of birth
    "Patient.deceasedDateTime": _year,
    "Patient._deceasedDateTime": _drop,
    "Bundle.entry.fullUrl": _drop,  # holds the real id; each entry's resource has the pseudonymous one
}


def deidentify(resource: dict[str, Any], pseudo: Pseudonymiser) -> dict[str, Any]:
    """A new dict; the input is not modified."""
    return _resource(resource, _Context(pseudo, resource["resourceType"]), top=True)


def _resource(resource: dict[str, Any], ctx: _Context, top: bool) -> dict[str, Any]:
    """A resource with its own identity (`top`) gets a pseudonymous id and the PSEUDED label; a
    contained one keeps its id, which only the `#id` references of its container use."""
    rtype = resource["resourceType"]
    out = _fields(resource, model_class(rtype), rtype, _Context(ctx.pseudo, rtype))
    if top:
        if isinstance(rid := resource.get("id"), str):
            out["id"] = ctx.pseudo.id(rtype, rid)
        security = out.setdefault("meta", {}).setdefault("security", [])
        if not any(c.get("system") == PSEUDED["system"] and c.get("code") == PSEUDED["code"] for c in security):
            security.append(dict(PSEUDED))
    return out


def _fields(node: dict[str, Any], cls: type | None, path: str, ctx: _Context) -> dict[str, Any]:
    types = _element_types(cls) if cls is not None else {}
    out = {}
    for key, value in node.items():
        where, child = f"{path}.{key}", types.get(key)
        rule = RULES.get(where) or RULES.get(f"*.{key}") or (RULES.get(child.__name__) if child else None)
        if rule is not _drop and (new := _element(value, child, where, rule, ctx)) is not None:
            out[key] = new
    return out


def _element(value: Any, cls: type | None, path: str, rule: Rule | None, ctx: _Context) -> Any:
    """The new value of an element (the rule applies to each item of a list), None if nothing is left."""
    if isinstance(value, list):
        items = [None if v is None else _element(v, cls, path, rule, ctx) for v in value]
        if not path.rsplit(".", 1)[-1].startswith("_"):  # `_given` & co. stay aligned with `given`
            items = [new for old, new in zip(value, items) if old is None or new is not None]
        return items if any(v is not None for v in items) else None
    if isinstance(value, dict):
        if "resourceType" in value and cls in (None, RESOURCE):  # ExampleScenario.instance has one too
            value = _resource(value, ctx, top=not path.endswith(".contained"))
        else:
            value = _fields(value, cls, path, ctx)
    if rule is not None:
        value = rule(value, ctx)
    return None if value is None or value == {} else value


@functools.cache
def _element_types(cls: type) -> dict[str, type | None]:
    """JSON name -> model class of each element of a resource, data type or backbone element (None for
    primitives). The R4B models match R4 for the types carebroker stores (conformance/r4b_vs_r4.md)."""
    return {info.alias or name: _model_of(info.annotation) for name, info in cls.model_fields.items()}


def _model_of(annotation: Any) -> type | None:
    if isinstance(annotation, type) and issubclass(annotation, FhirBase):
        return annotation.get_model_klass()
    return next((m for arg in typing.get_args(annotation) if (m := _model_of(arg)) is not None), None)


# -- what an analyst may search by ---------------------------------------------------------------

# Token parameters over an Identifier or a ContactPoint (every R4 one, found by resolving the token
# parameters' expressions against the models), and the logical id: each finds one person.
IDENTIFYING_TOKENS = frozenset({
    "_id", "identifier", "telecom", "phone", "email", "accession", "requisition", "group-identifier",
    "container-id", "container-identifier", "related-id", "request", "contact",
})
IDENTIFYING_DATES = frozenset({"birthdate", "death-date"})
# Modifiers that keep a search about groups. Not `:text` (the free text of a code), `:identifier`,
# `:of-type`, nor a chain's target type (`subject:Patient.name`).
GROUP_MODIFIERS = frozenset({"", "missing", "not", "in", "not-in", "below", "above"})
RESULT_PARAMETERS = frozenset({"_count", "_total", "_summary", "_elements", "_format", "_pretty", "_cursor", "_type"})


def _may_filter(params: dict[str, SearchParameter], name: str) -> bool:
    """Token, quantity, number and date parameters select groups (a code, a range), not a person.
    String parameters match names and addresses, reference parameters name real ids, chains hang off
    references; `_has`, `_include`, `_text`, `_filter`, ... are not in the registry: all refused."""
    code, _, modifier = name.partition(":")
    param = params.get(code)
    if param is None or modifier not in GROUP_MODIFIERS:
        return False
    return (param.type in ("quantity", "number") or param.type == "token" and code not in IDENTIFYING_TOKENS
            or param.type == "date" and code not in IDENTIFYING_DATES)


def check_analyst_search(rtype: str, params: list[tuple[str, str]]) -> None:
    """Raise FhirError 403 naming the first parameter an analyst may not search by: one that could
    single a person out, which the de-identified results would then tie to their pseudonym."""
    known = for_type(rtype)
    for name, value in params:
        if name == "_sort":
            allowed = all(_may_filter(known, key.strip().lstrip("-")) for key in value.split(","))
        else:
            allowed = name in RESULT_PARAMETERS or _may_filter(known, name)
        if not allowed:
            shown = f"_sort={value}" if name == "_sort" else name
            raise error(403, "forbidden", f"Users with the role 'analyst' may not search {rtype} by '{shown}': "
                        "only by codes, quantities and dates that cannot single a person out")

"""Validation of incoming resources against FHIR R4.

Three layers:
1. Structure, by the fhir.resources R4B models (unknown elements, wrong types, bad dates, cardinality).
   See r4b_vs_r4.md for where R4B and R4 differ for the types carebroker serves.
2. Required value-set bindings from the official R4 package (`data/required-code-bindings.json`),
   which the models do not enforce (they accept `gender: "bogus"`).
3. Profile rules (profiles.py), such as the NHS number check digit.

Structural failures are 400 (the content is not FHIR); binding and profile-rule failures are 422
(FHIR, but breaks the rules); every issue found is reported, not only the first. Every issue names
the element as a FHIRPath expression, e.g. `Patient.contact[0].gender`.
"""
from __future__ import annotations

import functools
import json
import re
from importlib import resources as pkg_resources
from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from fhir_core.fhirabstractmodel import FHIRAbstractModel
from pydantic import ValidationError

from conformance.profiles import profile_issues
from fhir_server.outcome import FhirError, Issue

DATA = pkg_resources.files("conformance") / "data"


@functools.cache
def r4_resource_types() -> tuple[str, ...]:
    """Every concrete resource type of FHIR R4 4.0.1 (from the official StructureDefinitions)."""
    return tuple(json.loads((DATA / "r4-resource-types.json").read_text()))


# R4B redesigned these: their R4 shape fails the R4B model, so carebroker cannot vouch for them.
R4B_REDESIGNED = frozenset({"Evidence", "EvidenceVariable"})
# Extension values that exist only in R4B.
R4B_ONLY_EXTENSION_VALUES = frozenset({"valueCodeableReference", "valueRatioRange"})
UUID_PATTERN = re.compile(r"urn:uuid:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@functools.cache
def supported_resource_types() -> tuple[str, ...]:
    """R4 types carebroker can validate: those with an R4B model that matches R4 (see r4b_vs_r4.md)."""
    return tuple(t for t in r4_resource_types() if model_class(t) is not None)


@functools.cache
def model_class(resource_type: str) -> type[FHIRAbstractModel] | None:
    if resource_type not in _R4_TYPES or resource_type in R4B_REDESIGNED:
        return None
    try:
        return get_fhir_model_class(resource_type)
    except (KeyError, ValueError, ImportError):
        return None


_R4_TYPES = frozenset(r4_resource_types())


@functools.cache
def required_bindings() -> dict[str, frozenset[str]]:
    """Element path (e.g. `Patient.gender`, `Address.use`) -> the codes its required binding allows."""
    data = json.loads((DATA / "required-code-bindings.json").read_text())
    return {path: frozenset(b["codes"]) for path, b in data["bindings"].items()}


def validate_resource(resource: dict[str, Any], structure: bool = True) -> None:
    """Check `resource` (parsed JSON with a known resourceType); raise FhirError listing every problem.
    `structure=False` applies only the profile rules, which are cheap (the bulk loader's fast path)."""
    status, issues = resource_issues(resource) if structure else (422, profile_issues(resource))
    if issues:
        raise FhirError(status, issues)


def resource_issues(resource: dict[str, Any]) -> tuple[int, list[Issue]]:
    """Every problem with `resource`, and the status a write would answer: 400 if it is not valid
    FHIR, 422 if it is but breaks a binding or profile rule (no issues: valid). The R4 structure
    must hold before bindings can be checked; profile rules are checked either way."""
    resource_type = resource["resourceType"]
    cls = model_class(resource_type)
    if cls is None:
        return 404, [Issue("not-supported", f"Resource type '{resource_type}' is not supported")]
    structure: list[Issue] = []
    for_model = _r4_only_parts(resource, resource_type, structure)
    rules: list[Issue] = []
    if not structure:
        try:
            rules.extend(_binding_issues(cls.model_validate(for_model), resource_type))
        except ValidationError as exc:
            structure.extend(_structure_issue(resource_type, err) for err in exc.errors())
    rules.extend(profile_issues(resource))
    return (400 if structure else 422), structure + rules


def _r4_only_parts(node: Any, path: str, issues: list[Issue], nested: bool = False) -> Any:
    """Check what R4 allows but the R4B model gets wrong, and return the node without the R4-only
    parts the model would refuse (the stored JSON keeps them):

    - nested resources (contained, Bundle entries) must be R4 types carebroker supports;
    - extensions may carry `valueMeta` and `_value<primitive>` (R4) but not R4B-only value types;
    - `uuid` values must be lower-case `urn:uuid:` (the model rewrites sloppy ones silently).
    """
    if isinstance(node, list):
        out = [_r4_only_parts(item, f"{path}[{i}]", issues, nested) for i, item in enumerate(node)]
        return out if any(a is not b for a, b in zip(out, node)) else node
    if not isinstance(node, dict):
        return node
    if nested and "resourceType" in node and model_class(str(node["resourceType"])) is None:
        issues.append(Issue("not-supported", f"{path}: resource type {node['resourceType']!r} is not a supported "
                            "R4 resource type", expression=path))
        return node
    changed: dict[str, Any] = {}
    for key, value in node.items():
        where = f"{path}.{key}"
        if key == "valueUuid":
            if not (isinstance(value, str) and UUID_PATTERN.fullmatch(value)):
                issues.append(Issue("value", f"{where}: {value!r} is not an R4 uuid (urn:uuid: + lower-case UUID)",
                                    expression=where))
            # checked here; the model would demand a version-4 UUID, which R4 does not
            changed[key] = _DROP
            changed["valueUri"] = value
            continue
        if key in ("extension", "modifierExtension") and isinstance(value, list):
            stripped = [_extension_for_model(ext, f"{where}[{i}]", issues) for i, ext in enumerate(value)]
            value = stripped if any(a is not b for a, b in zip(stripped, node[key])) else node[key]
        new = _r4_only_parts(value, where, issues, nested or key in ("contained", "resource", "outcome"))
        if new is not node[key]:
            changed[key] = new
    if not changed:
        return node
    merged = {**node, **changed}
    return {k: v for k, v in merged.items() if v is not _DROP}


_DROP = object()


def _extension_for_model(ext: Any, path: str, issues: list[Issue]) -> Any:
    """One extension without its R4-only parts, each checked here instead of by the model."""
    if not isinstance(ext, dict):
        return ext
    for key in R4B_ONLY_EXTENSION_VALUES & ext.keys():
        issues.append(Issue("structure", f"{path}.{key}: not an R4 element", expression=f"{path}.{key}"))
    r4_only = [k for k in ext if k == "valueMeta" or k.startswith("_value")]
    for key in r4_only:
        kind = "Meta" if key == "valueMeta" else "Element"
        try:
            get_fhir_model_class(kind).model_validate(ext[key])
        except (ValidationError, TypeError) as exc:
            issues.append(Issue("structure", f"{path}.{key}: not a valid {kind}: {exc}", expression=f"{path}.{key}"))
    return {k: v for k, v in ext.items() if k not in r4_only} if r4_only else ext


def _structure_issue(resource_type: str, err: Any) -> Issue:
    path = resource_type
    for part in err["loc"]:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part not in ("__root__",) and not str(part).startswith(("function-", "json-or-python")):
            path += f".{part}"
    msg = str(err["msg"]).removeprefix("Value error, ")
    code = "structure" if err["type"] in ("extra_forbidden", "list_type", "model_type", "dict_type") else (
        "required" if err["type"] == "missing" else "value")
    return Issue(code, f"{path}: {msg}", expression=path)


# -- required bindings ---------------------------------------------------------------------------

_type_paths: dict[type, str] = {}  # model class -> its element path in the binding table


def _class_path(obj: FHIRAbstractModel, path_here: str) -> str:
    """Binding-table prefix for a model object: resources and data types by their own name; their
    nested elements (PatientContact, TimingRepeat) by the path where they are first met, so that a
    recursive `Consent.provision.provision` maps back to `Consent.provision`.

    fhir.resources defines each type in a module of its own name, with its nested elements beside it.
    """
    cls = type(obj)
    found = _type_paths.get(cls)
    if found is None:
        is_type = cls.__module__.rsplit(".", 1)[-1] == cls.__name__.lower()
        found = cls.__name__ if is_type else path_here
        _type_paths[cls] = found
    return found


@functools.cache
def _coded_fields(cls: type, type_path: str) -> tuple[tuple[str, str, frozenset[str] | None], ...]:
    """(attribute, JSON name, allowed codes or None) for every element of the class."""
    bindings = required_bindings()
    out = []
    for attr, info in cls.model_fields.items():
        extra = info.json_schema_extra
        if not (isinstance(extra, dict) and extra.get("element_property")):
            continue
        alias = info.alias or attr
        out.append((attr, alias, bindings.get(f"{type_path}.{alias}")))
    return tuple(out)


def _binding_issues(obj: FHIRAbstractModel, expression: str, type_path: str | None = None):
    """Walk the validated model and yield an Issue for every code outside its required binding."""
    type_path = type_path or _class_path(obj, expression)
    for attr, alias, allowed in _coded_fields(type(obj), type_path):
        value = getattr(obj, attr, None)
        if value is None:
            continue
        items = value if isinstance(value, list) else [value]
        for index, item in enumerate(items):
            where = f"{expression}.{alias}" + (f"[{index}]" if isinstance(value, list) else "")
            if isinstance(item, FHIRAbstractModel):
                yield from _binding_issues(item, where, _class_path(item, f"{type_path}.{alias}"))
            elif allowed is not None and isinstance(item, str) and item not in allowed:
                yield Issue("code-invalid",
                            f"{where}: '{item}' is not in the required value set for {type_path}.{alias}",
                            expression=where)

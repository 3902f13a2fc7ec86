"""The SearchParameter registry: the official R4 definitions, as data.

`data/search-parameters.json` holds the 1,388 R4 SearchParameters that have a base and are not
`special` (from hl7.fhir.r4.examples 4.0.1). Adding a parameter is adding an entry there. A
parameter shared by several types (`clinical-patient`) carries one expression with a union part per
type; `for_type` gives each type only its own part.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from importlib import resources as pkg_resources
from typing import Any

DATA = pkg_resources.files("conformance") / "data"

# Types whose parameters apply to every resource type.
ABSTRACT_BASES = ("Resource", "DomainResource")


@dataclass(frozen=True)
class SearchParameter:
    """One search parameter as it applies to one resource type."""

    code: str
    type: str  # number | date | string | token | reference | composite | quantity | uri
    base: str  # the resource type (or Resource) it is defined on
    expression: str | None  # FHIRPath for this type only
    targets: tuple[str, ...] = ()
    modifiers: tuple[str, ...] = ()
    comparators: tuple[str, ...] = ()
    url: str = ""
    components: tuple[tuple[str, str], ...] = ()  # (definition url, expression) for composites


def split_top_level(expression: str, sep: str) -> list[str]:
    """Parts of a FHIRPath expression between top-level `sep` characters (not inside parentheses
    or string literals), stripped; empty parts dropped."""
    parts, depth, quoted, cur = [], 0, False, []
    for ch in expression:
        if ch == "'":
            quoted = not quoted
        elif not quoted and ch == "(":
            depth += 1
        elif not quoted and ch == ")":
            depth -= 1
        if ch == sep and depth == 0 and not quoted:
            parts.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur).strip())
    return [p for p in parts if p]


def split_union(expression: str) -> list[str]:
    """Top-level `|` parts of a FHIRPath expression."""
    return split_top_level(expression, "|")


def _root(part: str) -> str:
    return part.lstrip("(").split(".", 1)[0].split(" ", 1)[0]


def expression_for(expression: str | None, rtype: str) -> str | None:
    """The union parts of `expression` that start at `rtype` (or at Resource/DomainResource)."""
    if not expression:
        return None
    mine = [p for p in split_union(expression) if _root(p) in (rtype, *ABSTRACT_BASES)]
    return " | ".join(mine) or None


@functools.cache
def _definitions() -> tuple[dict[str, Any], ...]:
    return tuple(json.loads((DATA / "search-parameters.json").read_text())["searchParameters"])


@functools.cache
def for_type(rtype: str) -> dict[str, SearchParameter]:
    """code -> SearchParameter for `rtype`, including the parameters common to all resources."""
    out: dict[str, SearchParameter] = {}
    for d in _definitions():
        bases = d["base"]
        if rtype in bases:
            base = rtype
        elif any(b in bases for b in ABSTRACT_BASES):
            base = "Resource"
        else:
            continue
        expr = expression_for(d.get("expression"), rtype)
        if expr is None and d["code"] not in ("_id", "_lastUpdated"):
            continue  # a multi-base parameter whose expression has no part for this type
        targets = tuple(d.get("target", ())) if d["type"] == "reference" else ()
        components = tuple((c["definition"], c["expression"]) for c in d.get("component", ()))
        param = SearchParameter(d["code"], d["type"], base, expr, targets, tuple(d.get("modifier", ())),
                                tuple(d.get("comparator", ())), d["url"], components)
        # a type's own definition wins over a common one of the same code
        if d["code"] not in out or base != "Resource":
            out[d["code"]] = param
    return out


@functools.cache
def by_url() -> dict[str, dict[str, Any]]:
    return {d["url"]: d for d in _definitions()}


@functools.cache
def patient_compartment() -> dict[str, tuple[str, ...]]:
    """Resource type -> the parameters that put a resource in a Patient's compartment (official R4)."""
    data = json.loads((DATA / "CompartmentDefinition-patient.json").read_text())
    return {r["code"]: tuple(r["param"]) for r in data["resource"] if r.get("param")}

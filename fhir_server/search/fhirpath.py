"""Search-parameter expressions compiled to fast extractors over resource JSON.

Nearly every R4 search expression is a path with a few filters: `Patient.name`,
`(Observation.value as Quantity)`, `CarePlan.subject.where(resolve() is Patient)`,
`Patient.telecom.where(system='email')`, `Patient.extension('url')`. Those are compiled here to
plain Python steps (they run for every parameter of every write). Anything else is evaluated by
fhirpathpy, a full FHIRPath engine, so no official expression is left unindexed.
"""
from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable
from typing import Any

import fhirpathpy
from fhirpathpy.models import models as fhirpath_models

from conformance.search_parameters import split_top_level, split_union

log = logging.getLogger("carebroker.search")

Extractor = Callable[[dict[str, Any]], list[Any]]
Step = Callable[[list[Any]], list[Any]]

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_AS = re.compile(r"^\((.+) as ([A-Za-z]+)\)(\..+)?$")
_WHERE_RESOLVE = re.compile(r"where\(resolve\(\) is ([A-Za-z]+)\)")
_WHERE_EQ = re.compile(r"where\(([A-Za-z]+)\s*=\s*'([^']*)'\)")
_TYPE_FN = re.compile(r"(?:as|ofType)\(([A-Za-z]+)\)")
_EXTENSION = re.compile(r"extension\('([^']*)'\)")
_WHERE_HAS_EXTENSION = re.compile(r"where\(hasExtension\('([^']*)'\)\)")
_INDEX = re.compile(r"([A-Za-z][A-Za-z0-9_]*)\[(\d+)\]")


class Unsupported(Exception):
    """The expression is outside the fast subset: evaluate it with fhirpathpy."""


def _child(name: str) -> Step:
    """`.name`, including a choice element (`value` finds valueQuantity, valueString, ...)."""
    def step(nodes: list[Any]) -> list[Any]:
        out: list[Any] = []
        for node in nodes:
            if not isinstance(node, dict):
                continue
            if name in node:
                out.append(node[name])
                continue
            for key, value in node.items():  # choice type: name + TypeName
                if key.startswith(name) and len(key) > len(name) and key[len(name)].isupper():
                    out.append(_Typed(key[len(name):], value))
        return _flatten_typed(out)
    return step


class _Typed:
    """A choice-type value that remembers its type, so `as Quantity` can pick it."""

    __slots__ = ("type", "value")

    def __init__(self, type_: str, value: Any) -> None:
        self.type, self.value = type_, value


def _flatten_typed(values: list[Any]) -> list[Any]:
    out: list[Any] = []
    for v in values:
        if isinstance(v, _Typed) and isinstance(v.value, list):
            out.extend(_Typed(v.type, item) for item in v.value)
        elif isinstance(v, list):
            out.extend(v)
        elif v is not None:
            out.append(v)
    return out


def _only_type(type_name: str) -> Step:
    wanted = type_name[0].upper() + type_name[1:]

    def step(nodes: list[Any]) -> list[Any]:
        return [n.value for n in nodes if isinstance(n, _Typed) and n.type == wanted]
    return step


def _untyped(nodes: list[Any]) -> list[Any]:
    return [n.value if isinstance(n, _Typed) else n for n in nodes]


def _where_resolve(type_name: str) -> Step:
    def step(nodes: list[Any]) -> list[Any]:
        out = []
        for n in _untyped(nodes):
            ref = n.get("reference") if isinstance(n, dict) else None
            if isinstance(ref, str) and reference_type(ref) == type_name:
                out.append(n)
        return out
    return step


def _where_eq(field: str, value: str) -> Step:
    def step(nodes: list[Any]) -> list[Any]:
        return [n for n in _untyped(nodes) if isinstance(n, dict) and n.get(field) == value]
    return step


def _extension(url: str) -> Step:
    def step(nodes: list[Any]) -> list[Any]:
        out = []
        for n in _untyped(nodes):
            for ext in (n.get("extension") or []) if isinstance(n, dict) else []:
                if isinstance(ext, dict) and ext.get("url") == url:
                    out.append(ext)
        return out
    return step


def _where_has_extension(url: str) -> Step:
    has = _extension(url)

    def step(nodes: list[Any]) -> list[Any]:
        return [n for n in _untyped(nodes) if has([n])]
    return step


def _index(name: str, i: int) -> Step:
    child = _child(name)

    def step(nodes: list[Any]) -> list[Any]:
        values = child(nodes)
        return values[i:i + 1]
    return step


def reference_type(ref: str) -> str | None:
    """The resource type a literal reference points at (`Patient/1`, `http://x/fhir/Patient/1/_history/2`)."""
    parts = ref.split("/")
    if "_history" in parts:
        parts = parts[:parts.index("_history")]
    return parts[-2] if len(parts) >= 2 and parts[-2][:1].isupper() else None


def _compile_part(part: str) -> Extractor:
    part = part.strip()
    steps: list[Step] = []
    m = _AS.match(part)
    if m:
        inner, type_name, rest = m.group(1), m.group(2), m.group(3)
        steps.extend(_path_steps(inner))
        steps.append(_only_type(type_name))
        if rest:
            steps.extend(_path_steps("X" + rest))  # "X" stands in for the root, which is dropped
    else:
        steps.extend(_path_steps(part))

    def run(resource: dict[str, Any]) -> list[Any]:
        nodes: list[Any] = [resource]
        for step in steps:
            nodes = step(nodes)
            if not nodes:
                return []
        return _untyped(nodes)
    return run


def _path_steps(path: str) -> list[Step]:
    """Steps after the root type name (`Patient.name.given` -> [name, given])."""
    tokens = split_top_level(path, ".")
    if not _NAME.fullmatch(tokens[0]):
        raise Unsupported(path)
    steps: list[Step] = []
    for tok in tokens[1:]:
        if _NAME.fullmatch(tok):
            steps.append(_child(tok))
        elif m := _WHERE_RESOLVE.fullmatch(tok):
            steps.append(_where_resolve(m.group(1)))
        elif m := _WHERE_EQ.fullmatch(tok):
            steps.append(_where_eq(m.group(1), m.group(2)))
        elif m := _TYPE_FN.fullmatch(tok):
            steps.append(_only_type(m.group(1)))
        elif m := _EXTENSION.fullmatch(tok):
            steps.append(_extension(m.group(1)))
        elif m := _WHERE_HAS_EXTENSION.fullmatch(tok):
            steps.append(_where_has_extension(m.group(1)))
        elif m := _INDEX.fullmatch(tok):
            steps.append(_index(m.group(1), int(m.group(2))))
        else:
            raise Unsupported(path)
    return steps


def _fhirpathpy(expression: str) -> Extractor:
    compiled = fhirpathpy.compile(expression, fhirpath_models["r4"])

    def run(resource: dict[str, Any]) -> list[Any]:
        try:
            return _flatten_typed(list(compiled(resource)))
        except Exception:  # an engine gap must not fail a write; the value is just not indexed
            log.warning("FHIRPath engine could not evaluate %r", expression, exc_info=True)
            return []
    return run


@functools.cache
def compile_expression(expression: str) -> Extractor:
    """An extractor for a search-parameter expression: resource JSON -> the values it selects."""
    try:
        parts = [_compile_part(p) for p in split_union(expression)]
    except Unsupported:
        return _fhirpathpy(expression)

    def run(resource: dict[str, Any]) -> list[Any]:
        out: list[Any] = []
        for p in parts:
            out.extend(p(resource))
        return out
    return run

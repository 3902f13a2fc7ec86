"""Reference rewriting: one walk over a resource serves both transaction `urn:uuid:` placeholders and
conditional references (`Patient?identifier=...`).

A Reference's `reference` is the only string-valued element named `reference` in R4, so the walk
finds them without knowing each type's structure.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

# `Type?criteria`: a conditional reference, resolved by a search when the resource is written.
CONDITIONAL_REFERENCE = re.compile(r"[A-Z][A-Za-z]+\?.+", re.DOTALL)


def references(node: Any) -> list[str]:
    """Every Reference.reference string in `node`, in document order."""
    found: list[str] = []

    def collect(ref: str) -> str:
        found.append(ref)
        return ref

    rewrite_references(node, collect)
    return found


def rewrite_references(node: Any, replace: Callable[[str], str]) -> Any:
    """A copy of `node` with each Reference.reference `r` replaced by `replace(r)`; parts without
    a change are shared, not copied."""
    if isinstance(node, dict):
        out = None
        for key, value in node.items():
            new = replace(value) if key == "reference" and isinstance(value, str) else \
                rewrite_references(value, replace) if isinstance(value, (dict, list)) else value
            if new is not value:
                if out is None:
                    out = dict(node)
                out[key] = new
        return node if out is None else out
    if isinstance(node, list):
        items = [rewrite_references(v, replace) if isinstance(v, (dict, list)) else v for v in node]
        return node if all(a is b for a, b in zip(items, node)) else items
    return node


def has_conditional_references(resource: dict[str, Any]) -> bool:
    return any(CONDITIONAL_REFERENCE.fullmatch(ref) for ref in references(resource))

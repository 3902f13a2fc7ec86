"""FHIR JSON in and out, keeping decimals exactly as written.

FHIR decimals carry their precision in their digits (`1.00` is not `1.0`), so resource content is
parsed with `Decimal` and written back digit for digit. Everything else uses orjson directly.
"""
from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import orjson


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def loads(data: bytes | str) -> Any:
    """Parse JSON; numbers with a fraction or exponent become Decimal. Raises ValueError."""
    return json.loads(data, parse_float=Decimal, parse_constant=_no_constants)


def _decimal(value: Any) -> orjson.Fragment:
    if isinstance(value, Decimal):
        return orjson.Fragment(str(value))
    raise TypeError(f"{type(value).__name__} is not JSON")


def dumps(value: Any) -> bytes:
    """Compact JSON; Decimals written with the digits they were read with."""
    return orjson.dumps(value, default=_decimal)

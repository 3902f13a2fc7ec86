"""NHS number rules (NHS Digital / NHS Data Dictionary "NHS NUMBER").

An NHS number is 10 digits; the 10th is a Modulus 11 check digit over the first nine. Checking it
catches most typing and transposition errors before a record is matched to the wrong person.
"""
from __future__ import annotations

NHS_NUMBER_SYSTEM = "https://fhir.nhs.uk/Id/nhs-number"

_WEIGHTS = (10, 9, 8, 7, 6, 5, 4, 3, 2)


def _ascii_digits(value: str, length: int) -> bool:
    # str.isdigit() alone accepts non-ASCII digits such as "²" or Arabic-Indic numerals.
    return isinstance(value, str) and len(value) == length and value.isascii() and value.isdigit()


def nhs_check_digit(first_nine: str) -> int | None:
    """Check digit for the first nine digits, or None when no valid NHS number can start with them.

    None covers both malformed input (not exactly nine ASCII digits) and the case where the
    Modulus 11 remainder gives 10, which NHS Digital never issues.
    """
    if not _ascii_digits(first_nine, 9):
        return None
    total = sum(int(digit) * weight for digit, weight in zip(first_nine, _WEIGHTS))
    check = 11 - total % 11
    if check == 11:
        return 0
    if check == 10:
        return None
    return check


def nhs_number_problem(value: str) -> str | None:
    """What is wrong with `value` as an NHS number, in words for an OperationOutcome; None if valid.

    Spaces and dashes ("943 476 5919") are rejected: callers normalise display forms first, so a
    stored identifier always has one canonical spelling. The value itself is never echoed: it is a
    personal identifier, and error messages end up in logs.
    """
    if not (value.isascii() and value.isdigit()):
        return "an NHS number is 10 digits 0-9 with no spaces or other characters"
    if len(value) != 10:
        return f"an NHS number is exactly 10 digits, not {len(value)}"
    check = nhs_check_digit(value[:9])
    if check is None:
        return "no NHS number starts with these nine digits (their Modulus 11 check digit would be 10)"
    if check != int(value[9]):
        return "the check digit (the 10th digit) does not match the first nine (Modulus 11): a mistyped NHS number?"
    return None


def is_valid_nhs_number(value: str) -> bool:
    """True for exactly 10 ASCII digits whose last digit is the Modulus 11 check digit."""
    return isinstance(value, str) and nhs_number_problem(value) is None

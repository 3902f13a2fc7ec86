"""NHS number Modulus 11 rules: a wrong check digit must never match a person's record."""
import pytest

from conformance.nhs_number import NHS_NUMBER_SYSTEM, is_valid_nhs_number, nhs_check_digit


def test_system_uri() -> None:
    assert NHS_NUMBER_SYSTEM == "https://fhir.nhs.uk/Id/nhs-number"


def test_check_digit_of_published_example() -> None:
    # 9*10 + 4*9 + 3*8 + 4*7 + 7*6 + 6*5 + 5*4 + 9*3 + 1*2 = 299; 299 % 11 = 2; 11 - 2 = 9
    assert nhs_check_digit("943476591") == 9


def test_remainder_zero_gives_check_digit_zero() -> None:
    # 9*10 + 9*9 + 9*8 + 0 + 0 + 0 + 0 + 0 + 5*2 = 253 = 23 * 11, so 11 - 0 = 11 -> 0
    assert nhs_check_digit("999000005") == 0
    assert is_valid_nhs_number("9990000050")


def test_check_ten_means_no_valid_number() -> None:
    # weighted sum 276; 276 % 11 = 1; 11 - 1 = 10, which is never issued
    assert nhs_check_digit("943476503") is None
    assert not any(is_valid_nhs_number(f"943476503{d}") for d in range(10))


@pytest.mark.parametrize("first_nine", ["", "94347659", "9434765910", "94347659a", "943 47659",
                                        "９４３４７６５９１"])
def test_check_digit_of_malformed_input_is_none(first_nine: str) -> None:
    assert nhs_check_digit(first_nine) is None


@pytest.mark.parametrize("number", ["9434765919", "9990000050", "4010232137"])
def test_valid_numbers(number: str) -> None:
    assert is_valid_nhs_number(number)


@pytest.mark.parametrize("number", [
    "9434765918",          # wrong check digit
    "9434765910",          # wrong check digit
    "9434765035",          # first nine give check 10
    "943476591",           # 9 digits
    "94347659190",         # 11 digits
    "943 476 5919",        # spaced display form is not accepted here
    "943-476-5919",
    " 9434765919",
    "9434765919\n",
    "943476591X",
    "",
    "９４３４７６５９１９",  # full-width digits are not ASCII
    "٩٤٣٤٧٦٥٩١٩",          # Arabic-Indic digits
])
def test_invalid_numbers(number: str) -> None:
    assert not is_valid_nhs_number(number)

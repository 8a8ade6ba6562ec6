import pytest

from engine.errors import UserError
from engine.select.budget import parse_budget


@pytest.mark.parametrize(
    "spec, total, expected",
    [("30%", 1000, 300), ("100%", 999, 999), ("0.5%", 1000, 5), ("2M", 10**9, 2_000_000), ("500k", 10, 500_000),
     ("1.5B", 1, 1_500_000_000), ("10000", 5, 10000), (" 25 % ", 100, 25)],
)
def test_budgets_resolve_against_the_pool(spec, total, expected):
    assert parse_budget(spec).resolve(total) == expected


@pytest.mark.parametrize(
    "spec, message",
    [("0%", "keeps nothing"), ("0", "keeps nothing"), ("150%", "cannot exceed 100%"), ("abc", "not a budget"),
     ("-5%", "not a budget"), ("30 percent", "not a budget"), ("", "not a budget")],
)
def test_bad_budgets_are_one_line_errors(spec, message):
    with pytest.raises(UserError, match=message):
        parse_budget(spec)

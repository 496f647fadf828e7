"""AUTOMATIC1111's X/Y/Z plot value syntax: lists, ranges, steps and counts."""

from __future__ import annotations

import pytest

from ldm_cli.core.errors import UserError
from ldm_cli.grid import expand_range, parse_values, split_values


@pytest.mark.parametrize(
    ("text", "kind", "expected"),
    [
        # the examples of A1111's wiki (Features, "X/Y/Z plot")
        ("1-5", int, [1, 2, 3, 4, 5]),
        ("1-5 (+2)", int, [1, 3, 5]),
        ("10-5 (-3)", int, [10, 7]),
        ("1-3 (+0.5)", float, [1.0, 1.5, 2.0, 2.5, 3.0]),
        ("1-10 [5]", int, [1, 3, 5, 7, 10]),
        ("0.0-1.0 [6]", float, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]),
        # the forms of the issue
        ("10,20,30", int, [10, 20, 30]),
        ("1-10 (+3)", int, [1, 4, 7, 10]),
        ("1-10 [4]", int, [1, 4, 7, 10]),
        ("1-2 [3]", float, [1.0, 1.5, 2.0]),
        # lists mixing ranges and values, spaces anywhere
        (" 1-3 , 7,10 - 12 ", int, [1, 2, 3, 7, 10, 11, 12]),
        ("5, 7.5, 9", float, [5.0, 7.5, 9.0]),
        ("0-1 (+0.1)", float, [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]),
        ("5-1", int, [5, 4, 3, 2, 1]),  # counts down (A1111 would give nothing)
        ("3-3", int, [3]),
        ("2-8 [1]", int, [2]),
        ("-1", int, [-1]),  # a plain value, not a range (a random seed)
        ("-1, 5", int, [-1, 5]),
        ("+2", int, [2]),
        ("1e-3", float, [0.001]),
    ],
)
def test_values_as_a1111_reads_them(text, kind, expected):
    assert parse_values(text, kind) == expected
    assert all(type(v) is kind for v in parse_values(text, kind))


def test_text_values_are_csv_so_commas_can_be_quoted():
    assert split_values('a cat, "a dog, running" ,b') == ["a cat", "a dog, running", "b"]
    assert parse_values("euler, dpmpp_2m", str) == ["euler", "dpmpp_2m"]


def test_a_plain_value_is_not_a_range():
    assert expand_range("7", whole=True) is None
    assert expand_range("1-4", whole=True) == [1, 2, 3, 4]


def test_convert_checks_each_value():
    assert parse_values("1,2", int, lambda v: v * 10) == [10, 20]


@pytest.mark.parametrize(
    ("text", "kind", "needle"),
    [
        ("", int, "no values"),
        ("ten", int, "'ten' is not a whole number"),
        ("1.5", int, "'1.5' is not a whole number"),
        ("1-5 (+0)", int, "step must not be 0"),
        ("1-5 (-1)", int, "never gets from 1 to 5"),
        ("1-5 [0]", int, "count must be at least 1"),
        ("1-100000", int, "more than 1000 values"),
        ("x", float, "'x' is not a number"),
        ("a,,b", str, "an empty value"),
        ('"a', str, None),  # csv reads an unclosed quote; either way no crash
    ],
)
def test_bad_values_are_one_line_errors(text, kind, needle):
    if needle is None:
        parse_values(text, kind)
        return
    with pytest.raises(UserError, match=needle) as error:
        parse_values(text, kind)
    assert "\n" not in str(error.value)

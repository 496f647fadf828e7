"""The A1111 prompt grammar: cases from A1111's documentation and docstrings, and properties.

The expected values are AUTOMATIC1111's documented behaviour (its wiki's "prompt editing"
example and the examples in the docstrings of its ``prompt_parser``), written down by hand.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ldm_cli.core.errors import UserError
from ldm_cli.text.emphasis import parse_attention
from ldm_cli.text.grammar import parse_prompt, prompt_schedule, split_and, text_at

SCHEDULES_AT_10_STEPS = [
    ("test", [(10, "test")]),
    ("a [b:3]", [(3, "a "), (10, "a b")]),
    ("a [b: 3]", [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", [(10, "a [unbalanced")]),
    ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
    ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", [(s, "a" if s % 2 else "(b:1.1)") for s in range(1, 11)]),
    ("[fe|]male", [(s, "female" if s % 2 else "male") for s in range(1, 11)]),
    ("[fe|||]male", [(s, "female" if s % 4 == 1 else "male") for s in range(1, 11)]),
    # [from::when] removes, [to:when] adds; the step number may be written with spaces
    ("a [b::4] c", [(4, "a b c"), (10, "a  c")]),
    ("[a:b: 2 ]", [(2, "a"), (10, "b")]),
    # a decimal point makes a fraction of the steps, even at 1 or above (A1111 >= 1.6)
    ("[a:b:1]", [(1, "a"), (10, "b")]),
    ("[a:b:1.0]", [(10, "a")]),
    ("a [b:1.5] c", [(10, "a  c")]),
    # a step past the end never switches; 0 or below switches at once
    ("[a:b:15]", [(10, "a")]),
    ("[a:b:0]", [(10, "b")]),
    ("[a:b:-1]", [(10, "b")]),
    # brackets that form no group are literal at the top level; escapes stay for emphasis
    ("[a:b]", [(10, "[a:b]")]),
    ("[a:b:c:1]", [(10, "[a:b:c:1]")]),
    (r"\[a:b:2\]", [(10, r"\[a:b:2\]")]),
    ("[a:b:2](", [(2, "a("), (10, "b(")]),
    # a "|" outside [...] (or a trailing backslash) leaves the whole prompt verbatim
    ("a [{b|d{:.5] c", [(10, "a [{b|d{:.5] c")]),
    ("a | b [c:2]", [(10, "a | b [c:2]")]),
    ("{a|b} [c:2]", [(10, "{a|b} [c:2]")]),
    ("[a|b:0.5]", [(10, "[a|b:0.5]")]),
    ("[c:2] x\\", [(10, "[c:2] x\\")]),
    # ...but a ":" inside parentheses is fine in an alternation
    ("[a|(b:0.5)]", [(s, "a" if s % 2 else "(b:0.5)") for s in range(1, 11)]),
    ("[[a|b]:c:3]", [(1, "a"), (2, "b"), (3, "a"), *[(s, "c") for s in range(4, 11)]]),
]


@pytest.mark.parametrize(("prompt", "expected"), SCHEDULES_AT_10_STEPS)
def test_schedule_cases(prompt, expected):
    assert prompt_schedule(prompt, 10) == expected


def test_a1111_wiki_prompt_editing_example():
    prompt = (
        "fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75]"
        "[ in foreground::0.6][ in background:0.25] [shoddy:masterful:0.5]"
    )
    assert prompt_schedule(prompt, 100) == [
        (25, "fantasy landscape with a mountain and an oak in foreground shoddy"),
        (50, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
        (60, "fantasy landscape with a lake and an oak in foreground in background masterful"),
        (75, "fantasy landscape with a lake and an oak in background masterful"),
        (100, "fantasy landscape with a lake and a christmas tree in background masterful"),
    ]


def test_old_scheduling_reads_below_one_as_fraction_and_the_rest_as_steps():
    assert prompt_schedule("a [b:1.5] c", 10, old_scheduling=True) == [(1, "a  c"), (10, "a b c")]
    assert prompt_schedule("[a:b:1.0]", 10, old_scheduling=True) == [(1, "a"), (10, "b")]
    assert prompt_schedule("[a:b:0.3]", 10, old_scheduling=True) == [(3, "a"), (10, "b")]


def test_schedule_lookup_is_a1111s_first_entry_ending_at_or_after_the_step():
    # sampler steps count from 0, entries from 1: "[b:3]" adds b from step 4 on
    schedule = prompt_schedule("a [b:3]", 10)
    assert [text_at(schedule, step) for step in range(6)] == ["a "] * 4 + ["a b"] * 2
    alternation = prompt_schedule("[cat|dog]", 4)
    assert [text_at(alternation, step) for step in range(4)] == ["cat", "cat", "dog", "cat"]


ATTENTION_CASES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("a (b:1.5) c", [("a ", 1.0), ("b", 1.5), (" c", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    (r"\(literal\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
    ("[de-emphasized]", [("de-emphasized", 1 / 1.1)]),
    ("((a:1.2):1.5)", [("a", 1.2 * 1.5)]),
    ("(a: 1.3 )", [("a", 1.3)]),
    ("a:1.5) b]", [("a:1.5) b]", 1.0)]),
    ("(a:b)", [("a:b", 1.1)]),
    (r"\\ \: \x", [("\\ : x", 1.0)]),
    ("", [("", 1.0)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("BREAKING news", [("BREAKING news", 1.0)]),
    # inside brackets BREAK is weighted like any text, so it no longer splits (as in A1111)
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),
]


@pytest.mark.parametrize(("text", "expected"), ATTENTION_CASES)
def test_attention_cases(text, expected):
    assert parse_attention(text) == expected


@pytest.mark.parametrize("text", ["(a:1.2.3)", "(a:.)", "(a:" + "9" * 400 + ")"])
def test_unreadable_emphasis_weight_is_a_user_error(text):
    with pytest.raises(UserError, match="emphasis weight"):
        parse_attention(text)


AND_CASES = [
    ("a cat", [("a cat", 1.0)]),
    ("a cat AND a dog:0.5", [("a cat", 1.0), (" a dog", 0.5)]),
    ("a cat:1.5 ", [("a cat", 1.5)]),
    ("a AND b AND c : -0.25", [("a", 1.0), (" b", 1.0), (" c", -0.25)]),
    ("ANDROID AND", [("ANDROID", 1.0), ("", 1.0)]),
    ("(a:1.2) AND [b:c:0.5]", [("(a:1.2)", 1.0), (" [b:c:0.5]", 1.0)]),
    ("a: b", [("a: b", 1.0)]),
]


@pytest.mark.parametrize(("prompt", "expected"), AND_CASES)
def test_and_cases(prompt, expected):
    assert split_and(prompt) == expected


def test_parse_prompt_combines_and_schedule_and_emphasis():
    (first, second) = parse_prompt("a [cat:dog:0.5] (photo:1.2) AND sky:0.3", 4)
    assert first.weight == 1.0 and second.weight == 0.3
    assert first.schedule == (
        (2, (("a cat ", 1.0), ("photo", 1.2))),
        (4, (("a dog ", 1.0), ("photo", 1.2))),
    )
    assert second.schedule == ((4, ((" sky", 1.0),)),)


def test_deep_nesting_is_read_verbatim_not_a_crash():
    deep = "[" * 400 + "a:b:2" + "]" * 400
    assert prompt_schedule(deep, 10) == [(10, deep)]
    assert parse_attention("(" * 5000 + "a")[0][0] == "a"


SPECIAL = "[]():|\\"
plain_text = st.text(alphabet=st.characters(exclude_characters=SPECIAL), max_size=80)
pieces = st.sampled_from([*SPECIAL, "AND", "BREAK", " ", ":", "1", ".5", "2", "a", "(b:1.2)"])
any_text = st.lists(st.one_of(pieces, st.characters()), max_size=40).map("".join)


@settings(max_examples=300, deadline=None)
@given(any_text, st.integers(1, 40))
def test_no_input_crashes_the_parser(prompt, steps):
    try:
        parsed = parse_prompt(prompt, steps)
    except UserError:
        return
    assert parsed
    for sub in parsed:
        ends = [end for end, _ in sub.schedule]
        assert ends == sorted(set(ends)) and ends[-1] == steps and ends[0] >= 1
        assert all(runs for _, runs in sub.schedule)


@settings(max_examples=300, deadline=None)
@given(plain_text, st.integers(1, 40))
def test_plain_text_is_one_run_of_weight_one(text, steps):
    assert prompt_schedule(text, steps) == [(steps, text)]
    if "BREAK" not in text:
        assert parse_attention(text) == [(text, 1.0)]
    if "AND" not in text and ":" not in text:
        assert split_and(text) == [(text.rstrip(), 1.0)]

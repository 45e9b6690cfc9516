"""The addition task: exact scratchpad text, grading, samplers and critical-token positions."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from critical_tokens.addition import (
    TRACKED_TOKENS,
    CriticalToken,
    completion,
    critical_tokens,
    eval_pairs,
    is_correct,
    max_completion_length,
    parse_operand,
    parse_result,
    pretraining_pairs,
    prompt,
    random_operand,
    rl_pairs,
    sample_pair,
    tracked_token_key,
)

# --- prompt and completion: hand-written expected texts -------------------------------------------


def test_prompt_is_spec_text():
    assert prompt(123, 45) == "Input:\n123+45\nTarget:"


def test_completion_spec_example_verbatim():
    expected = (
        "\n<scratch>\n"
        "[1,2,3] + [4,5] , A=[] , C=0 , 3+5+0=8 , A->8 , C->0\n"
        "[1,2] + [4] , A=[8] , C=0 , 2+4+0=6 , A->6 , C->0\n"
        "[1] + [] , A=[6,8] , C=0 , 1+0+0=1 , A->1 , C->0\n"
        "[] + [] , A=[1,6,8] C=0 , END\n"
        "</scratch>\n"
        "1 6 8\n"
    )
    assert completion(123, 45) == expected


def test_completion_final_carry_makes_a_new_digit():
    assert completion(5, 5) == (
        "\n<scratch>\n"
        "[5] + [5] , A=[] , C=0 , 5+5+0=10 , A->0 , C->1\n"
        "[] + [] , A=[0] C=1 , END\n"
        "</scratch>\n"
        "1 0\n"
    )
    assert completion(999, 1) == (
        "\n<scratch>\n"
        "[9,9,9] + [1] , A=[] , C=0 , 9+1+0=10 , A->0 , C->1\n"
        "[9,9] + [] , A=[0] , C=1 , 9+0+1=10 , A->0 , C->1\n"
        "[9] + [] , A=[0,0] , C=1 , 9+0+1=10 , A->0 , C->1\n"
        "[] + [] , A=[0,0,0] C=1 , END\n"
        "</scratch>\n"
        "1 0 0 0\n"
    )


def test_completion_zeros():
    assert completion(0, 0) == (
        "\n<scratch>\n"
        "[0] + [0] , A=[] , C=0 , 0+0+0=0 , A->0 , C->0\n"
        "[] + [] , A=[0] C=0 , END\n"
        "</scratch>\n"
        "0\n"
    )
    assert completion(100, 0) == (
        "\n<scratch>\n"
        "[1,0,0] + [0] , A=[] , C=0 , 0+0+0=0 , A->0 , C->0\n"
        "[1,0] + [] , A=[0] , C=0 , 0+0+0=0 , A->0 , C->0\n"
        "[1] + [] , A=[0,0] , C=0 , 1+0+0=1 , A->1 , C->0\n"
        "[] + [] , A=[1,0,0] C=0 , END\n"
        "</scratch>\n"
        "1 0 0\n"
    )


def test_completion_unequal_lengths_both_ways():
    assert completion(7, 86) == (
        "\n<scratch>\n"
        "[7] + [8,6] , A=[] , C=0 , 7+6+0=13 , A->3 , C->1\n"
        "[] + [8] , A=[3] , C=1 , 0+8+1=9 , A->9 , C->0\n"
        "[] + [] , A=[9,3] C=0 , END\n"
        "</scratch>\n"
        "9 3\n"
    )
    assert completion(86, 7) == (
        "\n<scratch>\n"
        "[8,6] + [7] , A=[] , C=0 , 6+7+0=13 , A->3 , C->1\n"
        "[8] + [] , A=[3] , C=1 , 8+0+1=9 , A->9 , C->0\n"
        "[] + [] , A=[9,3] C=0 , END\n"
        "</scratch>\n"
        "9 3\n"
    )


def test_completion_rejects_negative_operands():
    with pytest.raises(ValueError):
        completion(-1, 3)


def _check_structure(a: int, b: int) -> None:
    text = completion(a, b)
    assert text.startswith("\n<scratch>\n") and text.endswith("\n")
    lines = text.split("\n")
    assert lines[0] == "" and lines[1] == "<scratch>" and lines[-1] == ""
    assert lines[-3] == "</scratch>"
    assert lines[-2] == " ".join(str(a + b))
    list_lines = lines[2:-3]
    assert len(list_lines) == max(len(str(a)), len(str(b))) + 1  # step lines + the final line
    *step_lines, final = list_lines
    assert all(" , C=" in line and line.endswith(" , C->" + line[-1]) for line in step_lines)
    assert final.startswith("[] + [] , A=[") and final.endswith(" , END")
    assert "] C=" in final and " , C=" not in final  # the format's quirk, final line only
    first_lists = step_lines[0].split(" , ")[0]
    assert first_lists == "[" + ",".join(str(a)) + "] + [" + ",".join(str(b)) + "]"


@pytest.mark.parametrize(
    "a, b",
    [(0, 0), (5, 5), (10**19, 1), (10**20 - 1, 10**20 - 1), (12345678901234567890, 7)],
)
def test_completion_structure_up_to_20_digits(a, b):
    _check_structure(a, b)
    _check_structure(b, a)


@given(
    st.integers(1, 20).flatmap(lambda n: st.integers(0, 10**n - 1)),
    st.integers(1, 20).flatmap(lambda n: st.integers(0, 10**n - 1)),
)
@settings(max_examples=200, deadline=None)
def test_completion_digit_length_invariants(a, b):
    _check_structure(a, b)
    text = completion(a, b)
    assert parse_result(text) == a + b
    assert is_correct(a, b, text)
    assert len(text) <= max_completion_length(max(len(str(a)), len(str(b))))
    for token in critical_tokens(a, b, n_digits_pretrained=3, steps=tuple(range(1, 25))):
        assert token.char == text[token.offset]


# --- grading -------------------------------------------------------------------------------------


def test_parse_result_and_is_correct_on_good_text():
    text = completion(123, 45)
    assert parse_result(text) == 168
    assert is_correct(123, 45, text)
    assert not is_correct(123, 46, text)
    # The episode may end at end-of-text right after the result line; nothing after it is graded.
    assert parse_result(text.rstrip("\n")) == 168
    assert is_correct(123, 45, text.rstrip("\n"))
    assert is_correct(123, 45, text + "garbage")


def test_only_the_result_line_is_graded():
    wrong_scratchpad = "\n<scratch>\n[9] + [9] , nonsense\n</scratch>\n1 6 8\n"
    assert is_correct(123, 45, wrong_scratchpad)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "\n<scratch>\n1 6 8\n",  # no </scratch>
        "</scratch>\n",  # empty result line
        "</scratch>\n168\n",  # digits not separated
        "</scratch>\n1  6 8\n",  # double space
        "</scratch>\n 1 6 8\n",  # leading space
        "</scratch>\n1 6 8 \n",  # trailing space
        "</scratch>\n1 6 a\n",
        "</scratch>\n-1 6 8\n",
        "</scratch>1 6 8\n",  # no newline before the result
    ],
)
def test_parse_result_malformed(text):
    assert parse_result(text) is None
    assert not is_correct(123, 45, text)


def test_is_correct_compares_text_digit_for_digit():
    assert parse_result("</scratch>\n0 1 6 8\n") == 168
    assert not is_correct(123, 45, "</scratch>\n0 1 6 8\n")  # a leading zero is not the sum's text
    assert is_correct(0, 0, "</scratch>\n0\n")


def test_parse_operand():
    assert parse_operand("123") == 123
    assert parse_operand(" 42\n") == 42
    assert parse_operand("0") == 0
    for bad in ["", "  ", "12a", "-3", "1.5", "+7", "²"]:
        with pytest.raises(ValueError, match="operand"):
            parse_operand(bad)


# --- samplers ------------------------------------------------------------------------------------


def _digits(x: int) -> int:
    return len(str(x))


def test_random_operand_digit_counts():
    rng = random.Random(0)
    assert {random_operand(1, rng) for _ in range(500)} == set(range(10))
    for n in (2, 5, 20):
        assert all(_digits(random_operand(n, rng)) == n for _ in range(200))
    with pytest.raises(ValueError):
        random_operand(0, rng)


def test_sample_pair_distribution():
    rng = random.Random(1)
    n = 4
    pairs = [sample_pair(n, rng) for _ in range(4000)]
    lengths = [(_digits(a), _digits(b)) for a, b in pairs]
    assert all(max(la, lb) == n for la, lb in lengths)
    both_long = sum(la == lb == n for la, lb in lengths) / len(pairs)
    first_long_only = sum(la == n > lb for la, lb in lengths) / len(pairs)
    assert abs(both_long - 0.5) < 0.05
    assert abs(first_long_only - 0.25) < 0.05  # the long operand is either one
    assert {min(la, lb) for la, lb in lengths} == {1, 2, 3, 4}
    assert all(_digits(a) == _digits(b) == 1 for a, b in (sample_pair(1, rng) for _ in range(50)))


def test_pretraining_pairs_balanced_and_seeded():
    pairs = pretraining_pairs(n_digits_max=3, per_length=50, seed=7)
    assert len(pairs) == 150
    longest = [max(_digits(a), _digits(b)) for a, b in pairs]
    assert [longest.count(n) for n in (1, 2, 3)] == [50, 50, 50]
    assert longest != sorted(longest)  # shuffled
    assert pairs == pretraining_pairs(3, 50, seed=7)
    assert pairs != pretraining_pairs(3, 50, seed=8)


def test_a_dose_of_n_plus_one_additions_is_added_to_the_same_pairs():
    base = pretraining_pairs(3, 200, seed=7)
    assert pretraining_pairs(3, 200, seed=7, n_plus_one_fraction=0.0) == base  # the default changes nothing
    dosed = pretraining_pairs(3, 200, seed=7, n_plus_one_fraction=0.05)
    longest = [max(_digits(a), _digits(b)) for a, b in dosed]
    assert longest.count(4) == round(600 * 0.05 / 0.95) == 32  # 32 of 632: 5% of the whole set
    assert max(longest) == 4
    assert sorted(p for p, n in zip(dosed, longest) if n <= 3) == sorted(base)  # the 1..3-digit pairs are the same
    assert [p for p, n in zip(dosed, longest) if n == 4] != sorted(p for p, n in zip(dosed, longest) if n == 4)  # shuffled in
    # The (N+1)-digit pairs follow the RL task's distribution: half the time the other operand is in 1..N.
    assert {min(_digits(a), _digits(b)) for a, b in pretraining_pairs(3, 200, seed=7, n_plus_one_fraction=0.3) if max(_digits(a), _digits(b)) == 4} == {1, 2, 3, 4}
    with pytest.raises(ValueError):
        pretraining_pairs(3, 10, seed=0, n_plus_one_fraction=1.0)


def test_eval_pairs_identical_and_varying():
    identical = eval_pairs(5, "identical", 200, seed=0)
    assert all(_digits(a) == _digits(b) == 5 for a, b in identical)
    varying = eval_pairs(5, "varying", 400, seed=0)
    assert all(max(_digits(a), _digits(b)) == 5 > min(_digits(a), _digits(b)) for a, b in varying)
    assert any(_digits(a) == 5 for a, _ in varying) and any(_digits(b) == 5 for _, b in varying)
    assert {min(_digits(a), _digits(b)) for a, b in varying} == {1, 2, 3, 4}
    assert eval_pairs(5, "varying", 50, seed=3) == eval_pairs(5, "varying", 50, seed=3)
    assert eval_pairs(5, "varying", 50, seed=3) != eval_pairs(5, "varying", 50, seed=4)
    with pytest.raises(ValueError):
        eval_pairs(1, "varying", 10, seed=0)
    with pytest.raises(ValueError):
        eval_pairs(3, "mixed", 10, seed=0)  # type: ignore[arg-type]


def test_rl_pairs_plus_k():
    pairs = rl_pairs(n_digits_pretrained=7, plus=1, count=300, seed=0)
    assert all(max(_digits(a), _digits(b)) == 8 for a, b in pairs)
    assert pairs == rl_pairs(7, 1, 300, seed=0)
    assert all(max(_digits(a), _digits(b)) == 9 for a, b in rl_pairs(7, 2, 100, seed=0))
    with pytest.raises(ValueError):
        rl_pairs(7, 0, 10, seed=0)


@given(st.integers(1, 20), st.integers(0, 2**32))
@settings(max_examples=100, deadline=None)
def test_samplers_respect_digit_counts(n, seed):
    rng = random.Random(seed)
    a, b = sample_pair(n, rng)
    assert max(_digits(a), _digits(b)) == n and min(_digits(a), _digits(b)) >= 1
    (a, b), = eval_pairs(n, "identical", 1, seed)
    assert _digits(a) == _digits(b) == n


def test_max_completion_length():
    assert max_completion_length(1) == len(completion(9, 9))
    assert max_completion_length(3) == len(completion(999, 999))
    rng = random.Random(0)
    for n in (1, 2, 5):
        for _ in range(200):
            a, b = random_operand(rng.randint(1, n), rng), random_operand(rng.randint(1, n), rng)
            assert len(completion(a, b)) <= max_completion_length(n)


# --- critical tokens -----------------------------------------------------------------------------


def _described(tokens: list[CriticalToken]) -> list[tuple[int, str, str, int, int]]:
    return [(t.offset, t.char, t.name, t.step, t.operand) for t in tokens]


def test_critical_tokens_spec_example_both_operands_longer():
    # N = 3, 8402+76563. The step lines start at offset 11 (after "\n<scratch>\n"):
    #   step 1: "[8,4,0,2] + [7,6,5,6,3] , ..."  operand 2's list starts 12 characters in
    #   step 2: "[8,4,0] + [7,6,5,6] , ..."      starts at 11 + 60 + 1 = 72 (step 1 has 60
    #   characters: 23 of lists, then " , A=[] , C=0 , 2+3+0=5 , A->5 , C->0"), operand 2 at +10
    step1 = [
        (11 + 6, ",", "n+1_comma", 1, 1),
        (11 + 7, "2", "n+1_digit", 1, 1),
        (11 + 12 + 6, ",", "n+1_comma", 1, 2),
        (11 + 12 + 7, "6", "n+1_digit", 1, 2),
        (11 + 12 + 8, ",", "n+2_comma", 1, 2),
        (11 + 12 + 9, "3", "n+2_digit", 1, 2),
    ]
    assert _described(critical_tokens(8402, 76563, 3, steps=(1,))) == step1
    step2 = [
        (72 + 4, ",", "n+1_comma", 2, 1),
        (72 + 5, "0", "n+1_digit", 2, 1),
        (72 + 10 + 4, ",", "n+1_comma", 2, 2),
        (72 + 10 + 5, "5", "n+1_digit", 2, 2),
        (72 + 10 + 6, ",", "n+2_comma", 2, 2),
        (72 + 10 + 7, "6", "n+2_digit", 2, 2),
    ]
    assert _described(critical_tokens(8402, 76563, 3, steps=(2,))) == step2
    default = critical_tokens(8402, 76563, 3)
    assert _described(default[:12]) == step1 + step2
    assert {t.step for t in default} == {1, 2, 3}


def test_critical_tokens_only_one_operand_longer():
    # N = 2, 45+678: only operand 2 is longer. Step 1 "[4,5] + [6,7,8] , ...", operand 2 at +8.
    assert _described(critical_tokens(45, 678, 2, steps=(1,))) == [
        (11 + 8 + 4, ",", "n+1_comma", 1, 2),
        (11 + 8 + 5, "8", "n+1_digit", 1, 2),
    ]
    # Swapped: operand 1 is the longer one, at the start of the line.
    assert _described(critical_tokens(678, 45, 2, steps=(1,))) == [
        (11 + 4, ",", "n+1_comma", 1, 1),
        (11 + 5, "8", "n+1_digit", 1, 1),
    ]


def test_critical_tokens_n_plus_2_with_short_lists():
    # N = 2, 9+12345: operand 2 has g = 3. Step 3's list "[1,2,3]" has only 3 digits: its first
    # digit has no comma before it, so n+1 gives only its digit.
    text = completion(9, 12345)
    tokens = critical_tokens(9, 12345, 2)
    step1 = [t for t in tokens if t.step == 1]
    assert [(t.name, t.char) for t in step1] == [
        ("n+1_comma", ","), ("n+1_digit", "3"),
        ("n+2_comma", ","), ("n+2_digit", "4"),
        ("n+3_comma", ","), ("n+3_digit", "5"),
    ]  # fmt: skip
    step3 = [t for t in tokens if t.step == 3]
    line3_start = text.index("[] + [1,2,3]")
    assert _described(step3) == [
        (line3_start + 6, "1", "n+1_digit", 3, 2),
        (line3_start + 7, ",", "n+2_comma", 3, 2),
        (line3_start + 8, "2", "n+2_digit", 3, 2),
        (line3_start + 9, ",", "n+3_comma", 3, 2),
        (line3_start + 10, "3", "n+3_digit", 3, 2),
    ]


def test_critical_tokens_steps_beyond_the_list():
    # N = 1, 57+3: step 1 "[5,7]" -> comma and "7"; step 2 "[5]" -> only "5"; step 3 is the final
    # "[] + []" line and steps 4, 5 do not exist: nothing.
    text = completion(57, 3)
    tokens = critical_tokens(57, 3, 1, steps=(1, 2, 3, 4, 5))
    assert _described(tokens) == [
        (11 + 2, ",", "n+1_comma", 1, 1),
        (11 + 3, "7", "n+1_digit", 1, 1),
        (text.index("[5] + []") + 1, "5", "n+1_digit", 2, 1),
    ]
    assert critical_tokens(57, 3, 1, steps=(3, 4, 5)) == []


def test_critical_tokens_empty_within_comfort_zone():
    assert critical_tokens(123, 45, 3) == []
    assert critical_tokens(999, 999, 3) == []
    assert critical_tokens(0, 0, 1) == []
    with pytest.raises(ValueError):
        critical_tokens(1234, 5, 3, steps=(0,))


def _reference_style(a: int, b: int, n: int, step: int) -> list[tuple[int, str, str]]:
    """An independent oracle in the reference's way: count back 2g characters from the "]" that
    closes each list. Valid while the list keeps more than g digits (step <= N)."""
    if step > max(len(str(a)), len(str(b))):
        return []  # no such step line (both operands are then within the comfort zone)
    text = completion(a, b)
    line_start = sum(len(line) + 1 for line in text.split("\n")[: step + 1])
    found = []
    close = line_start - 1
    for digits in (len(str(a)), len(str(b))):
        close = text.index("]", close + 1)
        gap = digits - n
        for back in range(1, 2 * gap + 1):  # the character `back` places before "]"
            i = gap - (back - 1) // 2
            kind = "digit" if back % 2 == 1 else "comma"
            found.append((close - back, text[close - back], f"n+{i}_{kind}"))
    return sorted(found)


@given(
    st.integers(3, 8),
    st.integers(1, 11).flatmap(lambda n: st.integers(0, 10**n - 1)),
    st.integers(1, 11).flatmap(lambda n: st.integers(0, 10**n - 1)),
)
@settings(max_examples=200, deadline=None)
def test_critical_tokens_match_reference_counting_and_chars(n, a, b):
    text = completion(a, b)
    tokens = critical_tokens(a, b, n)
    for token in tokens:
        assert token.char == text[token.offset]
        assert token.char.isdigit() == token.name.endswith("_digit")
    assert [t.offset for t in tokens] == sorted(t.offset for t in tokens)
    for step in (1, 2, 3):
        mine = [(t.offset, t.char, t.name) for t in tokens if t.step == step]
        assert mine == _reference_style(a, b, n, step)
    for token in tokens:
        operand_digits = len(str(a if token.operand == 1 else b))
        assert operand_digits > n


def test_tracked_tokens_and_keys():
    assert TRACKED_TOKENS == (
        (1, 1, "n+1_comma"), (1, 2, "n+1_comma"),
        (2, 1, "n+1_comma"), (2, 2, "n+1_comma"),
        (3, 1, "n+1_comma"), (3, 2, "n+1_comma"),
    )  # fmt: skip
    assert tracked_token_key(1, 2, "n+1_comma") == "step1/op2/n+1_comma"
    keys = {t.key for t in critical_tokens(12345678, 87654321, 7)}
    assert keys == {tracked_token_key(*tracked) for tracked in TRACKED_TOKENS} | {
        tracked_token_key(step, op, "n+1_digit") for step in (1, 2, 3) for op in (1, 2)
    }

"""The token-weight rules (critical_tokens/kl_rules.py): each built-in on a hand-computed (2, 3) batch, their
product, the checks at construction and on output (one-line UserError), 'auto' calibration, token texts
bound to a tokenizer, and the text syntax (parse, and back)."""

import pytest
import torch

from critical_tokens import kl
from critical_tokens.kl_rules import (
    ReferenceStats,
    custom,
    entropy_quantile,
    entropy_quantile_weights,
    ignore_token_weights,
    ignore_tokens,
    parse,
    prioritized,
    uniform,
    uniform_weights,
)
from critical_tokens.runs import UserError

# Two completions of 3 tokens, the last position of the second one padding.
MASK = torch.tensor([[True, True, True], [True, True, False]])
TOKENS = torch.tensor([[4, 7, 4], [9, 7, 0]])
CERTAINTY = torch.tensor([[0.5, 1.0, 0.25], [0.0, 0.8, 0.5]])
ENTROPY = torch.tensor([[0.1, 0.4, 0.2], [0.3, 0.5, 9.0]])  # 9.0: padding, ignored by the quantile
STATS = ReferenceStats(certainty=CERTAINTY, entropy=ENTROPY)


def test_prioritized_is_c_to_the_beta():
    # c^2: 0.25, 1, 0.0625 / 0, 0.64, 0.25; kl.prioritized_weights computes it (one c^beta in the project)
    expected = torch.tensor([[0.25, 1.0, 0.0625], [0.0, 0.64, 0.25]])
    torch.testing.assert_close(prioritized(2)(STATS, TOKENS, MASK), expected)
    torch.testing.assert_close(prioritized(2)(STATS, TOKENS, MASK), kl.prioritized_weights(CERTAINTY, 2.0))
    assert prioritized(0).constant == 1.0 and prioritized(2).constant is None and prioritized(2).beta == 2.0


def test_uniform_is_its_scale_everywhere():
    assert uniform_weights(MASK, 0.02).dtype == torch.float32
    torch.testing.assert_close(uniform(0.02)(STATS, TOKENS, MASK), torch.full((2, 3), 0.02))
    assert uniform(0.02).constant == 0.02 and uniform(0.02).needs == frozenset()


def test_ignore_tokens_zeroes_the_given_ids():
    # ids 4 and 9 ignored: [0, 1, 0] / [0, 1, 1]
    expected = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    torch.testing.assert_close(ignore_token_weights(TOKENS, [4, 9]), expected)
    torch.testing.assert_close(ignore_tokens([4, 9])(STATS, TOKENS, MASK), expected)


def test_entropy_quantile_zeroes_the_top_q_of_the_valid_tokens():
    # valid entropies 0.1 0.4 0.2 0.3 0.5; q = 0.4: theta = quantile 0.6 = sorted[0.6 * 4 = 2.4]
    # = 0.3 + 0.4 (0.4 - 0.3) = 0.34: the tokens of entropy 0.4 and 0.5 get 0, the others (padding too) 1
    expected = torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    torch.testing.assert_close(entropy_quantile_weights(ENTROPY, MASK, 0.4), expected)
    torch.testing.assert_close(entropy_quantile(0.4)(STATS, TOKENS, MASK), expected)
    # the threshold over every process's tokens (gather): here another process's 1.0, 1.0, 1.0 as well
    # moves the 0.6-quantile of the 8 values (position 4.2) to 0.5 + 0.2 (1 - 0.5) = 0.6: nothing here is above
    gathered = ReferenceStats(entropy=ENTROPY, gather=lambda values: torch.cat([values, torch.ones(3)]))
    torch.testing.assert_close(entropy_quantile(0.4)(gathered, TOKENS, MASK), torch.tensor([[1.0, 1, 1], [1, 1, 0]]))
    assert (entropy_quantile_weights(ENTROPY, torch.zeros_like(MASK), 0.4) == 1).all()  # no valid token: all ones


def test_rules_compose_by_product():
    rule = prioritized(2) * ignore_tokens([4]) * uniform(2.0)
    # 2 c^2 off token 4: [0, 2, 0] / [0, 1.28, 0.5]
    torch.testing.assert_close(rule(STATS, TOKENS, MASK), torch.tensor([[0.0, 2.0, 0.0], [0.0, 1.28, 0.5]]))
    assert rule.needs == {"certainty"} and rule.beta == 2.0 and rule.constant is None
    assert (uniform(0.5) * prioritized(0)).constant == 0.5
    with pytest.raises(UserError, match="at most one prioritized factor"):
        prioritized(2) * prioritized(3)


def test_a_user_callable_is_a_rule_checked_on_output():
    rule = custom(lambda stats, token_ids, mask: 1 - stats.certainty, needs=("certainty",))
    torch.testing.assert_close(rule(STATS, TOKENS, MASK), 1 - CERTAINTY)
    assert rule.needs == {"certainty"}
    for bad, message in [(lambda s, t, m: torch.ones(3), r"gave \(3,\), expected .* \(2, 3\)"),
                         (lambda s, t, m: -torch.ones(2, 3), "negative weight"),
                         (lambda s, t, m: torch.full((2, 3), float("nan")), "non-finite"),
                         (lambda s, t, m: [[1.0] * 3] * 2, "gave list")]:
        with pytest.raises(UserError, match=message):
            custom(bad)(STATS, TOKENS, MASK)
    with pytest.raises(UserError, match="the reference's entropy was not computed"):
        entropy_quantile(0.2)(ReferenceStats(certainty=CERTAINTY), TOKENS, MASK)


@pytest.mark.parametrize("make, message", [
    (lambda: prioritized(-1), r"beta .* must be in \[0, inf\)"),
    (lambda: prioritized("big"), "must be a number"),
    (lambda: uniform(float("inf")), "scale must be in"),
    (lambda: entropy_quantile(1.0), r"q must be in \(0, 1\)"),
    (lambda: ignore_tokens([]), "at least one"),
    (lambda: ignore_tokens([-1]), "integers >= 0"),
    (lambda: custom(3), "must be callable"),
])
def test_built_ins_refuse_bad_arguments_in_one_line(make, message):
    with pytest.raises(UserError, match=message) as error:
        make()
    assert "\n" not in str(error.value)


def test_auto_beta_is_calibrated_once_then_fixed():
    rule = prioritized("auto") * ignore_tokens([4])
    assert rule.needs_calibration and rule.beta is None
    with pytest.raises(UserError, match="calibrated"):
        rule(STATS, TOKENS, MASK)
    certainty = torch.tensor([0.5, 0.9, 0.95, 0.99])
    calibrated = rule.calibrated(certainty, quantile=0.0, weight=0.5)  # c_q = 0.5: beta = log 0.5 / log 0.5 = 1
    assert calibrated.beta == pytest.approx(1.0) and not calibrated.needs_calibration
    assert calibrated.calibrated(torch.tensor([0.1, 0.2])) is calibrated  # once


def test_token_texts_are_bound_to_the_tokenizer_s_ids(tokenizer):
    rule = ignore_tokens(["=", "<|endoftext|>", 3])
    with pytest.raises(UserError, match="need a tokenizer"):
        rule(STATS, TOKENS, MASK)
    bound = rule.bind(tokenizer)
    ids = tokenizer.convert_tokens_to_ids(["=", "<|endoftext|>"])
    tokens = torch.tensor([[ids[0], ids[1], 3, 5]])
    torch.testing.assert_close(bound(ReferenceStats(), tokens, torch.ones_like(tokens, dtype=torch.bool)), torch.tensor([[0.0, 0.0, 0.0, 1.0]]))
    with pytest.raises(UserError, match="no token of the tokenizer reads 'xyz'"):
        ignore_tokens(["xyz"]).bind(tokenizer)


@pytest.mark.parametrize("text, rule", [
    ("prioritized:8", prioritized(8)),
    ("prioritized:auto", prioritized("auto")),
    ("uniform:0.02", uniform(0.02)),
    ("ignore:=,+", ignore_tokens(["=", "+"])),
    (r"ignore:\,,\x20,\n", ignore_tokens([",", " ", "\n"])),
    ("ignore_ids:0,5", ignore_tokens([0, 5])),
    ("entropy_quantile:0.2", entropy_quantile(0.2)),
    ("prioritized:8*ignore:=,+", prioritized(8) * ignore_tokens(["=", "+"])),
])
def test_the_text_syntax_reads_each_built_in_and_writes_it_back(text, rule):
    assert parse(text) == rule and parse(rule.spec) == rule


@pytest.mark.parametrize("text, message", [("", "empty rule"), ("priority:8", "unknown rule 'priority'"), ("prioritized", "NAME:ARGUMENT"),
                                           ("ignore_ids:a", "integer token ids"), ("uniform:x", "must be a number")])
def test_the_text_syntax_refuses_bad_text_in_one_line(text, message):
    with pytest.raises(UserError, match=message):
        parse(text)

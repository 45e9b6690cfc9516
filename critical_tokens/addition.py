"""The task: multi-digit addition written out on a scratchpad (docs/method.md sections 1, 2 and 6).

A model is given a prompt and must generate the completion, one character per token:

    Input:                                  <- prompt(123, 45)
    123+45
    Target:
                                            <- completion(123, 45) starts with this newline
    <scratch>
    [1,2,3] + [4,5] , A=[] , C=0 , 3+5+0=8 , A->8 , C->0
    [1,2] + [4] , A=[8] , C=0 , 2+4+0=6 , A->6 , C->0
    [1] + [] , A=[6,8] , C=0 , 1+0+0=1 , A->1 , C->0
    [] + [] , A=[1,6,8] C=0 , END
    </scratch>
    1 6 8

Each step line pops the last digit of both operand lists (a missing digit counts as 0) and adds them
with the carry C; A holds the result digits found so far, most significant first. The final list
line lacks the " ," before "C=" (a quirk of the original format, kept). Only the result line after
"</scratch>" is graded.

A model pre-trained on operands of 1..N digits (the "comfort zone") is fine-tuned with RL on
N+1 ("plus1") or N+2 ("plus2") digits. Its errors concentrate on a few *critical tokens*: the
commas and digits at the end of an over-long operand list, where it tends to close the bracket
early or skip a digit (`critical_tokens`).

Pure Python: no torch. Every sampler takes a seed or a `random.Random`, so data sets are
reproducible.
"""

import random
import re
from dataclasses import dataclass
from typing import Literal

_SCRATCH_OPEN = "\n<scratch>\n"
_SCRATCH_CLOSE = "</scratch>\n"
_RESULT_LINE = re.compile(r"[0-9]( [0-9])*")
MAX_DIGITS = 30  # the largest N a command takes (--n-digits)


def prompt(a: int, b: int) -> str:
    """The prompt for `a + b`: ``"Input:\\n{a}+{b}\\nTarget:"`` (the completion starts after it)."""
    return f"Input:\n{a}+{b}\nTarget:"


def _list_text(digits: list[int]) -> str:
    return "[" + ",".join(str(d) for d in digits) + "]"


def completion(a: int, b: int) -> str:
    """The exact scratchpad completion for `a + b` (docs/method.md section 1), character for character.

    Starts with the newline that follows "Target:" and ends with the newline after the result line.
    The result line holds the digits of a + b separated by single spaces (a final carry is
    prepended to the accumulated digits).
    """
    if a < 0 or b < 0:
        raise ValueError(f"operands must be non-negative, got {a} and {b}")
    digits1, digits2 = [int(c) for c in str(a)], [int(c) for c in str(b)]
    result: list[int] = []  # least significant digit first
    carry = 0
    lines = []
    while digits1 or digits2:
        d1 = digits1[-1] if digits1 else 0
        d2 = digits2[-1] if digits2 else 0
        total = d1 + d2 + carry
        lines.append(
            f"{_list_text(digits1)} + {_list_text(digits2)} , A={_list_text(result[::-1])} , "
            f"C={carry} , {d1}+{d2}+{carry}={total} , A->{total % 10} , C->{total // 10}"
        )
        result.append(total % 10)
        carry = total // 10
        digits1, digits2 = digits1[:-1], digits2[:-1]
    lines.append(f"[] + [] , A={_list_text(result[::-1])} C={carry} , END")  # no " ," before C=
    if carry:
        result.append(carry)
    answer = " ".join(str(d) for d in reversed(result))
    return _SCRATCH_OPEN + "\n".join(lines) + "\n" + _SCRATCH_CLOSE + answer + "\n"


def _result_line(generated_completion: str) -> str | None:
    """The text between the first "</scratch>\\n" and the next newline (or the end), if any."""
    start = generated_completion.find(_SCRATCH_CLOSE)
    if start == -1:
        return None
    return generated_completion[start + len(_SCRATCH_CLOSE) :].split("\n", 1)[0]


def parse_result(generated_completion: str) -> int | None:
    """The number on the result line of a generated completion, or None if it is malformed.

    The result line follows the first "</scratch>\\n" and must be digits separated by single
    spaces, ended by a newline or by the end of the text ("1 6 8" -> 168).
    """
    line = _result_line(generated_completion)
    if line is None or not _RESULT_LINE.fullmatch(line):
        return None
    return int(line.replace(" ", ""))


def is_correct(a: int, b: int, generated_completion: str) -> bool:
    """True when the result line equals the true sum digit for digit (nothing else is graded).

    The comparison is on text, so a leading zero ("0 1 6 8") is wrong, as in the reference.
    """
    return _result_line(generated_completion) == " ".join(str(a + b))


def parse_operand(text: str) -> int:
    """A non-negative operand typed by a user (surrounding whitespace ignored)."""
    stripped = text.strip()
    if not re.fullmatch(r"[0-9]+", stripped):
        raise ValueError(f"operand must be a non-negative integer (digits 0-9 only), got {text!r}")
    return int(stripped)


def random_operand(n_digits: int, rng: random.Random) -> int:
    """A uniform integer with exactly `n_digits` digits (no leading zero; 1 digit: 0..9)."""
    if n_digits < 1:
        raise ValueError(f"n_digits must be >= 1, got {n_digits}")
    low = 0 if n_digits == 1 else 10 ** (n_digits - 1)
    return rng.randint(low, 10**n_digits - 1)


def _pair_with_long_operand(
    n_digits: int, other_digits: int, rng: random.Random
) -> tuple[int, int]:
    """One operand, chosen at random, has `n_digits` digits; the other has `other_digits`."""
    long_first = rng.random() < 0.5
    long, other = random_operand(n_digits, rng), random_operand(other_digits, rng)
    return (long, other) if long_first else (other, long)


def sample_pair(n_digits: int, rng: random.Random) -> tuple[int, int]:
    """An addition from the "plus k" distribution of docs/method.md section 2, generalised to n digits.

    One operand, chosen at random, has `n_digits` digits; the other has, with probability 1/2, a
    length drawn uniformly in 1..n-1, and otherwise exactly `n_digits` digits (n = 1: both 1 digit).
    """
    if n_digits > 1 and rng.random() < 0.5:
        other_digits = rng.randint(1, n_digits - 1)
    else:
        other_digits = n_digits
    return _pair_with_long_operand(n_digits, other_digits, rng)


def pretraining_pairs(n_digits_max: int, per_length: int, seed: int, n_plus_one_fraction: float = 0.0) -> list[tuple[int, int]]:
    """The pre-training set: `per_length` pairs `sample_pair(L)` for each L in 1..N, shuffled.

    `n_plus_one_fraction` (a deviation from the paper, 0 by default) replaces nothing and adds
    `rl_pairs(N, 1)` additions (the RL task's distribution) so that they make up that fraction of
    the whole set. They come from their own random stream: the 1..N pairs are the same whatever
    the fraction.
    """
    if not 0 <= n_plus_one_fraction < 1:
        raise ValueError(f"n_plus_one_fraction must be in [0, 1), got {n_plus_one_fraction}")
    rng = random.Random(seed)
    pairs = [sample_pair(n, rng) for n in range(1, n_digits_max + 1) for _ in range(per_length)]
    n_extra = round(len(pairs) * n_plus_one_fraction / (1 - n_plus_one_fraction))
    if n_extra:
        pairs += rl_pairs(n_digits_max, 1, n_extra, seed=f"{seed}-n+1")
    rng.shuffle(pairs)
    return pairs


def eval_pairs(
    n_digits: int, kind: Literal["identical", "varying"], count: int, seed: int
) -> list[tuple[int, int]]:
    """Evaluation additions (the paper's Appendix A, docs/method.md section 2).

    "identical": both operands have exactly `n_digits` digits. "varying": one operand, chosen at
    random, has `n_digits` digits and the other a length drawn uniformly in 1..n-1 (needs n >= 2).
    """
    if kind not in ("identical", "varying"):
        raise ValueError(f"kind must be 'identical' or 'varying', got {kind!r}")
    if kind == "varying" and n_digits < 2:
        raise ValueError(f"'varying' needs n_digits >= 2, got {n_digits}")
    rng = random.Random(seed)
    pairs = []
    for _ in range(count):
        other_digits = n_digits if kind == "identical" else rng.randint(1, n_digits - 1)
        pairs.append(_pair_with_long_operand(n_digits, other_digits, rng))
    return pairs


def rl_pairs(n_digits_pretrained: int, plus: int, count: int, seed: int | str,
             exclude: frozenset[tuple[int, int]] | set[tuple[int, int]] = frozenset()) -> list[tuple[int, int]]:
    """RL fine-tuning additions, the "plus k" task of docs/method.md section 2 (k = 1: "plus1", 2: "plus2").

    One operand, chosen at random, has N+k digits; the other has, with probability 1/2, a length
    uniform in 1..N (inside the comfort zone), otherwise a length uniform in N+1..N+k. For k = 1 this
    is exactly docs/method.md section 2; for k = 2 it follows the reference implementation
    (jvasso/llm-rl-arithmetic, ``src/env/operation_generator.py``).

    ``exclude``: pairs never returned (a drawn one is drawn again), e.g. the held-out evaluation
    prompts when drawing training prompts.
    """
    if plus < 1:
        raise ValueError(f"plus must be >= 1, got {plus}")
    rng = random.Random(seed)
    n, longest = n_digits_pretrained, n_digits_pretrained + plus
    pairs = []
    while len(pairs) < count:
        other = rng.randint(1, n) if rng.random() < 0.5 else rng.randint(n + 1, longest)
        pair = _pair_with_long_operand(longest, other, rng)
        if pair not in exclude:
            pairs.append(pair)
    return pairs


def max_completion_length(n_digits: int) -> int:
    """Length in characters of the longest completion when both operands have <= `n_digits` digits.

    All-9 operands are the worst case: both lists are as long as possible, every digit sum has two
    digits ("9+9+1=19") and the final carry adds a result digit.
    """
    largest = 10**n_digits - 1
    return len(completion(largest, largest))


@dataclass(frozen=True)
class CriticalToken:
    """One critical token of `completion(a, b)`.

    offset: index of the character in `completion(a, b)`; char: that character.
    name: "n+i_comma" or "n+i_digit" (i = 1..g, g = operand digits - N).
    step: 1-based step line (1 = the first line after "<scratch>"); operand: 1 or 2.
    """

    offset: int
    char: str
    name: str
    step: int
    operand: int

    @property
    def key(self) -> str:
        """The metric name of this token, e.g. "step1/op2/n+1_comma"."""
        return tracked_token_key(self.step, self.operand, self.name)


def critical_tokens(
    a: int, b: int, n_digits_pretrained: int, steps: tuple[int, ...] = (1, 2, 3)
) -> list[CriticalToken]:
    """The critical tokens of `completion(a, b)` for a model pre-trained on N digits, by offset.

    docs/method.md section 6, following the reference implementation (jvasso/llm-rl-arithmetic,
    `src/env/prompt.py`, `Prompt.extract_critical_tokens`, called with steps [1, 2, 3] from
    `src/rl_train.py`): on each step line in `steps`, for each operand with g = digits - N > 0,
    the last g digits of what is left of that operand's list and the comma before each of them;
    the i-th of these from the left (i = 1..g) is named "n+i_digit" / "n+i_comma". Example, N = 3,
    8402+76563, step 1: "[8,4,0,2]" gives n+1_comma, n+1_digit ("2"); "[7,6,5,6,3]" gives
    n+1_comma, n+1_digit ("6"), n+2_comma, n+2_digit ("3").

    Later step lines: as in the reference, g is the gap of the whole operand, while the list has
    lost k-1 digits by step k; the last g digits of the shortened list are still marked, named
    n+1..n+g (step 2 of the example marks "[7,6,5,6]" -> "5" and "6").

    Short lists (our decision; the reference raises there, which it never met with N >= 7 and
    steps 1..3): a marked position that no longer exists gives nothing, and the first digit of a
    list has no comma before it, so it gives only its n+i_digit. Step lines past the last list
    line, and the final "[] + []" line, give nothing. Operands of at most N digits give nothing.

    Note: the reference logs the policy's probability of a critical token only while the list it
    has generated so far on that line matches the true one.
    """
    if any(step < 1 for step in steps):
        raise ValueError(f"steps are 1-based, got {steps}")
    text = completion(a, b)
    lines = text.split("\n")  # "", "<scratch>", step 1, ..., final, "</scratch>", result, ""
    operand_digits = (len(str(a)), len(str(b)))
    n_lines = max(operand_digits) + 1  # step lines, final "[] + []" line included

    tokens = []
    for step in steps:
        if step > n_lines:
            continue
        line_offset = sum(len(line) + 1 for line in lines[: step + 1])
        list_start = 0  # operand 1's list opens the line; operand 2's follows "] + "
        for operand, digits in enumerate(operand_digits, start=1):
            remaining = max(digits - (step - 1), 0)  # digits left in the list on this line
            gap = digits - n_digits_pretrained
            for i in range(1, gap + 1):
                index = remaining - 1 - (gap - i)  # 0-based index of the n+i digit in the list
                if index < 0:
                    continue
                # In "[d,d,...,d]" the digit at `index` is at 2 * index + 1, its comma just before.
                positions = ((f"n+{i}_comma", 2 * index), (f"n+{i}_digit", 2 * index + 1))
                for name, position in positions:
                    if position == 0:  # the list's first digit follows "[", not a comma
                        continue
                    offset = line_offset + list_start + position
                    tokens.append(CriticalToken(offset, text[offset], name, step, operand))
            list_start += len(_list_text([0] * remaining)) + len(" + ")
    return sorted(tokens, key=lambda token: token.offset)


def tracked_token_key(step: int, operand: int, name: str) -> str:
    """Metric name of a critical token, e.g. ``tracked_token_key(1, 2, "n+1_comma")`` ->
    "step1/op2/n+1_comma"."""
    return f"step{step}/op{operand}/{name}"


TRACKED_TOKENS: tuple[tuple[int, int, str], ...] = tuple(
    (step, operand, "n+1_comma") for step in (1, 2, 3) for operand in (1, 2)
)
"""The six critical tokens of the paper's figure 7, as (step, operand, name): the n+1 comma of
each operand list on steps 1..3 (Appendix D.2: "the commas on the (N+1)-th token for each operand
list"; the reference tracks steps [1, 2, 3])."""

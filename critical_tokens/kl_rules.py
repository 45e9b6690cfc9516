"""Per-token KL weights by any rule: a rule is a value that the TRL trainers (``kl_weights=``) and the
``rl`` command (``--kl-weights``) both take.

A rule maps what the reference says at each completion token, the token ids and the completion mask to
the weights w_t of the per-token KL estimate k_t in the penalty (kl.kl_penalty: mean_t w_t k_t):

    rule(stats: ReferenceStats, token_ids (B, T), completion_mask (B, T) bool) -> weights (B, T) float32

The weights are checked on every call: the mask's shape, finite and >= 0 everywhere (padding included:
TRL multiplies them by the mask, and 0 * nan is nan). The built-ins, each a pure function below:

    prioritized(beta)      w = c^beta, the paper's eq. 1 (kl.prioritized_weights); beta 'auto' is
                           calibrated on the first batch (kl.calibrate_beta)
    uniform(scale)         w = scale: the standard penalty (1), or one of a chosen strength
    ignore_tokens(tokens)  w = 0 on the given token ids or texts, 1 elsewhere
    entropy_quantile(q)    w = 0 on the q share of completion tokens where the reference's entropy is
                           highest, 1 elsewhere (the KL counterpart of TRL's top_entropy_quantile)
    custom(fn)             a function of the same signature (any callable is taken as one)

Rules compose by product: ``prioritized(8) * ignore_tokens(["<|im_end|>"])``. The same rules as text
(``parse``), for the command line and for config.json: ``prioritized:8``, ``prioritized:auto``,
``uniform:0.02``, ``ignore:=,+`` (token texts, comma-separated; ``\\,`` ``\\*`` ``\\n`` ``\\x20`` escape),
``ignore_ids:0,5``, ``entropy_quantile:0.2``, and products joined by ``*``: ``prioritized:8*ignore:=,+``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from functools import reduce
from typing import Callable, ClassVar

import torch

from . import kl
from .runs import UserError

STATISTICS = ("certainty", "entropy")


def _same(values):
    return values


@dataclass(frozen=True)
class ReferenceStats:
    """What a rule may read about the reference model at each completion token, (B, T) each; None where
    the caller did not compute it (it computes what the rule's ``needs`` lists).

    certainty: c(s), kl.certainty at the certainty temperature (the paper's eq. 2 by default).
    entropy: H(s) = -sum_a p(a) log p(a) of the reference at the sampling temperature, in nats.
    gather: 1-D values of this process -> those of every process, for statistics over the batch
        (quantiles); the identity with one process."""

    certainty: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    gather: Callable[[torch.Tensor], torch.Tensor] = _same


# --- the built-ins' formulas, as pure functions --------------------------------------------------------
def uniform_weights(completion_mask, scale=1.0):
    """w_t = scale at every position: the standard KL penalty (scale 1), or a uniform penalty of a chosen
    strength (e.g. the mean weight a prioritized penalty realizes). completion_mask: (B, T).
    Returns (B, T) float32."""
    return torch.full(completion_mask.shape, float(scale), dtype=torch.float32, device=completion_mask.device)


def ignore_token_weights(token_ids, ignored_ids):
    """w_t = 0 if token_ids_t is in ``ignored_ids``, else 1. token_ids: (B, T) integer ids; ignored_ids:
    a sequence of ints. Returns (B, T) float32."""
    ignored = torch.as_tensor(list(ignored_ids), dtype=token_ids.dtype, device=token_ids.device)
    return (~torch.isin(token_ids, ignored)).float()


def entropy_quantile_weights(entropy, completion_mask, q, batch_entropy=None):
    """w_t = 0 where the reference's entropy is among the top q of the batch's, 1 elsewhere:

        theta = quantile(H over the batch's completion tokens, 1 - q)  (torch.quantile, linear),
        w_t = 0 if H_t >= theta else 1

    the rule of TRL's ``top_entropy_quantile`` (ties at theta all count as high; trl grpo_trainer.py ::
    get_high_entropy_mask), which frees the policy term there; here the KL term is dropped there instead.
    entropy, completion_mask: (B, T). batch_entropy: the 1-D entropies of the whole batch (every process's
    completion tokens), default ``entropy[completion_mask]``. q in (0, 1). Returns (B, T) float32; all
    ones if the batch has no completion token."""
    values = entropy[completion_mask.bool()] if batch_entropy is None else batch_entropy
    if values.numel() == 0:
        return torch.ones_like(entropy, dtype=torch.float32)
    theta = torch.quantile(values.float(), 1.0 - q)
    return (entropy.float() < theta).float()


def check_weights(weights, completion_mask, rule):
    """``weights`` as float32 if they are a tensor of the mask's shape, finite and >= 0 everywhere; else a
    one-line UserError naming the rule."""
    if not isinstance(weights, torch.Tensor) or weights.shape != completion_mask.shape:
        shape = tuple(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__
        raise UserError(f"KL weights {rule}: gave {shape}, expected a tensor of the completion mask's shape {tuple(completion_mask.shape)}")
    weights = weights.float()
    if not torch.isfinite(weights).all():
        raise UserError(f"KL weights {rule}: gave a non-finite weight (inf or nan)")
    if not (weights >= 0).all():
        raise UserError(f"KL weights {rule}: gave a negative weight ({weights.min().item():.4g})")
    return weights


def _number(value, name, low=0.0, low_open=False, high=math.inf, high_open=True):
    """``value`` as a float in the range, else a one-line UserError."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a number, got {value!r}") from None
    if not ((low < x if low_open else low <= x) and (x < high if high_open else x <= high)):
        brackets = ("(" if low_open else "[") + f"{low:g}, {high:g}" + (")" if high_open else "]")
        raise UserError(f"{name} must be in {brackets}, got {value!r}")
    return x


def _text(x: float) -> str:  # a float's shortest exact text: 8.0 -> "8", 7.93 -> "7.93"
    return repr(float(x)).removesuffix(".0")


# --- rules as values -----------------------------------------------------------------------------------
class Rule:
    """A token-weight rule (module docstring). Subclasses give ``weights``; calling the rule checks what it
    needs is there and checks its output. ``needs``: the ReferenceStats fields it reads."""

    needs: ClassVar[frozenset] = frozenset()

    def weights(self, stats: ReferenceStats, token_ids, completion_mask):
        raise NotImplementedError

    def __call__(self, stats: ReferenceStats, token_ids, completion_mask):
        for name in self.needs:
            if getattr(stats, name) is None:
                raise UserError(f"KL weights {self}: the reference's {name} was not computed")
        return check_weights(self.weights(stats, token_ids, completion_mask.bool()), completion_mask, self)

    def __mul__(self, other):
        return Product(tuple(_factors(self)) + tuple(_factors(as_rule(other))))

    def __str__(self):
        return self.spec

    # What a trainer resolves once, before the first weights: a beta 'auto', token texts.
    @property
    def needs_calibration(self) -> bool:
        """Whether a prioritized('auto') factor awaits its beta (``calibrated``)."""
        return False

    def with_beta(self, beta: float) -> Rule:
        """The rule with a beta 'auto' replaced by ``beta``."""
        return self

    def calibrated(self, certainty, quantile=0.05, weight=0.5) -> Rule:
        """The rule with a beta 'auto' replaced by kl.calibrate_beta(certainty, quantile, weight):
        certainty the 1-D certainties of the batch it is calibrated on."""
        return self.with_beta(kl.calibrate_beta(certainty, quantile, weight)) if self.needs_calibration else self

    def bind(self, tokenizer) -> Rule:
        """The rule with token texts turned into the tokenizer's ids."""
        return self

    @property
    def beta(self) -> float | None:
        """The exponent of its prioritized factor (None: none, or 'auto' not yet calibrated)."""
        return None

    @property
    def constant(self) -> float | None:
        """The weight it gives every token, if it is the same for all (uniform, prioritized(0)); else None."""
        return None


@dataclass(frozen=True)
class Prioritized(Rule):
    """w = c^beta (kl.prioritized_weights; the paper's eq. 1): see :func:`prioritized`."""

    beta_value: float | str = 150.0
    needs: ClassVar[frozenset] = frozenset({"certainty"})

    def __post_init__(self):
        if self.beta_value != "auto":
            object.__setattr__(self, "beta_value", _number(self.beta_value, "prioritized: beta (or 'auto')"))

    def weights(self, stats, token_ids, completion_mask):
        if self.beta_value == "auto":
            raise UserError("KL weights prioritized:auto: the beta must be calibrated before the first weights (Rule.calibrated)")
        return kl.prioritized_weights(stats.certainty, self.beta_value)

    @property
    def spec(self):
        return f"prioritized:{self.beta_value if self.beta_value == 'auto' else _text(self.beta_value)}"

    @property
    def needs_calibration(self):
        return self.beta_value == "auto"

    def with_beta(self, beta):
        return replace(self, beta_value=beta) if self.needs_calibration else self

    @property
    def beta(self):
        return None if self.needs_calibration else self.beta_value

    @property
    def constant(self):
        return 1.0 if self.beta_value == 0 else None


@dataclass(frozen=True)
class Uniform(Rule):
    """w = scale (uniform_weights): see :func:`uniform`."""

    scale: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "scale", _number(self.scale, "uniform: the scale"))

    def weights(self, stats, token_ids, completion_mask):
        return uniform_weights(completion_mask, self.scale)

    @property
    def spec(self):
        return f"uniform:{_text(self.scale)}"

    @property
    def constant(self):
        return self.scale


@dataclass(frozen=True)
class IgnoreTokens(Rule):
    """w = 0 on some tokens (ignore_token_weights): see :func:`ignore_tokens`. ``text_ids``: the ids of
    ``texts``, once bound to a tokenizer."""

    ids: tuple[int, ...] = ()
    texts: tuple[str, ...] = ()
    text_ids: tuple[int, ...] | None = None

    def __post_init__(self):
        if not self.ids and not self.texts:
            raise UserError("ignore_tokens: give at least one token id or text")
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in self.ids):
            raise UserError(f"ignore_tokens: token ids must be integers >= 0, got {list(self.ids)}")
        if any(not isinstance(t, str) or not t for t in self.texts):
            raise UserError(f"ignore_tokens: token texts must be non-empty strings, got {list(self.texts)}")

    def weights(self, stats, token_ids, completion_mask):
        if self.texts and self.text_ids is None:
            raise UserError(f"KL weights {self}: token texts need a tokenizer (Rule.bind) before the first weights")
        return ignore_token_weights(token_ids, self.ids + (self.text_ids or ()))

    @property
    def spec(self):
        parts = [f"ignore_ids:{','.join(map(str, self.ids))}"] if self.ids else []
        if self.texts:
            escape = {",": "\\,", "*": "\\*", "\\": "\\\\", "\n": "\\n", "\t": "\\t", " ": "\\x20"}
            parts.append("ignore:" + ",".join("".join(escape.get(ch, ch) for ch in t) for t in self.texts))
        return "*".join(parts)

    def bind(self, tokenizer):
        return self if not self.texts or self.text_ids is not None else replace(self, text_ids=token_ids_of(tokenizer, self.texts))


@dataclass(frozen=True)
class EntropyQuantile(Rule):
    """w = 0 on the top-q entropy tokens (entropy_quantile_weights): see :func:`entropy_quantile`."""

    q: float = 0.2
    needs: ClassVar[frozenset] = frozenset({"entropy"})

    def __post_init__(self):
        object.__setattr__(self, "q", _number(self.q, "entropy_quantile: q", 0.0, True, 1.0, True))

    def weights(self, stats, token_ids, completion_mask):
        return entropy_quantile_weights(stats.entropy, completion_mask, self.q, stats.gather(stats.entropy[completion_mask]))

    @property
    def spec(self):
        return f"entropy_quantile:{_text(self.q)}"


@dataclass(frozen=True)
class Custom(Rule):
    """A user's function ``fn(stats, token_ids, completion_mask) -> (B, T)``: see :func:`custom`."""

    fn: Callable = None
    statistics: frozenset = field(default=frozenset(STATISTICS))

    def __post_init__(self):
        if not callable(self.fn):
            raise UserError(f"custom: a KL weight rule must be callable, got {type(self.fn).__name__}")
        if unknown := set(self.statistics) - set(STATISTICS):
            raise UserError(f"custom: unknown statistics {sorted(unknown)}; expected some of {', '.join(STATISTICS)}")
        object.__setattr__(self, "statistics", frozenset(self.statistics))

    @property
    def needs(self):
        return self.statistics

    def weights(self, stats, token_ids, completion_mask):
        return self.fn(stats, token_ids, completion_mask)

    @property
    def spec(self):
        return f"custom:{getattr(self.fn, '__module__', '?')}.{getattr(self.fn, '__qualname__', type(self.fn).__name__)}"


@dataclass(frozen=True)
class Product(Rule):
    """w = the product of its factors' weights (each checked): e.g. prioritized(8) * ignore_tokens([...])."""

    factors: tuple[Rule, ...] = ()

    def __post_init__(self):
        if sum(isinstance(f, Prioritized) for f in self.factors) > 1:
            raise UserError(f"KL weights {self}: at most one prioritized factor (c^a * c^b is c^(a+b))")

    @property
    def needs(self):
        return frozenset().union(*(f.needs for f in self.factors))

    def weights(self, stats, token_ids, completion_mask):
        return reduce(torch.mul, (f(stats, token_ids, completion_mask) for f in self.factors))

    @property
    def spec(self):
        return "*".join(f.spec for f in self.factors)

    @property
    def needs_calibration(self):
        return any(f.needs_calibration for f in self.factors)

    def with_beta(self, beta):
        return Product(tuple(f.with_beta(beta) for f in self.factors))

    def bind(self, tokenizer):
        return Product(tuple(f.bind(tokenizer) for f in self.factors))

    @property
    def beta(self):
        return next((f.beta for f in self.factors if isinstance(f, Prioritized)), None)

    @property
    def constant(self):
        constants = [f.constant for f in self.factors]
        return None if None in constants else math.prod(constants)


def _factors(rule: Rule):
    return rule.factors if isinstance(rule, Product) else (rule,)


# --- the built-ins by name -----------------------------------------------------------------------------
def prioritized(beta: float | str = 150.0) -> Rule:
    """The prioritized KL penalty (Vassoyan, Beau, Plaud, NAACL Findings 2025, eq. 1): w_t = c(s_t)^beta,
    c the reference's certainty (kl.certainty), computed by kl.prioritized_weights. beta >= 0 (0: the
    standard penalty), or 'auto': calibrated once, on the first batch, to give weight 0.5 at the 5%
    certainty quantile (kl.calibrate_beta; the trainer's auto-beta options)."""
    return Prioritized(beta)


def uniform(scale: float = 1.0) -> Rule:
    """w_t = scale (uniform_weights): 1 is the standard KL penalty; another scale is a uniform penalty of
    that strength, e.g. the strength-matched control of a weighted rule as one line."""
    return Uniform(scale)


def ignore_tokens(tokens) -> Rule:
    """w_t = 0 on some tokens, 1 elsewhere (ignore_token_weights): ``tokens`` a list of token ids (int)
    and texts (str). A text names every token of the vocabulary whose decoded text is it, or is it with
    surrounding white space (``'='`` names ``'='`` and ``' ='``; ``' '`` names only ``' '``): e.g. a chat
    template's tokens and ``'<|endoftext|>'``, which carry much of the KL without carrying the answer."""
    tokens = [tokens] if isinstance(tokens, (int, str)) else list(tokens)
    return IgnoreTokens(tuple(t for t in tokens if not isinstance(t, str)), tuple(t for t in tokens if isinstance(t, str)))


def entropy_quantile(q: float = 0.2) -> Rule:
    """w_t = 0 on the completion tokens of the batch's top-q reference entropy, 1 elsewhere
    (entropy_quantile_weights; over every process's tokens)."""
    return EntropyQuantile(q)


def custom(fn: Callable, needs=STATISTICS) -> Rule:
    """A user's rule: ``fn(stats, token_ids, completion_mask) -> weights (B, T)``, checked like the
    built-ins'. ``needs``: the ReferenceStats fields it reads (computing the entropy costs one more pass
    over each chunk of logits; () gives TRL's own reference pass). A Trainer saves its args with pickle:
    pass a module-level function, not a lambda, if you call save_model."""
    return Custom(fn, frozenset(needs))


def as_rule(value) -> Rule:
    """A Rule from a rule, its text (``parse``) or a callable (``custom``)."""
    if isinstance(value, Rule):
        return value
    if isinstance(value, str):
        return parse(value)
    if callable(value):
        return custom(value)
    raise UserError(f"KL weights must be a rule, its text or a callable, got {type(value).__name__}")


def token_ids_of(tokenizer, texts) -> tuple[int, ...]:
    """The ids of the tokens whose decoded text is one of ``texts``, or is it with surrounding white space
    (``ignore_tokens``); a one-line UserError for a text no token reads."""
    decoded = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    ids = set()
    for text in texts:
        found = {i for i, t in enumerate(decoded) if t == text or (text.strip() and t.strip() == text)}
        if not found:
            raise UserError(f"ignore_tokens: no token of the tokenizer reads {text!r}")
        ids |= found
    return tuple(sorted(ids))


def parse(spec: str) -> Rule:
    """The rule of a text (module docstring): factors ``NAME:ARGUMENT`` joined by ``*``."""
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"KL weights: an empty rule; expected e.g. prioritized:8, uniform:1, ignore:=,+ or entropy_quantile:0.2")
    return reduce(lambda a, b: a * b, [_parse_factor(part, spec) for part in re.split(r"(?<!\\)\*", spec)])


_ESCAPES = {"n": "\n", "t": "\t", ",": ",", "*": "*", "\\": "\\"}


def _unescape(item: str) -> str:  # \, \* \n \t \\ and \xHH
    return re.sub(r"\\(x[0-9a-fA-F]{2}|[nt,*\\])", lambda m: chr(int(m[1][1:], 16)) if m[1][0] == "x" else _ESCAPES[m[1]], item)


def _parse_factor(part: str, spec: str) -> Rule:
    name, colon, argument = part.partition(":")
    name = name.strip()
    if not colon or not argument:
        raise UserError(f"KL weights {spec!r}: {part!r} needs NAME:ARGUMENT, e.g. prioritized:8")
    numeric = {"prioritized": prioritized, "uniform": uniform, "entropy_quantile": entropy_quantile}  # one number each
    if name in numeric:
        return numeric[name](argument.strip())
    items = [_unescape(item) for item in re.split(r"(?<!\\),", argument)]
    if name == "ignore":
        return ignore_tokens(items)
    if name == "ignore_ids":
        try:
            return ignore_tokens([int(item) for item in items])
        except ValueError:
            raise UserError(f"KL weights {spec!r}: ignore_ids takes integer token ids, got {argument!r}") from None
    raise UserError(f"KL weights {spec!r}: unknown rule {name!r}; expected prioritized, uniform, ignore, ignore_ids or entropy_quantile")

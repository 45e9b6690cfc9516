"""Which tokens a method frees, against the template's critical tokens: selection precision and recall.

Each token-level method singles out a set of tokens (token_weights.py says which: the prioritized
penalty's tokens of weight below 0.5, 80/20's selected tokens, Archer's high-entropy set, KL-Cov's and
Clip-Cov's selected tokens). On the addition task the tokens that decide success are known: the
template's critical tokens (addition.critical_tokens, docs/method.md section 6). A rollout follows the
template up to its first wrong character; the tokens up to and including it were chosen in states of
the template, so they are the ones where "critical or not" is defined (``on_template``).

`template_masks` marks them for a batch of rollouts; `SelectionCounts` adds up a method's set over the
minibatches of a collect and gives its precision (the share of the set that is critical) and recall
(the share of the critical tokens in the set), as the RL loop logs them (``selection/...``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .. import addition
from ..evaluate import first_difference


def template_masks(pairs: Sequence[tuple[int, int]], texts: Sequence[str], n_digits: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(critical, on_template), both bool (B, width): completion token t of episode i (one token per
    character) is critical when t is the offset of a critical token of the correct completion, and on
    the template when every token before it was right (t <= the first wrong character, inside the
    episode)."""
    critical = torch.zeros((len(pairs), width), dtype=torch.bool)
    on_template = torch.zeros((len(pairs), width), dtype=torch.bool)
    for i, ((a, b), text) in enumerate(zip(pairs, texts)):
        expected = addition.completion(a, b)
        last = min(first_difference(expected, text), len(text) - 1, width - 1)  # the first wrong token, or the last one
        on_template[i, : last + 1] = True
        for token in addition.critical_tokens(a, b, n_digits):
            if token.offset < width:
                critical[i, token.offset] = True
    return critical, on_template


@dataclass
class SelectionCounts:
    """A method's selected tokens against the critical ones, added up over minibatches."""

    selected: int = 0
    critical: int = 0
    both: int = 0
    tokens: int = 0

    def add(self, selected: torch.Tensor, critical: torch.Tensor, on_template: torch.Tensor) -> None:
        """selected, critical, on_template: (b, T) bool; counts the on-template tokens only."""
        sel, crit = selected.bool() & on_template, critical.bool() & on_template
        self.selected += int(sel.sum())
        self.critical += int(crit.sum())
        self.both += int((sel & crit).sum())
        self.tokens += int(on_template.sum())

    def record(self) -> dict[str, float | None]:
        """``selection/precision``, ``selection/recall`` (None when undefined) and ``selection/share``
        (the share of on-template tokens selected)."""
        return {"selection/precision": self.both / self.selected if self.selected else None,
                "selection/recall": self.both / self.critical if self.critical else None,
                "selection/share": self.selected / self.tokens if self.tokens else None}

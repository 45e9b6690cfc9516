"""Selection precision and recall: a method's freed tokens against the template's critical tokens."""

import torch

from critical_tokens import addition
from critical_tokens.critical.selection import SelectionCounts, template_masks


def test_counts_only_the_tokens_on_the_template():
    counts = SelectionCounts()
    selected = torch.tensor([[True, True, False, False, True]])
    critical = torch.tensor([[True, False, True, False, True]])
    on_template = torch.tensor([[True, True, True, True, False]])  # t4 is past the first wrong character: not counted
    counts.add(selected, critical, on_template)
    # over t0..t3: selected {0, 1}, critical {0, 2}, both {0}: precision 1/2, recall 1/2, 2 of 4 tokens selected
    assert counts.record() == {"selection/precision": 0.5, "selection/recall": 0.5, "selection/share": 0.5}
    counts.add(torch.zeros_like(selected), critical, on_template)  # a second minibatch adds 2 critical tokens, none selected
    assert counts.record() == {"selection/precision": 0.5, "selection/recall": 0.25, "selection/share": 0.25}
    assert SelectionCounts().record() == {"selection/precision": None, "selection/recall": None, "selection/share": None}


def test_template_masks_mark_the_critical_offsets_up_to_the_first_wrong_character():
    a, b, n = 8402, 76563, 3
    right = addition.completion(a, b)
    offsets = [t.offset for t in addition.critical_tokens(a, b, n)]
    wrong_at = offsets[2] + 1  # a rollout that goes wrong just after the third critical token
    wrong = right[:wrong_at] + ("x" if right[wrong_at] != "x" else "y") + right[wrong_at + 1:]
    critical, on_template = template_masks([(a, b), (a, b)], [right, wrong], n, width=len(right) + 5)
    assert critical[0].nonzero().flatten().tolist() == offsets == critical[1].nonzero().flatten().tolist()
    assert on_template[0].sum() == len(right) and not on_template[0, len(right):].any()
    assert on_template[1].nonzero().flatten().tolist() == list(range(wrong_at + 1))  # the wrong token's state is on the template

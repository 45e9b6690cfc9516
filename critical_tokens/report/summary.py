"""summary.json: the headline numbers of REPORT.md, for programs (the README's numbers are made from it).

Written next to REPORT.md by `critical-tokens report`, from the same computation, so the two always
agree. Its fields:

- ``preset``, ``command``: the reproduction; ``hardware`` (timing.json's), ``parallel_jobs`` and
  ``threads_per_job``: where it ran (RL numbers depend on the CPU and the thread count: README);
  ``wall_s``, ``invocations``: its wall time over how many invocations; ``runs``, ``of``: finished runs.
- ``verdict_metric``: the metric of the RL verdicts (``eval/accuracy_sampled``).
- ``findings``: the summary table of REPORT.md, one ``{"finding", "ours", "verdict"}`` per row.
- ``experiments``: per experiment of the preset (``levels``, ``table1``, ``rl_levels``,
  ``kl_comparison``, ``beta_sweep``, ``tracked_tokens``, ``kl_by_model``) its ``state``, ``verdict``
  and the numbers its section states. Every mean with an interval is ``{"mean", "low", "high", "n"}``
  (a fraction, not %; ``low`` and ``high`` null from a single value; ``n``: seeds, or examples for the
  evaluation tables, or outputs for table 1), or null where nothing was measured. For example
  ``kl_comparison``: ``task``, ``episodes``, ``runs``, ``compute_s`` (sum of its runs' wall times),
  ``start`` (``sampled`` and ``greedy`` accuracy before RL, over the standard arm's seeds:
  every arm starts from the same evaluation),
  ``standard_arm``, and per arm ``kl``, ``kl_coef``, ``beta`` (as the report shows it), ``beta_used`` (``[lowest, highest]`` beta
  the finished runs used, null for another KL), ``seeds``, ``final`` (``sampled``, ``greedy``,
  ``comfort_greedy``: in distribution), ``p_correct_critical`` (``initial``, ``final``), ``curve``
  (``lowest`` and ``highest``: the ``episode`` where the mean sampled accuracy is lowest or highest,
  with ``sampled`` and ``comfort_greedy`` there) and its ``verdict`` against the standard arm.
  ``confirm`` (a pre-registered study): ``decision`` (the pre-registered rule's), ``alpha``, ``runs``,
  ``of``, ``compute_s``, ``git_commit``, ``preregistration`` (``path``, ``commit``), per arm ``kl``,
  ``runs``, ``final`` (``sampled``, ``greedy``, ``comfort_greedy``, ``p_correct_critical``),
  ``kl_coef_used`` (``[lowest, highest]``) and ``mean_kl_weight``; per hypothesis ``arm``,
  ``versus``, ``metric``, ``margin``, ``role``, ``direction``, ``group`` (placement), ``n`` (paired
  units), ``mean``, ``sd``, ``low``, ``high`` (of the paired differences, 95%), ``t``, ``p_t``,
  ``p_wilcoxon``, ``p_holm``, ``rejects`` (an equivalence: holds), an equivalence's ``level``,
  ``low_tost``, ``high_tost``, ``t_lower``, ``t_upper``, ``p_lower``, ``p_upper``; ``left_out``
  (``"<instance>/seed<k>"``: why) and ``by_instance`` (the same test on the instance means);
  ``per_instance``: per hypothesis and instance the mean difference and its ``n``; per arm also
  ``continuous`` (``penalty_ratio``, ``comfort_kl``, ``comfort_logprob``, ``n_plus_1_kl``, null
  where the runs lack them); ``analysis`` ("pooled" or "instances": the one the decision reads);
  under the "placement" rule ``groups`` (per group its arms, ``verdict`` and placement ``share``);
  where the runs have ``final/comfort_kl``, ``strength_curve`` (per arm its kind, KL coefficient,
  ``comfort_kl`` and ``accuracy_sampled``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .document import Section
from .paper import VERDICT_METRIC
from .study_dir import StudyDir
from .statistics import Estimate

FORMAT = 1


def _plain(value: Any) -> Any:
    """``value`` with every `Estimate` as a dict, for json."""
    if isinstance(value, Estimate):
        return dataclasses.asdict(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def summary(rep: StudyDir, sections: dict[str, Section]) -> dict:
    timing = rep.timing or {}
    return {
        "format": FORMAT,
        "preset": rep.meta["preset_name"],
        "command": rep.meta["command"],
        "hardware": timing.get("hardware"),
        "parallel_jobs": rep.meta["parallel_jobs"],
        "threads_per_job": rep.meta["threads_per_job"],
        "wall_s": timing.get("wall_s"),
        "invocations": len(timing.get("invocations", [])),
        "runs": len(rep.finished(rep.jobs)),
        "of": len(rep.jobs),
        "verdict_metric": VERDICT_METRIC,
        "findings": [{"finding": f, "ours": o, "verdict": v} for s in sections.values() for f, _, o, v in s.summary],
        "experiments": {name: _plain(s.numbers) for name, s in sections.items()},
    }

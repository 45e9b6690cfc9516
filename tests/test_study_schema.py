"""A study's hypotheses, decision rule and placement groups in a preset: checked when the preset loads,
each mistake one line."""

import copy
import json

import pytest

from critical_tokens.study.plan import plan
from critical_tokens.study.preset import PRESETS_DIR, check_preset
from critical_tokens.runs import UserError

BETAS = (4, 8, 16)
ACC, KL = "final/accuracy_sampled", "final/comfort_kl"


def placement_study() -> dict:
    """The worked example: standard, no KL, and per beta the prioritized arm and its matched uniform
    arm; per beta superiority and TOST on sampled N+1 accuracy and on the comfort KL (lower is better)."""
    arms = [{"name": "standard", "kl": "standard"}, {"name": "no-kl", "kl": "none"}]
    hypotheses, groups = [], []
    for b in BETAS:
        prio, matched = f"prio-b{b}", f"matched-b{b}"
        arms += [{"name": prio, "kl": "prioritized", "beta": str(b)}, {"name": matched, "kl": "standard", "kl_coef": 0.1 * b}]
        groups.append({"name": f"beta {b}", "prioritized": prio, "matched": matched})
        common = {"arm": prio, "versus": matched, "group": f"beta {b}"}
        hypotheses += [{"name": f"S-acc-b{b}", **common, "metric": ACC, "margin": 0.0, "role": "superiority"},
                       {"name": f"E-acc-b{b}", **common, "metric": ACC, "margin": 0.03, "role": "equivalence"},
                       {"name": f"S-kl-b{b}", **common, "metric": KL, "margin": 0.0, "role": "superiority", "direction": "lower"},
                       {"name": f"E-kl-b{b}", **common, "metric": KL, "margin": 0.01, "role": "equivalence", "direction": "lower"}]
    return {"models": ["n2", "n2-d10"], "seeds": 2, "first_seed": 100, "rl": {"task": "plus1", "kl_coef": 5.0}, "arms": arms,
            "hypotheses": hypotheses, "alpha": 0.05, "decision": "placement",
            "placement": {"baseline": "standard", "metric": ACC, "groups": groups}}


def smoke_with(study: dict) -> dict:
    preset = json.loads((PRESETS_DIR / "smoke.json").read_text())
    preset["experiments"]["confirm"] = study
    return preset


def test_the_worked_example_loads_and_runs_its_baseline_with_the_tested_arms():
    preset = smoke_with(placement_study())
    check_preset(preset, "placement.json")
    jobs = [j for j in plan(preset)[0] if j.experiment == "confirm"]
    assert len(jobs) == 8 * 2 * 2  # 8 arms x 2 instances x 2 seeds
    order = [j.arm.split("/")[1] for j in jobs]
    # no-kl, in no hypothesis and not the placement baseline, runs after every other arm; standard,
    # the baseline of the placement share, with the tested arms.
    assert order.index("standard") < order.index("prio-b4") and set(order[-4:]) == {"no-kl"}


def edit(path: str, value):
    """A copy of the worked example with ``value`` at ``path`` ("hypotheses.0.margin"), or the key removed (value ...)."""
    study = copy.deepcopy(placement_study())
    *parents, last = path.split(".")
    target = study
    for key in parents:
        target = target[int(key)] if key.isdigit() else target[key]
    last = int(last) if last.isdigit() else last
    if value is ...:
        del target[last]
    else:
        target[last] = value
    return study


@pytest.mark.parametrize("path, value, message", [
    ("hypotheses.1.margin", 0.0, "an equivalence hypothesis's margin is the ± bound, > 0"),
    ("hypotheses.1.margin", -0.03, "an equivalence hypothesis's margin is the ± bound, > 0"),
    ("hypotheses.0.margin", -0.01, "a superiority hypothesis's margin is >= 0"),
    ("hypotheses.0.margin", float("nan"), "'margin' must be a finite number"),
    ("hypotheses.0.margin", True, "'margin' must be a finite number"),
    ("hypotheses.2.direction", "down", "'direction' (where the metric is better) is one of higher, lower"),
    ("hypotheses.0.role", "primary", "role is one of superiority, equivalence, comparison"),
    ("hypotheses.0.metric", "accuracy_sampled", "'metric' is a key of the runs' final evaluation"),
    ("hypotheses.0.versus", "prio-b4", "needs two different arms"),
    ("hypotheses.1.name", "S-acc-b4", "two hypotheses are named 'S-acc-b4'"),
    ("hypotheses.0.group", "beta 5", "'group' must name a group (beta 4, beta 8, beta 16)"),
    ("hypotheses.0.group", ..., "'group' must name a group"),
    ("hypotheses.4.group", "beta 4", "group 'beta 4' compares matched-b4 and prio-b4"),
    ("hypotheses.0.colour", "red", "unknown key 'colour'"),
    ("placement", ..., "'placement' (baseline, metric, groups) goes with, and only with"),
    ("placement.baseline", "uniform", "'baseline' must be an arm"),
    ("placement.metric", "accuracy", "'metric' (of the placement share) is a key of the final evaluation"),
    ("placement.groups", [], "'groups' must be a non-empty list"),
    ("placement.groups.1.name", "beta 4", "each group has a distinct non-empty 'name'"),
    ("placement.groups.0.matched", "standard", "'prioritized' and 'matched' are two arms other than the baseline"),
    ("placement.groups.0.matched", "matched-b5", "'prioritized' and 'matched' are two arms other than the baseline"),
    ("placement.groups.0.seed", 3, "unknown key 'seed'"),
    ("placement.alpha", 0.1, "unknown key 'alpha'"),
    ("decision", "confirm", "'placement' (baseline, metric, groups) goes with, and only with"),
    ("analysis", "by-seed", "'analysis' (the one the decision reads) is one of pooled, instances"),
])
def test_a_mistake_in_a_study_is_one_line(path, value, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
        check_preset(smoke_with(edit(path, value)), "placement.json")
    assert "\n" not in str(error.value)


def test_a_group_needs_a_hypothesis_to_decide_it():
    study = placement_study()
    study["hypotheses"] = [h for h in study["hypotheses"] if h["group"] != "beta 16"]
    with pytest.raises(UserError, match="group 'beta 16' has no superiority or equivalence hypothesis"):
        check_preset(smoke_with(study), "placement.json")


def test_the_older_rules_take_equivalence_and_direction_but_not_groups():
    preset = json.loads((PRESETS_DIR / "smoke.json").read_text())
    study = preset["experiments"]["confirm"]
    study["hypotheses"].append({"name": "E", "arm": "prioritized", "versus": "matched-penalty", "metric": ACC, "margin": 0.03,
                                "role": "equivalence", "direction": "higher"})
    check_preset(preset, "smoke.json")
    study["hypotheses"][-1]["group"] = "beta 8"
    with pytest.raises(UserError, match="a hypothesis's 'group' names a group of \"decision\": \"placement\""):
        check_preset(preset, "smoke.json")
    study["hypotheses"][-1].pop("group")
    study["hypotheses"][-1]["role"] = "superiority"
    with pytest.raises(UserError, match="role is one of primary, control, safety, comparison, equivalence"):
        check_preset(preset, "smoke.json")


def test_a_strength_matched_per_instance_becomes_each_instances_kl_coef():
    study = placement_study()
    study["arms"][3] = {"name": "matched-b4", "kl": "standard", "kl_coef_by_model": {"n2": 0.07, "n2-d10": 0.11}}
    preset = smoke_with(study)
    check_preset(preset, "placement.json")
    coefs = {(j.arm.split("/")[0], j.config["seed"]): j.config["kl_coef"] for j in plan(preset)[0] if (j.arm or "").endswith("/matched-b4")}
    assert coefs == {("n2", 100): 0.07, ("n2", 101): 0.07, ("n2-d10", 100): 0.11, ("n2-d10", 101): 0.11}
    study["arms"][3]["kl_coef_by_model"] = {"n2": 0.07}
    with pytest.raises(UserError, match="missing 'n2-d10'"):
        plan(smoke_with(study))

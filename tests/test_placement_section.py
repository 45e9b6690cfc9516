"""A synthetic placement study (4 instances x 3 seeds, six arms) through the report's study section:
equivalence and superiority hypotheses, a lower-is-better endpoint, the instance-level analysis, the
placement rule and share, the continuous endpoints, the strength curve, and the units left out."""

import json

import numpy as np
import pytest
from scipy import stats

from critical_tokens.report.confirm_section import section_confirm
from critical_tokens.report.hypotheses_section import equivalence_text
from critical_tokens.report.paired import HypothesisResult, tost
from critical_tokens.report.plots import Plots
from critical_tokens.report.study_dir import StudyDir
from critical_tokens.report.summary import summary
from critical_tokens.study.design import Hypothesis
from critical_tokens.study.preset import check_preset, load_preset

MODELS, SEEDS = ("i1", "i2", "i3", "i4"), (100, 101, 102)
UNITS = [(m, s) for m in MODELS for s in SEEDS]
ARMS = {"standard": {"kl": "standard"}, "no-kl": {"kl": "none"},
        "prio-b4": {"kl": "prioritized", "beta": "4"}, "matched-b4": {"kl": "standard", "kl_coef": 1.0},
        "prio-b8": {"kl": "prioritized", "beta": "8"}, "matched-b8": {"kl": "standard", "kl_coef": 0.3}}
ACC, KL = "final/accuracy_sampled", "final/comfort_kl"

# Per unit (UNITS order). The gain of each prioritized arm over standard, G; beta 8's matched arm
# reaches 0.4 G of it, so prio-b8 - matched-b8 = 0.6 G (share 0.6 exactly, at every unit); beta 4's
# matched arm is within a point of its prioritized arm, D4 (mean 0: share 0).
STANDARD = np.array([0.30, 0.32, 0.28, 0.20, 0.22, 0.21, 0.15, 0.16, 0.14, 0.10, 0.12, 0.11])
G = np.array([0.10, 0.12, 0.08, 0.09, 0.13, 0.10, 0.12, 0.10, 0.11, 0.08, 0.09, 0.10])
D4 = np.array([0.01, -0.005, 0.0, 0.005, -0.01, 0.0, 0.01, 0.0, -0.005, -0.005, 0.0, 0.0])
# comfort_kl (lower: closer to the reference): prio-b8 below matched-b8 by E8 > 0 (superiority,
# lower); prio-b4 beside matched-b4 (K4, mean 0: equivalent within 0.01).
KL_PRIO = np.array([0.050, 0.052, 0.048, 0.051, 0.049, 0.050, 0.053, 0.047, 0.050, 0.051, 0.049, 0.050])
E8 = np.array([0.020, 0.025, 0.015, 0.022, 0.018, 0.020, 0.024, 0.016, 0.021, 0.019, 0.020, 0.020])
K4 = np.array([0.001, -0.0005, 0.0, 0.0005, -0.001, 0.0, 0.001, 0.0, -0.0005, -0.0005, 0.0, 0.0])


def finals():
    """Per arm, per unit: the final record's endpoints."""
    prio = STANDARD + G
    acc = {"standard": STANDARD, "no-kl": STANDARD + 0.15, "prio-b4": prio, "matched-b4": prio - D4, "prio-b8": prio, "matched-b8": prio - 0.6 * G}
    kl = {"standard": KL_PRIO / 5, "no-kl": KL_PRIO * 8, "prio-b4": KL_PRIO, "matched-b4": KL_PRIO - K4, "prio-b8": KL_PRIO, "matched-b8": KL_PRIO + E8}
    return {arm: [{ACC: float(a), KL: float(k), "final/comfort_accuracy_greedy": 0.95, "final/comfort_logprob": -0.1 - k,
                   "final/n_plus_1_kl": 2 * k, **({"final/penalty_ratio": 0.05} if arm.startswith("prio") else {})}
                  for a, k in zip(acc[arm], kl[arm])] for arm in ARMS}


def hypothesis(name, group, metric, role, margin, **extra):
    prio, matched = f"prio-{group[-2:]}", f"matched-{group[-2:]}"
    return {"name": name, "arm": prio, "versus": matched, "metric": metric, "margin": margin, "role": role, "group": f"beta {group[-1]}", **extra}


HYPOTHESES = [h for b in ("b4", "b8") for h in (
    hypothesis(f"S-acc-{b}", b, ACC, "superiority", 0.0), hypothesis(f"E-acc-{b}", b, ACC, "equivalence", 0.03),
    hypothesis(f"S-kl-{b}", b, KL, "superiority", 0.0, direction="lower"), hypothesis(f"E-kl-{b}", b, KL, "equivalence", 0.01, direction="lower"))]
PLACEMENT = {"baseline": "standard", "metric": ACC,
             "groups": [{"name": "beta 4", "prioritized": "prio-b4", "matched": "matched-b4"},
                        {"name": "beta 8", "prioritized": "prio-b8", "matched": "matched-b8"}]}
SPEC = {"models": list(MODELS), "seeds": len(SEEDS), "first_seed": SEEDS[0], "arms": [{"name": a, **o} for a, o in ARMS.items()],
        "hypotheses": HYPOTHESES, "alpha": 0.05, "decision": "placement", "placement": PLACEMENT,
        "preregistration": "docs/preregistration/cpu-placement.md", "title": "Placement or strength"}


def fake_study(root):
    jobs, values = [], finals()
    for i, (model, seed) in enumerate(UNITS):
        for arm, overrides in ARMS.items():
            config = {"kl": "standard", "kl_coef": 5.0, "beta": "auto", "match_weight_beta": None, "method": "kl", "seed": seed,
                      "final_eval_episodes": 200, "final_eval_comfort_episodes": 100, **overrides}
            job = {"name": f"confirm/{model}/{arm}/seed{seed}", "kind": "rl", "experiment": "confirm", "dir": f"confirm/{model}/{arm}/seed{seed}",
                   "config": config, "arm": f"{model}/{arm}", "seed": seed}
            jobs.append(job)
            run = root / job["dir"]
            run.mkdir(parents=True)
            (run / "DONE.json").write_text(json.dumps({"wall_s": 1.0, "config": config}))
            (run / "config.json").write_text(json.dumps({"config": config, "kl_coef_used": 0.0 if arm == "no-kl" else config["kl_coef"]}))
            records = [{"step": 0, "episodes": 0, "eval/accuracy_sampled": 0.1}, {"step": 640, "episodes": 640, **values[arm][i]}]
            (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (root / "reproduce.json").write_text(json.dumps({
        "command": "critical-tokens reproduce --preset fake", "preset_name": "fake", "preset_source": "fake.json", "parallel_jobs": 1,
        "threads_per_job": 1, "preset": {"name": "fake", "experiments": {"confirm": SPEC}}, "jobs": jobs,
        "models": {m: {"config": {"n_digits": 3}, "init": "scratch"} for m in MODELS}, "git_commit": "abc1234", "preregistration_commit": "def5678"}))
    return StudyDir(root)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    rep = fake_study(root / "rep")
    return rep, section_confirm(rep, Plots(root / "plots")), root


def test_the_synthetic_study_decides_each_strength(study):
    rep, s, _ = study
    n, text = s.numbers, "\n".join(s.lines)
    h = n["hypotheses"]
    assert n["state"] == "complete" and all(h[x]["n"] == 12 and not h[x]["left_out"] for x in h)
    # beta 8: prio - matched = 0.6 G > 0 at every unit; superiority rejects, equivalence within 3 points fails.
    assert h["S-acc-b8"]["mean"] == pytest.approx(0.6 * G.mean())
    assert h["S-acc-b8"]["p_t"] == pytest.approx(stats.ttest_1samp(0.6 * G, 0.0, alternative="greater").pvalue)
    assert h["S-acc-b8"]["rejects"] and not h["E-acc-b8"]["rejects"]
    # Lower is better: the tested difference is matched - prio = E8.
    assert h["S-kl-b8"]["direction"] == "lower" and h["S-kl-b8"]["mean"] == pytest.approx(E8.mean())
    assert h["S-kl-b8"]["p_t"] == pytest.approx(stats.ttest_1samp(E8, 0.0, alternative="greater").pvalue)
    # beta 4: TOST on D4 at ±0.03 is the larger of two one-sided t-tests (scipy's, another implementation).
    lower, upper = stats.ttest_1samp(D4, -0.03, alternative="greater").pvalue, stats.ttest_1samp(D4, 0.03, alternative="less").pvalue
    assert h["E-acc-b4"]["p_t"] == pytest.approx(max(lower, upper))
    assert h["E-acc-b4"]["rejects"] and h["E-kl-b4"]["rejects"] and not h["S-acc-b4"]["rejects"] and not h["S-kl-b4"]["rejects"]
    # Holm over all 8 hypotheses, superiority and equivalence together.
    p = sorted(x["p_t"] for x in h.values())
    assert min(x["p_holm"] for x in h.values()) == pytest.approx(8 * p[0])
    assert n["verdicts"] == {"beta 4": "strength explains it, within the margins", "beta 8": "placement adds"}
    assert n["decision"] == "strength explains it, within the margins: beta 4; placement adds: beta 8"
    assert s.summary[0][2].startswith("beta 4: strength explains it, within the margins (placement share 0.00 [-0.")
    assert s.summary[0][2].endswith("beta 8: placement adds (placement share 0.60 [0.60, 0.60])")
    assert "| beta 4 | prio-b4 | matched-b4 | strength explains it, within ±3.0 points on `final/accuracy_sampled`, ±0.01 on `final/comfort_kl` |" in text
    e4, e8 = h["E-acc-b4"], h["E-acc-b8"]
    assert f"| equivalent within ±3.0 points (the 90% interval [{100 * e4['low_tost']:+.1f}, {100 * e4['high_tost']:+.1f}] lies inside) |" in text
    assert (f"| not shown equivalent within ±3.0 points: the 90% interval [{100 * e8['low_tost']:+.1f}, {100 * e8['high_tost']:+.1f}] "
            "does not exclude +3.0 |") in text
    assert e8["low_tost"] > 0.03  # the whole interval beyond the upper margin
    assert "| S-kl-b8 | superiority | matched-b8 - prio-b8 (lower is better) | `final/comfort_kl` |" in text


def test_the_placement_share_and_the_instance_level_analysis(study):
    _, s, _ = study
    groups = s.numbers["groups"]
    # beta 8: P - M = 0.6 (P - S) at every unit, so every resample's ratio is 0.6.
    share8 = groups["beta 8"]["share"]
    assert (share8["n"], share8["mean"], share8["low"], share8["high"]) == (12, pytest.approx(0.6), pytest.approx(0.6), pytest.approx(0.6))
    share4 = groups["beta 4"]["share"]
    assert share4["mean"] == pytest.approx(0.0, abs=1e-12) and share4["low"] < 0 < share4["high"]
    # By instance: the 4 instance means of 0.6 G, tested on 3 degrees of freedom.
    means = (0.6 * G).reshape(4, 3).mean(axis=1)
    by = s.numbers["hypotheses"]["S-acc-b8"]["by_instance"]
    assert by["n"] == 4 and by["mean"] == pytest.approx(means.mean())
    assert by["p_t"] == pytest.approx(stats.ttest_1samp(means, 0.0, alternative="greater").pvalue)
    assert s.numbers["per_instance"]["S-acc-b8"]["i2"] == {"mean": pytest.approx(means[1]), "n": 3}


def test_the_arms_table_the_unit_tables_and_the_strength_curve(study):
    rep, s, root = study
    text = "\n".join(s.lines)
    assert "realized penalty ratio | in-distribution KL to the reference |" in text
    assert "| prio-b8 | prioritized (beta 8) | 12/12 |" in text and "| 0.05 [0.05, 0.05] |" in text
    arms = s.numbers["arms"]
    assert arms["standard"]["continuous"]["penalty_ratio"] is None  # '-' in its row
    assert arms["matched-b8"]["continuous"]["comfort_kl"].mean == pytest.approx((KL_PRIO + E8).mean())
    for metric in (ACC, KL):  # every endpoint a hypothesis reads, per unit
        assert f"`{metric}`" in text and "of each run:" in text
    kl_table = text[text.index("`final/comfort_kl` of each run:"):]
    row = next(line for line in kl_table.splitlines() if line.startswith("| i1 | 101 |"))
    assert row.endswith(f"| {0.052 + 0.025:.3g} |")  # matched-b8's comfort KL at (i1, 101), the last column
    curve = s.numbers["strength_curve"]
    assert {a: p["kind"] for a, p in curve.items()} == {"standard": "uniform", "no-kl": "uniform", "prio-b4": "prioritized",
                                                        "matched-b4": "uniform", "prio-b8": "prioritized", "matched-b8": "uniform"}
    assert curve["no-kl"]["kl_coef"] == 0.0 and curve["matched-b8"]["kl_coef"] == pytest.approx(0.3)
    assert "![strength curve](plots/confirm_strength.png)" in text and (root / "plots" / "confirm_strength.png").exists()
    json.dumps(summary(rep, {"confirm": s}))  # summary.json can hold it


def test_units_left_out_are_named_with_their_reason(tmp_path):
    rep = fake_study(tmp_path / "rep")
    (rep.root / "confirm/i1/matched-b8/seed100/DONE.json").unlink()  # still running
    metrics = rep.root / "confirm/i2/prio-b8/seed101/metrics.jsonl"
    metrics.write_text(metrics.read_text()[:-40])  # the final line cut short
    metrics = rep.root / "confirm/i3/prio-b4/seed102/metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    del records[-1][KL]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    s = section_confirm(rep, Plots(tmp_path / "plots"))
    h, text = s.numbers["hypotheses"], "\n".join(s.lines)
    assert h["S-acc-b8"]["n"] == 10 and h["S-acc-b8"]["left_out"] == {
        "i1/seed100": "matched-b8: run not finished",
        "i2/seed101": "prio-b8: final evaluation unreadable (its last metrics line is missing or cut short)"}
    assert h["S-kl-b4"]["left_out"] == {"i3/seed102": "prio-b4: final evaluation has no `final/comfort_kl`"}
    assert h["S-acc-b4"]["n"] == 12 and h["S-acc-b4"]["left_out"] == {}
    assert "- S-acc-b8: 10 pairs used, 2 left out: (i1, 100): matched-b8: run not finished; (i2, 101): prio-b8: final evaluation" in text
    # Not "complete": 72 runs planned, 71 finished, 70 with a final evaluation.
    assert s.numbers["state"] == "incomplete: 70 of 72 runs have a readable final evaluation (prio-b8 (i2, seed 101) finished without one)"
    assert (s.numbers["runs"], s.numbers["of"]) == (70, 72) and s.numbers["arms"]["prio-b8"]["runs"] == 11
    assert "| prio-b8 | prioritized (beta 8) | 11/12 |" in text


def test_a_study_without_the_continuous_endpoints_says_why_there_is_no_curve(tmp_path):
    rep = fake_study(tmp_path / "rep")
    for path in rep.root.glob("confirm/*/*/seed*/metrics.jsonl"):
        records = [{k: v for k, v in json.loads(line).items() if k != KL} for line in path.read_text().splitlines()]
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    s = section_confirm(rep, Plots(tmp_path / "plots"))
    assert "is not drawn: no run of this study has `final/comfort_kl`" in "\n".join(s.lines)
    assert s.numbers["verdicts"]["beta 4"] == "not run"  # its comfort-KL hypotheses have no pairs


def test_the_instance_level_analysis_can_be_the_pre_registered_one(tmp_path):
    rep = fake_study(tmp_path / "rep")
    meta = json.loads((rep.root / "reproduce.json").read_text())
    meta["preset"]["experiments"]["confirm"]["analysis"] = "instances"
    (rep.root / "reproduce.json").write_text(json.dumps(meta))
    s = section_confirm(StudyDir(rep.root), Plots(tmp_path / "plots"))
    h = s.numbers["hypotheses"]
    assert s.numbers["analysis"] == "instances"
    held = ", ".join(name for name, x in h.items() if x["by_instance"]["rejects"])
    assert h["E-acc-b4"]["by_instance"]["p_holm"] != h["E-acc-b4"]["p_holm"]  # the decision reads the other analysis
    assert f"Decision (the pre-registered rule, on the instance-level analysis as pre-registered): **" in "\n".join(s.lines)
    assert f"after Holm: {held};" in "\n".join(s.lines)


def test_an_instance_level_analysis_needs_two_instances(tmp_path):
    rep = fake_study(tmp_path / "rep")
    for model in MODELS[1:]:  # matched-b4 finished on i1 only
        for seed in SEEDS:
            (rep.root / f"confirm/{model}/matched-b4/seed{seed}/DONE.json").unlink()
    s = section_confirm(rep, Plots(tmp_path / "plots"))
    h = s.numbers["hypotheses"]["S-acc-b4"]
    assert h["n"] == 3 and h["by_instance"] == {"n": 1, "p_holm": None, "rejects": False}
    row = next(line for line in s.lines if line.startswith("| S-acc-b4 | +"))
    assert "| fewer than 2 instances (1) | - | - | - |" in row
    assert s.numbers["hypotheses"]["S-acc-b8"]["by_instance"]["n"] == 4


# The 90% intervals by hand: mean ± t_{0.95,3} sd / 2, t_{0.95,3} = 2.353363.
# [0.01, -0.01, 0.0, 0.005]: mean 0.00125, squared deviations sum 2.1875e-4, sd 0.0085391: ± 0.0100478 -> [-0.9, +1.1] points;
# [0.04, 0.01, 0.02, 0.05]: mean 0.03, squared deviations sum 1e-3, sd 0.018257: ± 0.021483 -> [+0.9, +5.1];
# [0.04, -0.06, 0.02, -0.05]: mean -0.0125, squared deviations sum 7.475e-3, sd 0.049917: ± 0.058735 -> [-7.1, +4.6].
@pytest.mark.parametrize("differences, p_holm, text", [
    ([0.01, -0.01, 0.0, 0.005], 0.001, "equivalent within ±3.0 points (the 90% interval [-0.9, +1.1] lies inside)"),
    ([0.01, -0.01, 0.0, 0.005], 0.2, "not shown equivalent within ±3.0 points: the 90% interval [-0.9, +1.1] excludes ±3.0, "
                                     "but Holm's correction over the 12 hypotheses leaves p = 0.2000"),
    ([0.04, 0.01, 0.02, 0.05], 0.3, "not shown equivalent within ±3.0 points: the 90% interval [+0.9, +5.1] does not exclude +3.0"),
    ([0.04, -0.06, 0.02, -0.05], 0.9, "not shown equivalent within ±3.0 points: the 90% interval [-7.1, +4.6] does not exclude -3.0 or +3.0"),
])
def test_what_an_equivalence_test_shows_in_words(differences, p_holm, text):
    r = HypothesisResult("E", "equivalence", 0.03, tost(differences, 0.03), p_holm)  # p_holm as Holm would give it among 12
    assert equivalence_text(Hypothesis("E", "prio-b4", "matched-b4", ACC, 0.03, "equivalence"), r, 0.05, 12) == text


def test_the_readme_placement_part_gives_each_strengths_verdict_share_and_tests(study):
    from critical_tokens.report import readme
    from critical_tokens.runs import UserError

    rep, s, _ = study
    numbers = json.loads(json.dumps(summary(rep, {"confirm": s})))  # as read back from summary.json
    lines = readme.placement(numbers)
    text = " ".join(line.strip() for line in lines)  # wrapped prose read as one line
    assert "all 8 hypotheses: **strength explains it, within the margins: beta 4; placement adds: beta 8**" in text
    assert "**beta 8: placement adds** (placement share 0.60 [0.60, 0.60])" in text
    assert f"S-acc-b8 (superiority): prio-b8 - matched-b8 on `final/accuracy_sampled`: {100 * 0.6 * G.mean():+.1f} points" in text
    # Lower is better: the tested difference matched - prio = E8 > 0, as the report's section computed it.
    assert f"S-kl-b8 (superiority): matched-b8 - prio-b8 on `final/comfort_kl`: {E8.mean():+.3g} [" in text
    # Each hypothesis sits under its own strength, indented below the strength's line.
    assert text.index("S-acc-b4") < text.index("**beta 8:") < text.index("S-acc-b8")
    assert any(line.startswith("  - E-acc-b4 (equivalence)") for line in lines)
    del numbers["experiments"]["confirm"]["groups"]
    with pytest.raises(UserError, match="placement rule"):
        readme.placement(numbers)

"""The report's section on the pre-registered study, from a reproduction directory written by hand."""

import json

import pytest
from scipy import stats

from critical_tokens.report.confirm_section import section_confirm
from critical_tokens.report.plots import Plots
from critical_tokens.report.study_dir import StudyDir
from critical_tokens.report.summary import summary

MODELS, SEEDS = ("i21", "i22"), (100, 101, 102)
UNITS = [(m, s) for m in MODELS for s in SEEDS]  # the order paired_differences sorts them in
ARMS = {"standard": {"kl": "standard"}, "prioritized": {"kl": "prioritized", "beta": "8"},
        "matched-weight": {"kl": "standard", "match_weight_beta": 8.0}, "matched-penalty": {"kl": "standard", "kl_coef": 0.1},
        "no-kl": {"kl": "none"}}
HYPOTHESES = [{"name": "H1", "arm": "prioritized", "versus": "standard", "metric": "final/accuracy_sampled", "margin": 0.0, "role": "primary"},
              {"name": "H2a", "arm": "prioritized", "versus": "matched-weight", "metric": "final/accuracy_sampled", "margin": 0.0, "role": "control"},
              {"name": "H2b", "arm": "prioritized", "versus": "matched-penalty", "metric": "final/accuracy_sampled", "margin": 0.0, "role": "control"},
              {"name": "H3", "arm": "prioritized", "versus": "standard", "metric": "final/comfort_accuracy_greedy", "margin": -0.02, "role": "safety"}]
# Per unit (in UNITS order): standard's final sampled accuracy, and what each other arm differs by.
STANDARD = [0.40, 0.42, 0.38, 0.30, 0.33, 0.31]
H1 = [0.10, 0.12, 0.14, 0.06, 0.08, 0.10]  # mean 0.10
H2A = [0.05, 0.06, 0.07, 0.03, 0.04, 0.05]  # mean 0.05
H2B_STRENGTH = [0.02, -0.03, 0.01, -0.02, 0.03, -0.01]  # mean 0: the gain is the strength's
H3 = [0.0, 0.01, -0.01, 0.0, 0.01, 0.0]  # comfort differences, well above -2 points


def write_json(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))


def finals(h2b, h3):
    """Per arm, per unit: (final sampled accuracy, final in-distribution greedy accuracy)."""
    prioritized = [s + d for s, d in zip(STANDARD, H1)]
    return {"standard": [(s, 0.90) for s in STANDARD], "prioritized": [(p, 0.90 + c) for p, c in zip(prioritized, h3)],
            "matched-weight": [(p - d, 0.91) for p, d in zip(prioritized, H2A)],
            "matched-penalty": [(p - d, 0.92) for p, d in zip(prioritized, h2b)], "no-kl": [(0.2, 0.5)] * len(UNITS)}


def fake_reproduction(root, h2b=H2B_STRENGTH, h3=H3, with_confirm=True):
    jobs, values = [], finals(h2b, h3)
    for (model, seed), i in zip(UNITS, range(len(UNITS))):
        for arm, overrides in ARMS.items():
            config = {"kl": "standard", "kl_coef": 5.0, "beta": "auto", "match_weight_beta": None, "seed": seed,
                      "final_eval_episodes": 200, "final_eval_comfort_episodes": 100, **overrides}
            job = {"name": f"confirm/{model}/{arm}/seed{seed}", "kind": "rl", "experiment": "confirm", "dir": f"confirm/{model}/{arm}/seed{seed}",
                   "config": config, "arm": f"{model}/{arm}", "seed": seed}
            jobs.append(job)
            run = root / job["dir"]
            coef = {"matched-weight": 5.0 * (0.30 + 0.01 * i), "no-kl": 0.0}.get(arm, config["kl_coef"])
            write_json(run / "DONE.json", {"wall_s": 1.0, "config": config})
            write_json(run / "config.json", {"config": config, "kl_coef_used": coef, "beta": 8.0})
            sampled, comfort = values[arm][i]
            weight = {"weight_mean": 0.2 if arm == "prioritized" else 1.0} if arm != "no-kl" else {}
            if arm == "prioritized":  # the tokens it frees against the critical ones (selection.py)
                weight.update({"selection/precision": 0.1, "selection/recall": 0.9, "selection/share": 0.5})
            records = [{"step": 0, "episodes": 0, "eval/accuracy_sampled": 0.25, "eval/comfort_accuracy_greedy": 0.95},
                       {"step": 320, "episodes": 320, "kl": 0.01, "kl_term": 0.05, **weight},
                       {"step": 640, "episodes": 640, "kl": 0.02, "kl_term": 0.1, **{k: v / 2 for k, v in weight.items()},
                        "final/accuracy_sampled": sampled, "final/accuracy_greedy": sampled + 0.05,
                        "final/comfort_accuracy_greedy": comfort, "final/p_correct/critical_mean": 0.6}]
            (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    spec = {"models": list(MODELS), "seeds": len(SEEDS), "first_seed": SEEDS[0], "rl": {},
            "arms": [{"name": a, **o} for a, o in ARMS.items()], "hypotheses": HYPOTHESES, "alpha": 0.05,
            "preregistration": "docs/preregistration/cpu-confirm.md"}
    experiments = {"confirm": spec} if with_confirm else {"kl_by_model": {}}
    write_json(root / "reproduce.json", {
        "command": "critical-tokens reproduce --preset fake", "preset_name": "fake", "preset_source": "fake.json", "parallel_jobs": 1,
        "threads_per_job": 1, "preset": {"name": "fake", "experiments": experiments}, "jobs": jobs if with_confirm else [],
        "models": {m: {"config": {"n_digits": 3}, "init": "scratch"} for m in MODELS}, "git_commit": "abc1234", "preregistration_commit": "def5678"})
    return StudyDir(root)


def section(tmp_path, **kwargs):
    rep = fake_reproduction(tmp_path / "rep", **kwargs)
    return rep, section_confirm(rep, Plots(tmp_path / "plots"))


def test_complete_study_explained_by_strength(tmp_path):
    rep, s = section(tmp_path)
    n = s.numbers
    assert (n["state"], n["runs"], n["of"]) == ("complete", 30, 30)
    hyp = n["hypotheses"]
    assert [hyp[h]["n"] for h in hyp] == [6, 6, 6, 6]
    assert hyp["H1"]["mean"] == pytest.approx(0.10)
    assert hyp["H2a"]["mean"] == pytest.approx(0.05)
    assert hyp["H2b"]["mean"] == pytest.approx(0.0, abs=1e-12)
    assert hyp["H3"]["mean"] == pytest.approx(sum(H3) / 6)
    # The one-sided t-test agrees with scipy's own (another implementation), and Holm is over all four.
    assert hyp["H1"]["p_t"] == pytest.approx(stats.ttest_1samp(H1, 0.0, alternative="greater").pvalue)
    assert hyp["H3"]["p_t"] == pytest.approx(stats.ttest_1samp(H3, -0.02, alternative="greater").pvalue)
    p = sorted(hyp[h]["p_t"] for h in hyp)
    assert min(hyp[h]["p_holm"] for h in hyp) == pytest.approx(4 * p[0])
    assert [hyp[h]["rejects"] for h in hyp] == [True, True, False, True]
    assert n["decision"] == "beats standard, explained by strength"
    assert s.summary[0][0] == "Prioritized KL beats standard KL and strength-matched controls (pre-registered)"
    assert s.summary[0][3] == "beats standard, explained by strength"
    assert "+10.0 points" in s.summary[0][2] and "over 6 pairs" in s.summary[0][2]
    # Per instance: i21's H1 differences 0.10, 0.12, 0.14; i22's 0.06, 0.08, 0.10.
    assert n["per_instance"]["H1"] == {"i21": {"mean": pytest.approx(0.12), "n": 3}, "i22": {"mean": pytest.approx(0.08), "n": 3}}
    arms = n["arms"]
    assert arms["matched-weight"]["kl_coef_used"] == pytest.approx([1.5, 5.0 * 0.35])
    assert arms["no-kl"]["kl_coef_used"] is None and arms["no-kl"]["mean_kl_weight"] is None
    assert arms["prioritized"]["mean_kl_weight"].mean == pytest.approx(0.15)  # (0.2 + 0.1) / 2 per run
    assert arms["standard"]["final"]["sampled"].mean == pytest.approx(sum(STANDARD) / 6)
    assert arms["standard"]["runs"] == 6
    text = "\n".join(s.lines)
    assert "**beats standard, explained by strength**" in text
    assert "`docs/preregistration/cpu-confirm.md` (first committed in `def5678`)" in text and "`abc1234`" in text
    assert "| i21 | 101 | 42.0 | 54.0 |" in text  # the per-seed table: standard, then prioritized
    assert "| H1 | +12.0 (n=3) | +8.0 (n=3) | +10.0 (n=6) |" in text
    assert "![confirm](plots/confirm.png)" in text and (tmp_path / "plots" / "confirm.png").exists()
    assert "| prioritized | 0.075 [0.075, 0.075] | 0.675 [0.675, 0.675] | 0.375 [0.375, 0.375] |" in text  # per run the mean over its collects
    assert "![selection during RL](plots/confirm_selection.png)" in text and (tmp_path / "plots" / "confirm_selection.png").exists()
    json.dumps(summary(rep, {"confirm": s}))  # summary.json can hold it


@pytest.mark.parametrize("h2b, h3, decision", [
    (H2A, H3, "confirmed"),
    (H2A, [-0.05, -0.04, -0.06, -0.05, -0.03, -0.05], "beats standard and its controls, but loses the comfort zone"),
])
def test_other_decisions(tmp_path, h2b, h3, decision):
    _, s = section(tmp_path, h2b=h2b, h3=h3)
    assert s.numbers["decision"] == decision
    assert f"**{decision}**" in "\n".join(s.lines)


def test_partial_study_drops_the_unfinished_pair(tmp_path):
    rep = fake_reproduction(tmp_path / "rep")
    (rep.root / "confirm/i21/prioritized/seed101/DONE.json").unlink()  # a run still going: its metrics are not final
    s = section_confirm(rep, Plots(tmp_path / "plots"))
    n = s.numbers
    assert n["state"] == "partial: 29 of 30 runs finished"
    # Without unit (i21, 101) every hypothesis on prioritized has 5 pairs.
    assert [n["hypotheses"][h]["n"] for h in ("H1", "H2a", "H2b", "H3")] == [5, 5, 5, 5]
    kept = [d for u, d in zip(UNITS, H1) if u != ("i21", 101)]
    assert n["hypotheses"]["H1"]["mean"] == pytest.approx(sum(kept) / 5)
    assert n["per_instance"]["H1"]["i21"] == {"mean": pytest.approx(0.12), "n": 2}
    assert n["arms"]["prioritized"]["runs"] == 5 and n["arms"]["standard"]["runs"] == 6
    assert "| i21 | 101 | 42.0 | - |" in "\n".join(s.lines)


def test_not_run(tmp_path):
    _, s = section(tmp_path, with_confirm=False)
    assert s.numbers == {"state": "not in the preset"} and s.summary[0][3] == "not run"
    rep = fake_reproduction(tmp_path / "none")
    for job in rep.jobs:
        (rep.root / job["dir"] / "DONE.json").unlink()
    s = section_confirm(rep, Plots(tmp_path / "plots"))
    assert s.numbers == {"state": "not run"} and s.summary[0][2:] == ("-", "not run")


def test_the_per_arm_rule_gives_each_arm_its_verdict(tmp_path):
    """A study of several methods against one baseline (decision "per-arm"): each arm's gain (G) and
    comfort-zone (S) hypotheses give its verdict; a comparison (P) is tested but enters no verdict."""
    rep = fake_reproduction(tmp_path / "rep")
    meta = json.loads((rep.root / "reproduce.json").read_text())
    def hypothesis(name, arm, versus, metric, margin, role):
        return {"name": name, "arm": arm, "versus": versus, "metric": f"final/{metric}", "margin": margin, "role": role}
    meta["preset"]["experiments"]["confirm"].update(decision="per-arm", title="Methods side by side", hypotheses=[
        *[hypothesis(f"G-{a}", a, "standard", "accuracy_sampled", 0.0, "primary") for a in ("prioritized", "matched-weight", "no-kl")],
        *[hypothesis(f"S-{a}", a, "standard", "comfort_accuracy_greedy", -0.02, "safety") for a in ("prioritized", "matched-weight", "no-kl")],
        hypothesis("P-matched-weight", "prioritized", "matched-weight", "accuracy_sampled", 0.0, "comparison")])
    write_json(rep.root / "reproduce.json", meta)
    s = section_confirm(StudyDir(rep.root), Plots(tmp_path / "plots"))
    n, text = s.numbers, "\n".join(s.lines)
    # prioritized: +10 points, comfort equal; matched-weight: +5, comfort +1; no-kl: below standard at every unit.
    assert n["verdicts"] == {"prioritized": "gains and keeps the comfort zone", "matched-weight": "gains and keeps the comfort zone",
                             "no-kl": "no gain shown"}
    assert n["rule"] == "per-arm" and n["hypotheses"]["P-matched-weight"]["rejects"]
    assert n["decision"] == ("gains and keeps the comfort zone: prioritized, matched-weight; no gain shown: no-kl; "
                             "comparisons rejected: P-matched-weight of P-matched-weight")
    assert text.startswith("## Methods side by side") and "| no-kl | no gain shown |" in text
    assert s.summary[0][0] == "Methods side by side (pre-registered)"
    p = sorted(h["p_t"] for h in n["hypotheses"].values())
    assert min(h["p_holm"] for h in n["hypotheses"].values()) == pytest.approx(7 * p[0])  # Holm over all 7


def test_the_header_says_when_the_wall_time_leaves_out_an_interrupted_invocation(tmp_path):
    from critical_tokens.report.document import _header
    rep = fake_reproduction(tmp_path / "rep")  # no timing.json: no invocation recorded its wall time
    line = next(x for x in _header(rep) if x.startswith("- Wall time"))
    assert "30 of the 30 finished jobs ran in an invocation that was stopped" in line
    write_json(rep.root / "timing.json", {"invocations": [{"runs": 30, "wall_s": 20.0}], "wall_s": 20.0, "hardware": {}})
    line = next(x for x in _header(StudyDir(rep.root)) if x.startswith("- Wall time"))
    assert "stopped" not in line  # every finished job is in a recorded invocation

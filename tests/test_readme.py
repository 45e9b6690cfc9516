"""The README's numbers are generated from the committed reports (`critical_tokens.report.readme`),
never typed by hand: a hand edit of a marked block fails here."""

import json
from pathlib import Path

import pytest

from critical_tokens.report import readme

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("page", ["README.md", "docs/RESULTS.md"])
def test_the_readme_numbers_are_those_of_the_committed_reports(page):
    text = (ROOT / page).read_text()
    found = readme.blocks(text)
    assert found, f"{page} has no <!-- numbers: DIR --> ... <!-- /numbers --> block"
    assert len(found) == text.count("<!-- numbers: "), f"{page} has a marker that is not a block"
    missing = [m["source"] for m in found if not readme.source(ROOT / page, m).exists()]
    for m in found:
        if m["source"] not in missing:
            assert m[0] == readme.block(ROOT / page, m), f"{page}'s numbers from {m['source']} are not its source's: run make readme"
    if missing:
        pytest.skip(f"no summary.json committed yet in {', '.join(missing)}: write it with "
                    f"`critical-tokens report RUN_DIR --to DIR`, then `make readme`")


def _estimate(mean, low, high, n=10):
    return {"mean": mean, "low": low, "high": high, "n": n}


SUMMARY = {  # as `critical-tokens report` writes it, reduced to what the README block reads
    "preset": "cpu-full", "hardware": {"cpu": "AMD EPYC", "cores": 2, "gpu": None, "gpus": 0}, "threads_per_job": 1,
    "wall_s": 1705.0, "parallel_jobs": 2, "invocations": 1,
    "experiments": {"kl_by_model": {
        "state": "partial: 28 of 60 runs finished", "verdict": "not reproduced",
        "models": {"n3-d1": {"n_plus_one_fraction": 0.01, "seeds": 2, "of": 10,
                             "start": {"greedy": _estimate(0.016, 0.002, 0.1), "sampled": _estimate(0.0, 0.0, 0.07)},
                             "final_sampled": {"standard": _estimate(0.0, 0.0, 0.716, 2), "prioritized": None},
                             "verdicts": {}}}},
        "kl_comparison": {
        "state": "complete", "verdict": "not reproduced", "task": "plus1", "episodes": 640, "runs": 20, "compute_s": 6182.4,
        "start": {"sampled": _estimate(0.109, 0.086, 0.138), "greedy": _estimate(0.15, 0.123, 0.182)},
        "arms": {
            "standard": {"kl": "standard", "beta": "-", "seeds": 10,
                         "curve": {"lowest": {"episode": 160, "sampled": _estimate(0.003, 0.0, 0.02), "comfort_greedy": _estimate(0.2, 0.1, 0.35)},
                                   "highest": {"episode": 0, "sampled": _estimate(0.109, 0.086, 0.138), "comfort_greedy": None}},
                         "final": {"sampled": _estimate(0.081, 0.052, 0.124), "greedy": _estimate(0.134, None, None, 1),
                                   "comfort_greedy": _estimate(0.925, 0.83, 0.969)}},
            "prioritized": {"kl": "prioritized", "beta": "auto (1.68..1.79)", "beta_used": [1.6812, 1.7893], "seeds": 10,
                            "final": {"sampled": _estimate(0.066, 0.034, 0.122), "greedy": None,
                                      "comfort_greedy": _estimate(0.562, 0.285, 0.806)}}}}},
}


def test_make_readme_rewrites_the_marked_block_and_nothing_else(tmp_path, capsys):
    (tmp_path / "docs" / "results" / "cpu-full").mkdir(parents=True)
    (tmp_path / "docs" / "results" / "cpu-full" / "summary.json").write_text(json.dumps(SUMMARY))
    before = "# Title\n\n- **The comparison**, by hand:\n\n"
    after = "\n  Text after the block, kept as it is: 99.9%.\n"
    path = tmp_path / "README.md"
    path.write_text(before + "  <!-- numbers: docs/results/cpu-full -->\n  | stale | 1% |\n  <!-- /numbers -->\n" + after)

    assert readme.main([str(path)]) == 0
    # 6182.4 s = 1h43m02s, 1705 s = 28m25s; 0.109 -> 10.9%; a value from one seed has no interval; a missing one is "-"
    assert path.read_text() == before + """\
  <!-- numbers: docs/results/cpu-full -->
  20 runs of 640 episodes, 1h43m02s of compute on AMD EPYC (2 cores, 1 torch thread per run). The whole
  reproduction took 28m25s of wall time, in one invocation (2 runs in parallel). Verdict: **not
  reproduced**. Both arms start at 10.9% [8.6, 13.8] sampled accuracy on N+1 (greedy 15.0% [12.3, 18.2]).
  Final accuracy, mean over 10 seeds [95% interval]:

  | | sampled N+1 | greedy N+1 | in distribution (greedy) |
  |---|---|---|---|
  | standard KL | 8.1% [5.2, 12.4] | 13.4% | 92.5% [83.0, 96.9] |
  | prioritized KL (beta = auto: 1.68..1.79) | 6.6% [3.4, 12.2] | - | 56.2% [28.5, 80.6] |

  <!-- /numbers -->
""" + after
    assert "rewritten" in capsys.readouterr().out
    rewritten = path.read_text()
    assert readme.main([str(path)]) == 0 and path.read_text() == rewritten  # a second run changes nothing
    assert "unchanged" in capsys.readouterr().out


def test_a_readme_without_a_closed_block_is_an_error(tmp_path, capsys):
    path = tmp_path / "README.md"
    path.write_text("<!-- numbers: docs/results/cpu-full -->\nno end marker\n")
    assert readme.main([str(path)]) == 2
    assert "unclosed" in capsys.readouterr().err
    assert path.read_text() == "<!-- numbers: docs/results/cpu-full -->\nno end marker\n"


def test_the_other_parts_curves_kl_by_model_and_a_regime_row(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "summary.json").write_text(json.dumps(SUMMARY))
    (tmp_path / "row.json").write_text(json.dumps({
        "name": "tiny-n3-d3", "examples": 1000, "eval_seed": 2027,
        "accuracy": {"identical@+0": 0.998, "varying@+0": 1.0, "identical@+1": 0.177, "varying@+1": 0.218},
        "sampled": {"n_plus_1@T=1": 0.126}, "gap_critical": -0.1064, "gap_non_critical": 0.00348, "failures_at_critical": 0.1394}))
    path = tmp_path / "README.md"
    path.write_text("<!-- numbers: r curves -->\n<!-- /numbers -->\n<!-- numbers: r kl_by_model -->\n<!-- /numbers -->\n"
                    "<!-- numbers: row.json -->\n<!-- /numbers -->\n")
    assert readme.main([str(path)]) == 0
    text = " ".join(path.read_text().split())  # the lines unwrapped
    # the arm without a curve is left out; a missing value is "-"
    assert ("- standard KL: lowest 0.3% [0.0, 2.0] at episode 160 (in distribution 20.0% [10.0, 35.0]), highest 10.9% [8.6, 13.8] "
            "at episode 0 of 640. <!-- /numbers -->") in text
    assert "prioritized KL (beta = auto: 1.68..1.79): lowest" not in text
    assert "- `n3-d1` (N+1 dose 1%, starts at 1.6% [0.2, 10.0] greedy), 2 of 10 seeds: standard 0.0% [0.0, 71.6], prioritized -" in text
    assert "State: partial: 28 of 60 runs finished; verdict: **not reproduced**." in text
    assert "`tiny-n3-d3` on 1,000 examples per cell, evaluation seed 2027:" in text
    assert "- 17.7% / 21.8% greedy at N+1, and 12.6% of sampled N+1 rollouts are right at T = 1;" in text
    assert "13.9% of its greedy N+1 failures start at a critical token." in text


def test_an_unknown_part_is_an_error(tmp_path, capsys):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "summary.json").write_text(json.dumps(SUMMARY))
    path = tmp_path / "README.md"
    path.write_text("<!-- numbers: r tables -->\n<!-- /numbers -->\n")
    assert readme.main([str(path)]) == 2
    assert "unknown part 'tables'" in capsys.readouterr().err


def test_the_wall_time_is_stated_only_for_a_reproduction_made_in_one_invocation():
    text = " ".join(readme.outcome({**SUMMARY, "invocations": 3}))
    assert "wall time" not in text and "Verdict: **not reproduced**" in text


def test_an_arm_with_its_own_kl_coefficient_is_named_by_it():
    """The control arm of cpu-rloo (the standard penalty at alpha 0.8) must not read as a second "standard KL"."""
    kl = json.loads(json.dumps(SUMMARY["experiments"]["kl_comparison"]))
    kl["standard_arm"] = "standard"
    kl["arms"]["standard"]["kl_coef"] = 5.0
    kl["arms"]["prioritized"]["kl_coef"] = 5.0
    kl["arms"]["standard-alpha0.8"] = {**kl["arms"]["standard"], "kl_coef": 0.8}
    labels = [readme._arm_label(arm, kl) for arm in kl["arms"].values()]
    assert labels == ["standard KL", "prioritized KL (beta = auto: 1.68..1.79)", "standard KL with alpha = 0.8"]
    table = "\n".join(readme.outcome({**SUMMARY, "experiments": {"kl_comparison": kl}}))
    assert "| standard KL with alpha = 0.8 | 8.1% [5.2, 12.4] |" in table


def test_a_studys_block_gives_its_decision_arms_and_hypotheses():
    arm = {"kl": "standard", "final": {"sampled": _estimate(0.2, 0.15, 0.26, 30), "greedy": _estimate(0.3, 0.25, 0.36, 30),
                                       "comfort_greedy": _estimate(1.0, 0.99, 1.0, 30), "p_correct_critical": None},
           "kl_coef_used": [1.0504, 1.0712]}
    summary = {"preset": "cpu-confirm", "hardware": {"cpu": "AMD EPYC", "cores": 2}, "threads_per_job": 1, "experiments": {"confirm": {
        "state": "complete", "decision": "beats standard, explained by strength", "runs": 150, "compute_s": 7200.0,
        "preregistration": {"path": "docs/preregistration/cpu-confirm.md", "commit": "7f8cf4a60ad6"},
        "arms": {"matched-weight": arm},
        "hypotheses": {"H2a": {"role": "control", "arm": "prioritized", "versus": "matched-weight", "metric": "final/accuracy_sampled",
                               "n": 30, "mean": 0.031, "low": -0.01, "high": 0.072, "margin": 0.0, "p_holm": 0.21, "rejects": False},
                       "H3": {"role": "safety", "arm": "prioritized", "versus": "standard", "metric": "final/comfort_accuracy_greedy",
                              "n": 30, "mean": 0.0, "low": 0.0, "high": 0.0, "margin": -0.02, "p_holm": 0.0, "rejects": True}}}}}
    text = " ".join(line.strip() for line in readme.confirm(summary))  # wrapped prose read as one line
    assert "(commit 7f8cf4a): **beats standard, explained by strength**" in text and "2h00m00s of compute" in text
    assert "| matched-weight | standard | 20.0% [15.0, 26.0] | 30.0% [25.0, 36.0] | 100.0% [99.0, 100.0] | 1.05..1.07 |" in text
    assert "+3.1 points [-1.0, +7.2]" in text and "Holm p = 0.21: does not reject" in text
    assert "margin -2; Holm p = 0: holds" in text  # a safety hypothesis holds where its non-inferiority test rejects
    study = summary["experiments"]["confirm"]
    study["verdicts"] = {"matched-weight": "gains, loses the comfort zone"}  # a per-arm rule: the verdict in each arm's row
    study["arms"]["standard"] = arm
    rows = [line for line in readme.confirm(summary) if line.startswith("| ")]
    assert rows[0].endswith("| KL coefficient | verdict |")
    assert rows[1].endswith("| 1.05..1.07 | gains, loses the comfort zone |") and rows[2].endswith("| baseline |")


def test_a_finding_part_quotes_the_reports_summary_rows():
    summary = {"preset": "cpu", "findings": [{"finding": "Critical tokens are uncertain (table 1)", "ours": "n3: -0.081", "verdict": "partly"},
                                             {"finding": "Prioritized KL beats standard KL (figure 4)", "ours": "x", "verdict": "partly"}]}
    assert readme.findings(summary, "table1") == ["- Critical tokens are uncertain (table 1): **partly** (n3: -0.081).", ""]
    with pytest.raises(readme.UserError, match="no levels results"):
        readme.findings(summary, "levels")


def test_an_equivalence_and_a_lower_is_better_hypothesis_read_as_what_their_tests_say():
    summary = {"preset": "cpu-placement", "hardware": {"cpu": "AMD EPYC", "cores": 2}, "threads_per_job": 1, "experiments": {"confirm": {
        "state": "complete", "decision": "beta 8: strength explains it", "runs": 320, "compute_s": 3600.0,
        "preregistration": {"path": "docs/preregistration/cpu-placement.md", "commit": "abcdef0123"}, "arms": {},
        "hypotheses": {
            # TOST on accuracy: the 90% interval [-1.2, +2.0] points lies inside ±3
            "E-acc-b8": {"role": "equivalence", "arm": "prio-b8", "versus": "matched-b8", "metric": "final/accuracy_sampled", "n": 40,
                         "mean": 0.004, "low": -0.018, "high": 0.026, "low_tost": -0.012, "high_tost": 0.02, "level": 0.9,
                         "margin": 0.03, "p_holm": 0.01, "rejects": True},
            # a KL, lower is better: summary.json holds the tested difference, versus - arm = +0.002 (report/paired.py)
            "S-kl-b8": {"role": "superiority", "arm": "prio-b8", "versus": "matched-b8", "metric": "final/comfort_kl", "direction": "lower",
                        "n": 40, "mean": 0.002, "low": -0.0001, "high": 0.004, "margin": 0.0, "p_holm": 0.2, "rejects": False}}}}}
    text = " ".join(line.strip() for line in readme.confirm(summary))
    assert ("E-acc-b8 (equivalence): prio-b8 - matched-b8 on `final/accuracy_sampled`: +0.4 points [-1.2, +2.0] (90% interval) "
            "over 40 pairs, margin ±3; Holm p = 0.01: equivalent within the margin.") in text
    assert ("S-kl-b8 (superiority): matched-b8 - prio-b8 on `final/comfort_kl`: +0.002 [-0.0001, +0.004] over 40 pairs, "
            "margin +0; Holm p = 0.2: does not reject.") in text
    assert "two one-sided tests (TOST)" in text

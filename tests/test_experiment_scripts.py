"""The study scripts under scripts/: their configurations are valid and are the ones they claim."""

import dataclasses
import importlib.util
import json
import math
from pathlib import Path

import pytest

from critical_tokens.rl import config as rl_config
from critical_tokens.study.plan import comparable, plan
from critical_tokens.study.preset import check_preset, load_preset, preset_names
from critical_tokens.runs import UserError

ROOT = Path(__file__).resolve().parents[1]


def script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


rl_algorithms = script("rl_algorithms")


@pytest.mark.parametrize("name", list(rl_algorithms.CONFIGS))
def test_every_rl_algorithm_probe_is_a_valid_run_of_the_shipped_model(name, tmp_path):
    config = rl_algorithms.config_of(name, tmp_path)
    rl_config.validate(config)
    algorithm, kl, lr, detach_critic = rl_algorithms.CONFIGS[name]
    assert (config.algorithm, config.kl, config.lr, config.detach_critic, config.seed) == (algorithm, kl, lr, detach_critic, 0)
    assert (ROOT / config.pretrained / "model").is_dir()


@pytest.mark.parametrize("preset_name, probe, arm", [("cpu-full", "a2c-none-lr2e-4", "no-kl"), ("cpu-full", "a2c-standard-lr2e-4", "standard"),
                                                     ("cpu-rloo", "rloo-none-lr2e-5", "no-kl")])
def test_a_probe_is_the_same_run_as_its_presets_kl_comparison_at_seed_0(preset_name, probe, arm, tmp_path):
    """The table reuses cpu-full's two A2C runs at 2e-4, and the cpu-rloo no-KL arm repeats the RLOO probe
    at 2e-5: their configs must agree except the model's path (the same shipped weights)."""
    preset, where = load_preset(preset_name)
    jobs, _ = plan(preset, where)
    job = next(j for j in jobs if j.name == f"kl_comparison/{arm}/seed0")
    ours = comparable(dataclasses.asdict(rl_algorithms.config_of(probe, tmp_path)))
    theirs = comparable(job.config)
    assert theirs.pop("pretrained").startswith("n3-d3-") and ours.pop("pretrained") == "tiny-n3-d3"
    assert ours == theirs


def test_unfinished_runs_are_not_rows(tmp_path):
    assert not rl_algorithms.finished(tmp_path / "absent")
    assert "Not run yet" in rl_algorithms.render(tmp_path)


def fake_trl_study(out: Path, module, gain: dict, seeds) -> None:
    """result.json files as the example writes them: each arm's sampled accuracy after is 0.2 + its gain
    + a seed effect shared by every arm (the pairing takes it out), and for the prioritized arm +-0.5 points
    by seed (even: +, odd: -)."""
    for arm in module.ARMS:
        for seed in seeds:
            after = 0.2 + gain[arm] + 0.01 * (seed % 3) + (0.005 * (-1) ** seed if arm == "prioritized" else 0.0)
            (out / f"{arm}-s{seed}").mkdir(parents=True)
            (out / f"{arm}-s{seed}" / "result.json").write_text(json.dumps(
                {"before": {"greedy": 0.3, "sampled": 0.2}, "after": {"greedy": after + 0.1, "sampled": after}}))


def test_the_trl_study_tests_its_hypotheses_on_paired_seeds_and_decides(tmp_path):
    trl_study = script("trl_study")
    seeds = list(trl_study.SEEDS)
    fake_trl_study(tmp_path, trl_study, {"standard": 0.0, "prioritized": 0.2, "matched-weight": 0.1, "matched-penalty": 0.2}, seeds)
    text = trl_study.report(tmp_path)
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["hypotheses"]["H1"]["rejects"] and result["hypotheses"]["H2a"]["rejects"]
    assert not result["hypotheses"]["H2b"]["rejects"]  # +-0.5 points: a mean difference of 0
    assert result["decision"] == "beats standard, explained by strength" and "explained by strength" in text
    assert result["hypotheses"]["H1"]["differences"] == pytest.approx([0.2 + 0.005 * (-1) ** s for s in seeds])


def test_the_trl_study_pairs_only_seeds_both_arms_finished(tmp_path):
    import shutil

    trl_study = script("trl_study")
    seeds = list(trl_study.SEEDS)
    fake_trl_study(tmp_path, trl_study, {arm: 0.0 for arm in trl_study.ARMS}, seeds)
    shutil.rmtree(tmp_path / f"standard-s{seeds[0]}")
    trl_study.report(tmp_path)
    result = json.loads((tmp_path / "results.json").read_text())
    assert len(result["hypotheses"]["H1"]["differences"]) == len(seeds) - 1
    assert len(result["hypotheses"]["H2a"]["differences"]) == len(seeds)
    assert result["decision"] == "not confirmed"


def test_the_trl_study_arms_are_options_of_the_example():
    import sys

    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from addition_task import parser
    finally:
        sys.path.remove(str(ROOT / "examples"))
    trl_study = script("trl_study")
    for arm, options in trl_study.ARMS.items():
        args = parser("", "grpo", kl_coef=5.0, kl_help="", lr=5e-5, lr_help="").parse_args(options)
        assert float(args.prioritized_beta) == (8.0 if arm == "prioritized" else 0.0)
    assert float(trl_study.ARMS["matched-weight"][-1]) == pytest.approx(5.0 * trl_study.MATCHED_WEIGHT, rel=1e-3)


# --- cpu-placement: the pilot preset from the instance search, and the calibration -----------------------


def test_the_pilot_preset_has_the_first_four_passing_seeds_and_plans_their_runs(tmp_path):
    pilots = script("placement_pilots")
    for seed, ok in [(24, False), (25, True), (26, True), (27, False), (28, True), (29, True), (30, True)]:
        (tmp_path / f"s{seed}.json").write_text(json.dumps({"seed": seed, "verdict": "meets the target" if ok else "misses: x"}))
    seeds = pilots.chosen_instances(tmp_path)
    assert seeds == [25, 26, 28, 29]  # in order, the fifth passing seed left out
    preset = pilots.pilot_preset(seeds)
    check_preset(preset, "pilot.json")
    jobs, models = plan(preset)
    rl = [j for j in jobs if j.kind == "rl"]
    assert len(rl) == 4 * 3 * 3 and {j.seed for j in rl} == {900, 901, 902}  # 4 instances x 3 betas x 3 seeds
    assert [models[f"i{s}"]["config"]["seed"] for s in seeds] == seeds
    (tmp_path / "s27.json").unlink()  # seed 27 not checked yet: 28 and 29 may not be among the first four
    assert pilots.chosen_instances(tmp_path, partial=True) == [25, 26]
    with pytest.raises(UserError, match="2 of 4"):
        pilots.chosen_instances(tmp_path)


def test_the_calibration_takes_the_median_ratio_and_the_paired_comfort_sd(tmp_path):
    pilots = script("placement_pilots")

    def run(path: Path, ratio, comfort):
        path.mkdir(parents=True)
        (path / "metrics.jsonl").write_text(json.dumps({"step": 0}) + "\n" + json.dumps(
            {"step": 640, "final/accuracy_sampled": 0.3, "final/penalty_ratio": ratio, "final/comfort_kl": comfort}) + "\n")

    base = tmp_path / "kl_by_model" / "i25"
    for k, (ratio, prio_kl, std_kl) in enumerate([(0.02, 0.5, 0.1), (0.04, 0.7, 0.2), (0.03, 0.9, 0.2)]):
        for b in (4, 8, 16):
            run(base / f"prio-b{b}" / f"seed{900 + k}", ratio * b / 8, prio_kl)
        run(base / "standard" / f"seed{900 + k}", 1.0, std_kl)
    result = pilots.calibrate([tmp_path])["instances"]["i25"]
    assert math.isclose(result["beta 8"]["median_ratio"], 0.03) and math.isclose(result["beta 8"]["matched_kl_coef"], 0.15)
    assert math.isclose(result["beta 16"]["median_ratio"], 0.06)
    # differences 0.4, 0.5, 0.7: mean 0.5333, squared deviations 0.01778 + 0.00111 + 0.02778 = 0.04667, over 2: sd 0.15275
    assert math.isclose(result["beta 4"]["comfort_kl_paired_sd"], 0.15275, rel_tol=1e-4)
    assert "| i25 | 8 | 3 |" in pilots.markdown(pilots.calibrate([tmp_path]))


def test_the_study_preset_matches_each_instance_and_beta_and_fixes_the_margins_by_rule(tmp_path):
    pilots = script("placement_pilots")

    def run(path: Path, ratio, comfort, accuracy):
        path.mkdir(parents=True)
        (path / "metrics.jsonl").write_text(json.dumps({"step": 640, "final/accuracy_sampled": accuracy,
                                                        "final/penalty_ratio": ratio, "final/comfort_kl": comfort}) + "\n")

    for i, instance in enumerate(["i25", "i26", "i28", "i30"]):
        for k in range(3):
            for b in (4, 8, 16):  # comfort KL b x 10^(k - 6): log10 of it log10(b) - 6 + k, within an instance sd 1
                run(tmp_path / "kl_by_model" / instance / f"prio-b{b}" / f"seed{900 + k}", 0.01 * b * (i + 1), b * 10.0 ** (k - 6),
                    0.3 + 0.01 * b + 0.02 * k)
            run(tmp_path / "kl_by_model" / instance / "standard" / f"seed{900 + k}", 1.0, 0.001, 0.2)
    result = pilots.calibrate([tmp_path])
    preset = pilots.study_preset(result)
    check_preset(preset, "cpu-placement.json")
    study = preset["experiments"]["confirm"]
    matched = {a["name"]: a["kl_coef_by_model"] for a in study["arms"] if "kl_coef_by_model" in a}
    assert matched["matched-b8"] == {"i25": 0.4, "i26": 0.8, "i28": 1.2, "i30": 1.6}  # 5 x 0.08 x (i + 1)
    margins = {h["name"]: h["margin"] for h in study["hypotheses"]}
    assert margins["E-acc-b4"] == 0.03 and margins["E-kl-b8"] == 0.5 and margins["E-kl-b16"] == 0.5  # half an order of magnitude
    assert {h["metric"] for h in study["hypotheses"] if h["name"].startswith(("S-kl", "E-kl"))} == {"final/comfort_kl_log10"}
    assert len(study["hypotheses"]) == 13 and {m["seed"] for name, m in preset["models"].items() if name.startswith("i")} == {25, 26, 28, 30}
    jobs = [j for j in plan(preset)[0] if j.kind == "rl"]
    assert len(jobs) == 7 * 4 * 15 and {j.seed for j in jobs} == set(range(600, 615))  # standard and 3 x 2 arms, 15 seeds
    inputs = pilots.power_inputs(result)
    # prioritized at adjacent betas differ by 0.04 and 0.08 on every seed: no spread, so cpu-confirm's 4.4 points stand
    assert inputs["accuracy"]["pilot_sd"] == 0.0 and inputs["accuracy"]["sd"] == 0.044
    # log10 comfort KL within an instance: c - 6, c - 5, c - 4: sd 1, times sqrt(2)
    assert math.isclose(inputs["comfort beta 4"]["sd"], 2 ** 0.5) and math.isclose(inputs["comfort beta 8"]["pilot_mean_log10"], math.log10(8) - 5)
    assert any(line.startswith("| accuracy | 0.044 | 0.03 |") for line in pilots.power_table(result))


def test_the_committed_cpu_placement_preset_is_the_calibrations_and_runs_fresh_seeds():
    """critical_tokens/study/presets/cpu-placement.json is what `placement_pilots.py study` makes of the committed
    calibration, and its 420 RL runs use seeds no other preset uses."""
    pilots = script("placement_pilots")
    committed, _ = load_preset("cpu-placement")
    made = pilots.study_preset(json.loads((ROOT / "docs" / "placement-pilots.json").read_text()))
    assert committed["experiments"] == made["experiments"] and committed["models"] == made["models"]
    jobs = [j for j in plan(committed)[0] if j.kind == "rl"]
    assert len(jobs) == 7 * 4 * 15
    used_before = {j.seed for name in preset_names() if name not in ("cpu-placement", "smoke") for j in plan(load_preset(name)[0])[0] if j.kind == "rl"}
    assert not used_before & {j.seed for j in jobs}


# --- scripts/same_numbers.py: the comparison of two commits' numbers ------------------------------------


def test_same_numbers_tells_identical_from_rounding_from_a_real_difference():
    same_numbers = script("same_numbers")
    old = ([{"step": 32, "accuracy": 0.5, "kl": 0.0018}], {"final/accuracy_sampled": 0.29})
    assert same_numbers.verdict(same_numbers.differences(old, old), 0.0) == ("identical", False)

    rounded = ([{"step": 32, "accuracy": 0.5, "kl": 0.0018 * (1 + 2e-6)}], {"final/accuracy_sampled": 0.29})
    found = same_numbers.differences(old, rounded)
    assert [path for path, _, _ in found] == ["[0][0].kl"]
    line, beyond = same_numbers.verdict(found, 1e-4)
    assert not beyond and "equal within rtol" in line and "2.0e-06" in line
    assert same_numbers.verdict(found, 0.0)[1]  # bit for bit: a difference

    other_outcome = ([{"step": 32, "accuracy": 0.53125, "kl": 0.0018}], {"final/accuracy_sampled": 0.29})
    line, beyond = same_numbers.verdict(same_numbers.differences(old, other_outcome), 1e-4)
    assert beyond and "accuracy" in line  # 0.5 -> 0.53: beyond rounding
    cancelling = ([{"step": 32, "accuracy": 0.5, "kl": 0.0018, "loss": 1e-4}], old[1])
    found = same_numbers.differences(cancelling, ([{**cancelling[0][0], "loss": 1.0002e-4}], old[1]))
    assert same_numbers.verdict(found, 1e-4)[1] and not same_numbers.verdict(found, 1e-4, atol=1e-7)[1]  # 2e-4 relative, 2e-8 absolute
    fewer_lines = ([], old[1])
    assert same_numbers.verdict(same_numbers.differences(old, fewer_lines), 1.0)[1]  # a missing metrics line is never rounding


def test_same_numbers_in_distribution_says_when_a_mean_leaves_the_other_commits_interval():
    same_numbers = script("same_numbers")
    old = {1: 0.40, 2: 0.44, 3: 0.36, 4: 0.40}  # mean 0.40, sd 0.0327, 95% interval 0.40 ± 3.182 * 0.0163 = [0.348, 0.452]
    line, apart = same_numbers.distribution_line("a:b", "final/accuracy_sampled", old, {s: v + 0.01 for s, v in old.items()})
    assert not apart and "old 0.400 [0.348, 0.452]" in line and "new - old +0.010" in line
    line, apart = same_numbers.distribution_line("a:b", "final/accuracy_sampled", old, {s: v + 0.06 for s, v in old.items()})
    assert apart and "outside" in line  # 0.46 is above 0.452
    assert not same_numbers.inside(0.4, same_numbers.t_interval([0.4]))  # one seed: no interval to be inside

"""The cpu-placement study's scripts: the pilot preset from the instance search, and the calibration."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

from critical_tokens.experiments import check_preset, plan
from critical_tokens.runs import UserError

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_pilot_preset_has_the_first_four_passing_seeds_and_plans_their_runs(tmp_path):
    pilots = load("placement_pilots")
    for seed, ok in [(24, False), (25, True), (26, True), (27, False), (28, True), (29, True), (30, True)]:
        (tmp_path / f"s{seed}.json").write_text(json.dumps({"seed": seed, "verdict": "meets the target" if ok else "misses: x"}))
    seeds = pilots.chosen_instances(tmp_path)
    assert seeds == [25, 26, 28, 29]  # in order, the fifth passing seed left out
    preset = pilots.pilot_preset(seeds)
    check_preset(preset, "pilot.json")
    jobs, models = plan(preset)
    rl = [j for j in jobs if j.kind == "rl"]
    assert len(rl) == 4 * 4 * 3 and {j.seed for j in rl} == {900, 901, 902}
    assert [models[f"i{s}"]["config"]["seed"] for s in seeds] == seeds
    (tmp_path / "s28.json").unlink(), (tmp_path / "s29.json").unlink(), (tmp_path / "s30.json").unlink()
    with pytest.raises(UserError, match="2 of 4"):
        pilots.chosen_instances(tmp_path)


def test_the_calibration_takes_the_median_ratio_and_the_paired_comfort_sd(tmp_path):
    pilots = load("placement_pilots")

    def run(path: Path, ratio, comfort):
        path.mkdir(parents=True)
        (path / "metrics.jsonl").write_text(json.dumps({"step": 0}) + "\n" + json.dumps(
            {"step": 640, "final/accuracy_sampled": 0.3, "final/penalty_ratio": ratio, "final/comfort_kl": comfort}) + "\n")

    base = tmp_path / "kl_by_model" / "i25"
    for k, (ratio, prio_kl, std_kl) in enumerate([(0.02, 0.5, 0.1), (0.04, 0.7, 0.2), (0.03, 0.9, 0.2)]):
        for b in (4, 8, 16):
            run(base / f"prio-b{b}" / f"seed{900 + k}", ratio * b / 8, prio_kl)
        run(base / "standard" / f"seed{900 + k}", 1.0, std_kl)
    result = pilots.calibrate(tmp_path)["instances"]["i25"]
    assert math.isclose(result["beta 8"]["median_ratio"], 0.03) and math.isclose(result["beta 8"]["matched_kl_coef"], 0.15)
    assert math.isclose(result["beta 16"]["median_ratio"], 0.06)
    # differences 0.4, 0.5, 0.7: mean 0.5333, squared deviations 0.01778 + 0.00111 + 0.02778 = 0.04667, over 2: sd 0.15275
    assert math.isclose(result["beta 4"]["comfort_kl_paired_sd"], 0.15275, rel_tol=1e-4)
    assert "| i25 | 8 | 3 |" in pilots.markdown(pilots.calibrate(tmp_path))

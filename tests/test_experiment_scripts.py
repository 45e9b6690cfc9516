"""The study scripts under scripts/: their configurations are valid and are the ones they claim."""

import dataclasses
import importlib.util
from pathlib import Path

import pytest

from critical_tokens.rl import config as rl_config
from critical_tokens.experiments import comparable, load_preset, plan

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

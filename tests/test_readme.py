"""The README's numbers are generated from the committed reports (`critical_tokens.report.readme`),
never typed by hand: a hand edit of a marked block fails here."""

import json
from pathlib import Path

import pytest

from critical_tokens.report import readme

ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_numbers_are_those_of_the_committed_reports():
    text = (ROOT / "README.md").read_text()
    found = readme.blocks(text)
    assert found, "README.md has no <!-- numbers: DIR --> ... <!-- /numbers --> block"
    missing = [m["dir"] for m in found if not (ROOT / m["dir"] / "summary.json").exists()]
    for m in found:
        if m["dir"] not in missing:
            assert m[0] == readme.block(ROOT / "README.md", m), f"README.md's numbers from {m['dir']} are not its summary.json's: run make readme"
    if missing:
        pytest.skip(f"no summary.json committed yet in {', '.join(missing)}: write it with "
                    f"`critical-tokens report RUN_DIR --to DIR`, then `make readme`")


def _estimate(mean, low, high, n=10):
    return {"mean": mean, "low": low, "high": high, "n": n}


SUMMARY = {  # as `critical-tokens report` writes it, reduced to what the README block reads
    "preset": "cpu-full", "hardware": {"cpu": "AMD EPYC", "cores": 2, "gpu": None, "gpus": 0}, "threads_per_job": 1,
    "experiments": {"kl_comparison": {
        "state": "complete", "verdict": "not reproduced", "task": "plus1", "episodes": 640, "runs": 20, "compute_s": 6182.4,
        "start": {"sampled": _estimate(0.109, 0.086, 0.138), "greedy": _estimate(0.15, 0.123, 0.182)},
        "arms": {
            "standard": {"kl": "standard", "beta": "-", "seeds": 10,
                         "final": {"sampled": _estimate(0.081, 0.052, 0.124), "greedy": _estimate(0.134, None, None, 1),
                                   "comfort_greedy": _estimate(0.925, 0.83, 0.969)}},
            "prioritized": {"kl": "prioritized", "beta": "8", "seeds": 10,
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
    # 6182.4 s = 1h43m02s; 0.109 -> 10.9%; a value from one seed has no interval; a missing one is "-"
    assert path.read_text() == before + """\
  <!-- numbers: docs/results/cpu-full -->
  20 runs of 640 episodes, 1h43m02s of compute on AMD EPYC (2 cores, 1 torch thread per run); verdict:
  **not reproduced**. Both arms start at 10.9% [8.6, 13.8] sampled accuracy on N+1 (greedy 15.0% [12.3,
  18.2]). Final accuracy, mean over 10 seeds [95% interval]:

  | | sampled N+1 | greedy N+1 | in distribution (greedy) |
  |---|---|---|---|
  | standard KL | 8.1% [5.2, 12.4] | 13.4% | 92.5% [83.0, 96.9] |
  | prioritized KL (beta = 8) | 6.6% [3.4, 12.2] | - | 56.2% [28.5, 80.6] |

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

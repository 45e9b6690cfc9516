"""The README's numbers, generated from a committed report's summary.json instead of typed by hand.

README.md marks each generated block with the directory of the report it comes from::

    <!-- numbers: docs/results/cpu-full -->
    (generated from docs/results/cpu-full/summary.json: the outcome of the KL comparison)
    <!-- /numbers -->

``python -m critical_tokens.report.readme README.md`` (``make readme``) rewrites the lines between
each pair of markers and nothing else; ``tests/test_readme.py`` fails when a committed block differs
from what this generates, so a hand edit cannot drift from the report.
"""

from __future__ import annotations

import argparse
import re
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

from ..config import add_arguments, arg, from_namespace
from ..runs import UserError, atomic_write_text, read_json
from .document import duration
from .statistics import Estimate, pct

BLOCK = re.compile(r"^(?P<indent>[ \t]*)<!-- numbers: (?P<dir>\S+) -->\n(?P<body>.*?)^(?P=indent)<!-- /numbers -->$", re.M | re.S)
WIDTH = 105  # the README's line length


def _estimate(e: dict | None) -> Estimate | None:
    return None if e is None else Estimate(**e)


def _arm_label(arm: dict) -> str:
    if arm["kl"] == "none":
        return "no KL"
    if arm["kl"] != "prioritized":
        return f"{arm['kl']} KL"
    beta = str(arm["beta"])
    return f"prioritized KL (beta = {beta})" if not beta.startswith("auto ") else f"prioritized KL (beta = auto: {beta[6:-1]})"


def _machine(summary: dict) -> str:
    hw = summary.get("hardware") or {}
    if not hw:
        return "a machine not recorded"
    gpu = f" and {hw['gpus']} x {hw['gpu']}" if hw.get("gpu") else ""
    threads = summary["threads_per_job"]
    return f"{hw.get('cpu', '?')} ({hw.get('cores', '?')} cores{gpu}, {threads} torch thread{'s' if threads != 1 else ''} per run)"


def outcome(summary: dict) -> list[str]:
    """The block for one report: the KL comparison's runs, where they start, and each arm's final
    accuracy (sampled and greedy on the RL task, greedy in distribution) with its 95% interval."""
    kl = summary["experiments"].get("kl_comparison", {"state": "not run"})
    if kl["state"] == "not run":
        raise UserError(f"the report of preset {summary['preset']!r} has no kl_comparison runs to put in the README")
    digits = "N+" + kl["task"].removeprefix("plus")
    arms = kl["arms"]
    seeds = {a["seeds"] for a in arms.values()}
    start = kl["start"]
    text = (f"{kl['runs']} runs of {kl['episodes']} episodes, {duration(kl['compute_s'])} of compute on {_machine(summary)}; "
            f"verdict: **{kl['verdict']}**. {'Both arms start' if len(arms) == 2 else f'All {len(arms)} arms start'} at "
            f"{pct(_estimate(start['sampled']))} sampled accuracy on {digits} (greedy {pct(_estimate(start['greedy']))}). "
            f"Final accuracy, mean over {f'{seeds.pop()} seeds' if len(seeds) == 1 else 'seeds'} [95% interval]:")
    lines = textwrap.wrap(text, WIDTH, break_long_words=False, break_on_hyphens=False)
    lines += ["", f"| | sampled {digits} | greedy {digits} | in distribution (greedy) |", "|---|---|---|---|"]
    for arm in arms.values():
        final = {k: pct(_estimate(v)) for k, v in arm["final"].items()}
        lines.append(f"| {_arm_label(arm)} | {final['sampled']} | {final['greedy']} | {final['comfort_greedy']} |")
    return lines + [""]  # a blank line: the closing marker must not read as a row of the table


def blocks(text: str) -> list[re.Match]:
    """Each marked block of a README, markers included: ``m["indent"]``, ``m["dir"]`` (the report's
    directory, relative to the README) and ``m["body"]`` (the lines between the markers)."""
    return list(BLOCK.finditer(text))


def block(readme: Path, m: re.Match) -> str:
    """The block ``m`` of ``readme`` as generated from its directory's summary.json, markers included."""
    lines = outcome(read_json(readme.parent / m["dir"] / "summary.json"))
    body = textwrap.indent("\n".join(lines) + "\n", m["indent"], lambda line: line.strip() != "")
    return f"{m['indent']}<!-- numbers: {m['dir']} -->\n{body}{m['indent']}<!-- /numbers -->"


def rewrite(readme: Path) -> str:
    """README.md with every marked block generated anew; the rest byte for byte."""
    text = readme.read_text()
    if text.count("<!-- numbers: ") != text.count("<!-- /numbers -->") or not blocks(text):
        raise UserError(f"{readme}: no block, or an unclosed one, between <!-- numbers: DIR --> and <!-- /numbers -->")
    return BLOCK.sub(lambda m: block(readme, m), text)


@dataclass(frozen=True)
class ReadmeConfig:
    readme: str = arg("README.md", "the README whose <!-- numbers: DIR --> blocks to regenerate from DIR/summary.json", positional=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m critical_tokens.report.readme", description=__doc__.splitlines()[0])
    add_arguments(parser, ReadmeConfig)
    config = from_namespace(ReadmeConfig, parser.parse_args(argv))
    readme = Path(config.readme)
    try:
        if not readme.is_file():
            raise UserError(f"{readme} is not a file")
        text = rewrite(readme)
    except UserError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    changed = text != readme.read_text()
    if changed:
        atomic_write_text(readme, text)
    print(f"{readme}: {len(blocks(text))} block(s) of numbers, {'rewritten' if changed else 'unchanged'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

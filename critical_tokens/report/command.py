"""`critical-tokens report RUN_DIR`: REPORT.md, report.html, summary.json and plots/, rebuilt from a reproduction's files.

For each finding of the paper, in `SECTIONS` order, the report puts the paper's number or claim
beside ours, with seeds and 95% intervals, and a verdict computed by the rules in
`paper.VERDICT_RULES`. Every file is written atomically: a reader never sees half a report.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import arg
from ..runs import UserError, atomic_dir, atomic_write_text, check_output, write_json
from .document import markdown
from .html import html_page
from .plots import Plots
from .pretraining_sections import section_levels, section_table1
from .study_dir import StudyDir
from .rl_sections import section_beta_sweep, section_kl_by_model, section_kl_comparison, section_rl_levels, section_tracked_tokens
from .confirm_section import section_confirm
from .summary import summary

# The experiments of a preset, in the order of the report.
SECTIONS = {"levels": section_levels, "table1": section_table1, "rl_levels": section_rl_levels, "kl_comparison": section_kl_comparison,
            "beta_sweep": section_beta_sweep, "tracked_tokens": section_tracked_tokens, "kl_by_model": section_kl_by_model,
            "confirm": section_confirm}


@dataclass(frozen=True)
class ReportConfig:
    run: str = arg(None, "reproduction directory (the --out of critical-tokens reproduce)", positional=True, metavar="RUN_DIR")
    to: str | None = arg(None, "write REPORT.md, summary.json and plots/ to this directory instead of RUN_DIR (e.g. docs/results/cpu)")


def report(config: ReportConfig) -> Path:
    """Rebuilds REPORT.md, summary.json and plots/ from a reproduction's files."""
    if config.run is None:
        raise UserError("give the reproduction directory: critical-tokens report RUN_DIR")
    check_output(config.to, "--to", directory=True)  # before reading the reproduction
    rep = StudyDir(config.run)
    target = Path(config.to) if config.to else rep.root
    check_output(str(target), "--to", directory=True)
    target.mkdir(parents=True, exist_ok=True)
    with atomic_dir(target / "plots") as tmp:
        plots = Plots(tmp)
        sections = {name: section(rep, plots) for name, section in SECTIONS.items()}
    text = markdown(rep, list(sections.values()))
    atomic_write_text(target / "REPORT.md", text)
    atomic_write_text(target / "report.html", html_page(text, target))  # the same report, self-contained, for a browser
    write_json(target / "summary.json", summary(rep, sections))
    print(f"wrote {target / 'REPORT.md'}, {target / 'summary.json'} and {target / 'plots'}/; open {target / 'report.html'} in a browser")
    return target / "REPORT.md"

"""A study's report: REPORT.md, summary.json and plots/, rebuilt from the files of its directory alone.

From the bottom up:

- `study_dir`: reading a study directory (the plan, each job's results, the timing);
- `statistics`: means over seeds with 95% intervals, comparisons, and how they print;
- `paper`: the paper's numbers and claims, and the rules that give each verdict;
- `plots`: the figures, drawn from the sections' numbers;
- `document`: what a section is, and REPORT.md around the sections (header, summary, runs);
- `pretraining_sections`, `rl_sections`: the sections, one function per experiment;
- `paired`, `confirm_section`: a pre-registered study's paired tests (one-sided and TOST), Holm's
  correction, its decision rules and the placement share, and its section, built from
  `study_runs` (its runs by unit), `hypotheses_section` (the tests, pooled and by instance, and
  the units left out) and `placement_section` (placement or strength, the strength curve);
- `power`: the power of a paired study's tests, for its pre-registration
  (``python -m critical_tokens.report.power``);
- `summary`: summary.json, the headline numbers for programs;
- `command`: ``critical-tokens report``;
- `readme`: the README's numbers, generated from a committed summary.json.
"""

from .command import ReportConfig, report

__all__ = ["ReportConfig", "report"]

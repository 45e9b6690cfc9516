"""The usage page's public-API snippet runs as written (on the shipped checkpoint)."""

import re
from pathlib import Path

README = Path(__file__).parents[1] / "docs" / "usage.md"


def readme_snippet() -> str:
    """The first Python block of the usage page's "Public API" section."""
    section = README.read_text().split("## Public API", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_snippet_runs(capsys):
    exec(compile(readme_snippet(), str(README), "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "Input:\n8402+76563\nTarget:" in out
    match = re.search(r"critical tokens: gap ([-+.\d]+), weight ([.\d]+); other tokens: gap ([-+.\d]+), weight ([.\d]+)", out)
    assert match, out
    critical_gap, _, other_gap, _ = map(float, match.groups())
    assert critical_gap < other_gap  # the shipped model is less certain on the critical tokens (docs/method.md section 6)

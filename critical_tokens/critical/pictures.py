"""Pictures of critical tokens: scratchpads shaded by the model's certainty, critical tokens
outlined in orange and the first wrong character boxed in red (docs/method.md section 6).

A `Scratchpad` is plain data (a text, one certainty per character, the offsets to outline), so the
pictures are drawn from saved numbers as well as from a live model: `critical_command` builds them
from teacher-forced and generated completions, the reproduction's report from report.json.

- `render_html`: a self-contained HTML page, one character per coloured span;
- `render_png`: the same picture as a PNG, one panel per scratchpad, with a colour bar.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..runs import atomic_write_text

CRITICAL_COLOR = "#ff8c00"
WRONG_COLOR = "#e00000"
CMAP = "Blues_r"  # uncertain tokens dark, certain ones pale
WRAP = 100  # characters per row of the picture (a runaway generation has no newlines)


@dataclass(frozen=True)
class Scratchpad:
    """One completion to draw: its text, a certainty per character, and what to outline."""

    title: str
    text: str
    certainty: tuple[float, ...]  # (len(text),)
    critical_offsets: tuple[int, ...]
    first_wrong: int | None = None  # may be len(text): the generation stopped where it should not


def _cells(text: str, wrap: int = WRAP) -> list[tuple[int, int, str]]:
    """(row, column, shown character) per character of `text`, plus one cell after its end; a
    newline is shown as "↵" at the end of its line, and lines longer than `wrap` are folded."""
    cells, row, col = [], 0, 0
    for ch in text:
        if col == wrap:
            row, col = row + 1, 0
        cells.append((row, col, "↵" if ch == "\n" else ch))
        row, col = (row + 1, 0) if ch == "\n" else (row, col + 1)
    return cells + [(row, col, "")]


def _color_range(scratchpads: Sequence[Scratchpad]) -> tuple[float, float]:
    """[lowest certainty shown, 1], so that the usual certainties near 1 do not all look alike."""
    low = min((min(p.certainty) for p in scratchpads if p.certainty), default=0.0)
    return (min(low, 0.99), 1.0)


def _hex(cmap, norm, value: float) -> str:
    from matplotlib import colors

    return colors.to_hex(cmap(norm(value)))


def render_html(scratchpads: Sequence[Scratchpad], path: str | Path, title: str = "Certainty along the scratchpad") -> None:
    """A self-contained HTML page (inline styles only): each character on a background shaded by
    certainty, critical tokens outlined in orange, the first wrong character boxed in red."""
    from matplotlib import colormaps, colors

    cmap, (vmin, vmax) = colormaps[CMAP], _color_range(scratchpads)
    norm = colors.Normalize(vmin, vmax)
    stops = ", ".join(_hex(cmap, norm, v) for v in np.linspace(vmin, vmax, 11))
    parts = [
        "<!doctype html>", '<html><head><meta charset="utf-8">', f"<title>{html.escape(title)}</title></head>",
        '<body style="font-family: sans-serif; margin: 2em;">', f"<h2>{html.escape(title)}</h2>",
        f'<p>Background: certainty (<span style="outline: 2px solid {CRITICAL_COLOR};">critical token</span>, '
        f'<span style="outline: 2px solid {WRONG_COLOR};">first wrong character</span>).</p>',
        f'<div style="display: flex; align-items: center; gap: 0.5em; font-size: 0.9em;">{vmin:.3f}'
        f'<div style="width: 20em; height: 1em; background: linear-gradient(to right, {stops});"></div>{vmax:.3f} certainty</div>',
    ]
    for pad in scratchpads:
        critical = set(pad.critical_offsets)
        spans = []
        for offset, (_, col, shown) in enumerate(_cells(pad.text)):
            if col == 0 and offset and pad.text[offset - 1] != "\n":
                spans.append("\n")  # a folded line
            if offset == len(pad.text):
                if pad.first_wrong == offset:  # the generation stopped too early
                    spans.append(f'<span style="outline: 2px solid {WRONG_COLOR};" title="expected more">&nbsp;</span>')
                break
            c = pad.certainty[offset]
            color = "#ffffff" if norm(c) < 0.45 else "#000000"
            style = f"background: {_hex(cmap, norm, c)}; color: {color};"
            if offset == pad.first_wrong:
                style += f" outline: 2px solid {WRONG_COLOR};"
            elif offset in critical:
                style += f" outline: 2px solid {CRITICAL_COLOR};"
            spans.append(f'<span style="{style}" title="offset {offset}: certainty {c:.4f}">{html.escape(shown)}</span>')
            if pad.text[offset] == "\n":
                spans.append("\n")
        parts += [f'<h3 style="font-family: monospace; font-size: 1em;">{html.escape(pad.title)}</h3>',
                  f'<pre style="font-family: monospace; line-height: 1.7; font-size: 14px;">{"".join(spans)}</pre>']
    parts.append("</body></html>")
    atomic_write_text(path, "\n".join(parts) + "\n")


def render_png(scratchpads: Sequence[Scratchpad], path: str | Path, title: str = "Certainty along the scratchpad") -> None:
    """The same picture as `render_html` as a PNG: a monospace grid, one panel per scratchpad, each
    cell shaded by certainty, with a colour bar."""
    from matplotlib import colormaps, colors
    from matplotlib.cm import ScalarMappable
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    if not scratchpads:
        raise ValueError("render_png needs at least one scratchpad")
    cmap, norm = colormaps[CMAP].with_extremes(bad="white"), colors.Normalize(*_color_range(scratchpads))
    layouts = [_cells(p.text) for p in scratchpads]
    # The cell after the end is drawn only when it holds the first wrong character (a premature stop).
    rows = [(cells if p.first_wrong == len(p.text) else cells[:-1])[-1][0] + 1 for p, cells in zip(scratchpads, layouts)]
    width = max(col for cells in layouts for _, col, _ in cells) + 1
    fig = Figure(figsize=(0.11 * width + 1.5, 0.2 * (sum(rows) + 2 * len(rows)) + 0.6), layout="constrained")
    axes = fig.subplots(len(scratchpads), 1, squeeze=False, gridspec_kw={"height_ratios": rows})[:, 0]
    for ax, pad, cells, n_rows in zip(axes, scratchpads, layouts, rows):
        grid = np.full((n_rows, width), np.nan)  # (rows, columns)
        for offset, (row, col, _) in enumerate(cells[:-1]):
            grid[row, col] = pad.certainty[offset]
        ax.imshow(grid, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest", extent=(0, width, n_rows, 0))
        critical = set(pad.critical_offsets)
        for offset, (row, col, shown) in enumerate(cells):
            if offset < len(pad.text):
                dark = norm(pad.certainty[offset]) < 0.45
                ax.text(col + 0.5, row + 0.5, shown, ha="center", va="center", family="monospace", fontsize=7,
                        color="white" if dark else "black")
            if offset == pad.first_wrong:
                ax.add_patch(Rectangle((col, row), 1, 1, fill=False, edgecolor=WRONG_COLOR, linewidth=2))
            elif offset in critical:
                ax.add_patch(Rectangle((col, row), 1, 1, fill=False, edgecolor=CRITICAL_COLOR, linewidth=1.5))
        ax.set_title(pad.title, loc="left", fontsize=8, family="monospace")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{title} (orange: critical token, red: first wrong character)", fontsize=9)
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=list(axes), label="certainty", shrink=0.8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, format="png")  # exactly `path`: without a format, a name lacking ".png" gets one added

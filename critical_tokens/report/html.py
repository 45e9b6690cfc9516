"""report.html: REPORT.md as one self-contained web page (plots inline), for a browser.

Python-Markdown turns the markdown into HTML (tables included); every image the report shows is
then inlined as a base64 ``data:`` URI, so the page has no external reference and can be mailed or
opened from anywhere. The page adds a table of contents and a little CSS, nothing else: its text is
REPORT.md's.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path

import markdown

MIME = {".png": "image/png", ".svg": "image/svg+xml", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}
STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em;
       line-height: 1.45; color: #1b1b1b; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 1em 0; font-size: .9em; display: block; overflow-x: auto; }
th, td { border: 1px solid #ccc; padding: .3em .6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } tr:nth-child(even) td { background: #fafafa; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
code { background: #f3f3f3; padding: 0 .2em; border-radius: 3px; font-size: .9em; }
nav { background: #f8f8f8; border: 1px solid #e3e3e3; padding: .5em 1.5em; }
nav ul { margin: .3em 0; }
"""


def _inline_images(body: str, directory: Path) -> str:
    """Every ``<img src="relative/path">`` whose file exists under ``directory`` becomes a data URI;
    an image that does not exist is replaced by its alt text (never left as an external reference)."""

    def inline(match: re.Match) -> str:
        before, src, after = match.group(1), match.group(2), match.group(3)
        path = directory / src
        if src.startswith("data:"):
            return match.group(0)
        if path.suffix.lower() not in MIME or not path.is_file():
            alt = re.search(r'alt="([^"]*)"', before + after)
            return f"<em>[missing image: {alt.group(1) if alt else src}]</em>"
        data = base64.b64encode(path.read_bytes()).decode()
        return f'{before}src="data:{MIME[path.suffix.lower()]};base64,{data}"{after}'

    return re.sub(r'(<img\b[^>]*?)src="([^"]+)"([^>]*>)', inline, body)


def html_page(report_markdown: str, directory: Path) -> str:
    """The whole page of a REPORT.md whose images are relative to ``directory``."""
    converter = markdown.Markdown(extensions=["tables", "fenced_code", "toc"], extension_configs={"toc": {"toc_depth": "2"}})
    body = _inline_images(converter.convert(report_markdown), directory)
    title = next((line[2:] for line in report_markdown.splitlines() if line.startswith("# ")), "Report")
    return (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{title}</title>\n"
            f"<style>{STYLE}</style>\n</head>\n<body>\n<nav><strong>Contents</strong>\n{converter.toc}</nav>\n{body}\n</body>\n</html>\n")

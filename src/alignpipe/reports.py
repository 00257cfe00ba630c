"""One table as a small report, in Markdown (KFP renders it) and as an HTML page beside it.

The report steps of the pipelines (the comparison of alignment methods, the multitask and
contrastive evaluations) show what their stages measured; all write through :func:`write_table`.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

MARKDOWN_FILE = "report.md"
HTML_FILE = "report.html"


def write_table(
    title: str,
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    output: str | Path,
    *,
    intro: str = "",
    notes: Sequence[str] = (),
    name: str = "report",
) -> Path:
    """Write ``<name>.md`` and ``<name>.html`` under ``output``; return the Markdown file.

    ``intro`` is a paragraph above the table, ``notes`` a bullet list below it.
    """
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", ""] + ([intro, ""] if intro else [])
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ([""] + [f"- {note}" for note in notes]) if notes else []
    markdown = out / f"{name}.md"
    markdown.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def cells(tag: str, row: Sequence[str]) -> str:
        return "".join(f"<{tag}>{html.escape(cell)}</{tag}>" for cell in row)

    body = "".join(f"<tr>{cells('td', row)}</tr>" for row in rows)
    page = [
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>',
        f"</head><body><h1>{html.escape(title)}</h1>",
        f"<p>{html.escape(intro)}</p>" if intro else "",
        f"<table><thead><tr>{cells('th', header)}</tr></thead><tbody>{body}</tbody></table>",
        f"<ul>{cells('li', notes)}</ul>" if notes else "",
        "</body></html>\n",
    ]
    (out / f"{name}.html").write_text("".join(page), encoding="utf-8")
    return markdown

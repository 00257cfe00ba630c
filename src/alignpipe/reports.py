"""One table as a small report, in Markdown (KFP renders it) and as an HTML page beside it.

The report steps of the multitask and contrastive pipelines show what their stage measured on
held-out data, before and after training; both write their table through :func:`write_table`.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

MARKDOWN_FILE = "report.md"
HTML_FILE = "report.html"


def write_table(
    title: str, header: Sequence[str], rows: Sequence[Sequence[str]], output: str | Path
) -> Path:
    """Write ``report.md`` and ``report.html`` under ``output``; return the Markdown file."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    markdown = out / MARKDOWN_FILE
    markdown.write_text("\n".join(lines) + "\n", encoding="utf-8")
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows
    )
    page = (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"</head><body><h1>{html.escape(title)}</h1><table><thead><tr>{head}</tr></thead>"
        f"<tbody>{body}</tbody></table></body></html>\n"
    )
    (out / HTML_FILE).write_text(page, encoding="utf-8")
    return markdown

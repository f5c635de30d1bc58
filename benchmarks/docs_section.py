"""Each benchmark script owns one marked section of a docs page and rewrites only that section."""

from __future__ import annotations

from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"
BENCHMARKS_DOC = DOCS / "benchmarks.md"
_NEW_PAGE = "# Benchmarks\n\nFigures measured by the scripts in `benchmarks/`.\n"


def write_section(name: str, text: str, doc: Path = BENCHMARKS_DOC) -> Path:
    """Replace the section between `<!-- name:start -->` and `<!-- name:end -->` in `doc` (appended if absent)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{text.rstrip()}\n{end}\n"
    page = doc.read_text() if doc.exists() else _NEW_PAGE
    if start in page and end in page:
        head, rest = page.split(start, 1)
        page = head + block + rest.split(end, 1)[1].lstrip("\n")
    else:
        page = page.rstrip() + "\n\n" + block
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(page)
    return doc

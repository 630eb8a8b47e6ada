"""Measurement pages that cannot drift from their data: a benchmark writes its generated table between two
marker comments of a docs page (`write_section`), and a test regenerates it from the saved JSON and compares
(`section`)."""

from __future__ import annotations

from pathlib import Path

from ..core import atomic


def markers(name: str) -> tuple[str, str]:
    """The comments that open and close the generated section `name` of a page."""
    return f"<!-- {name}: generated from the benchmark's JSON; do not edit -->\n", f"<!-- /{name} -->\n"


def section(path: str | Path, name: str) -> str | None:
    """The generated section `name` of a page (None where the page has no such section)."""
    begin, end = markers(name)
    text = Path(path).read_text() if Path(path).is_file() else ""
    if begin not in text or end not in text:
        return None
    return text.split(begin, 1)[1].split(end, 1)[0]


def write_section(path: str | Path, name: str, body: str) -> None:
    """Put `body` between the page's markers of section `name` (atomically), or write it as the whole file where
    the page has none."""
    begin, end = markers(name)
    body = body.rstrip("\n") + "\n"
    text = Path(path).read_text() if Path(path).is_file() else ""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        body = head + begin + body + end + rest.split(end, 1)[1]
    atomic.write_text(path, body)

"""Every relative link and #anchor in README.md, docs/*.md and bench/results/README.md resolves.

Anchors are GitHub's: a heading's slug (lower case, punctuation but ``-`` and ``_`` dropped,
spaces to ``-``, ``-1``, ``-2`` for repeats) or an explicit ``<a id="...">``. Links inside code
spans and fenced blocks are not links and are skipped. No network: http(s) links are not checked.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
        ROOT / "bench" / "results" / "README.md"]

_FENCE = re.compile(r"^\s*(```|~~~)")
_CODE_SPAN = re.compile(r"`+[^`]*`+")
_LINK = re.compile(r"\[[^\]]*\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_EXPLICIT = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"")


def _prose_lines(text: str) -> list[str]:
    """The file's lines outside fenced blocks (fenced lines become empty)."""
    out, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            out.append("")
            continue
        out.append("" if fenced else line)
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text."""
    text = re.sub(r"<[^>]+>", "", heading)            # inline HTML (e.g. <a id=...>)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # links keep their text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = path.read_text(encoding="utf-8")
    found: set[str] = set(_EXPLICIT.findall(text))
    seen: dict[str, int] = {}
    for line in _prose_lines(text):
        m = _HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(path: Path) -> list[tuple[int, str]]:
    out = []
    for no, line in enumerate(_prose_lines(path.read_text(encoding="utf-8")), 1):
        for target in _LINK.findall(_CODE_SPAN.sub("", line)):
            out.append((no, target))
    return out


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    bad = []
    for no, target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):     # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(root)}:{no}: {target}"
        if not dest.exists():
            bad.append(f"{where} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{where} (no anchor #{anchor} in {dest.relative_to(root)})")
    return bad


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve(path: Path) -> None:
    assert path.exists()
    assert broken_links(path) == []


def test_checker_catches_a_broken_file_an_anchor_and_finds_real_ones(tmp_path: Path) -> None:
    doc = tmp_path / "a.md"
    (tmp_path / "b.md").write_text(
        '# Top: `x` & more\n\n- <a id="kept"></a>bullet\n## Top: `x` & more\n')
    doc.write_text("[ok](b.md#top-x--more) [dup](b.md#top-x--more-1) [id](b.md#kept)\n"
                   "[gone](c.md) [bad](b.md#nope) `[code](c.md)` [web](https://x.invalid/#y)\n"
                   "```\n[fenced](c.md)\n```\n")
    assert broken_links(doc, tmp_path) == [
        "a.md:2: c.md (no such file)", "a.md:2: b.md#nope (no anchor #nope in b.md)"]

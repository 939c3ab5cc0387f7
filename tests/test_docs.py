"""The README is a short guide and docs/ the reference: every relative link between them resolves.

A link that names a file must find it, and one that names a heading (`page.md#anchor`, `#anchor`)
must find that heading, spelt as GitHub spells its anchors, so moving or renaming a page or a
section fails here rather than in a reader's browser.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAX_README_LINES = 250

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", re.M)


def pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def prose(text: str) -> str:
    """The text a reader sees as prose: fenced blocks and code spans hold no links or headings."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def links(text: str) -> list[str]:
    return LINK.findall(prose(text))


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = text.replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading's anchor, with GitHub's -1, -2 suffixes for repeated headings."""
    seen: dict[str, int] = {}
    found = set()
    for heading in HEADING.findall(FENCE.sub("", text)):
        base = anchor(heading)
        count = seen.get(base, 0)
        found.add(base if count == 0 else f"{base}-{count}")
        seen[base] = count + 1
    return found


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    problems = []
    for target in links(page.read_text()):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        path_part, _, fragment = target.partition("#")
        destination = (page.parent / unquote(path_part)).resolve() if path_part else page
        if not destination.exists():
            problems.append(f"{page.relative_to(root)}: {target} (no such file)")
            continue
        if fragment and (destination.suffix != ".md" or fragment not in anchors(destination.read_text())):
            problems.append(f"{page.relative_to(root)}: {target} (no heading #{fragment})")
    return problems


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_at_a_file_and_heading_that_exist(page: Path) -> None:
    assert broken_links(page) == []


def test_the_link_check_sees_a_broken_file_and_a_broken_heading(tmp_path: Path) -> None:
    """The check itself: a missing file, a missing heading and a link inside code are told apart."""
    (tmp_path / "other.md").write_text("# Exit codes\n\n## The `lottery sync` command\n\n## Exit codes\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md#exit-codes) [ok2](other.md#the-lottery-sync-command) [ok3](other.md#exit-codes-1)\n"
        "[gone](missing.md) [bad](other.md#exit-code) [self](#nowhere) [web](https://example.org/x)\n"
        "`[in code](missing-too.md)`\n```\n[in a block](missing-three.md)\n```\n"
    )
    assert broken_links(page, root=tmp_path) == [
        "page.md: missing.md (no such file)",
        "page.md: other.md#exit-code (no heading #exit-code)",
        "page.md: #nowhere (no heading #nowhere)",
    ]


def test_the_readme_is_a_guide_of_at_most_250_lines() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; move reference text to docs/"


def test_every_docs_page_is_reachable_from_the_readme() -> None:
    """The README links the index, and the index links every page in docs/."""
    assert "docs/index.md" in links(README.read_text())
    listed = {Path(target.partition("#")[0]).name for target in links((DOCS / "index.md").read_text())}
    assert {p.name for p in DOCS.glob("*.md")} - {"index.md"} <= listed


def test_the_readme_keeps_the_commands_ci_and_newcomers_run() -> None:
    """CI runs exactly the README's test command (.ci/run); `make check` and `make demo` stay beside it."""
    text = README.read_text()
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    for command in ("make test", "make check", "make demo", "lottery sweep", "lottery aggregate"):
        assert command in text, command


def test_the_exit_codes_table_lists_every_code_errors_py_defines() -> None:
    """docs/faults.md's table has a row per exit code constant of orchestrator/errors.py."""
    from orchestrator import errors

    constants = vars(errors).items()
    codes = {value for name, value in constants if name.endswith("_EXIT") and isinstance(value, int)}
    text = (DOCS / "faults.md").read_text()
    section = text.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    rows = {int(m) for m in re.findall(r"^\| (\d+) \|", section, re.M)}
    assert codes and codes <= rows
    assert {0, 1, 2, 3} <= rows

"""The README and the pages of docs/: every relative link names a file that exists (anchors are not checked), and the
README links every page of docs/."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from .helpers import REPO


PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")  # [text](target "title"), images too


def relative_links(page: Path) -> list[str]:
    """The link targets of ``page`` that are files, without their ``#anchor``; code blocks and code spans hold none."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)
    text = re.sub(r"`[^`\n]*`", "", text)
    targets = []
    for target in LINK.findall(text):
        if target.startswith("#") or re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", target):
            continue  # an anchor on the same page, or a URL (https:, mailto:)
        targets.append(target.split("#", 1)[0])
    return targets


@pytest.mark.parametrize("page", PAGES, ids=lambda path: path.relative_to(REPO).as_posix())
def test_every_relative_link_resolves(page: Path) -> None:
    missing = [target for target in relative_links(page) if not (page.parent / target).exists()]
    assert missing == [], f"{page.relative_to(REPO)} links to files that do not exist"


def test_readme_links_every_docs_page() -> None:
    linked = {(REPO / target).resolve() for target in relative_links(REPO / "README.md")}
    assert [page.name for page in PAGES[1:] if page.resolve() not in linked] == []
    assert len(PAGES) > 1


def test_link_parsing() -> None:
    page_text = '[a](docs/x.md) ![i](robustness.png "t") [b](#here) [c](https://x.org/y.md) `[d](no.md)` [e](y.md#z)'
    assert LINK.findall(page_text) == ["docs/x.md", "robustness.png", "#here", "https://x.org/y.md", "no.md", "y.md#z"]

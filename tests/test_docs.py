"""The documentation builds without warnings (broken links, bad markup) and every component has a page."""

from __future__ import annotations

import sys
from pathlib import Path

from conftest import ROOT, run
from nbdformats.registry import names


def test_every_plugin_and_filter_has_a_page():
    for kind in ("plugin", "filter"):
        missing = [n for n in names(kind) if not (ROOT / "docs" / f"{kind}s" / f"{n}.md").exists()]
        assert not missing, f"{kind}s without a docs page: {missing}"


def test_sphinx_builds_html_and_man_pages(tmp_path):
    run([sys.executable, "-m", "sphinx", "-q", "-W", "--keep-going", "-b", "html", ROOT / "docs", tmp_path / "html"],
        timeout=300)
    run([sys.executable, "-m", "sphinx", "-q", "-W", "--keep-going", "-b", "man", ROOT / "docs", tmp_path / "man"],
        timeout=300)
    pages = {p.name for p in (tmp_path / "man").glob("*.1")}
    assert "nbdformats.1" in pages and "nbdformats-memory-plugin.1" in pages
    text = run(["man", "-l", "-P", "cat", tmp_path / "man" / "nbdformats-memory-plugin.1"]).stdout.decode()
    assert "NAME" in text and "sparse" in text

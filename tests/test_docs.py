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


def test_api_reference_names_everything_authors_can_use():
    """docs/api.md keeps up with the API: every class attribute, callback and handle method of
    the base classes, and every parameter type, is named there."""
    from nbdformats.api import chain, params

    text = (ROOT / "docs" / "api.md").read_text()
    public: set[str] = set()
    for cls in (chain.Component, chain.Plugin, chain.Filter, chain.PluginHandle, chain.FilterHandle):
        public |= {name for name in vars(cls) if not name.startswith("_")}
    public -= {"configure", "summary", "debug_flags", "final_thread_model"}  # the server's, or named in prose
    public |= {name for name, value in vars(params).items()
               if isinstance(value, type) and issubclass(value, params.ParamType) and value is not params.ParamType}
    missing = sorted(name for name in public if f"`{name}" not in text)
    assert not missing, f"not in docs/api.md: {missing}"

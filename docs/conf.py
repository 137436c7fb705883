"""Sphinx configuration: the Markdown pages in docs/ become HTML (checked in CI) and man pages.

    .venv/bin/python -m sphinx -W -b html docs build/html
    .venv/bin/python -m sphinx -W -b man docs build/man     # nbdformats(1), nbdformats-NAME-plugin(1) ...
"""

from pathlib import Path

project = "nbdformats"
author = "the nbdformats developers"
extensions = ["myst_parser"]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build", "build"]
myst_heading_anchors = 3
suppress_warnings = ["misc.highlighting_failure"]
root_doc = "index"

_here = Path(__file__).parent


def _summary(page: Path) -> str:
    """The first sentence of a page's first paragraph, for the man page's NAME line."""
    paragraph: list[str] = []
    for line in page.read_text().splitlines()[1:]:
        if line.strip() and not line.startswith(("#", "`", "|", "-", ">")):
            paragraph.append(line.strip())
        elif paragraph:
            break
    text = " ".join(paragraph).replace("`", "")
    return text.split(". ")[0].rstrip(".") if text else page.stem


man_pages = [("server", "nbdformats", "serve disk images over NBD (nbdkit-compatible)", [author], 1)]
for kind in ("plugins", "filters"):
    for page in sorted((_here / kind).glob("*.md")):
        man_pages.append((f"{kind}/{page.stem}", f"nbdformats-{page.stem}-{kind[:-1]}", _summary(page),
                          [author], 1))

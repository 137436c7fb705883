"""nbdformats.formats stays pure: no module under it imports the server, the plugin/filter API,
plugins or filters (they import the formats, never the other way round)."""

from __future__ import annotations

import ast
from pathlib import Path

import nbdformats.formats

FORMATS = Path(nbdformats.formats.__file__).parent
FORBIDDEN = ("nbdformats.server", "nbdformats.api", "nbdformats.plugins", "nbdformats.filters")


def imported_modules(path: Path) -> list[str]:
    """Absolute names of every module `path` imports (relative imports resolved)."""
    package = ["nbdformats", *path.relative_to(FORMATS.parent).with_suffix("").parts[:-1]]
    if path.name == "__init__.py":
        package = ["nbdformats", *path.relative_to(FORMATS.parent).parent.parts]
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            names.append(module)
            names += [f"{module}.{alias.name}" for alias in node.names]
    return names


def test_formats_import_nothing_from_server_api_plugins_or_filters() -> None:
    offending = [f"{path.relative_to(FORMATS.parent)} imports {name}"
                 for path in sorted(FORMATS.rglob("*.py"))
                 for name in imported_modules(path)
                 if name.startswith(FORBIDDEN)]
    assert not offending, "\n".join(offending)


def test_the_check_sees_relative_imports() -> None:
    luks_header = FORMATS / "luks" / "header.py"
    assert "nbdformats.formats.readers" in imported_modules(luks_header)
    assert "nbdformats.formats.errors" in imported_modules(FORMATS / "fat" / "__init__.py")

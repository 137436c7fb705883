"""Finding plugins and filters by name.

Built-in components live one per module: `nbdformats/plugins/NAME.py` defines `PLUGIN`,
`nbdformats/filters/NAME.py` defines `FILTER` (a package of that name works too).
Third-party packages register theirs under the entry-point groups `nbdformats.plugins`
and `nbdformats.filters`; a path ending in `.py` loads a plugin or filter from that file.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil
from importlib import metadata
from typing import Any

from .api.chain import Filter, Plugin
from .api.errors import ConfigError

PLUGIN_ALIASES = {"s3": "s3", "S3": "s3"}


def _from_file(path: str, attr: str) -> Any:
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, attr):
        raise ConfigError(f"{path} defines no {attr}")
    return getattr(module, attr)


def _load(kind: str, name: str, attr: str, base: type) -> Any:
    if name.endswith(".py") or os.sep in name:
        cls = _from_file(name, attr)
    else:
        module_name = name.lower().replace("-", "_")
        try:
            module = importlib.import_module(f"nbdformats.{kind}s.{module_name}")
            cls = getattr(module, attr, None)
            if cls is None:
                raise ConfigError(f"{name!r} is not a {kind} (available: {', '.join(names(kind))})")
        except ModuleNotFoundError as e:
            if e.name != f"nbdformats.{kind}s.{module_name}":
                raise
            for ep in metadata.entry_points(group=f"nbdformats.{kind}s"):
                if ep.name == name:
                    cls = ep.load()
                    break
            else:
                known = ", ".join(sorted(names(kind)))
                other = "filter" if kind == "plugin" else "plugin"
                hint = f"; {name} is a {other}" + (f": use --filter={name}" if other == "filter" else "") \
                    if name.lower() in names(other) else ""
                raise ConfigError(f"unknown {kind} {name!r} (available: {known}){hint}") from None
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ConfigError(f"{name}: {attr} is not a {base.__name__} subclass")
    return cls


def load_plugin(name: str) -> type[Plugin]:
    return _load("plugin", name, "PLUGIN", Plugin)


def load_filter(name: str) -> type[Filter]:
    return _load("filter", name, "FILTER", Filter)


def names(kind: str) -> list[str]:
    """Built-in components (modules defining PLUGIN or FILTER) and registered entry points."""
    package = importlib.import_module(f"nbdformats.{kind}s")
    attr = kind.upper()
    found = []
    for module in pkgutil.iter_modules(package.__path__):
        if module.name.startswith("_"):
            continue
        try:
            if hasattr(importlib.import_module(f"nbdformats.{kind}s.{module.name}"), attr):
                found.append(module.name.replace("_", "-"))  # user-facing names use dashes (multi-conn)
        except ImportError:
            found.append(module.name.replace("_", "-"))  # listed, so that --list shows why it cannot load
    found += [ep.name for ep in metadata.entry_points(group=f"nbdformats.{kind}s")]
    return sorted(set(found))

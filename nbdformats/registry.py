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
import re
from typing import Any

from . import __version__
from .api.chain import Filter, Plugin
from .api.errors import ConfigError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def _from_file(kind: str, path: str, attr: str) -> Any:
    if not os.path.isfile(path):
        what = "--filter=" if kind == "filter" else "plugin "
        raise ConfigError(f"{what}{path}: no such file")
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, attr):
        raise ConfigError(f"{path} defines no {attr}")
    return getattr(module, attr)


def _not_a_component(kind: str, name: str) -> ConfigError:
    """The message for a name that is no plugin (or filter): say what the user probably meant."""
    other = "filter" if kind == "plugin" else "plugin"
    if kind == "plugin" and (os.path.exists(name) or not _NAME.match(name)):
        return ConfigError(f"{name} is not a plugin; did you mean 'file {name}'?  "
                           "(nbdformats [--filter=FILTER ...] PLUGIN [KEY=VALUE ...])")
    if name.lower() in names(other):
        if other == "filter":
            return ConfigError(f"{name} is a filter, not a plugin: use --filter={name} before the plugin")
        return ConfigError(f"{name} is a plugin, not a filter: give it after the filters, without --filter=")
    return ConfigError(f"unknown {kind} {name!r} (available: {', '.join(names(kind))}; "
                       f"'nbdformats --list' describes them)")


def _load(kind: str, name: str, attr: str, base: type) -> Any:
    if name.endswith(".py") or os.sep in name:
        cls = _from_file(kind, name, attr)
    elif not _NAME.match(name):
        raise _not_a_component(kind, name)
    else:
        module_name = f"nbdformats.{kind}s.{name.lower().replace('-', '_')}"
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:  # the component exists but needs something not installed
                raise ConfigError(f"{kind} {name} cannot load: {e}") from None
            from importlib import metadata  # only for names that are no built-in: ~10 ms to import
            cls = next((ep.load() for ep in metadata.entry_points(group=f"nbdformats.{kind}s") if ep.name == name),
                       None)
            if cls is None:
                raise _not_a_component(kind, name) from None
        else:
            cls = getattr(module, attr, None)
            if cls is None:
                raise _not_a_component(kind, name)
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ConfigError(f"{name}: {attr} is not a {base.__name__} subclass")
    return cls


def load_plugin(name: str) -> type[Plugin]:
    return _load("plugin", name, "PLUGIN", Plugin)


def load_filter(name: str) -> type[Filter]:
    return _load("filter", name, "FILTER", Filter)


def is_filter_name(name: str) -> bool:
    """True for a filter's name that is no plugin's (`nbdformats luks --help` asks about the filter)."""
    return name.lower() in names("filter") and name.lower() not in names("plugin")


def component_version(cls: type) -> str:
    """The version of the distribution that provides a component (nbdformats' for built-ins)."""
    from importlib import metadata
    top = cls.__module__.split(".")[0]
    for distribution in metadata.packages_distributions().get(top, []):
        return metadata.version(distribution)
    return __version__


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
    from importlib import metadata
    found += [ep.name for ep in metadata.entry_points(group=f"nbdformats.{kind}s")]
    return sorted(set(found))

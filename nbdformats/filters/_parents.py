"""Files next to an image: its parent (a backing file, a delta disk's parent) and a VMDK's extents.

The rules of issue 23, shared by the image decoders (qcow2's backing files, vmdk, vpc/vhd, vhdx
and ova), so that every decoder resolves names alike:

- `auto`: the name the image records is taken next to the image.  Over the file plugin (file=PATH)
  or the curl plugin (url=URL) directly, that is a file in the same directory (a URL under the same
  one), opened by the same plugin with the same parameters.  Otherwise it is an export of the
  layer below, relative to the image's own export name: another member of an archive served
  whole, another file of `file dir=`.  An absolute name, `../` leaving the directory or archive, a
  symbolic link out, a loop or a missing file is an error; nothing outside is opened.
- `none`: what the parent would give reads as zeroes.
- A PATH or URI (http(s)://, nbd://) given by the operator names the top image's parent; the
  parents it names in turn are found next to it.
"""

from __future__ import annotations

import os
import posixpath
import threading
import urllib.parse
from dataclasses import dataclass, field
from typing import Callable

from ..api.chain import Layer, OpenNext, Plugin
from ..api.errors import ConfigError, NBDError
from ..api.params import params_of
from ..formats.blockmap import ReadInto
from ..formats.errors import FormatError
from ..formats.parents import ParentLink
from ..formats.readers import Reader
from ..registry import load_plugin
from ._layer_bytes import READ_CHUNK, read_bytes

MAX_CHAIN = 64  # parents above a disk: VMware snapshot chains stop at 32, ours refuse a runaway one
# Plugins that serve one location given by a parameter: a file next to theirs is the same plugin,
# same parameters, at a sibling location.
LOCATION_PARAMS = {"file": "file", "curl": "url"}
PROBE_NAME = "\0nbdformats: no such export"  # a name no layer below can have


class ParentError(FormatError):
    """A parent or extent that cannot be opened: missing, outside the archive or directory, a loop."""


class RefusedError(ParentError):
    """A name that leads outside the archive or directory, or a layer below that cannot hold siblings."""


@dataclass
class OpenedFile:
    """One file of a disk: its name where it was found, its size and how to read it (and the
    layer it reads, where it is a whole layer: qcow2 serves a raw backing file's holes)."""

    name: str
    size: int
    read: Reader
    read_into: ReadInto
    close: Callable[[], None] = field(default=lambda: None)
    layer: Layer | None = None


def layer_file(name: str, layer: Layer, close: Callable[[], None] = lambda: None) -> OpenedFile:
    size = layer.get_size()

    def read(offset: int, length: int) -> bytes:
        return read_bytes(layer, offset, max(0, min(length, size - offset)))

    def read_into(buf: memoryview, offset: int) -> None:
        for start in range(0, len(buf), READ_CHUNK):
            layer.pread(buf[start:start + READ_CHUNK], offset + start, 0)

    return OpenedFile(name, size, read, read_into, close, layer)


def sibling_export(export: str, name: str, what: str) -> str:
    """`name` relative to the export `export`, refused if it leaves the archive or directory."""
    joined = posixpath.normpath(posixpath.join(posixpath.dirname(export.lstrip("/")), name))
    if posixpath.isabs(name) or joined == ".." or joined.startswith("../"):
        raise RefusedError(f"{what} {name!r} leads outside the archive or directory of {export or 'the image'}: "
                          "refused")
    return joined


def sibling_path(path: str, name: str, what: str) -> str:
    """`name` next to the file `path`; refused if it (or a symbolic link on the way) leaves the directory."""
    directory = os.path.dirname(path) or "."
    target = os.path.normpath(os.path.join(directory, name))
    real_directory = os.path.realpath(directory)
    if os.path.isabs(name) or os.path.commonpath([real_directory, os.path.realpath(target)]) != real_directory:
        raise RefusedError(f"{what} {name!r} leads outside the directory {directory}: refused")
    if not os.path.isfile(target):
        raise ParentError(f"{what} {target} is not there")
    return target


def sibling_url(url: str, name: str, what: str) -> str:
    """`name` relative to the URL `url`, within the same directory tree of the same server."""
    target = urllib.parse.urljoin(url, name)
    base = url.rsplit("/", 1)[0] + "/"
    if urllib.parse.urlsplit(name).scheme or not target.startswith(base):
        raise RefusedError(f"{what} {name!r} leads outside {base}: refused")
    return target


def plugin_for(value: str) -> tuple[str, str]:
    """The plugin and its location parameter for a parent given as PATH or URI."""
    scheme = urllib.parse.urlsplit(value).scheme
    if scheme in ("http", "https"):
        return "curl", "url"
    if scheme.startswith("nbd"):
        return "nbd", "uri"
    return "file", "file"


@dataclass(frozen=True)
class Location:
    """Where an image was found: an export of the layer below (`plugin` None), or a plugin
    serving one file or URL (`value` of its parameter `key`)."""

    export: str = ""
    plugin: Plugin | None = None
    key: str = ""
    value: str = ""

    @property
    def name(self) -> str:
        return self.value if self.plugin is not None else self.export

    def describe(self) -> str:
        return self.value if self.plugin is not None else f"export {self.export!r}"


class Siblings:
    """One filter's way to the files next to its images; the plugins it made for them are kept
    (made once per location) and cleaned up with the filter.  `param` is the filter's parameter
    that names a parent explicitly (NAME-parent=, qcow2's backing=), for the hints of errors."""

    def __init__(self, component: str, open_below: Callable[[bool, str], Layer], param: str = "") -> None:
        self.component, self.open_below = component, open_below
        self.param = param or f"{component}-parent"
        self._plugins: dict[tuple[str, str], Plugin] = {}
        self._lock = threading.Lock()
        self._names_select_exports: bool | None = None

    def location_of(self, below: Layer, export_name: str) -> Location:
        plugin = getattr(below.handle, "plugin", None)
        key = LOCATION_PARAMS.get(getattr(plugin, "name", ""))
        if isinstance(plugin, Plugin) and key and getattr(plugin, key, None):
            return Location(export_name, plugin, key, getattr(plugin, key))
        return Location(export_name)

    def open(self, where: Location, name: str, next_open: OpenNext, what: str) -> tuple[OpenedFile, Location]:
        """The file `name` (as the image records it) next to the image at `where`."""
        if where.plugin is not None:
            if where.key == "file":
                value = sibling_path(where.value, name, what)
            elif where.key == "url":
                value = sibling_url(where.value, name, what)
            else:
                raise ParentError(f"{what} {name!r}: the {where.plugin.name} plugin serves no directory to find it "
                                  f"in (give {self.param}=PATH-or-URI)")
            plugin = self._plugin(where.plugin, where.key, value)
            layer = Layer(plugin.open(True, ""), True)
            return layer_file(value, layer, layer.close), Location(plugin=plugin, key=where.key, value=value)
        export = sibling_export(where.export, name, what)
        if not self.names_select_exports():
            raise RefusedError(f"{what} {export!r} is a file next to the image, but the layer below serves one file "
                              "whatever the export name: serve the archive with every member an export (without "
                              "tar-entry=/zip-entry=) or the directory (file dir=DIR), and name the image as the "
                              "export" + (f", or give {self.param}=PATH" if "parent" in what or "backing" in what
                                          else ""))
        try:
            layer = next_open(True, export)
        except NBDError as e:
            raise ParentError(f"{what} {export!r} (an export of the layer below) cannot be opened: {e}") from None
        return layer_file(export, layer, layer.close), Location(export)

    def open_explicit(self, value: str) -> tuple[OpenedFile, Location]:
        """The parent the operator named by PATH or URI."""
        with self._lock:
            plugin = self._plugins.get(("explicit", value))
            if plugin is None:
                plugin_name, key = plugin_for(value)
                plugin = load_plugin(plugin_name)()
                self._ready(plugin, lambda: plugin.configure([(key, value)]))
                self._plugins[("explicit", value)] = plugin
        key = LOCATION_PARAMS.get(plugin.name, "")
        layer = Layer(plugin.open(True, ""), True)
        where = Location(plugin=plugin, key=key, value=value) if key else Location(plugin=plugin, value=value)
        return layer_file(value, layer, layer.close), where

    def names_select_exports(self) -> bool:
        """Whether the layer below opens another file for another export name: a layer serving one
        file (tar-entry=, a plugin other than file and curl) gives the same bytes whatever the name,
        which must never be read as another file.  Such a layer accepts a name no real one can have."""
        if self._names_select_exports is None:
            try:
                self.open_below(True, PROBE_NAME).close()
                self._names_select_exports = False
            except (NBDError, OSError):
                self._names_select_exports = True
        return self._names_select_exports

    def cleanup(self) -> None:
        for plugin in self._plugins.values():
            plugin.cleanup()

    def _plugin(self, plugin: Plugin, key: str, value: str) -> Plugin:
        """The same plugin with the same parameters, serving `value` instead (made once)."""
        with self._lock:
            sibling = self._plugins.get((key, value))
            if sibling is None:
                sibling = type(plugin)()
                for param in params_of(type(plugin)):
                    setattr(sibling, param.attr, getattr(plugin, param.attr))
                setattr(sibling, key, value)
                self._ready(sibling, sibling.config_complete)
                self._plugins[(key, value)] = sibling
        return sibling

    @staticmethod
    def _ready(plugin: Plugin, configure: Callable[[], None]) -> None:
        try:
            configure()
            plugin.get_ready()
        except ConfigError as e:
            raise ParentError(str(e)) from None


def open_parent(siblings: Siblings, link: ParentLink, where: Location, next_open: OpenNext
                ) -> tuple[OpenedFile, Location]:
    """The parent a link names, next to the image: its relative names tried in order."""
    what = f"the parent ({link.what})"
    if not link.relative:
        shown = ", ".join(repr(path) for path in link.absolute) or "nothing"
        raise ParentError(f"the image names its parent only by the absolute path {shown} ({link.what}), which is not "
                          f"opened: give {siblings.param}=PATH (or {siblings.param}=none)")
    missing = []
    for relative in link.relative:
        try:
            return siblings.open(where, relative, next_open, what)
        except RefusedError:
            raise
        except ParentError as e:
            missing.append(str(e))
    raise ParentError("; ".join(missing))

"""qcow2 filter: serve the disk inside a qcow2 image, read-only (writes: --filter=cow on top).

The image is read through the layer below, so it may sit in a tar, zip or compressed file or
on a web server.  Versions 2 and 3, zlib and zstd compressed clusters, extended L2 entries
(subclusters), internal snapshots (snapshot=), LUKS encryption (the luks filter's passphrase
parameters) and backing files:

- backing=auto (the default) resolves the backing file name next to the image, as qemu does,
  but never outside where the image is: over the file plugin (file=PATH) or the curl plugin
  (url=URL) directly, a file in the same directory (a URL under the same one); otherwise the
  name is an export of the layer below, relative to the image's own export name, so that
  `--filter=qcow2 --filter=tar file box.tar` (every member an export) finds a sibling member
  and `file dir=DIR` a sibling file.  Absolute names, `../` out of the archive or directory,
  loops and missing files are errors.
- backing=none reads what the backing file would give as zeroes (nbdkit's qcow2dec does so).
- backing=PATH or a URI (http(s)://, nbd://, nbd+unix://) names the top image's backing
  file; its own backing files are found next to it.

Unallocated and zero clusters are holes: extents report them (as qemu's block status does)
and sparse reads leave them unfilled.
"""

from __future__ import annotations

import errno
import logging
import os
import posixpath
import threading
import urllib.parse
from dataclasses import dataclass
from typing import Any, Callable

from ..api.chain import (EXTENT_DATA, EXTENT_HOLE, EXTENT_ZERO, FLAG_REQ_ONE, NONE, Extents, Filter, FilterHandle,
                         Holes, Layer, OpenNext, Plugin)
from ..api.errors import ConfigError, NBDError
from ..api.params import Param, Size, String, params_of
from ..api.zeroes import fill_zero
from ..formats.errors import FormatError
from ..formats.luks.errors import LuksError
from ..formats.luks.unlock import KdfBudgetError
from ..formats.qcow2.image import ByteCache, Cipher, Disk, Qcow2Disk, Qcow2Image, luks_header_reader, open_image
from ..formats.readers import Reader
from ..formats.qcow2.structs import MAGIC
from ..registry import load_plugin
from ._decompress import layer_reader
from ._format_errors import nbd_error
from ._layer_bytes import READ_CHUNK
from .luks import KEYSLOTS_FLAG, LuksKeys

log = logging.getLogger(__name__)

MAX_CHAIN = 64  # backing files below one image
# Plugins that serve one location given by a parameter: a backing file of theirs is the same
# plugin, same parameters, at a sibling location.
LOCATION_PARAMS = {"file": "file", "curl": "url"}


class ChainError(FormatError):
    """A backing file that cannot be opened (missing, outside the archive or directory, a loop),
    or an encrypted image without a passphrase."""


def layer_read_into(layer: Layer) -> Callable[[memoryview, int], None]:
    def read_into(buf: memoryview, offset: int) -> None:
        for start in range(0, len(buf), READ_CHUNK):
            layer.pread(buf[start:start + READ_CHUNK], offset + start, 0)
    return read_into


class LayerDisk:
    """A raw backing file: the layer's bytes, its holes and extents as they are."""

    def __init__(self, layer: Layer) -> None:
        self.layer = layer
        self.size = layer.get_size()

    def read_into(self, buf: memoryview, offset: int) -> list[tuple[int, int]]:
        holes: list[tuple[int, int]] = []
        for start in range(0, len(buf), READ_CHUNK):
            piece = buf[start:start + READ_CHUNK]
            holes.extend((start + s, n) for s, n in self.layer.pread_sparse(piece, offset + start, 0))
        return holes

    def allocation(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        if not self.layer.can_extents():
            return [(offset, length, False)]
        found = Extents(offset, offset + length)
        self.layer.extents(length, offset, 0, found)
        return [(o, n, bool(kind & EXTENT_ZERO)) for o, n, kind in found] or [(offset, length, False)]


@dataclass(frozen=True)
class Location:
    """Where an image was found, to resolve its backing file name: an export of the layer below
    (`plugin` None), or a plugin serving one file or URL (`value` of parameter `key`)."""

    export: str = ""
    plugin: Plugin | None = None
    key: str = ""
    value: str = ""

    def describe(self) -> str:
        return self.value if self.plugin is not None else f"export {self.export!r}"


def sibling_export(export: str, name: str) -> str:
    """`name` relative to the export `export`, refused if it leaves the archive or directory."""
    joined = posixpath.normpath(posixpath.join(posixpath.dirname(export), name))
    if name.startswith("/") or joined == ".." or joined.startswith("../"):
        raise ChainError(f"the backing file name {name!r} points outside the archive or directory "
                           f"(backing=PATH names it explicitly)")
    return joined


def sibling_path(path: str, name: str) -> str:
    """`name` next to the file `path`; refused if it (or a symbolic link on the way) leaves the directory."""
    directory = os.path.dirname(path) or "."
    target = os.path.normpath(os.path.join(directory, name))
    real_directory = os.path.realpath(directory)
    if os.path.isabs(name) or os.path.commonpath([real_directory, os.path.realpath(target)]) != real_directory:
        raise ChainError(f"the backing file name {name!r} points outside the directory {directory} "
                           f"(backing=PATH names it explicitly)")
    if not os.path.isfile(target):
        raise ChainError(f"the backing file {target} does not exist")
    return target


def sibling_url(url: str, name: str) -> str:
    """`name` relative to the URL `url`, within the same directory tree of the same server."""
    target = urllib.parse.urljoin(url, name)
    base = url.rsplit("/", 1)[0] + "/"
    if urllib.parse.urlsplit(name).scheme or not target.startswith(base):
        raise ChainError(f"the backing file name {name!r} points outside {base}")
    return target


def plugin_for(value: str) -> tuple[str, str]:
    """The plugin and its location parameter for backing=PATH-or-URI."""
    scheme = urllib.parse.urlsplit(value).scheme
    if scheme in ("http", "https"):
        return "curl", "url"
    if scheme.startswith("nbd"):
        return "nbd", "uri"
    return "file", "file"


class Qcow2Filter(LuksKeys, Filter):
    """Decode a qcow2 image read-only: v2/v3, compressed, subclusters, backing files, snapshots, LUKS."""

    name = "qcow2"
    debug_flag_help = KEYSLOTS_FLAG
    backing = Param(String(), default="auto",
                    help="auto: the backing file next to the image (a sibling member of the archive, a sibling "
                         "file or URL); none: read as zeroes what the backing file would give; PATH or URI "
                         "(http(s)://, nbd://): the top image's backing file")
    snapshot = Param(String(), help="Serve this internal snapshot (by id, else by name, as qemu-img snapshot -l "
                                    "lists them) instead of the current disk")
    cache_size = Param(Size(minimum=1 << 20), key="qcow2-cache-size", default=64 << 20,
                       help="Memory for decoded L2 tables and decompressed clusters, all images together "
                            "(default 64M)")

    def dump_plugin(self) -> None:
        # nbdkit's qcow2dec lists the compression types it decodes.
        print(f"{self.name}_deflate=yes")
        print(f"{self.name}_zstd=yes")

    def prepare(self) -> None:
        """What get_ready does except checking the default export (the image filter calls it)."""
        if self.passphrase is not None or self.keyfile is not None:
            self.check_one_passphrase()
        self.prepare_keys()
        self._cache = ByteCache(self.cache_size)
        self._images: dict[tuple[Any, ...], Qcow2Image] = {}
        self._plugins: dict[tuple[str, str], Plugin] = {}
        self._lock = threading.Lock()

    def get_ready(self) -> None:
        self.prepare()
        self.check_default_export()

    def check_default_export(self) -> None:
        """Open the default export's image (and its backing files, its LUKS volume) at start-up,
        so that a bad image or passphrase stops the server before it listens."""
        try:
            below = self.open_below(True, "")
        except (NBDError, OSError) as e:
            log.debug("%s: cannot open the layer below at start-up (%s); checking at connection", self.name, e)
            return
        opened: list[Layer] = []
        try:
            self.open_disk(below, "", self.open_below, opened)
        except KdfBudgetError as e:
            raise ConfigError(self.budget_message(e)) from None
        except (FormatError, NBDError) as e:
            raise ConfigError(f"{self.name}: {e}") from None
        finally:
            for layer in [*opened, below]:
                layer.close()

    def cleanup(self) -> None:
        for plugin in getattr(self, "_plugins", {}).values():
            plugin.cleanup()

    def open(self, next_open: OpenNext, readonly: bool, export_name: str) -> FilterHandle:
        below = next_open(True, export_name)  # decoded data is read-only
        opened: list[Layer] = []
        try:
            disk = self.open_disk(below, export_name, next_open, opened)
            return Qcow2Handle(self, below, disk, opened)
        except BaseException as e:
            for layer in opened:
                layer.close()
            below.close()
            if isinstance(e, (FormatError, MemoryError)):
                raise nbd_error(e, f"{self.name}: ") from None
            raise

    # The chain of images ------------------------------------------------------------------
    def open_disk(self, below: Layer, export_name: str, next_open: OpenNext, opened: list[Layer]) -> Qcow2Disk:
        """The disk `below` holds, with its backing files opened (into `opened`, closed by the caller)."""
        top = self._location_of(below, export_name)
        seen: list[tuple[bytes, str]] = []
        return self._qcow2_disk(below, top, next_open, opened, seen, snapshot=self.snapshot)

    def _location_of(self, below: Layer, export_name: str) -> Location:
        plugin = getattr(below.handle, "plugin", None)
        key = LOCATION_PARAMS.get(getattr(plugin, "name", ""))
        if isinstance(plugin, Plugin) and key and getattr(plugin, key, None):
            return Location(export_name, plugin, key, getattr(plugin, key))
        return Location(export_name)

    def _qcow2_disk(self, layer: Layer, where: Location, next_open: OpenNext, opened: list[Layer],
                    seen: list[tuple[bytes, str]], snapshot: str | None = None) -> Qcow2Disk:
        read = layer_reader(layer)
        identity = read(0, 4096) + layer.get_size().to_bytes(8, "big")
        for earlier, described in seen:
            if earlier == identity:
                raise ChainError(f"the backing file of {seen[-1][1]} is {described} again: a backing loop, or the "
                                   "layer below serves the same image whatever the export name (a single file, or "
                                   "an archive member chosen with NAME-entry=); serve the archive or directory with "
                                   "every member as an export, or give backing=PATH or backing=none")
        if len(seen) > MAX_CHAIN:
            raise ChainError(f"more than {MAX_CHAIN} backing files")
        seen.append((identity, where.describe()))
        image = self._image(where, snapshot, read, layer.get_size())
        cipher = self._cipher(image, read) if image.header.encryption else None
        backing: Disk | None = None
        name = image.header.backing_file
        if name is not None and self.backing != "none":
            explicit = self.backing != "auto" and len(seen) == 1
            backing_layer, backing_where = (self._open_explicit(self.backing) if explicit else
                                            self._open_sibling(where, name, next_open))
            opened.append(backing_layer)
            if self._is_qcow2(image.header.backing_format, backing_layer):
                backing = self._qcow2_disk(backing_layer, backing_where, next_open, opened, seen)
            else:
                backing = LayerDisk(backing_layer)
        return Qcow2Disk(image, read, layer_read_into(layer), backing, cipher)

    def _image(self, where: Location, snapshot: str | None, read: Reader, size: int) -> Qcow2Image:
        key = (where.export, where.value, snapshot, size)
        with self._lock:
            image = self._images.get(key)
        if image is None:
            image = open_image(read, size, self._cache, snapshot)
            with self._lock:
                image = self._images.setdefault(key, image)
        return image

    def _cipher(self, image: Qcow2Image, read: Reader) -> Cipher:
        if self.passphrase is None:
            raise ChainError("the image is encrypted (LUKS): give passphrase= or keyfile=")
        luks_read, length = luks_header_reader(read, image.header)
        try:
            return self.unlock_volume(luks_read, length).cipher
        except KdfBudgetError:
            raise
        except LuksError as e:
            raise ChainError(f"the LUKS encryption header: {e}") from None

    def _is_qcow2(self, declared: str | None, layer: Layer) -> bool:
        if declared in ("qcow2", "raw"):
            return declared == "qcow2"
        if declared is not None:
            raise ChainError(f"backing file format {declared!r} is not supported (qcow2 or raw)")
        return layer.get_size() >= len(MAGIC) and layer_reader(layer)(0, len(MAGIC)) == MAGIC

    def _open_sibling(self, where: Location, name: str, next_open: OpenNext) -> tuple[Layer, Location]:
        if where.plugin is not None:
            if where.key == "file":
                value = sibling_path(where.value, name)
            elif where.key == "url":
                value = sibling_url(where.value, name)
            else:
                raise ChainError(f"backing file {name!r}: the {where.plugin.name} plugin serves no directory "
                                   "to find it in (give backing=PATH-or-URI)")
            plugin = self._sibling_plugin(where.plugin, where.key, value)
            return Layer(plugin.open(True, ""), True), Location(plugin=plugin, key=where.key, value=value)
        export = sibling_export(where.export, name)
        try:
            return next_open(True, export), Location(export)
        except NBDError as e:
            raise ChainError(f"backing file {name!r} (export {export!r} of the layer below) cannot be opened: "
                               f"{e}") from None

    def _sibling_plugin(self, plugin: Plugin, key: str, value: str) -> Plugin:
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

    def _open_explicit(self, value: str) -> tuple[Layer, Location]:
        with self._lock:
            plugin = self._plugins.get(("explicit", value))
            if plugin is None:
                plugin_name, key = plugin_for(value)
                plugin = load_plugin(plugin_name)()
                self._ready(plugin, lambda: plugin.configure([(key, value)]))
                self._plugins[("explicit", value)] = plugin
        key = LOCATION_PARAMS.get(plugin.name, "")
        where = Location(plugin=plugin, key=key, value=value) if key else Location(plugin=plugin)
        return Layer(plugin.open(True, ""), True), where

    @staticmethod
    def _ready(plugin: Plugin, configure: Callable[[], None]) -> None:
        try:
            configure()
            plugin.get_ready()
        except ConfigError as e:
            raise ChainError(f"backing file: {e}") from None


class Qcow2Handle(FilterHandle):
    """One connection's decoded disk; `opened` are its backing files' layers."""

    def __init__(self, filter: Qcow2Filter, next: Layer, disk: Qcow2Disk, opened: list[Layer]) -> None:
        self.filter, self.next = filter, next
        self.disk, self.opened = disk, opened

    def get_size(self) -> int:
        return self.disk.size

    def block_size(self) -> tuple[int, int, int] | None:
        return None

    def can_multi_conn(self) -> bool:
        return True  # read-only: every connection sees the same bytes

    def can_cache(self) -> int:
        return NONE

    def can_extents(self) -> bool:
        return True

    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        for start, length in self.pread_sparse(buf, offset, flags):
            fill_zero(buf[start:start + length])

    def pread_sparse(self, buf: memoryview, offset: int, flags: int) -> Holes:
        try:
            return self.disk.read_into(buf, offset)
        except (FormatError, MemoryError) as e:
            raise nbd_error(e, f"{self.filter.name}: ") from None

    def extents(self, count: int, offset: int, flags: int, extents: Extents) -> None:
        try:
            found = self.disk.allocation(offset, count)
        except (FormatError, MemoryError) as e:
            raise nbd_error(e, f"{self.filter.name}: ") from None
        for start, length, zero in found:
            extents.add(start, length, EXTENT_HOLE | EXTENT_ZERO if zero else EXTENT_DATA)
            if flags & FLAG_REQ_ONE:
                return

    def close(self) -> None:
        for layer in self.opened:
            layer.close()


FILTER = Qcow2Filter

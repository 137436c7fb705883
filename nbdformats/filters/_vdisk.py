"""What the image decoders share (vmdk, vpc/vhd, vhdx, vdi, and ova's disks): a read-only disk
decoded from the layer below, its holes in reads and block status, and its parent chain.

A subclass implements `load(file)`, which parses the image in `file`, and, when its data lies in
other files too (a VMDK's extents), `data_files`.  Parsed images are shared by all connections
(one per file: their tables and decoded grains are cached there, bounded by NAME-cache-size=);
each connection opens its own files and parents, found as filters/_parents.py says.
"""

from __future__ import annotations

import errno
import logging
import threading
from typing import Any

from ..api.chain import (EXTENT_DATA, EXTENT_HOLE, EXTENT_ZERO, FLAG_REQ_ONE, NONE, Extents, Filter, FilterHandle,
                         Holes, Layer, OpenNext)
from ..api.errors import ConfigError, NBDError
from ..api.params import Param, Size, String
from ..api.zeroes import fill_zero
from ..formats.blockmap import Disk, Image, LayeredDisk
from ..formats.errors import FormatError
from ._format_errors import nbd_error
from ._parents import MAX_CHAIN, Location, OpenedFile, ParentError, Siblings, layer_file, open_parent

log = logging.getLogger(__name__)

DEFAULT_CACHE = 64 << 20


def parent_param(component: str) -> Any:
    return Param(String(), key=f"{component}-parent", default="auto",
                 help="auto: the parent the image names, next to it (another member of the archive, another file "
                      "of the directory); none: read what the parent holds as zeroes; PATH or URI (http(s)://, "
                      "nbd://): the top image's parent")


def cache_param(component: str) -> Any:
    return Param(Size(minimum=1 << 20), key=f"{component}-cache-size", default=DEFAULT_CACHE,
                 help="Memory for each image's tables and decoded grains (an LRU)")


class Chain:
    """The files one connection opened for a disk and its parents, closed together."""

    def __init__(self) -> None:
        self.files: list[OpenedFile] = []

    def add(self, file: OpenedFile) -> OpenedFile:
        self.files.append(file)
        return file

    def close(self) -> None:
        for file in reversed(self.files):
            try:
                file.close()
            except Exception as e:  # one file failing to close must not keep the others open
                log.debug("closing %s: %s", file.name, e)
        self.files.clear()


class DiskImageFilter(Filter):
    """Base of the image decoders.  Subclasses set `name`, declare NAME_parent = parent_param(NAME)
    and NAME_cache_size = cache_param(NAME) (attributes of their own: the image filter takes every
    decoder's parameters at once), and implement `load`."""

    @property
    def parent(self) -> str:
        return str(getattr(self, f"{self.name}_parent", "none"))

    @property
    def cache_size(self) -> int:
        return int(getattr(self, f"{self.name}_cache_size", DEFAULT_CACHE))

    def load(self, file: OpenedFile, where: Location, next_open: OpenNext) -> Image:
        """Parse the image in `file`, found at `where` (a FormatError if it is not valid)."""
        raise NotImplementedError

    def data_files(self, image: Image, file: OpenedFile, where: Location, next_open: OpenNext,
                   chain: Chain) -> list[OpenedFile]:
        """The files the image's runs read, in its numbering (opened for this connection into `chain`)."""
        return [file]

    def get_ready(self) -> None:
        self.prepare()
        self.check_default_export()

    def prepare(self) -> None:
        """What get_ready does except checking the default export (the image filter calls it)."""
        self._images: dict[tuple[str, bool, int], Image] = {}
        self._lock = threading.Lock()
        self.siblings = Siblings(self.name, self.open_below)

    def check_default_export(self) -> None:
        # Open the default export now, so a bad image is a start-up error.  Its parents are
        # checked too, but where the layer below has other exports a failure there waits for a
        # connection: only then is the image's real name known (a member of an archive may lie in
        # a directory its parent's name is relative to).
        with self.below_if_available() as below:
            if below is None:
                return
            try:
                self.open_disk(below, "", self.open_below).close()
            except NBDError as e:
                if e.errno != errno.ENOENT or self.siblings.location_of(below, "").plugin is not None or \
                        not self.siblings.names_select_exports():
                    raise ConfigError(str(e)) from None
                log.warning("%s (checked again when a client connects)", e)

    def cleanup(self) -> None:
        self.siblings.cleanup()

    def image(self, file: OpenedFile, where: Location, next_open: OpenNext) -> Image:
        """The parsed image of `file`, parsed once and shared."""
        key = (where.name, where.plugin is None, file.size)
        with self._lock:
            cached = self._images.get(key)
        if cached is not None:
            return cached
        image = self.load(file, where, next_open)
        with self._lock:
            return self._images.setdefault(key, image)

    def open(self, next_open: OpenNext, readonly: bool, export_name: str) -> FilterHandle:
        below = next_open(True, export_name)  # decoded images are read-only: write through --filter=cow
        try:
            return self.open_disk(below, export_name, next_open)
        except BaseException:
            below.close()
            raise

    def open_disk(self, below: Layer, export_name: str, next_open: OpenNext) -> "DiskHandle":
        chain = Chain()
        try:
            where = self.siblings.location_of(below, export_name)
            disk = self.disk(layer_file(where.name, below), where, next_open, chain)
        except ParentError as e:
            chain.close()
            raise NBDError(errno.ENOENT, f"{self.name}: {e}") from None
        except (FormatError, MemoryError) as e:
            chain.close()
            raise nbd_error(e, f"{self.name}: ") from None
        except BaseException:
            chain.close()
            raise
        return DiskHandle(self, below, disk, chain)

    def disk(self, file: OpenedFile, where: Location, next_open: OpenNext, chain: Chain) -> LayeredDisk:
        """The disk in `file` over its parents: `auto`, `none` or a path, as NAME-parent= says."""
        image = self.image(file, where, next_open)
        top = disk = self.layered(image, file, where, next_open, chain)
        seen = {where.name}
        for depth in range(MAX_CHAIN + 1):
            link = getattr(image, "parent", None)
            if link is None:
                if self.parent not in ("auto", "none") and depth == 0:
                    raise ParentError(f"{self.name}-parent={self.parent}: the image has no parent")
                return top
            if self.parent == "none":
                return top
            if depth == MAX_CHAIN:
                raise ParentError(f"the chain of parents is longer than {MAX_CHAIN}")
            if self.parent == "auto" or depth > 0:
                parent_file, where = open_parent(self.siblings, link, where, next_open)
            else:
                parent_file, where = self.siblings.open_explicit(self.parent)
            chain.add(parent_file)
            if where.name in seen:
                raise ParentError(f"the chain of parents loops: {where.name!r} is its own ancestor")
            seen.add(where.name)
            image = self.image(parent_file, where, next_open)
            identity = getattr(image, "identity", "")
            if identity not in link.identities:
                raise ParentError(f"the parent {where.name!r} is {identity}, but the image expects "
                                  f"{' or '.join(link.identities)} ({link.what}): it is not this image's parent, or "
                                  "it changed after the image was made")
            parent = self.layered(image, parent_file, where, next_open, chain)
            disk.parent = parent
            disk = parent
        raise AssertionError("unreachable")

    def layered(self, image: Image, file: OpenedFile, where: Location, next_open: OpenNext,
                chain: Chain) -> LayeredDisk:
        files = self.data_files(image, file, where, next_open, chain)
        return LayeredDisk(image, [f.read for f in files], [f.read_into for f in files])


class DiskHandle(FilterHandle):
    """A read-only decoded disk: reads with holes, block status, and the files it opened."""

    def __init__(self, filter: Filter, next: Layer, disk: Disk, chain: Chain,
                 description: str | None = None) -> None:
        self.filter, self.next = filter, next
        self.disk, self.chain, self.description = disk, chain, description

    def get_size(self) -> int:
        return self.disk.size

    def block_size(self) -> tuple[int, int, int] | None:
        return None

    def export_description(self) -> str | None:
        return self.description or self.next.export_description()

    def can_write(self) -> bool:
        return False

    def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        raise NBDError(errno.EROFS, f"{self.filter.name}: read-only (stack --filter=cow on top to write)")

    def zero(self, count: int, offset: int, flags: int) -> None:
        raise NBDError(errno.EROFS, f"{self.filter.name}: read-only")

    def trim(self, count: int, offset: int, flags: int) -> None:
        raise NBDError(errno.EROFS, f"{self.filter.name}: read-only")

    def can_multi_conn(self) -> bool:
        return True  # read-only: every connection sees the same bytes

    def can_extents(self) -> bool:
        return True

    def can_cache(self) -> int:
        return NONE

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
        self.chain.close()

"""memory plugin: a RAM disk, sparse by default, so a 1 TB disk costs only what is written.

nbdkit's allocators: `sparse` (a dictionary of 32 KiB pages; absent pages are holes), `malloc`
(one buffer of the whole size, optionally locked in RAM with `mlock=true`), and `zstd` (sparse
pages, each kept compressed).  All connections share one disk.
"""

from __future__ import annotations

import ctypes
import errno
import threading
from typing import NamedTuple

import zstandard

from ..api.chain import EXTENT_DATA, EXTENT_HOLE, EXTENT_ZERO, NATIVE, Extents, Plugin, PluginHandle
from ..api.errors import ConfigError, NBDError
from ..api.params import Param, ParamType, Size, parse_bool
from ..api.zeroes import ZEROES, fill_zero

PAGE = 32 * 1024  # allocation unit, as nbdkit's sparse array
ZERO_PAGE = ZEROES[:PAGE]  # reads of pages never written
REGION_PAGES = 2048  # pages per region (64 MiB); regions count their pages so extents skip holes fast
MAX_SIZE = (1 << 63) - 1


class AllocatorChoice(NamedTuple):
    name: str
    mlock: bool = False

    def __str__(self) -> str:
        return self.name + (",mlock=true" if self.mlock else "")


class Allocator(ParamType):
    """nbdkit's `allocator=sparse|malloc[,mlock=true]|zstd`."""

    metavar = "sparse|malloc[,mlock=true]|zstd"

    def parse(self, text: str) -> AllocatorChoice:
        name, _, options = text.partition(",")
        if name not in ("sparse", "malloc", "zstd"):
            raise ValueError("use sparse, malloc[,mlock=true] or zstd")
        mlock = False
        for option in filter(None, options.split(",")):
            key, _, value = option.partition("=")
            if name != "malloc" or key != "mlock":
                raise ValueError(f"unknown allocator option {option!r} (only malloc takes mlock=true|false)")
            mlock = parse_bool(value)
        return AllocatorChoice(name, mlock)


class SparsePages:
    """Pages that exist only once written; the others read as zeroes (allocator=sparse)."""

    packed = False  # ZstdPages: pages are kept compressed (decompress() gives one back)

    def __init__(self) -> None:
        # Each page is a memoryview of its bytearray: assigning to a slice of a bytearray copies
        # the source into a temporary first (CPython), a memoryview slice copies once.
        self.pages: dict[int, memoryview] = {}  # ZstdPages keeps each compressed, as bytes
        self.region_counts: dict[int, int] = {}
        # Connections run in threads of their own: pages are added and removed under this lock
        # (two writes to one new page must not each allocate it); reads take none (dict lookups
        # are atomic), and writes into an existing page are as concurrent as in nbdkit.
        self.lock = threading.Lock()

    def read(self, buf: memoryview, offset: int) -> None:
        pages = self.pages
        done, count = 0, len(buf)
        index, start = divmod(offset, PAGE)
        while done < count:
            n = min(PAGE - start, count - done)
            # memoryview slices: one copy, straight from the page into the reply buffer
            buf[done:done + n] = pages.get(index, ZERO_PAGE)[start:start + n]
            done += n
            index += 1
            start = 0

    def read_sparse(self, buf: memoryview, offset: int) -> list[tuple[int, int]]:
        """Copy the pages that exist; return the ranges of buf (start, length) that are holes."""
        pages, regions, packed = self.pages, self.region_counts, self.packed
        holes: list[tuple[int, int]] = []
        done, count = 0, len(buf)
        index, start = divmod(offset, PAGE)
        while done < count:
            page = pages.get(index)
            if page is not None:
                n = min(PAGE - start, count - done)
                if packed:
                    page = memoryview(self.decompress(page))
                buf[done:done + n] = page[start:start + n]
                done += n
                index += 1
                start = 0
                continue
            region = index // REGION_PAGES
            if region not in regions:  # the rest of an empty region
                n = min((region + 1) * REGION_PAGES * PAGE - (offset + done), count - done)
            else:
                n = min(PAGE - start, count - done)
            if holes and sum(holes[-1]) == done:
                holes[-1] = (holes[-1][0], holes[-1][1] + n)
            else:
                holes.append((done, n))
            done += n
            index, start = divmod(offset + done, PAGE)
        return holes

    def decompress(self, packed: bytes | bytearray | memoryview) -> bytes:
        raise NotImplementedError  # only ZstdPages keeps pages packed

    def write(self, buf: memoryview, offset: int) -> None:
        pages = self.pages
        done, count = 0, len(buf)
        index, start = divmod(offset, PAGE)
        while done < count:
            n = min(PAGE - start, count - done)
            page = pages.get(index)
            if page is None:
                page = self.allocate(index)
            page[start:start + n] = buf[done:done + n]
            done += n
            index += 1
            start = 0

    def allocate(self, index: int) -> memoryview:
        """Page `index`, allocated (zeroed) unless another thread just did."""
        with self.lock:
            page = self.pages.get(index)
            if page is None:
                page = self.pages[index] = memoryview(bytearray(PAGE))
                region = index // REGION_PAGES
                self.region_counts[region] = self.region_counts.get(region, 0) + 1
            return page

    def page_is_zero(self, index: int, start: int = 0) -> bool:
        """Whether page `index` holds only zeroes from byte `start` of it on (a freed one does)."""
        page = self.pages.get(index)
        return page is None or page[start:] == ZERO_PAGE[start:]

    def free(self, index: int) -> None:
        with self.lock:
            if self.pages.pop(index, None) is not None:
                region = index // REGION_PAGES
                left = self.region_counts[region] - 1
                if left:
                    self.region_counts[region] = left
                else:
                    del self.region_counts[region]

    def clear(self, count: int, offset: int) -> None:
        """Zero (trim) a range: whole pages are freed, the edges of others zeroed."""
        end = offset + count
        while offset < end:
            index, start = divmod(offset, PAGE)
            n = min(PAGE - start, end - offset)
            if n == PAGE:
                self.free(index)
            elif index in self.pages:
                self.write(ZEROES[:n], offset)
            offset += n

    def resize(self, old: int, size: int) -> None:
        """Bytes past a smaller size are dropped, so growing again reads zeroes."""
        if size < old:
            with self.lock:
                beyond = [i for i in self.pages if i * PAGE >= size]
            for index in beyond:
                self.free(index)
            tail = size % PAGE
            if tail and size // PAGE in self.pages:
                self.clear(PAGE - tail, size)

    def extents(self, count: int, offset: int, extents: Extents) -> None:
        pages, regions = self.pages, self.region_counts
        end = offset + count
        position = offset - offset % PAGE
        while position < end:
            index = position // PAGE
            if index % REGION_PAGES == 0 and index // REGION_PAGES not in regions:
                step = REGION_PAGES * PAGE  # a whole empty region
                kind = EXTENT_HOLE | EXTENT_ZERO
            else:
                step = PAGE
                if index not in pages:
                    kind = EXTENT_HOLE | EXTENT_ZERO
                else:  # as nbdkit's sparse array: allocated zeroes (from where the request starts) read as zeroes
                    zero = self.page_is_zero(index, max(offset - position, 0))
                    kind = EXTENT_ZERO if zero else EXTENT_DATA
            extents.add(position, step, kind)
            position += step


class ZstdPages(SparsePages):
    """Sparse pages kept zstd-compressed (allocator=zstd): about twice the data in the same RAM,
    for the cost of (de)compressing a page on each access."""

    packed = True

    def __init__(self) -> None:
        super().__init__()
        # zstandard's (de)compressors must not be used by two threads at once: one per thread.
        self.codecs = threading.local()
        self.write_lock = threading.Lock()

    def _thread_codecs(self) -> tuple[zstandard.ZstdCompressor, zstandard.ZstdDecompressor]:
        codecs = self.codecs
        if not hasattr(codecs, "pair"):
            codecs.pair = (zstandard.ZstdCompressor(level=1), zstandard.ZstdDecompressor())
        return codecs.pair

    def decompress(self, packed: bytes | bytearray | memoryview) -> bytes:
        return self._thread_codecs()[1].decompress(packed)

    def compress(self, page: bytearray) -> bytes:
        return self._thread_codecs()[0].compress(page)

    def page_is_zero(self, index: int, start: int = 0) -> bool:
        packed = self.pages.get(index)
        return packed is None or memoryview(self.decompress(packed))[start:] == ZERO_PAGE[start:]

    def read(self, buf: memoryview, offset: int) -> None:
        done, count = 0, len(buf)
        while done < count:
            index, start = divmod(offset + done, PAGE)
            n = min(PAGE - start, count - done)
            packed = self.pages.get(index)
            source = ZERO_PAGE if packed is None else memoryview(self.decompress(packed))
            buf[done:done + n] = source[start:start + n]
            done += n

    def write(self, buf: memoryview, offset: int) -> None:
        done, count = 0, len(buf)
        with self.write_lock:  # each page is read, changed and stored whole: one writer at a time
            while done < count:
                index, start = divmod(offset + done, PAGE)
                n = min(PAGE - start, count - done)
                packed = self.pages.get(index)
                page = bytearray(PAGE) if packed is None else bytearray(self.decompress(packed))
                memoryview(page)[start:start + n] = buf[done:done + n]
                self._store(index, self.compress(page))
                done += n

    def _store(self, index: int, packed: bytes) -> None:
        with self.lock:
            if index not in self.pages:
                region = index // REGION_PAGES
                self.region_counts[region] = self.region_counts.get(region, 0) + 1
            self.pages[index] = packed  # type: ignore[assignment]  # compressed bytes


class WholeBuffer:
    """The whole disk in one buffer (allocator=malloc): no sparseness, nothing to look up."""

    def __init__(self, size: int, mlock: bool) -> None:
        self.mlock = mlock
        try:
            self.data = bytearray(size)  # calloc: the kernel commits pages only when they are touched
        except (MemoryError, OverflowError):
            raise ConfigError(f"memory: allocator=malloc cannot allocate {size} bytes") from None
        self.view = memoryview(self.data)
        self._lock_in_ram()

    def _lock_in_ram(self) -> None:
        if not self.mlock or not len(self.data):
            return
        libc = ctypes.CDLL(None, use_errno=True)
        address = ctypes.addressof(ctypes.c_char.from_buffer(self.data))
        if libc.mlock(ctypes.c_void_p(address), ctypes.c_size_t(len(self.data))) != 0:
            reason = errno.errorcode.get(ctypes.get_errno(), "error")
            raise ConfigError(f"memory: mlock of {len(self.data)} bytes failed ({reason}): raise the "
                              "locked-memory limit (ulimit -l) or run as root")

    def read(self, buf: memoryview, offset: int) -> None:
        buf[:] = self.view[offset:offset + len(buf)]

    def read_sparse(self, buf: memoryview, offset: int) -> list[tuple[int, int]]:
        self.read(buf, offset)
        return []

    def write(self, buf: memoryview, offset: int) -> None:
        self.view[offset:offset + len(buf)] = buf

    def clear(self, count: int, offset: int) -> None:
        fill_zero(self.view[offset:offset + count])  # not a temporary the size of the request

    def resize(self, old: int, size: int) -> None:
        try:
            grown = bytearray(size)
        except (MemoryError, OverflowError):
            raise NBDError(errno.ENOMEM, f"cannot allocate {size} bytes for the disk") from None
        keep = min(old, size)
        grown[:keep] = self.view[:keep]
        self.view.release()
        self.data, self.view = grown, memoryview(grown)
        try:
            self._lock_in_ram()
        except ConfigError as e:
            raise NBDError(errno.ENOMEM, str(e)) from None

    def extents(self, count: int, offset: int, extents: Extents) -> None:
        extents.add(offset, count, EXTENT_DATA)


class MemoryPlugin(Plugin):
    """A RAM disk (sparse: unwritten and trimmed pages read as zeroes and cost nothing)."""

    name = "memory"
    size = Param(Size(maximum=MAX_SIZE), required=True, magic=True,
                 help="Size of the disk, e.g. 1G (nbdkit's size suffixes)")
    allocator = Param(Allocator(), default=AllocatorChoice("sparse"),
                      help="sparse (default): 32 KiB pages allocated when written; malloc[,mlock=true]: one "
                           "buffer of the whole size (optionally locked in RAM); zstd: sparse pages kept "
                           "compressed")

    def get_ready(self) -> None:
        # All connections share one disk, as in nbdkit.
        kind, mlock = self.allocator
        if kind == "malloc":
            self.store: SparsePages | WholeBuffer = WholeBuffer(self.size, mlock)
        else:
            self.store = ZstdPages() if kind == "zstd" else SparsePages()

    def dump_plugin(self) -> None:
        print("mlock=yes")

    class Handle(PluginHandle):
        def __init__(self, plugin: "MemoryPlugin", readonly: bool, export_name: str) -> None:
            self.plugin = plugin
            self.store = plugin.store

        def get_size(self) -> int:
            return self.plugin.size

        def resize(self, size: int) -> None:
            if size > MAX_SIZE:
                raise NBDError(errno.EINVAL, "size too large")
            self.store.resize(self.plugin.size, size)
            self.plugin.size = size

        def can_multi_conn(self) -> bool:
            return True  # one shared store: a flush on any connection covers all

        def can_fua(self) -> int:
            return NATIVE  # memory writes are durable as soon as they are done

        def can_cache(self) -> int:
            return NATIVE

        def pread(self, buf: memoryview, offset: int, flags: int) -> None:
            self.store.read(buf, offset)

        def pread_sparse(self, buf: memoryview, offset: int, flags: int) -> list[tuple[int, int]]:
            return self.store.read_sparse(buf, offset)

        def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
            self.store.write(buf, offset)

        def flush(self, flags: int) -> None:
            pass

        def trim(self, count: int, offset: int, flags: int) -> None:
            self.store.clear(count, offset)

        def zero(self, count: int, offset: int, flags: int) -> None:
            self.store.clear(count, offset)

        def cache(self, count: int, offset: int, flags: int) -> None:
            pass

        def extents(self, count: int, offset: int, flags: int, extents: Extents) -> None:
            self.store.extents(count, offset, extents)


PLUGIN = MemoryPlugin

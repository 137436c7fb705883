"""memory plugin: a RAM disk, sparse, so a 1 TB disk costs only what is written."""

from __future__ import annotations

import errno

from ..core.chain import EXTENT_DATA, EXTENT_HOLE, EXTENT_ZERO, Extents, Plugin, PluginHandle
from ..core.errors import NBDError
from ..core.params import Param, Size

PAGE = 32 * 1024  # allocation unit, as nbdkit's sparse array
ZERO_PAGE = memoryview(bytes(PAGE))
REGION_PAGES = 2048  # pages per region (64 MiB); regions count their pages so extents skip holes fast


class MemoryPlugin(Plugin):
    """A RAM disk (sparse: unwritten and trimmed pages read as zeroes and cost nothing)."""

    name = "memory"
    cheap_extents = True  # extents come from a dict / lseek: ask before large reads to send holes
    size = Param(Size(maximum=(1 << 63) - 1), required=True, magic=True,
                 help="Size of the disk, e.g. 1G (nbdkit's size suffixes)")

    def get_ready(self) -> None:
        # All connections share one disk, as in nbdkit.
        self.pages: dict[int, bytearray] = {}
        self.region_counts: dict[int, int] = {}

    class Handle(PluginHandle):
        def __init__(self, plugin: "MemoryPlugin", readonly: bool, export_name: str) -> None:
            self.pages = plugin.pages
            self.region_counts = plugin.region_counts
            self.plugin = plugin

        def get_size(self) -> int:
            return self.plugin.size

        def resize(self, size: int) -> None:
            """Grow or shrink; the bytes past the new end are dropped, so growing again reads zeroes."""
            old = self.plugin.size
            if size >= 1 << 63:
                raise NBDError(errno.EINVAL, "size too large")
            if size < old:
                for index in [i for i in self.pages if i * PAGE >= size]:
                    self._free(index)
                tail = size % PAGE
                page = self.pages.get(size // PAGE)
                if tail and page is not None:
                    page[tail:] = bytes(PAGE - tail)
            self.plugin.size = size

        def can_multi_conn(self) -> bool:
            return True  # one shared store: a flush on any connection covers all

        def can_fua(self) -> int:
            return 2  # NATIVE: memory writes are durable as soon as they are done

        def can_cache(self) -> int:
            return 2

        def pread(self, buf: memoryview, offset: int, flags: int) -> None:
            pages = self.pages
            done, count = 0, len(buf)
            while done < count:
                index, start = divmod(offset + done, PAGE)
                n = min(PAGE - start, count - done)
                page = pages.get(index)
                # memoryview slices: one copy, straight from the page into the reply buffer
                source = ZERO_PAGE if page is None else memoryview(page)
                buf[done:done + n] = source[start:start + n]
                done += n

        def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
            pages = self.pages
            done, count = 0, len(buf)
            while done < count:
                index, start = divmod(offset + done, PAGE)
                n = min(PAGE - start, count - done)
                page = pages.get(index)
                if page is None:
                    page = self._allocate(index)
                page[start:start + n] = buf[done:done + n]
                done += n

        def _allocate(self, index: int) -> bytearray:
            page = bytearray(PAGE)
            if self.pages.setdefault(index, page) is page:
                region = index // REGION_PAGES
                self.region_counts[region] = self.region_counts.get(region, 0) + 1
            return self.pages[index]

        def _free(self, index: int) -> None:
            if self.pages.pop(index, None) is not None:
                region = index // REGION_PAGES
                left = self.region_counts[region] - 1
                if left:
                    self.region_counts[region] = left
                else:
                    del self.region_counts[region]

        def flush(self, flags: int) -> None:
            pass

        def _clear(self, count: int, offset: int) -> None:
            pages = self.pages
            end = offset + count
            while offset < end:
                index, start = divmod(offset, PAGE)
                n = min(PAGE - start, end - offset)
                if n == PAGE:
                    self._free(index)
                else:
                    page = pages.get(index)
                    if page is not None:
                        page[start:start + n] = bytes(n)
                offset += n

        def trim(self, count: int, offset: int, flags: int) -> None:
            self._clear(count, offset)

        def zero(self, count: int, offset: int, flags: int) -> None:
            self._clear(count, offset)

        def cache(self, count: int, offset: int, flags: int) -> None:
            pass

        def extents(self, count: int, offset: int, flags: int, extents: Extents) -> None:
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
                    kind = EXTENT_DATA if index in pages else EXTENT_HOLE | EXTENT_ZERO
                extents.add(position, step, kind)
                position += step


PLUGIN = MemoryPlugin

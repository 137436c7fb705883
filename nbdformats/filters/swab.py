"""swab filter: swap the bytes of each 16, 32 or 64-bit word (nbdkit-swab-filter compatible).

For disks written by machines of the other byte order (the Atari Falcon's IDE wiring), or to make
the pattern plugin little-endian.  Requests must be aligned to the word size; the disk's size is
rounded down to it.
"""

from __future__ import annotations

import errno

import numpy as np

from ..api.chain import Extents, Filter, FilterHandle, Holes, Layer
from ..api.errors import NBDError
from ..api.params import Enum, Param

WORD_TYPES = {16: np.uint16, 32: np.uint32, 64: np.uint64}


def aligned_extents(below: Layer, count: int, offset: int, flags: int, align: int, extents: Extents) -> None:
    """The extents of the layer below in whole `align`-byte blocks, as nbdkit_extents_aligned: a
    block of mixed extents gets the types they all share (data unless all are holes or zeroes)."""
    found = Extents(offset, offset + count)
    below.extents(count, offset, flags, found)
    runs = list(found)
    for index, (start, length, kind) in enumerate(runs):
        end = start + length
        if end % align == 0:
            extents.add(start, length, kind)
            continue
        if end > offset + align:  # unaligned past the first block: keep the aligned part, stop
            extents.add(start, end - end % align - start, kind)
            return
        # A first extent shorter than a block: merge what follows until the block is covered.
        for _, more, more_kind in runs[index + 1:]:
            kind &= more_kind
            end += more
            if end >= offset + align:
                break
        while end < offset + align:
            more_found = Extents(end, offset + align)
            below.extents(offset + align - end, end, 0, more_found)
            if not len(more_found):
                raise NBDError(errno.EIO, "swab: the layer below reported no extents")
            for _, more, more_kind in more_found:
                kind &= more_kind
                end += more
        extents.add(offset, align, kind)
        return


class SwabFilter(Filter):
    """Swap the byte order of each 16, 32 or 64-bit word (swab-bits=)."""

    name = "swab"
    swab_bits = Param(Enum("8", "16", "32", "64"), default="16",
                      help="Word size in bits: 16 (default) swaps pairs of bytes; 8 turns the filter off")

    class Handle(FilterHandle):
        filter: "SwabFilter"

        def __init__(self, filter: "SwabFilter", next: Layer, readonly: bool, export_name: str) -> None:
            super().__init__(filter, next, readonly, export_name)
            self.bits = int(filter.swab_bits)
            self.width = self.bits // 8

        def _check(self, count: int, offset: int) -> None:
            if count % self.width or offset % self.width:
                raise NBDError(errno.EINVAL, "swab: requests to this filter must be aligned")

        def _swapped(self, buf: memoryview) -> np.ndarray:
            return np.frombuffer(buf, dtype=WORD_TYPES[self.bits]).byteswap()

        def get_size(self) -> int:
            size = self.next.get_size()
            return size - size % self.width

        def block_size(self) -> tuple[int, int, int] | None:
            below = self.next.block_size()
            if below is None:
                return self.width, 512, 0xFFFFFFFF
            minimum, preferred, maximum = below
            return max(minimum, self.width), preferred, maximum

        def _swap_in_place(self, buf: memoryview) -> None:
            if self.bits != 8:
                np.frombuffer(buf, dtype=WORD_TYPES[self.bits]).byteswap(inplace=True)

        def pread(self, buf: memoryview, offset: int, flags: int) -> None:
            self._check(len(buf), offset)
            self.next.pread(buf, offset, flags)
            self._swap_in_place(buf)

        def pread_sparse(self, buf: memoryview, offset: int, flags: int) -> Holes:
            self._check(len(buf), offset)
            holes = self.next.pread_sparse(buf, offset, flags)
            self._swap_in_place(buf)  # holes read as zeroes in any byte order: what fills them does not matter
            return holes

        def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
            self._check(len(buf), offset)
            if self.bits != 8:
                buf = memoryview(self._swapped(buf).tobytes())
            self.next.pwrite(buf, offset, flags)

        def trim(self, count: int, offset: int, flags: int) -> None:
            self._check(count, offset)
            self.next.trim(count, offset, flags)

        def zero(self, count: int, offset: int, flags: int) -> None:
            self._check(count, offset)
            self.next.zero(count, offset, flags)

        def extents(self, count: int, offset: int, flags: int, extents: Extents) -> None:
            self._check(count, offset)
            aligned_extents(self.next, count, offset, flags, self.width, extents)

        def cache(self, count: int, offset: int, flags: int) -> None:
            self._check(count, offset)
            self.next.cache(count, offset, flags)


FILTER = SwabFilter

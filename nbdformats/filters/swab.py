"""swab filter: swap the bytes of each 16, 32 or 64-bit word (nbdkit-swab-filter compatible).

For disks written by machines of the other byte order (the Atari Falcon's IDE wiring), or to make
the pattern plugin little-endian.  Requests must be aligned to the word size; the disk's size is
rounded down to it.
"""

from __future__ import annotations

import errno

import numpy as np

from ..api.chain import Extents, Filter, FilterHandle, Holes, Layer, extents_aligned
from ..api.errors import NBDError
from ..api.params import Enum, Param

WORD_TYPES = {16: np.uint16, 32: np.uint32, 64: np.uint64}


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
            extents_aligned(self.next, count, offset, flags, self.width, extents)

        def cache(self, count: int, offset: int, flags: int) -> None:
            self._check(count, offset)
            self.next.cache(count, offset, flags)


FILTER = SwabFilter

"""truncate filter: make the disk smaller or larger, or round its size (nbdkit-truncate-filter compatible).

Bytes past the end of the layer below read as zeroes; writes there must be zeroes (anything
else fails with ENOSPC), zero and trim there do nothing.  The size is taken when a
connection opens.  Unlike nbdkit 1.32, extents of the added tail are reported correctly
when round-up= (rather than truncate=) enlarged the disk.
"""

from __future__ import annotations

import errno

from ..api.chain import EXTENT_HOLE, EXTENT_ZERO, FLAG_FAST_ZERO, Extents, Filter, FilterHandle, Holes, Layer
from ..api.errors import NBDError
from ..api.params import Param, Size
from ..api.zeroes import fill_zero, is_zero

MAX_SIZE = (1 << 63) - 1


def apparent_size(real: int, truncate: int | None, round_up: int | None, round_down: int | None) -> int:
    """The size after truncate=, then round-up=, then round-down= (each optional), as nbdkit."""
    size = real if truncate is None else truncate
    if round_up:
        size = -(-size // round_up) * round_up
        if size > MAX_SIZE:
            raise NBDError(errno.EINVAL, f"truncate: cannot round the size up to a multiple of {round_up}")
    if round_down:
        size -= size % round_down
    return size


class TruncateFilter(Filter):
    """Change the size of the plugin: truncate=SIZE, round-up=N, round-down=N."""

    name = "truncate"
    truncate = Param(Size(maximum=MAX_SIZE), help="The new size: smaller or larger than the plugin")
    round_up = Param(Size(minimum=1, maximum=0xFFFFFFFF, power_of_two=True),
                     help="Round the size up to a multiple of N (a power of 2)")
    round_down = Param(Size(minimum=1, maximum=0xFFFFFFFF, power_of_two=True),
                       help="Round the size down to a multiple of N (a power of 2)")

    class Handle(FilterHandle):
        def __init__(self, filter: "TruncateFilter", next: Layer, readonly: bool, export_name: str) -> None:
            super().__init__(filter, next, readonly, export_name)
            self.real_size = next.get_size()
            self.size = apparent_size(self.real_size, filter.truncate, filter.round_up, filter.round_down)

        def get_size(self) -> int:
            return self.size

        def can_extents(self) -> bool:
            return True  # the tail is a hole whatever the plugin says

        def can_fast_zero(self) -> bool:
            return True  # zeroing the tail is free; zeroes below pass FAST_ZERO on

        def _inside(self, count: int, offset: int) -> int:
            """How many of the bytes [offset, offset+count) exist in the layer below."""
            return max(0, min(count, self.real_size - offset))

        def pread(self, buf: memoryview, offset: int, flags: int) -> None:
            n = self._inside(len(buf), offset)
            if n:
                self.next.pread(buf[:n], offset, flags)
            fill_zero(buf[n:])

        def pread_sparse(self, buf: memoryview, offset: int, flags: int) -> Holes:
            n = self._inside(len(buf), offset)
            holes = list(self.next.pread_sparse(buf[:n], offset, flags)) if n else []
            if n < len(buf):  # past the plugin's end: zeroes
                holes.append((n, len(buf) - n))
            return holes

        def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
            n = self._inside(len(buf), offset)
            if not is_zero(buf[n:]):
                raise NBDError(errno.ENOSPC, "truncate: write of nonzero data beyond the end of the underlying disk")
            if n:
                self.next.pwrite(buf[:n], offset, flags)

        def trim(self, count: int, offset: int, flags: int) -> None:
            n = self._inside(count, offset)
            if n:
                self.next.trim(n, offset, flags)

        def zero(self, count: int, offset: int, flags: int) -> None:
            n = self._inside(count, offset)
            if n:
                if flags & FLAG_FAST_ZERO and not self.next.can_fast_zero():
                    raise NBDError(errno.ENOTSUP, "truncate: the underlying disk cannot zero fast")
                self.next.zero(n, offset, flags)

        def cache(self, count: int, offset: int, flags: int) -> None:
            n = self._inside(count, offset)
            if n:
                self.next.cache(n, offset, flags)

        def extents(self, count: int, offset: int, flags: int, extents: Extents) -> None:
            real = self.real_size
            if offset < real:
                inner = Extents(offset, min(extents.end, real))
                self.next.extents(self._inside(count, offset), offset, flags, inner)
                for start, length, kind in inner:
                    extents.add(start, length, kind)
                if inner.covered < real:
                    return  # the client asks again from where the plugin stopped
            if self.size > real:
                extents.add(real, self.size - real, EXTENT_HOLE | EXTENT_ZERO)


FILTER = TruncateFilter

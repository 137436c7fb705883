"""checkwrite filter: writes become checks that the data is already there (nbdkit-checkwrite-filter
compatible).

The plugin is opened read-only and never written.  A write, trim or zero succeeds when the disk
already holds that data (zeroes for trims and zeroes: holes count) and fails with EIO otherwise,
which tests copying tools: `nbdcopy "$uri" "$uri"`.
"""

from __future__ import annotations

import errno

from ..api.chain import EXTENT_ZERO, FLAG_FAST_ZERO, NATIVE, Extents, Filter, FilterHandle, OpenNext
from ..api.errors import NBDError
from ..api.zeroes import ZEROES

PIECE = len(ZEROES)  # bytes read at a time to check for zeroes


def mismatch() -> NBDError:
    return NBDError(errno.EIO, "checkwrite: data written does not match expected")


class CheckwriteFilter(Filter):
    """Check that writes, trims and zeroes match what the plugin holds; never write to it."""

    name = "checkwrite"

    def open(self, next_open: OpenNext, readonly: bool, export_name: str) -> FilterHandle:
        below = next_open(True, export_name)  # whatever the client may do, the plugin is only read
        try:
            return self.Handle(self, below, readonly, export_name)
        except BaseException:
            below.close()
            raise

    class Handle(FilterHandle):
        # Everything write-like is supported, as checks.
        def can_write(self) -> bool:
            return True

        def can_flush(self) -> bool:
            return True

        def can_fua(self) -> int:
            return NATIVE

        def can_trim(self) -> bool:
            return True

        def can_zero(self) -> int:
            return NATIVE

        def can_fast_zero(self) -> bool:
            return True  # a fast zero over data fails at once with ENOTSUP

        def can_multi_conn(self) -> bool:
            return True

        def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
            expected = bytearray(len(buf))
            self.next.pread(memoryview(expected), offset, 0)
            if buf != expected:
                raise mismatch()

        def flush(self, flags: int) -> None:
            pass

        def zero(self, count: int, offset: int, flags: int) -> None:
            end = offset + count
            while offset < end:
                found = Extents(offset, end)
                self.next.extents(end - offset, offset, 0, found)
                for start, length, kind in found:
                    if not kind & EXTENT_ZERO:  # anything that reads as zeroes is fine as it is
                        if flags & FLAG_FAST_ZERO:
                            raise NBDError(errno.ENOTSUP, "checkwrite: fast zero would have to read the data")
                        self._check_zeroes(start, start + length)
                offset = found.covered

        def trim(self, count: int, offset: int, flags: int) -> None:
            self.zero(count, offset, flags & ~FLAG_FAST_ZERO)

        def _check_zeroes(self, start: int, end: int) -> None:
            buf = bytearray(min(PIECE, end - start))
            for position in range(start, end, PIECE):
                piece = memoryview(buf)[:min(PIECE, end - position)]
                self.next.pread(piece, position, 0)
                if piece != ZEROES[:len(piece)]:
                    raise mismatch()


FILTER = CheckwriteFilter

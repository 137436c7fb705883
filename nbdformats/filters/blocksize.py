"""blocksize filter: turn any client request into requests the plugin accepts
(nbdkit-blocksize-filter compatible).

Requests below are aligned to `minblock` and at most `maxdata` (read, write) or `maxlen`
(zero, trim, cache, extents) bytes: reads are widened to whole blocks, unaligned heads and
tails of writes and zeroes become read-modify-write cycles, unaligned parts of trims are
skipped (trim is advisory), and long requests are split.  The disk is cut down to a
multiple of minblock (use the truncate filter to round up instead).  When the layer below
emulates FUA by flushing, a split FUA request becomes its pieces without FUA and one flush, as
nbdkit's filter does, instead of a flush per piece.

As in nbdkit's filter, a read-modify-write cycle holds a lock exclusively while aligned writes,
zeroes and trims hold it shared: a concurrent aligned write is never undone by a cycle's stale
copy, and aligned writes (and all reads) still run in parallel.
"""

from __future__ import annotations

import errno

from ..api.chain import (EMULATE, FLAG_FAST_ZERO, FLAG_FUA, FLAG_MAY_TRIM, MAX_REQUEST_SIZE, Extents, Filter,
                         FilterHandle, Layer, extents_aligned)
from ..api.errors import ConfigError, NBDError
from ..api.params import Param, Size
from ._blocklocks import SharedLock

MAX_MINBLOCK = 64 * 1024
MAX_LENGTH = 0xFFFFFFFF  # the 32-bit length of an NBD request


class BlocksizeFilter(Filter):
    """Align and split requests for plugins with block size limits: minblock=, maxdata=, maxlen=."""

    name = "blocksize"
    minblock = Param(Size(minimum=1, maximum=MAX_MINBLOCK, power_of_two=True),
                     help="Alignment and minimum size of requests to the plugin (a power of 2, at most 64K; "
                          "default: the plugin's minimum block size, or 1)")
    maxdata = Param(Size(minimum=1, maximum=MAX_REQUEST_SIZE),
                    help="Largest read or write sent to the plugin (a multiple of minblock; default: 64M or "
                         "the plugin's maximum)")
    maxlen = Param(Size(minimum=1, maximum=MAX_LENGTH),
                   help="Largest zero, trim, cache or extents request sent to the plugin (a multiple of "
                        "minblock; default 4G-1 rounded down to minblock)")

    def config_complete(self) -> None:
        if self.minblock:
            for key, value in (("maxdata", self.maxdata), ("maxlen", self.maxlen)):
                if value and value % self.minblock:
                    raise ConfigError(f"blocksize: {key}={value} must be a multiple of minblock={self.minblock}")

    class Handle(FilterHandle):
        def __init__(self, filter: "BlocksizeFilter", next: Layer, readonly: bool, export_name: str) -> None:
            super().__init__(filter, next, readonly, export_name)
            below = next.block_size()
            minimum, preferred, maximum = below if below else (1, 0, MAX_REQUEST_SIZE)
            self.minblock = filter.minblock or max(1, minimum)
            if self.minblock & (self.minblock - 1):
                raise NBDError(errno.EINVAL, f"blocksize: the plugin's minimum block size {self.minblock} "
                                             f"is not a power of 2; set minblock=")
            self.maxdata = filter.maxdata or min(MAX_REQUEST_SIZE, maximum)
            self.maxdata -= self.maxdata % self.minblock
            self.maxlen = filter.maxlen or MAX_LENGTH
            self.maxlen -= self.maxlen % self.minblock
            if not self.maxdata or not self.maxlen:
                raise NBDError(errno.EINVAL, f"blocksize: maxdata and maxlen must be at least minblock "
                                             f"({self.minblock})")
            self.preferred = max(self.minblock, preferred or 4096)
            self.size = next.get_size() - next.get_size() % self.minblock
            self.lock = SharedLock()  # exclusive: a read-modify-write cycle; shared: aligned writes

        def get_size(self) -> int:
            return self.size

        def block_size(self) -> tuple[int, int, int]:
            return 1, self.preferred, MAX_LENGTH  # any request is fine: we fix it up

        # -- helpers -------------------------------------------------------------------------
        def _split(self, offset: int, end: int) -> tuple[int, int]:
            """The aligned middle [lo, hi) of [offset, end), which spans more than one block."""
            m = self.minblock
            return offset + (-offset % m), end - end % m

        def _inside_one_block(self, offset: int, end: int) -> bool:
            """True if [offset, end) is part of one block, but not all of it."""
            m = self.minblock
            return offset // m == (end - 1) // m and bool(offset % m or end % m)

        def _flush_instead_of_fua(self, flags: int) -> tuple[int, bool]:
            """(flags for the pieces, whether to flush after them): FUA emulated below is a flush
            per request, so the pieces go without it and one flush follows."""
            if flags & FLAG_FUA and self.next.can_fua() == EMULATE:
                return flags & ~FLAG_FUA, True
            return flags, False

        def _read_block(self, start: int) -> bytearray:
            block = bytearray(self.minblock)
            self.next.pread(memoryview(block), start, 0)
            return block

        def _rmw(self, offset: int, piece: memoryview | None, count: int, flags: int) -> None:
            """Write `piece` (None: zeroes) at [offset, offset+count) inside one block."""
            start = offset - offset % self.minblock
            with self.lock.exclusive():
                block = self._read_block(start)
                block[offset - start:offset - start + count] = piece if piece is not None else bytes(count)
                self.next.pwrite(memoryview(block), start, flags & ~(FLAG_MAY_TRIM | FLAG_FAST_ZERO))

        # -- data ----------------------------------------------------------------------------
        def pread(self, buf: memoryview, offset: int, flags: int) -> None:
            m, end = self.minblock, offset + len(buf)
            if self._inside_one_block(offset, end):
                start = offset - offset % m
                buf[:] = self._read_block(start)[offset - start:end - start]
                return
            lo, hi = self._split(offset, end)
            if offset < lo:  # unaligned head
                buf[:lo - offset] = self._read_block(lo - m)[m - (lo - offset):]
            position = lo
            while position < hi:
                n = min(self.maxdata, hi - position)
                self.next.pread(buf[position - offset:position - offset + n], position, flags)
                position += n
            if hi < end:  # unaligned tail
                buf[hi - offset:] = self._read_block(hi)[:end - hi]

        def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
            self._write(offset, len(buf), buf, flags)

        def zero(self, count: int, offset: int, flags: int) -> None:
            self._write(offset, count, None, flags)

        def _write(self, offset: int, count: int, data: memoryview | None, flags: int) -> None:
            end = offset + count
            lo, hi = self._split(offset, end)
            one_block = self._inside_one_block(offset, end)
            if data is None and flags & FLAG_FAST_ZERO and (one_block or offset < lo or hi < end):
                raise NBDError(errno.ENOTSUP, "blocksize: an unaligned fast zero would need read-modify-write")
            flags, flush = self._flush_instead_of_fua(flags)
            self._write_pieces(offset, end, lo, hi, one_block, data, flags)
            if flush:
                self.next.flush(0)

        def _write_pieces(self, offset: int, end: int, lo: int, hi: int, one_block: bool,
                          data: memoryview | None, flags: int) -> None:
            """The read-modify-write head and tail and the split middle of one write or zero."""
            if one_block:
                self._rmw(offset, data, end - offset, flags)
                return
            if offset < lo:
                self._rmw(offset, data[:lo - offset] if data is not None else None, lo - offset, flags)
            position = lo
            limit = self.maxdata if data is not None else self.maxlen
            with self.lock.shared():
                while position < hi:
                    n = min(limit, hi - position)
                    if data is None:
                        self.next.zero(n, position, flags)
                    else:
                        self.next.pwrite(data[position - offset:position - offset + n], position, flags)
                    position += n
            if hi < end:
                self._rmw(hi, data[hi - offset:] if data is not None else None, end - hi, flags)

        def trim(self, count: int, offset: int, flags: int) -> None:
            lo, hi = self._split(offset, offset + count)
            flags, flush = self._flush_instead_of_fua(flags)
            with self.lock.shared():
                while lo < hi:
                    n = min(self.maxlen, hi - lo)
                    self.next.trim(n, lo, flags)
                    lo += n
            if flush:
                self.next.flush(0)

        def cache(self, count: int, offset: int, flags: int) -> None:
            m = self.minblock
            position = offset - offset % m
            end = min(offset + count + (-(offset + count) % m), self.size)
            while position < end:
                n = min(self.maxlen, end - position)
                self.next.cache(n, position, flags)
                position += n

        def extents(self, count: int, offset: int, flags: int, extents: Extents) -> None:
            m = self.minblock
            start = offset - offset % m
            end = min(offset + count + (-(offset + count) % m), self.size, start + self.maxlen)
            # Whole blocks, as nbdkit's filter: a block of mixed extents is data unless all of it is
            # a hole or zeroes (a client must never be told part of a block it cannot write alone).
            extents_aligned(self.next, end - start, start, flags, m, extents)


FILTER = BlocksizeFilter

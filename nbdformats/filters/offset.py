"""offset filter: serve the byte range [offset, offset+range) of the layer below
(nbdkit-offset-filter compatible).

`RangeHandle` shifts every request by a start offset; the partition filter reuses it.
"""

from __future__ import annotations

import errno

from ..api.chain import Extents, Filter, FilterHandle, Holes, Layer
from ..api.errors import ConfigError, NBDError
from ..api.params import Param, Size


def shifted_extents(next: Layer, count: int, offset: int, flags: int, extents: Extents, shift: int) -> None:
    """Ask `next` for the extents of [offset+shift, ...) and report them `shift` bytes lower."""
    inner = Extents(offset + shift, extents.end + shift)
    next.extents(count, offset + shift, flags, inner)
    for start, length, kind in inner:
        extents.add(start - shift, length, kind)


class RangeHandle(FilterHandle):
    """A window [start, start+length) of the layer below, served from offset 0."""

    start = 0
    length = 0

    def get_size(self) -> int:
        return self.length

    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        self.next.pread(buf, offset + self.start, flags)

    def pread_sparse(self, buf: memoryview, offset: int, flags: int) -> Holes:
        return self.next.pread_sparse(buf, offset + self.start, flags)  # holes are relative to buf

    def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        self.next.pwrite(buf, offset + self.start, flags)

    def trim(self, count: int, offset: int, flags: int) -> None:
        self.next.trim(count, offset + self.start, flags)

    def zero(self, count: int, offset: int, flags: int) -> None:
        self.next.zero(count, offset + self.start, flags)

    def cache(self, count: int, offset: int, flags: int) -> None:
        self.next.cache(count, offset + self.start, flags)

    def extents(self, count: int, offset: int, flags: int, extents: Extents) -> None:
        shifted_extents(self.next, count, offset, flags, extents, self.start)


def window(size: int, offset: int, length: int | None) -> tuple[int, int]:
    """(start, length) of the served range over a disk of `size` bytes; ValueError if it does not fit."""
    if offset > size:
        raise ValueError(f"offset {offset} is beyond the end of the underlying disk ({size} bytes)")
    if length is None:
        return offset, size - offset
    if offset + length > size:
        raise ValueError(f"offset+range ({offset}+{length}) is beyond the end of the underlying disk "
                         f"({size} bytes); use the truncate filter to extend it")
    return offset, length


class OffsetFilter(Filter):
    """Serve a byte range of the plugin: offset= and range=."""

    name = "offset"
    offset = Param(Size(), default=0, help="Start of the range served (default 0)")
    range = Param(Size(), help="Length of the range served (default: to the end of the plugin)")

    def get_ready(self) -> None:
        # Report a range beyond the disk at start-up when the plugin can be opened now;
        # otherwise (several exports, say) each connection checks its own disk.
        with self.below_if_available() as below:
            if below is not None:
                try:
                    window(below.get_size(), self.offset, self.range)
                except ValueError as e:
                    raise ConfigError(f"offset: {e}") from None

    class Handle(RangeHandle):
        def __init__(self, filter: "OffsetFilter", next: Layer, readonly: bool, export_name: str) -> None:
            super().__init__(filter, next, readonly, export_name)
            try:
                self.start, self.length = window(next.get_size(), filter.offset, filter.range)
            except ValueError as e:
                raise NBDError(errno.EINVAL, f"offset: {e}") from None


FILTER = OffsetFilter

"""null plugin: writes are discarded, everything reads as zeroes (nbdkit-null-plugin compatible)."""

from __future__ import annotations

from ..api.chain import EXTENT_HOLE, EXTENT_ZERO, NATIVE, Extents, Holes
from ..api.params import Param, Size
from ..api.zeroes import fill_zero
from ._synthetic import SyntheticPlugin


class NullPlugin(SyntheticPlugin):
    """A bit bucket: writes are discarded and every byte reads as zero."""

    name = "null"
    size = Param(Size(), default=0, magic=True, help="Size of the disk (default 0)")

    class Handle(SyntheticPlugin.Handle):
        def can_fua(self) -> int:
            return NATIVE  # nothing is ever stored, so every write is as durable as it gets

        def can_fast_zero(self) -> bool:
            return True

        def pread(self, buf: memoryview, offset: int, flags: int) -> None:
            fill_zero(buf)

        def pread_sparse(self, buf: memoryview, offset: int, flags: int) -> Holes:
            return [(0, len(buf))]  # all zeroes: nothing to fill

        def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
            pass

        def zero(self, count: int, offset: int, flags: int) -> None:
            pass

        def trim(self, count: int, offset: int, flags: int) -> None:
            pass

        def flush(self, flags: int) -> None:
            pass

        def extents(self, count: int, offset: int, flags: int, extents: Extents) -> None:
            extents.add(0, self.plugin.size, EXTENT_HOLE | EXTENT_ZERO)


PLUGIN = NullPlugin

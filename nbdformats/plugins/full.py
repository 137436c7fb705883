"""full plugin: a disk that is always full (nbdkit-full-plugin compatible).

Reads return zeroes; writes, trims and zeroes fail with ENOSPC, like a thin-provisioned disk
whose host has run out of space.
"""

from __future__ import annotations

import errno

from ..api.chain import EXTENT_HOLE, EXTENT_ZERO, Extents, Holes
from ..api.errors import NBDError
from ..api.zeroes import fill_zero
from ._synthetic import SyntheticPlugin


class FullPlugin(SyntheticPlugin):
    """Reads return zeroes; every write, trim and zero fails with ENOSPC."""

    name = "full"

    class Handle(SyntheticPlugin.Handle):
        def pread(self, buf: memoryview, offset: int, flags: int) -> None:
            fill_zero(buf)

        def pread_sparse(self, buf: memoryview, offset: int, flags: int) -> Holes:
            return [(0, len(buf))]  # all zeroes: nothing to fill

        def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
            raise NBDError(errno.ENOSPC, "full: no space left on device")

        def trim(self, count: int, offset: int, flags: int) -> None:
            raise NBDError(errno.ENOSPC, "full: no space left on device")

        # No zero(): the layer emulates it with pwrite, which fails with ENOSPC as nbdkit's does.

        def extents(self, count: int, offset: int, flags: int, extents: Extents) -> None:
            extents.add(0, self.plugin.size, EXTENT_HOLE | EXTENT_ZERO)


PLUGIN = FullPlugin

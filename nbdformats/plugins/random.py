"""random plugin: a disk of pseudo-random bytes (nbdkit-random-plugin compatible, same bytes for the same seed).

Each byte is computed from seed + offset alone (nbdkit's three rounds of xoshiro256**), so any
byte can be read without generating the ones before it.  Writes succeed only when they write
what is already there, which tests copying tools: `nbdcopy "$uri" "$uri"`.
"""

from __future__ import annotations

import errno
import time

import numpy as np

from ..api.errors import NBDError
from ..api.params import Int, Param
from . import _xoshiro
from ._synthetic import SyntheticPlugin

PIECE = 1 << 20  # bytes computed at a time: the generator state is 32 bytes per byte of output


def random_bytes(seed: int, offset: int, count: int) -> bytes:
    """The disk's bytes [offset, offset + count)."""
    pieces = []
    for start in range(offset, offset + count, PIECE):
        n = min(PIECE, offset + count - start)
        state = _xoshiro.seed_states(np.arange(n, dtype=np.uint64) + np.uint64(seed + start))
        _xoshiro.next_output(state)
        _xoshiro.next_output(state)
        pieces.append((_xoshiro.next_output(state) & np.uint64(255)).astype(np.uint8).tobytes())
    return b"".join(pieces)


class RandomPlugin(SyntheticPlugin):
    """Pseudo-random bytes (not sparse); writes must match what is there (tests copying tools)."""

    name = "random"
    seed = Param(Int(minimum=0, maximum=(1 << 32) - 1),
                 help="Random seed (0 to 2^32-1) for repeatable data; default: the time the server started")

    def config_complete(self) -> None:
        if self.seed is None:
            self.seed = int(time.time()) & 0xFFFFFFFF  # as nbdkit: the time of day, truncated to 32 bits

    class Handle(SyntheticPlugin.Handle):
        plugin: "RandomPlugin"

        def pread(self, buf: memoryview, offset: int, flags: int) -> None:
            buf[:] = random_bytes(self.plugin.seed, offset, len(buf))

        def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
            if buf != random_bytes(self.plugin.seed, offset, len(buf)):
                raise NBDError(errno.EIO, "random: data written does not match expected")

        def trim(self, count: int, offset: int, flags: int) -> None:
            raise NBDError(errno.EIO, "random: attempt to trim or zero non-sparse random disk")

        def zero(self, count: int, offset: int, flags: int) -> None:
            raise NBDError(errno.EIO, "random: attempt to trim or zero non-sparse random disk")


PLUGIN = RandomPlugin

"""sparse-random plugin: runs of random data between runs of holes, shaped like a virtual machine's
disk (nbdkit-sparse-random-plugin compatible: the same layout and bytes for the same seed).

The disk is 4 KiB blocks.  At start-up a two-state Markov chain (hole, data) walks the blocks
with nbdkit's random stream and leaves one bit per block, as nbdkit's bitmap (32 MiB per TiB).
A data block is one random non-zero byte repeated, or (random-content=true) random bytes,
computed from seed + the block's offset when read.  Writes must write what is there, and trims
and zeroes must hit only holes, which tests copying tools: `nbdcopy "$uri" "$uri"`.
"""

from __future__ import annotations

import errno
import logging
import time

import numpy as np

from ..api.chain import EXTENT_DATA, EXTENT_HOLE, EXTENT_ZERO, Extents, Holes, pread_sparse_by_extents
from ..api.errors import ConfigError, NBDError
from ..api.params import Bool, Float, Int, Param, Size
from ..api.progress import progress
from . import _xoshiro
from ._synthetic import SyntheticPlugin

log = logging.getLogger(__name__)

BLOCK = 4096
MAX_BLOCKS = 1 << 32  # 16 TiB: a 512 MiB bitmap and a few minutes of start-up
EXTENTS_LIMIT = 1 << 32  # bytes described per extents request: a bounded piece of the bitmap
U64_RANGE = float(2**64 - 1)  # nbdkit compares with (double) UINT64_MAX, which is 2^64


def data_bitmap(blocks: int, seed: int, percent: float, runlength: int) -> np.ndarray:
    """One bit per block (1: data), packed little-endian, laid out as nbdkit's get_ready does.

    The next state depends on the current one only through one of three functions of the
    random value: keep the state, toggle it, or set it (to hole or to data).  So the states of
    a whole array of blocks come at once: the last "set" before each block, then the parity
    of the toggles since.
    """
    if percent in (0, 100):
        return np.full((blocks + 7) // 8, 0xFF if percent == 100 else 0, dtype=np.uint8)
    to_hole = 1.0 / (runlength / BLOCK)
    to_data = (percent / 100.0) * to_hole / (1.0 - percent / 100.0)
    packed = []
    state = 0  # the first block is a hole
    with progress(blocks, "sparse-random: laying out data and holes") as bar:
        for values in _xoshiro.stream(seed, blocks):  # pieces of a multiple of 8 values, but the last
            as_float = values.astype(np.float64)
            leaves_hole = as_float <= to_data * U64_RANGE
            leaves_data = as_float <= to_hole * U64_RANGE
            sets = leaves_hole != leaves_data  # then the next state is leaves_hole, whatever this one is
            toggles = np.cumsum(leaves_hole & leaves_data, dtype=np.int64)
            last_set = np.maximum.accumulate(np.where(sets, np.arange(len(values)), -1))
            after_set = leaves_hole[last_set] ^ ((toggles - toggles[last_set]) & 1).astype(bool)
            from_state = bool(state) ^ (toggles & 1).astype(bool)
            following = np.where(last_set >= 0, after_set, from_state)  # the state of the next block
            packed.append(np.packbits(np.concatenate(([bool(state)], following[:-1])), bitorder="little"))
            state = int(following[-1])
            bar.update(len(values))
    return np.concatenate(packed) if packed else np.zeros(0, dtype=np.uint8)


def fill_bytes(seed: int, block_offsets: np.ndarray) -> np.ndarray:
    """The repeated byte of each data block (random-content=false): never zero."""
    state = _xoshiro.seed_states(block_offsets + np.uint64(seed))
    values = (_xoshiro.next_output(state) & np.uint64(255)).astype(np.uint8)
    values[values == 0] = 1
    return values


def random_blocks(seed: int, block_offsets: np.ndarray) -> np.ndarray:
    """Whole blocks of random bytes (random-content=true), one row per block."""
    state = _xoshiro.seed_states(block_offsets + np.uint64(seed))
    rows = np.empty((BLOCK, len(block_offsets)), dtype=np.uint8)
    for i in range(BLOCK):
        rows[i] = _xoshiro.next_output(state) & np.uint64(255)
    return rows.T


def _percentage(value: float) -> None:
    if not value <= 100:  # also refuses nan
        raise ValueError("must be between 0 and 100")


class SparseRandomPlugin(SyntheticPlugin):
    """Runs of random data between holes, like a VM disk (for testing copying tools)."""

    name = "sparse-random"
    seed = Param(Int(minimum=0, maximum=(1 << 32) - 1),
                 help="Random seed (0 to 2^32-1) for repeatable data; default: the time the server started")
    percent = Param(Float(minimum=0), default=10.0, check=_percentage,
                    help="Approximate percentage of the disk that is data (0-100)")
    runlength = Param(Size(minimum=1), default=16 * 1024 * 1024, help="Average length of a run of data in bytes")
    random_content = Param(Bool(), default=False,
                           help="true: random bytes in each data block; false: one random byte repeated (faster)")

    def config_complete(self) -> None:
        if self.seed is None:
            self.seed = int(time.time()) & 0xFFFFFFFF  # as nbdkit: the time of day, truncated to 32 bits
        self.blocks = (self.size + BLOCK - 1) // BLOCK
        if self.blocks > MAX_BLOCKS:
            raise ConfigError(f"sparse-random: size={self.size} is too large: at most {MAX_BLOCKS * BLOCK} bytes "
                              f"({MAX_BLOCKS} blocks of {BLOCK})")

    def get_ready(self) -> None:
        self.bitmap = data_bitmap(self.blocks, self.seed, self.percent, self.runlength)
        data_blocks = int(np.unpackbits(self.bitmap, count=self.blocks, bitorder="little").sum()) if self.blocks else 0
        log.debug("percent actual = %g%%", 100.0 * data_blocks / self.blocks if self.blocks else 0.0)

    def data_bits(self, first: int, count: int) -> np.ndarray:
        """Whether each of the blocks [first, first + count) is data."""
        byte = first // 8
        last_byte = (first + count + 7) // 8
        bits = np.unpackbits(self.bitmap[byte:last_byte], bitorder="little")
        start = first - byte * 8
        return bits[start:start + count].astype(bool)

    def read_blocks(self, first: int, count: int) -> np.ndarray:
        """The bytes of blocks [first, first + count)."""
        is_data = self.data_bits(first, count)
        out = np.zeros((count, BLOCK), dtype=np.uint8)
        offsets = (np.flatnonzero(is_data).astype(np.uint64) + np.uint64(first)) * np.uint64(BLOCK)
        if len(offsets):
            if self.random_content:
                out[is_data] = random_blocks(self.seed, offsets)
            else:
                out[is_data] = fill_bytes(self.seed, offsets)[:, None]
        return out.reshape(-1)

    class Handle(SyntheticPlugin.Handle):
        plugin: "SparseRandomPlugin"

        def _blocks(self, count: int, offset: int) -> tuple[int, int]:
            first = offset // BLOCK
            return first, (offset + count + BLOCK - 1) // BLOCK - first

        def _expected(self, offset: int, count: int) -> memoryview:
            first, blocks = self._blocks(count, offset)
            start = offset - first * BLOCK
            return memoryview(self.plugin.read_blocks(first, blocks).data)[start:start + count]

        def pread(self, buf: memoryview, offset: int, flags: int) -> None:
            buf[:] = self._expected(offset, len(buf))

        def pread_sparse(self, buf: memoryview, offset: int, flags: int) -> Holes:
            return pread_sparse_by_extents(self, buf, offset, flags)  # holes from the bitmap

        def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
            if buf != self._expected(offset, len(buf)):
                raise NBDError(errno.EIO, "sparse-random: data written does not match expected")

        def flush(self, flags: int) -> None:
            pass  # writes store nothing

        def _only_holes(self, count: int, offset: int) -> None:
            if self.plugin.data_bits(*self._blocks(count, offset)).any():
                raise NBDError(errno.EIO, "sparse-random: trying to trim or zero non-hole in disk")

        def trim(self, count: int, offset: int, flags: int) -> None:
            self._only_holes(count, offset)

        def zero(self, count: int, offset: int, flags: int) -> None:
            self._only_holes(count, offset)

        def extents(self, count: int, offset: int, flags: int, extents: Extents) -> None:
            count = min(count, EXTENTS_LIMIT)  # the client asks again from where the answer stops
            first, blocks = self._blocks(count, offset)
            is_data = self.plugin.data_bits(first, blocks)
            changes = np.flatnonzero(is_data[1:] != is_data[:-1]) + 1  # blocks where a run begins
            position = offset
            for run_start, run_end in zip([0, *changes.tolist()], [*changes.tolist(), blocks]):
                end = min(offset + count, (first + run_end) * BLOCK)
                extents.add(position, end - position, EXTENT_DATA if is_data[run_start] else EXTENT_HOLE | EXTENT_ZERO)
                position = end


PLUGIN = SparseRandomPlugin

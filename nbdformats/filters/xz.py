"""xz filter: serve the uncompressed contents of an .xz file, read-only, block by block.

As nbdkit's xz filter: the blocks are found through the stream indexes at the end of the
file, a read decodes only the blocks it touches, and the last xz-max-depth decoded blocks
are cached.  Files made with `xz --block-size=16MiB` (or `xz -T0`, which splits its input
into blocks) give random access; a plain `xz` file is one block.  Unlike nbdkit, a block
larger than xz-max-block is not refused: it is decoded on demand into a spill file, so its
start answers at once and nothing is decoded twice.  Several concatenated streams and stream
padding are read; every block's integrity check (CRC32/CRC64/SHA-256) is verified.
"""

from __future__ import annotations

import errno
import logging
import lzma

from ..api.chain import Layer
from ..api.errors import NBDError
from ..api.params import Int, Param, Size
from ..formats.xz import XzBlock, locate_blocks, single_block_stream
from ._decompress import BlockSource, DecompressFilter, Reader, Unit, read_exact

log = logging.getLogger(__name__)

STREAM_CHUNK = 4 << 20  # spill decoding: output per step, compressed bytes read per step


class XzBlockStream:
    """A ChunkDecoder for one (large) block: decodes it a few MiB at a time."""

    def __init__(self, block: XzBlock) -> None:
        head, tail = single_block_stream(block)
        self.decoder = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
        self.block = block
        self.pending = [head]
        self.position = block.offset  # next compressed byte of the block to feed
        self.tail: bytes | None = tail

    def _next_input(self, reader: Reader) -> bytes:
        if self.pending:
            return self.pending.pop()
        end = self.block.offset + self.block.padded
        if self.position < end:
            n = min(STREAM_CHUNK, end - self.position)
            data = read_exact(reader, self.position, n, f"xz block {self.block.number}")
            self.position += n
            return data
        if self.tail is not None:
            tail, self.tail = self.tail, None
            return tail
        return b""

    def read(self, reader: Reader) -> bytes:
        while not self.decoder.eof:
            data = self._next_input(reader) if self.decoder.needs_input else b""
            if self.decoder.needs_input and not data:
                raise NBDError(errno.EIO, f"xz block {self.block.number} is truncated")
            try:
                out = self.decoder.decompress(data, STREAM_CHUNK)
            except lzma.LZMAError as e:
                raise NBDError(errno.EIO, f"xz block {self.block.number} is corrupt: {e}") from None
            if out:
                return out
        return b""


def decode_block(block: XzBlock, reader: Reader) -> bytes:
    head, tail = single_block_stream(block)
    data = read_exact(reader, block.offset, block.padded, f"xz block {block.number}")
    decoder = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    try:
        # One byte more than the index says, so a lying block cannot make us allocate more.
        out = decoder.decompress(head + data + tail, block.uncompressed + 1)
    except lzma.LZMAError as e:
        raise NBDError(errno.EIO, f"xz block {block.number} (compressed offset {block.offset}) "
                                  f"is corrupt: {e}") from None
    if not decoder.eof or len(out) != block.uncompressed:
        raise NBDError(errno.EIO, f"xz block {block.number} does not decode to the "
                                  f"{block.uncompressed} bytes the index says")
    return out


class XzFilter(DecompressFilter):
    """Serve an xz-compressed disk image read-only, with random access by xz block."""

    name = "xz"
    xz_max_block = Param(Size(minimum=1), key="xz-max-block", default=512 << 20,
                         help="Blocks up to this size are decoded whole and cached; larger ones are "
                              "decoded on demand into a spill file (nbdkit refuses them)")
    xz_max_depth = Param(Int(minimum=1), key="xz-max-depth", default=8,
                         help="How many decoded blocks to keep in the cache")

    def load(self, below: Layer, reader: Reader) -> BlockSource:
        blocks = locate_blocks(reader, below.get_size())
        units = [Unit(b.out, b.uncompressed, b.offset, b.padded, b.number) for b in blocks]
        total = sum(b.uncompressed for b in blocks)
        largest = max((b.uncompressed for b in blocks), default=0)
        log.info("xz: %d blocks, %d bytes, largest block %d bytes", len(blocks), total, largest)
        if len(blocks) == 1 and largest > 64 << 20:
            log.info("xz: a single block: a read needs everything before it decoded (make random "
                     "access files with xz --block-size=16MiB)")
        by_number = {b.number: b for b in blocks}
        return BlockSource(self.name, units,
                           lambda unit, read: decode_block(by_number[unit.number], read),
                           lambda unit: XzBlockStream(by_number[unit.number]),
                           self.xz_max_block, self.xz_max_depth, "block")


FILTER = XzFilter

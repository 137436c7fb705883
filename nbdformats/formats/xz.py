"""The .xz container (xz-file-format-1.1.0.txt): locating blocks through the stream indexes.

An .xz file is one or more streams, each `header (12) | blocks | index | footer (12)`,
optionally followed by stream padding (a multiple of four zero bytes).  The footer's
Backward Size gives the index, the index lists every block's Unpadded Size and Uncompressed
Size, and "Block Padding ... makes the size of the Block a multiple of four bytes" (3.3), so
block offsets follow from the index alone, walking back from the end of the file.

To decode one block with Python's lzma module we wrap it in a stream of its own: the real
stream header, the block, and a one-record index and footer (`single_block_stream`).  lzma
then checks the block's integrity check (CRC32, CRC64 or SHA-256) and its sizes.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from .errors import FormatError, check_size
from .readers import Reader

HEADER_MAGIC = b"\xfd7zXZ\x00"
FOOTER_MAGIC = b"YZ"
HEADER_SIZE = FOOTER_SIZE = 12
MAX_INDEX_SIZE = 1 << 34  # Backward Size is 32 bits of 4-byte units
# LZMA2, the filter xz writes, stores at most 2 MiB of output per chunk, and a chunk takes at
# least 6 bytes (control, unpacked and packed sizes, properties, one byte of data): a block
# cannot decode to more than this many times its Unpadded Size.
LZMA2_MAX_RATIO = (2 << 20) // 6 + 1


class XzFormatError(FormatError):
    pass


@dataclass(frozen=True)
class XzBlock:
    number: int  # 0-based, across streams
    offset: int  # compressed offset of the block header
    unpadded: int  # Unpadded Size: header + compressed data + check
    uncompressed: int
    out: int  # uncompressed offset
    flags: bytes  # the stream flags (check type) of its stream

    @property
    def padded(self) -> int:
        return round4(self.unpadded)


def round4(n: int) -> int:
    return (n + 3) & ~3


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """A multibyte integer (1.2): 7 bits per byte, least significant first, at most 9 bytes."""
    value = 0
    for i in range(9):
        if pos >= len(data):
            raise XzFormatError("truncated integer in the xz index")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            if byte == 0 and i:
                raise XzFormatError("non-minimal integer encoding in the xz index")
            return value, pos
    raise XzFormatError("integer longer than 9 bytes in the xz index")


def write_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def parse_stream_header(header: bytes) -> bytes:
    """The 2 stream-flag bytes of a stream header (2.1.1)."""
    if len(header) != HEADER_SIZE or header[:6] != HEADER_MAGIC:
        raise XzFormatError("not an xz file (no FD 37 7A 58 5A 00 stream header)")
    flags = header[6:8]
    if struct.unpack("<I", header[8:12])[0] != zlib.crc32(flags):
        raise XzFormatError("xz stream header CRC32 mismatch")
    if flags[0] or flags[1] & 0xF0:
        raise XzFormatError(f"unsupported xz stream flags {flags.hex()}")
    return flags


def parse_stream_footer(footer: bytes) -> tuple[int, bytes]:
    """(index size, stream flags) from a stream footer (2.1.2)."""
    if len(footer) != FOOTER_SIZE or footer[10:12] != FOOTER_MAGIC:
        raise XzFormatError("no xz stream footer at the end of the file (truncated?)")
    if struct.unpack("<I", footer[0:4])[0] != zlib.crc32(footer[4:10]):
        raise XzFormatError("xz stream footer CRC32 mismatch")
    (backward,) = struct.unpack("<I", footer[4:8])
    return (backward + 1) * 4, footer[8:10]


def parse_index(index: bytes) -> list[tuple[int, int]]:
    """[(Unpadded Size, Uncompressed Size)] of an index (section 4), its CRC32 checked."""
    if not index or index[0] != 0:
        raise XzFormatError("bad xz index indicator")
    if struct.unpack("<I", index[-4:])[0] != zlib.crc32(index[:-4]):
        raise XzFormatError("xz index CRC32 mismatch")
    count, pos = read_varint(index, 1)
    if count > len(index):  # each record takes at least two bytes
        raise XzFormatError("xz index claims more records than it can hold")
    records = []
    for _ in range(count):
        unpadded, pos = read_varint(index, pos)
        uncompressed, pos = read_varint(index, pos)
        if unpadded < 5 or unpadded > (1 << 63) - 4:
            raise XzFormatError(f"impossible block size {unpadded} in the xz index")
        records.append((unpadded, uncompressed))
    if round4(pos) != len(index) - 4 or any(index[pos:len(index) - 4]):
        raise XzFormatError("bad padding in the xz index")
    return records


def locate_blocks(read: Reader, size: int) -> list[XzBlock]:
    """Every block of every stream of an .xz file of `size` bytes, in file order."""
    if size % 4:
        raise XzFormatError(f"an xz file is a multiple of 4 bytes, this one is {size} (truncated?)")
    streams: list[tuple[int, bytes, list[tuple[int, int]]]] = []
    end = size
    while end > 0:
        while end > 0 and read(end - 4, 4) == bytes(4):  # stream padding
            end -= 4
        if end == 0:
            break
        if end < HEADER_SIZE + FOOTER_SIZE + 8:
            raise XzFormatError(f"truncated xz stream before offset {end}")
        index_size, flags = parse_stream_footer(read(end - FOOTER_SIZE, FOOTER_SIZE))
        index_start = end - FOOTER_SIZE - index_size
        if index_size > MAX_INDEX_SIZE or index_start < HEADER_SIZE:
            raise XzFormatError("the xz stream footer points outside the file")
        records = parse_index(read(index_start, index_size))
        stream_start = index_start - sum(round4(u) for u, _ in records) - HEADER_SIZE
        if stream_start < 0:
            raise XzFormatError("the xz index lists more data than the file holds")
        if parse_stream_header(read(stream_start, HEADER_SIZE)) != flags:
            raise XzFormatError("xz stream header and footer flags differ")
        streams.append((stream_start + HEADER_SIZE, flags, records))
        end = stream_start
    blocks: list[XzBlock] = []
    out = 0
    for first_block, flags, records in reversed(streams):
        offset = first_block
        for unpadded, uncompressed in records:
            if uncompressed > unpadded * LZMA2_MAX_RATIO:
                raise XzFormatError(f"xz block {len(blocks)}: the index's Uncompressed Size {uncompressed} is more "
                                    f"than its {unpadded} compressed bytes can hold (LZMA2: 2 MiB per 6-byte chunk)")
            blocks.append(XzBlock(len(blocks), offset, unpadded, uncompressed, out, flags))
            offset += round4(unpadded)
            out += uncompressed
    check_size(out, "the sum of the xz index's Uncompressed Sizes", error=XzFormatError)
    return blocks


def single_block_stream(block: XzBlock) -> tuple[bytes, bytes]:
    """(what goes before, what goes after) the block's padded bytes to make a valid .xz stream."""
    header = HEADER_MAGIC + block.flags + struct.pack("<I", zlib.crc32(block.flags))
    index = bytearray(b"\x00" + write_varint(1) + write_varint(block.unpadded) + write_varint(block.uncompressed))
    index += bytes(round4(len(index)) - len(index))
    index += struct.pack("<I", zlib.crc32(index))
    backward = struct.pack("<I", len(index) // 4 - 1) + block.flags
    footer = struct.pack("<I", zlib.crc32(backward)) + backward + FOOTER_MAGIC
    return header, bytes(index) + footer

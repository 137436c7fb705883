"""Zstandard frames (RFC 8878) and the seekable format (zstd contrib/seekable_format), sans-IO.

A zstd file is a sequence of frames, each decodable on its own: `magic | header | blocks |
[checksum]`.  Frames can be walked without decoding: every block starts with a 3-byte header
giving its type and size (RFC 8878 3.1.1.2).  The header may declare Frame_Content_Size.

The seekable format appends a skippable frame (magic 0x184D2A5E) holding a seek table:
`entries | Number_Of_Frames (4) | Seek_Table_Descriptor (1) | Seekable_Magic_Number (4,
0x8F92EAB1)`, each entry `Compressed_Size (4) | Decompressed_Size (4) | [Checksum (4)]`,
the checksum being "the lowest 32 bits of the XXH64 of the decompressed data".
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .errors import FormatError, check_size
from .readers import Reader

FRAME_MAGIC = 0xFD2FB528
SKIPPABLE_MASK, SKIPPABLE_MAGIC = 0xFFFFFFF0, 0x184D2A50
SEEK_TABLE_MAGIC = 0x184D2A5E
SEEKABLE_MAGIC = 0x8F92EAB1
SEEK_FOOTER = 9
MAX_BLOCK = 128 * 1024  # Block_Maximum_Size: a block never decodes to more than this
# The smallest block that decodes to MAX_BLOCK bytes is an RLE block: a 3-byte header and one byte.
MAX_RATIO = MAX_BLOCK // 4
FRAME_HEADER_MAX = 4 + 14


class ZstdFormatError(FormatError):
    pass


@dataclass(frozen=True)
class FrameHeader:
    header_size: int  # magic included
    content_size: int | None  # Frame_Content_Size, None when not declared
    has_checksum: bool


def parse_frame_header(data: bytes) -> FrameHeader:
    """The header of a zstd frame at the start of `data` (at least FRAME_HEADER_MAX bytes or all)."""
    if len(data) < 5 or struct.unpack_from("<I", data)[0] != FRAME_MAGIC:
        raise ZstdFormatError("not a zstd frame (no 28 B5 2F FD magic)")
    descriptor = data[4]
    fcs_flag, single_segment = descriptor >> 6, bool(descriptor & 0x20)
    if descriptor & 0x08:
        raise ZstdFormatError("zstd frame header has the reserved bit set")
    dict_id_size = (0, 1, 2, 4)[descriptor & 3]
    fcs_size = (1 if single_segment else 0, 2, 4, 8)[fcs_flag]
    pos = 5 + (0 if single_segment else 1) + dict_id_size
    if len(data) < pos + fcs_size:
        raise ZstdFormatError("truncated zstd frame header")
    content_size = None
    if fcs_size:
        content_size = int.from_bytes(data[pos:pos + fcs_size], "little") + (256 if fcs_size == 2 else 0)
    return FrameHeader(pos + fcs_size, content_size, bool(descriptor & 0x04))


@dataclass(frozen=True)
class Frame:
    offset: int  # compressed offset of the magic
    length: int  # compressed length of the whole frame
    content_size: int | None


def walk_frames(read: Reader, size: int) -> list[Frame]:
    """The data frames of a zstd file (skippable frames left out), from their block headers."""
    frames = []
    offset = 0
    while offset < size:
        head = read(offset, min(FRAME_HEADER_MAX, size - offset))
        if len(head) < 8:
            raise ZstdFormatError(f"truncated zstd data at offset {offset}")
        magic = struct.unpack_from("<I", head)[0]
        if magic & SKIPPABLE_MASK == SKIPPABLE_MAGIC:
            offset += 8 + struct.unpack_from("<I", head, 4)[0]
            continue
        if magic != FRAME_MAGIC:
            raise ZstdFormatError(f"no zstd frame at offset {offset} (magic {magic:08x})")
        header = parse_frame_header(head)
        pos = offset + header.header_size
        blocks = 0
        while True:
            blocks += 1
            block = read(pos, 3)
            if len(block) < 3:
                raise ZstdFormatError(f"truncated zstd frame at offset {offset}")
            value = int.from_bytes(block, "little")
            last, kind, block_size = value & 1, (value >> 1) & 3, value >> 3
            if kind == 3:
                raise ZstdFormatError(f"reserved zstd block type at offset {pos}")
            if block_size > MAX_BLOCK:
                raise ZstdFormatError(f"zstd block larger than 128 KiB at offset {pos}")
            pos += 3 + (1 if kind == 1 else block_size)
            if last:
                break
        pos += 4 if header.has_checksum else 0
        if pos > size:
            raise ZstdFormatError(f"truncated zstd frame at offset {offset}")
        if header.content_size is not None and header.content_size > blocks * MAX_BLOCK:
            raise ZstdFormatError(f"the zstd frame at offset {offset} declares a Frame_Content_Size of "
                                  f"{header.content_size} bytes, more than its {blocks} block(s) can hold "
                                  f"(128 KiB each)")
        frames.append(Frame(offset, pos - offset, header.content_size))
        offset = pos
    return frames


@dataclass(frozen=True)
class SeekEntry:
    compressed: int
    decompressed: int
    checksum: int | None


def parse_seek_table_footer(footer: bytes) -> tuple[int, bool] | None:
    """(Number_Of_Frames, checksum flag) if the last 9 bytes of a file end a seek table."""
    if len(footer) != SEEK_FOOTER or struct.unpack_from("<I", footer, 5)[0] != SEEKABLE_MAGIC:
        return None
    count, descriptor = struct.unpack_from("<IB", footer)
    if descriptor & 0x7C:
        raise ZstdFormatError("zstd seek table descriptor has reserved bits set")
    return count, bool(descriptor & 0x80)


def seek_table_size(count: int, checksums: bool) -> int:
    """Size of the whole skippable frame holding a seek table of `count` entries."""
    return 8 + count * (12 if checksums else 8) + SEEK_FOOTER


def parse_seek_table(frame: bytes, count: int, checksums: bool) -> list[SeekEntry]:
    """The entries of the seek table skippable frame `frame` (magic to footer)."""
    magic, frame_size = struct.unpack_from("<II", frame)
    if magic != SEEK_TABLE_MAGIC or frame_size != len(frame) - 8:
        raise ZstdFormatError("bad zstd seek table frame header")
    step = 12 if checksums else 8
    entries: list[SeekEntry] = []
    for pos in range(8, 8 + count * step, step):
        compressed, decompressed = struct.unpack_from("<II", frame, pos)
        if decompressed > compressed * MAX_RATIO:
            raise ZstdFormatError(f"zstd seek table entry {len(entries)}: Decompressed_Size {decompressed} is more "
                                  f"than its {compressed} compressed bytes can hold")
        checksum = struct.unpack_from("<I", frame, pos + 8)[0] if checksums else None
        entries.append(SeekEntry(compressed, decompressed, checksum))
    check_size(sum(entry.decompressed for entry in entries), "the sum of the zstd seek table's Decompressed_Sizes",
               error=ZstdFormatError)
    return entries


def check_frames(read: Reader, entries: list[SeekEntry]) -> list[bool]:
    """Check the seek table against the frames it lists: each must start with a frame header,
    and one that declares Frame_Content_Size must declare the entry's Decompressed_Size (else a
    lying entry would shift every later frame: the data served at the wrong offsets).  Returns,
    per entry, whether its frame declares its size."""
    offset, declared = 0, []
    for number, entry in enumerate(entries):
        header = parse_frame_header(read(offset, min(FRAME_HEADER_MAX, entry.compressed)))
        if header.content_size is not None and header.content_size != entry.decompressed:
            raise ZstdFormatError(f"zstd seek table entry {number} says {entry.decompressed} bytes, its frame "
                                  f"(at offset {offset}) declares {header.content_size}")
        declared.append(header.content_size is not None)
        offset += entry.compressed
    return declared


def seek_table(entries: list[tuple[int, int, int | None]]) -> bytes:
    """A seek table frame for (compressed, decompressed, checksum or None) entries."""
    checksums = bool(entries) and entries[0][2] is not None
    body = b"".join(struct.pack("<II", c, d) + (struct.pack("<I", x) if checksums else b"")
                    for c, d, x in entries)
    body += struct.pack("<IBI", len(entries), 0x80 if checksums else 0, SEEKABLE_MAGIC)
    return struct.pack("<II", SEEK_TABLE_MAGIC, len(body)) + body

"""ext2/3/4 linear directories: the superblock fields they depend on, and their blocks read and written.

A linear directory is a run of blocks, each a chain of entries (inode u32, rec_len u16, name_len
u8, file_type u8, name padded to 4 bytes); an entry's rec_len reaches the next, the last one's
the end of the block.  Inode 0 marks free room.  With metadata_csum each block ends with a
12-byte tail holding the CRC-32C of the rest, seeded by the filesystem, the directory's inode
number and its generation (e2fsprogs lib/ext2fs/csum.c).  linuxdisk writes a large directory
this way and lets e2fsck -D index it (see plugins/linuxdisk).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .crc32c import crc32c_le, crc32c_rows

SUPERBLOCK_OFFSET = 1024
INCOMPAT_FILETYPE = 0x0002
INCOMPAT_INLINE_DATA = 0x8000
INCOMPAT_CSUM_SEED = 0x2000
RO_COMPAT_METADATA_CSUM = 0x0400
TAIL_SIZE = 12
TAIL_FILE_TYPE = 0xDE  # det_reserved_ft: marks the checksum tail
_ENTRY = struct.Struct("<IHBB")


@dataclass(frozen=True)
class Superblock:
    block_size: int
    filetype: bool  # entries carry a file type (else name_len is 16 bits and the type 0)
    metadata_csum: bool
    inline_data: bool
    csum_seed: int  # crc32c_le(~0, uuid), or s_checksum_seed with csum_seed

    @classmethod
    def parse(cls, data: bytes) -> "Superblock":
        """From the 1024 bytes at SUPERBLOCK_OFFSET."""
        if struct.unpack_from("<H", data, 0x38)[0] != 0xEF53:
            raise ValueError("not an ext2/3/4 superblock")
        log_block_size, = struct.unpack_from("<I", data, 0x18)
        incompat, ro_compat = struct.unpack_from("<II", data, 0x60)
        return cls(1024 << log_block_size, bool(incompat & INCOMPAT_FILETYPE),
                   bool(ro_compat & RO_COMPAT_METADATA_CSUM), bool(incompat & INCOMPAT_INLINE_DATA),
                   checksum_seed(data))


def checksum_seed(superblock: bytes) -> int:
    """metadata_csum's seed: s_checksum_seed with the csum_seed feature, else crc32c_le(~0, s_uuid)."""
    incompat, = struct.unpack_from("<I", superblock, 0x60)
    if incompat & INCOMPAT_CSUM_SEED:
        return struct.unpack_from("<I", superblock, 0x270)[0]
    return crc32c_le(0xFFFFFFFF, superblock[0x68:0x78])


def _rec_len(raw: int, block_size: int) -> int:
    if raw == 0xFFFF or raw == 0:
        return block_size  # how 64 KiB is written (lib/ext2fs/dirblock.c)
    return (raw & 0xFFFC) | ((raw & 3) << 16)


def _raw_rec_len(length: int, block_size: int) -> int:
    if length < 65536:
        return length
    if length == block_size:
        return 0xFFFF if block_size == 65536 else 0
    return (length & 0xFFFC) | ((length >> 16) & 3)


def entries(block: bytes, block_size: int) -> Iterator[tuple[int, int, bytes]]:
    """(inode, file type, name) of every entry in use in one directory block."""
    offset = 0
    while offset < block_size:
        inode, raw, name_len, file_type = _ENTRY.unpack_from(block, offset)
        length = _rec_len(raw, block_size)
        if length < 8 or length % 4 or offset + length > block_size or 8 + name_len > length:
            raise ValueError(f"corrupt directory entry at offset {offset}")
        if inode:
            yield inode, file_type, bytes(block[offset + 8:offset + 8 + name_len])
        offset += length


def pack(items: list[tuple[int, int, bytes]], sb: Superblock, inode: int, generation: int,
         min_blocks: int = 1) -> bytes:
    """Linear directory blocks holding `items` (inode, file type, name) in order (the first two
    must be "." and ".."), then empty blocks up to `min_blocks`.  With metadata_csum every block
    gets its checksum tail."""
    size = sb.block_size
    room = size - (TAIL_SIZE if sb.metadata_csum else 0)
    out = bytearray()
    start = 0  # where the current block begins in `out`
    last = -1  # offset in `out` of the current block's last entry
    for number, file_type, name in items:
        length = (8 + len(name) + 3) & ~3
        if last >= 0 and len(out) - start + length > room:
            _close_block(out, start, last, room, size)
            start = len(out)
            last = -1
        last = len(out)
        out += _ENTRY.pack(number, length, len(name), file_type if sb.filetype else 0) + name
        out += bytes(length - 8 - len(name))
    if last >= 0:
        _close_block(out, start, last, room, size)
    while len(out) < min_blocks * size:  # one free entry spanning the block
        start = len(out)
        out += _ENTRY.pack(0, 8, 0, 0)
        _close_block(out, start, start, room, size)
    if sb.metadata_csum:
        blocks = np.frombuffer(bytes(out), dtype=np.uint8).reshape(-1, size)
        seed = crc32c_le(crc32c_le(sb.csum_seed, struct.pack("<I", inode)), struct.pack("<I", generation))
        crcs = crc32c_rows(seed, blocks[:, :room])
        for index, crc in enumerate(crcs.tolist()):
            struct.pack_into("<I", out, index * size + room + 8, crc)
    return bytes(out)


def _close_block(out: bytearray, start: int, last: int, room: int, block_size: int) -> None:
    """The block's last entry reaches the end of its room; the checksum tail (if any) follows."""
    struct.pack_into("<H", out, last + 4, _raw_rec_len(start + room - last, block_size))
    out += bytes(start + room - len(out))
    if room != block_size:  # inode 0, rec_len 12, name_len 0, type 0xDE, the checksum (filled in later)
        out += struct.pack("<IHBBI", 0, TAIL_SIZE, 0, TAIL_FILE_TYPE, 0)

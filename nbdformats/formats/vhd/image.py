"""Reading a VHD: fixed, dynamic and differencing disks (sans-IO, over `read(offset, length)`).

"Hard Disk Footer ... at the end of the file" (and for dynamic disks "a copy of the hard disk
footer at the beginning of the file"); a dynamic or differencing disk's footer points to the
dynamic disk header, which points to the Block Allocation Table: one 32-bit sector offset per
block, 0xFFFFFFFF for a block not allocated.  "Each data block consists of a sector bitmap and
data": in a differencing disk "if a bit is set, it indicates that the data is in the current
file; if not, the data should be read from the parent".  A dynamic disk's allocated block is
read whole, as qemu reads it.
"""

from __future__ import annotations

import uuid
from urllib.parse import unquote, urlparse
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from ..blockmap import Kind, Run, TableCache, bitmap_runs, block_spans, read_exact
from ..errors import FormatError, check_size
from ..parents import ParentLink, split_path
from ..readers import Reader
from .structs import (BAT_ENTRY, DIFFERENCING, DYNAMIC, DYNAMIC_CHECKSUM_AT, DYNAMIC_COOKIE, DYNAMIC_HEADER,
                      FIXED, FOOTER, FOOTER_CHECKSUM_AT, FOOTER_COOKIE, LOCATOR, LOCATORS, PLATFORM_MACX,
                      PLATFORM_W2KU, PLATFORM_W2RU, SECTOR, UNUSED)

MAX_BLOCK_SIZE = 256 << 20  # Hyper-V and qemu write 2 MiB blocks; refuse absurd ones
MAX_LOCATOR = 64 << 10  # a parent path, in bytes
# qemu's vpc.c: "Microsoft Virtual PC and Microsoft Hyper-V produce and read VHD image sizes
# differently.  VPC will rely on CHS geometry, while Hyper-V and disk2vhd use the size specified
# in the footer"; these creators use the size, the others the geometry, unless the geometry is
# the largest there is.
SIZE_CREATORS = (b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0")
MAX_GEOMETRY = 65535 * 16 * 255


class VhdError(FormatError):
    """A corrupt, truncated or unsupported VHD: the message names the field."""


@dataclass(frozen=True)
class Footer:
    data_offset: int
    creator: bytes
    size: int  # the disk's size, after qemu's geometry rule
    disk_type: int
    unique_id: str


def _checksum(block: bytes, at: int) -> int:
    """"The checksum is a one's complement of the sum of all the bytes in the footer without the
    checksum field."""
    return ~(sum(block) - sum(block[at:at + 4])) & 0xFFFFFFFF


def parse_footer(block: bytes) -> Footer:
    (cookie, _features, version, data_offset, _time, creator, _creator_version, _host, _original, current,
     cylinders, heads, sectors, disk_type, checksum, unique_id, _saved) = FOOTER.unpack(block)
    if cookie != FOOTER_COOKIE:
        raise VhdError(f"not a VHD: the footer's cookie is {cookie!r}, not 'conectix'")
    if version >> 16 != 1:
        raise VhdError(f"unsupported VHD file format version {version:#x} (1.0 is the only one)")
    if checksum != _checksum(block, FOOTER_CHECKSUM_AT):
        raise VhdError(f"the footer's checksum is {checksum:#x}, its bytes sum to "
                       f"{_checksum(block, FOOTER_CHECKSUM_AT):#x}: the footer is corrupt")
    if disk_type not in (FIXED, DYNAMIC, DIFFERENCING):
        raise VhdError(f"unsupported disk type {disk_type} (2 fixed, 3 dynamic and 4 differencing are)")
    check_size(current, "the footer's Current Size", error=VhdError)
    geometry = cylinders * heads * sectors
    size = current if creator in SIZE_CREATORS or geometry == MAX_GEOMETRY else geometry * SECTOR
    return Footer(data_offset, creator, size, disk_type, str(uuid.UUID(bytes=unique_id)))


@dataclass(frozen=True)
class DynamicHeader:
    table_offset: int
    max_table_entries: int
    block_size: int
    parent_id: str
    parent_name: str
    locators: list[tuple[bytes, int, int]]  # (platform code, offset, length)


def parse_dynamic_header(block: bytes, file_size: int) -> DynamicHeader:
    (cookie, _data_offset, table_offset, version, entries, block_size, checksum, parent_id, _parent_time,
     parent_name, locators, ) = DYNAMIC_HEADER.unpack(block)
    if cookie != DYNAMIC_COOKIE:
        raise VhdError(f"the dynamic disk header's cookie is {cookie!r}, not 'cxsparse'")
    if version >> 16 != 1:
        raise VhdError(f"unsupported dynamic disk header version {version:#x}")
    if checksum != _checksum(block, DYNAMIC_CHECKSUM_AT):
        raise VhdError(f"the dynamic disk header's checksum is {checksum:#x}, its bytes sum to "
                       f"{_checksum(block, DYNAMIC_CHECKSUM_AT):#x}: the header is corrupt")
    if block_size < SECTOR or block_size & (block_size - 1) or block_size > MAX_BLOCK_SIZE:
        raise VhdError(f"the Block Size is {block_size}, not a power of two from 512 to {MAX_BLOCK_SIZE}")
    check_size(table_offset + entries * BAT_ENTRY, f"the BAT's end (Table Offset {table_offset} + "
               f"{entries} entries)", file_size, VhdError, f"the file's size, {file_size}")
    found = []
    for index in range(LOCATORS):
        code, _space, length, _reserved, offset = LOCATOR.unpack_from(locators, index * LOCATOR.size)
        if code == bytes(4):
            continue
        check_size(length, f"parent locator {index}'s Platform Data Length", MAX_LOCATOR, VhdError)
        check_size(offset + length, f"parent locator {index}'s end (Platform Data Offset {offset} + its "
                   f"length {length})", file_size, VhdError, f"the file's size, {file_size}")
        found.append((code, offset, length))
    return DynamicHeader(table_offset, entries, block_size, str(uuid.UUID(bytes=parent_id)),
                         parent_name.decode("utf-16-be", "replace").rstrip("\0"), found)


def read_footer(read: Reader, file_size: int) -> Footer:
    """A dynamic disk has "a copy of the hard disk footer at the beginning of the file" (512
    bytes) besides the footer in its last 512 bytes.  As qemu, the copy is read first, so a disk
    whose end is damaged or cut still opens; a fixed disk has no copy (its first sector is data)."""
    problems = []
    for offset in (0, file_size - FOOTER.size):
        try:
            footer = parse_footer(read_exact(read, offset, FOOTER.size, "the footer", VhdError))
        except VhdError as e:
            problems.append(str(e))
            continue
        if offset == file_size - FOOTER.size or footer.disk_type != FIXED:
            return footer
    raise VhdError(problems[-1])


class VhdImage:
    """A checked VHD and its BAT, shared by all connections."""

    def __init__(self, read: Reader, file_size: int, cache_bytes: int) -> None:
        if file_size < FOOTER.size:
            raise VhdError(f"the file has {file_size} bytes, too few for a VHD footer ({FOOTER.size})")
        self.footer = read_footer(read, file_size)
        self.size = self.footer.size
        self.identity = self.footer.unique_id
        self.cache = TableCache(cache_bytes)
        self.parent: ParentLink | None = None
        if self.footer.disk_type == FIXED:
            check_size(self.size, "the disk's size", file_size - FOOTER.size, VhdError,
                       f"the {file_size - FOOTER.size} bytes before the footer (the file is truncated)")
            return
        offset = self.footer.data_offset
        check_size(offset + DYNAMIC_HEADER.size, f"the dynamic disk header's end (Data Offset {offset})",
                   file_size, VhdError, f"the file's size, {file_size}")
        self.header = parse_dynamic_header(read_exact(read, offset, DYNAMIC_HEADER.size, "the dynamic disk header",
                                                      VhdError), file_size)
        self.block_size = self.header.block_size
        blocks_needed = -(-self.size // self.block_size)
        if self.header.max_table_entries < blocks_needed:
            raise VhdError(f"the BAT has {self.header.max_table_entries} entries, too few for the "
                           f"{self.size}-byte disk ({blocks_needed} blocks of {self.block_size} bytes)")
        # "The sector bitmap ... is padded to a 512-byte sector boundary."
        self.bitmap_size = -(-(self.block_size // SECTOR) // 8 // SECTOR) * SECTOR
        self.file_size = file_size
        self.bat = np.frombuffer(read_exact(read, self.header.table_offset, blocks_needed * BAT_ENTRY, "the BAT",
                                            VhdError), dtype=">u4")
        if self.footer.disk_type == DIFFERENCING:
            self.parent = self._parent_link(read)

    def _parent_link(self, read: Reader) -> ParentLink:
        relative: list[str] = []
        absolute: list[str] = []
        for code, offset, length in self.header.locators:
            if code not in (PLATFORM_W2RU, PLATFORM_W2KU, PLATFORM_MACX):
                continue  # Wi2r and Wi2k are "deprecated" 8.3 paths; Mac aliases are opaque
            data = read_exact(read, offset, length, "a parent locator", VhdError)
            if code == PLATFORM_MACX:  # a file URL: an absolute path
                name, path = split_path(unquote(urlparse(data.decode("utf-8", "replace")).path), windows=False)
            else:
                name, path = split_path(data.decode("utf-16-le", "replace").rstrip("\0"), windows=True)
            relative += [name] if name else []
            absolute += [path] if path else []
        return ParentLink(tuple(relative), tuple(absolute) or (self.header.parent_name,), (self.header.parent_id,),
                          "parent locators")

    def runs(self, offset: int, length: int, files: Sequence[Reader]) -> Iterator[Run]:
        end = min(offset + length, self.size)
        if self.footer.disk_type == FIXED:
            if offset < end:
                yield Run(offset, end - offset, Kind.DATA, offset)
            return
        differencing = self.footer.disk_type == DIFFERENCING
        for block, within, position, run_end in block_spans(offset, end, self.block_size):
            sector = int(self.bat[block])
            if sector == UNUSED:
                yield Run(position, run_end - position, Kind.PARENT)
            else:
                start = sector * SECTOR
                check_size(start + self.bitmap_size + self.block_size, f"the end of block {block} (BAT entry "
                           f"{sector:#x})", self.file_size, VhdError, f"the file's size, {self.file_size}")
                present = Run(position, run_end - position, Kind.DATA, start + self.bitmap_size + within)
                if differencing:
                    bitmap = self.cache.get((block,), lambda: read_exact(files[0], start, self.bitmap_size,
                                                                          f"the sector bitmap of block {block}", VhdError))
                    assert isinstance(bitmap, bytes)
                    yield from bitmap_runs(bitmap, "big", block * self.block_size // SECTOR, SECTOR, position,
                                           run_end, present)
                else:
                    yield present

    def decompress(self, run: Run, files: Sequence[Reader]) -> bytes:
        raise VhdError("VHD has no compressed blocks")

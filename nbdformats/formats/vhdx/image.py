"""Reading a VHDX: fixed, dynamic and differencing disks (sans-IO, over `read(offset, length)`).

The current header is the valid one (signature and CRC-32C) with the larger SequenceNumber; it
names the log, which must be empty ("If LogGuid is zero, ... there are no log entries to
replay"): an image whose log needs replaying is refused, since replaying means writing.  The
region table locates the BAT and the metadata region; the metadata gives the block size, the
disk size, the logical sector size and, for a differencing disk, the parent locator.  The BAT
interleaves payload entries with one sector bitmap entry per chunk: "the sector bitmap block
entry associated with a chunk follows the entries for the payload blocks in that chunk".
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from ..blockmap import Kind, Run, TableCache, bitmap_runs, block_spans, read_exact
from ..crc32c import crc32c
from ..errors import FormatError, check_size
from ..parents import ParentLink, split_path
from ..readers import Reader
from .structs import (BAT_ENTRY, BAT_REGION, CHECKSUM_AT, FILE_PARAMETERS, FILE_PARAMETERS_ITEM, FILE_SIGNATURE,
                      HAS_PARENT, HEADER, HEADER_OFFSETS, HEADER_SIGNATURE, HEADER_SIZE, IS_REQUIRED, KNOWN_ITEMS,
                      LOGICAL_SECTOR_SIZE, MAX_ENTRIES, METADATA_ENTRY, METADATA_REGION, METADATA_SIGNATURE,
                      METADATA_TABLE_HEADER, METADATA_TABLE_SIZE, MiB, OFFSET_SHIFT, PARENT_LOCATOR,
                      PARENT_LOCATOR_ENTRY, PARENT_LOCATOR_HEADER, PAYLOAD_FULLY_PRESENT, PAYLOAD_NOT_PRESENT,
                      PAYLOAD_PARTIALLY_PRESENT, PAYLOAD_UNDEFINED, PAYLOAD_UNMAPPED, PAYLOAD_UNMAPPED_V095, PAYLOAD_ZERO, REGION_ENTRY, REGION_TABLE_HEADER, REGION_TABLE_OFFSETS, REGION_TABLE_SIGNATURE,
                      REGION_TABLE_SIZE, SB_BLOCK_PRESENT, SECTOR_BITMAP_SIZE, SECTORS_PER_BITMAP, STATE_MASK, UINT32,
                      UINT64, VERSION, VHDX_LOCATOR_TYPE, VIRTUAL_DISK_SIZE)

MAX_DISK_SIZE = 64 << 40  # 2.6.2.2: "MUST be ... less than or equal to 64 terabytes"
MAX_BAT_BYTES = 1 << 30  # a BAT larger than this cannot describe a disk of at most 64 TiB
MAX_METADATA_ITEM = 1 << 20  # 2.6.1.2: "Length ... MUST be less than or equal to 1 MB"
ABSENT = (PAYLOAD_NOT_PRESENT, PAYLOAD_UNDEFINED, PAYLOAD_UNMAPPED, PAYLOAD_UNMAPPED_V095)


class VhdxError(FormatError):
    """A corrupt, truncated or unsupported VHDX: the message names the field."""


@dataclass(frozen=True)
class Header:
    sequence: int
    data_write_guid: str
    log_guid: uuid.UUID
    log_length: int
    log_offset: int


def _checked(block: bytes, what: str) -> bytes:
    """`block` if its CRC-32C, computed "with the Checksum field set to zero", matches."""
    stored = UINT32.unpack_from(block, CHECKSUM_AT)[0]
    actual = crc32c(block[:CHECKSUM_AT] + bytes(4) + block[CHECKSUM_AT + 4:])
    if stored != actual:
        raise VhdxError(f"{what}: its CRC-32C is {stored:#010x}, its bytes give {actual:#010x}")
    return block


def _parse_header(block: bytes, where: int) -> Header:
    signature, _checksum, sequence, _file_guid, data_guid, log_guid, _log_version, version, log_length, log_offset = \
        HEADER.unpack_from(block)
    if signature != HEADER_SIGNATURE:
        raise VhdxError(f"the header at {where} has signature {signature!r}, not 'head'")
    _checked(block, f"the header at {where}")
    if version != VERSION:
        raise VhdxError(f"the header at {where} has version {version}, not 1")
    return Header(sequence, str(uuid.UUID(bytes_le=data_guid)), uuid.UUID(bytes_le=log_guid), log_length, log_offset)


def current_header(read: Reader) -> Header:
    """2.2.2.1: "the header with the largest SequenceNumber that is valid is the current header"."""
    found: list[Header] = []
    problems: list[str] = []
    for offset in HEADER_OFFSETS:
        try:
            found.append(_parse_header(read_exact(read, offset, HEADER_SIZE, "a header", VhdxError), offset))
        except VhdxError as e:
            problems.append(str(e))
    if not found:
        raise VhdxError(f"no valid header: {'; '.join(problems)}")
    return max(found, key=lambda header: header.sequence)


def regions(read: Reader, file_size: int) -> dict[uuid.UUID, tuple[int, int]]:
    """The regions (offset, length) of the first valid region table, by GUID."""
    problems: list[str] = []
    for table_offset in REGION_TABLE_OFFSETS:
        try:
            table = _checked(read_exact(read, table_offset, REGION_TABLE_SIZE, "a region table", VhdxError),
                             f"the region table at {table_offset}")
            signature, _checksum, count, _reserved = REGION_TABLE_HEADER.unpack_from(table)
            if signature != REGION_TABLE_SIGNATURE:
                raise VhdxError(f"the region table at {table_offset} has signature {signature!r}, not 'regi'")
            check_size(count, "the region table's EntryCount", MAX_ENTRIES, VhdxError)
        except VhdxError as e:
            problems.append(str(e))
            continue
        found = {}
        for index in range(count):
            guid, offset, length, required = REGION_ENTRY.unpack_from(table, REGION_TABLE_HEADER.size +
                                                                      index * REGION_ENTRY.size)
            region = uuid.UUID(bytes_le=guid)
            if region not in (BAT_REGION, METADATA_REGION):
                if required & 1:
                    raise VhdxError(f"the image requires region {region}, which this reader does not know")
                continue
            if offset % MiB or length % MiB:
                raise VhdxError(f"region {region}: FileOffset {offset} and Length {length} must be multiples of 1 MiB")
            check_size(offset + length, f"the end of region {region} (FileOffset {offset} + Length {length})",
                       file_size, VhdxError, f"the file's size, {file_size}")
            found[region] = (offset, length)
        for needed, name in ((BAT_REGION, "BAT"), (METADATA_REGION, "metadata")):
            if needed not in found:
                raise VhdxError(f"the region table has no {name} region")
        return found
    raise VhdxError(f"no valid region table: {'; '.join(problems)}")


def metadata_items(read: Reader, offset: int, length: int) -> dict[uuid.UUID, bytes]:
    table = read_exact(read, offset, METADATA_TABLE_SIZE, "the metadata table", VhdxError)
    signature, _reserved, count = METADATA_TABLE_HEADER.unpack_from(table)
    if signature != METADATA_SIGNATURE:
        raise VhdxError(f"the metadata table has signature {signature!r}, not 'metadata'")
    check_size(count, "the metadata table's EntryCount", MAX_ENTRIES, VhdxError)
    items = {}
    for index in range(count):
        guid, item_offset, item_length, flags, _reserved2 = METADATA_ENTRY.unpack_from(
            table, METADATA_TABLE_HEADER.size + index * METADATA_ENTRY.size)
        item = uuid.UUID(bytes_le=guid)
        if item not in KNOWN_ITEMS:
            if flags & IS_REQUIRED:
                raise VhdxError(f"the image requires metadata item {item}, which this reader does not know")
            continue
        check_size(item_length, f"the length of metadata item {item}", MAX_METADATA_ITEM, VhdxError)
        if item_length and item_offset < METADATA_TABLE_SIZE:
            raise VhdxError(f"metadata item {item} at offset {item_offset} overlaps the metadata table")
        check_size(item_offset + item_length, f"the end of metadata item {item}", length, VhdxError,
                   f"the metadata region's length, {length}")
        items[item] = read_exact(read, offset + item_offset, item_length, f"metadata item {item}", VhdxError)
    return items


def _item(items: dict[uuid.UUID, bytes], guid: uuid.UUID, name: str, size: int) -> bytes:
    data = items.get(guid)
    if data is None or len(data) < size:
        raise VhdxError(f"the metadata has no valid {name} item")
    return data


def parse_parent_locator(data: bytes) -> ParentLink:
    """2.6.2.6.3: the keys parent_linkage (and parent_linkage2), relative_path, volume_path and
    absolute_win32_path, "evaluated ... in a specific order ...: relative_path, volume_path and then
    absolute_path"."""
    if len(data) < PARENT_LOCATOR_HEADER.size:
        raise VhdxError("the parent locator is shorter than its header")
    locator_type, _reserved, count = PARENT_LOCATOR_HEADER.unpack_from(data)
    if uuid.UUID(bytes_le=locator_type) != VHDX_LOCATOR_TYPE:
        raise VhdxError(f"the parent locator's type is {uuid.UUID(bytes_le=locator_type)}, not a VHDX parent")
    values: dict[str, str] = {}
    for index in range(count):
        at = PARENT_LOCATOR_HEADER.size + index * PARENT_LOCATOR_ENTRY.size
        if at + PARENT_LOCATOR_ENTRY.size > len(data):
            raise VhdxError(f"the parent locator's {count} entries do not fit in its {len(data)} bytes")
        key_offset, value_offset, key_length, value_length = PARENT_LOCATOR_ENTRY.unpack_from(data, at)
        if key_offset + key_length > len(data) or value_offset + value_length > len(data):
            raise VhdxError(f"parent locator entry {index} points past the end of the locator")
        key = data[key_offset:key_offset + key_length].decode("utf-16-le", "replace")
        values[key] = data[value_offset:value_offset + value_length].decode("utf-16-le", "replace")
    if "parent_linkage" not in values:
        raise VhdxError("the parent locator has no parent_linkage")
    identities = tuple(str(uuid.UUID(values[key])) for key in ("parent_linkage", "parent_linkage2") if key in values)
    relative: list[str] = []
    absolute: list[str] = []
    for key in ("relative_path", "volume_path", "absolute_win32_path"):
        if key in values:
            name, path = split_path(values[key], windows=True)
            relative += [name] if name else []
            absolute += [path] if path else []
    return ParentLink(tuple(relative), tuple(absolute), identities, "parent locator")


class VhdxImage:
    """A checked VHDX and its BAT, shared by all connections."""

    def __init__(self, read: Reader, file_size: int, cache_bytes: int) -> None:
        signature = read_exact(read, 0, len(FILE_SIGNATURE), "the file type identifier", VhdxError)
        if signature != FILE_SIGNATURE:
            raise VhdxError(f"not a VHDX: the file starts with {signature!r}, not 'vhdxfile'")
        header = current_header(read)
        if header.log_guid.int:
            raise VhdxError(f"the log (LogGuid {header.log_guid}) has entries to replay: the image was not closed "
                            "cleanly; open it once read-write with Hyper-V or qemu-img check -r all to replay them")
        self.identity = header.data_write_guid
        found = regions(read, file_size)
        items = metadata_items(read, *found[METADATA_REGION])
        self.block_size, flags = FILE_PARAMETERS_ITEM.unpack(_item(items, FILE_PARAMETERS, "file parameters", 8)[:8])
        self.size = UINT64.unpack(_item(items, VIRTUAL_DISK_SIZE, "virtual disk size", 8)[:8])[0]
        self.sector_size = UINT32.unpack(_item(items, LOGICAL_SECTOR_SIZE, "logical sector size", 4)[:4])[0]
        if self.block_size < MiB or self.block_size > 256 * MiB or self.block_size & (self.block_size - 1):
            raise VhdxError(f"the BlockSize is {self.block_size}, not a power of two from 1 MiB to 256 MiB")
        if self.sector_size not in (512, 4096):
            raise VhdxError(f"the LogicalSectorSize is {self.sector_size}, not 512 or 4096")
        check_size(self.size, "the VirtualDiskSize", MAX_DISK_SIZE, VhdxError, "64 TiB")
        if self.size % self.sector_size:
            raise VhdxError(f"the VirtualDiskSize {self.size} is not a multiple of the sector size {self.sector_size}")
        self.differencing = bool(flags & HAS_PARENT)
        self.parent = parse_parent_locator(_item(items, PARENT_LOCATOR, "parent locator", 0)) \
            if self.differencing else None
        self.chunk_ratio = SECTORS_PER_BITMAP * self.sector_size // self.block_size
        blocks = -(-self.size // self.block_size)
        # 2.5: entries for all payload blocks and the sector bitmap entries between their chunks
        # (a differencing disk also has the last chunk's); the BAT entry of payload block i is
        # i + i // chunk ratio.
        entries = (-(-blocks // self.chunk_ratio) * (self.chunk_ratio + 1) if self.differencing
                   else blocks + (blocks - 1) // self.chunk_ratio if blocks else 0)
        bat_offset, bat_length = found[BAT_REGION]
        check_size(entries * BAT_ENTRY, "the BAT's size for this disk", min(bat_length, MAX_BAT_BYTES), VhdxError,
                   f"the BAT region's length, {bat_length}")
        self.bat = np.frombuffer(read_exact(read, bat_offset, entries * BAT_ENTRY, "the BAT", VhdxError), dtype="<u8")
        self.file_size = file_size
        self.cache = TableCache(cache_bytes)

    def _located(self, entry: int, what: str, length: int) -> int:
        start = (entry >> OFFSET_SHIFT) * MiB
        check_size(start + length, f"the end of {what} (FileOffsetMB {entry >> OFFSET_SHIFT})", self.file_size,
                   VhdxError, f"the file's size, {self.file_size}")
        return start

    def runs(self, offset: int, length: int, files: Sequence[Reader]) -> Iterator[Run]:
        end = min(offset + length, self.size)
        for block, within, position, run_end in block_spans(offset, end, self.block_size):
            entry = int(self.bat[block + block // self.chunk_ratio])
            state = entry & STATE_MASK
            if state == PAYLOAD_FULLY_PRESENT:
                start = self._located(entry, f"payload block {block}", self.block_size)
                yield Run(position, run_end - position, Kind.DATA, start + within)
            elif state == PAYLOAD_PARTIALLY_PRESENT and self.differencing:
                start = self._located(entry, f"payload block {block}", self.block_size)
                bitmap = self._sector_bitmap(block // self.chunk_ratio, files[0])
                # 2.4.2: "Bit 0 (that is, bit 0 of byte 0) is the entry for the first virtual sector".
                yield from bitmap_runs(bitmap, "little", (block - block % self.chunk_ratio) * self.block_size
                                       // self.sector_size, self.sector_size, position, run_end,
                                       Run(position, run_end - position, Kind.DATA, start + within))
            elif state == PAYLOAD_ZERO:
                yield Run(position, run_end - position, Kind.ZERO)
            elif state in ABSENT:
                # A differencing disk reads these from its parent; fixed and dynamic disks have none,
                # and "may return zero data", as qemu does.
                yield Run(position, run_end - position, Kind.PARENT)
            else:
                raise VhdxError(f"payload block {block} has BAT state {state}, invalid in a "
                                f"{'differencing' if self.differencing else 'fixed or dynamic'} disk")

    def _sector_bitmap(self, chunk: int, read: Reader) -> bytes:
        entry = int(self.bat[chunk * (self.chunk_ratio + 1) + self.chunk_ratio])
        if entry & STATE_MASK != SB_BLOCK_PRESENT:
            raise VhdxError(f"chunk {chunk} has partially present blocks but its sector bitmap block is not present")
        start = self._located(entry, f"the sector bitmap block of chunk {chunk}", SECTOR_BITMAP_SIZE)
        bitmap = self.cache.get((chunk,), lambda: read_exact(read, start, SECTOR_BITMAP_SIZE,
                                                             f"the sector bitmap of chunk {chunk}", VhdxError))
        assert isinstance(bitmap, bytes)
        return bitmap

    def decompress(self, run: Run, files: Sequence[Reader]) -> bytes:
        raise VhdxError("VHDX has no compressed blocks")

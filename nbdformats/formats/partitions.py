"""MBR (with logical partitions in an extended partition) and GPT partition tables.

Sans-IO: `find_partition(read, disk_size, number, sector_size)` asks `read(offset, n)` for the
few sectors it needs and returns the partition's (offset, length) in bytes.

Numbering follows Linux, qemu-nbd -P and nbdkit's partition filter: MBR primary partitions
are 1-4 by their slot in the table (empty and extended slots are not servable), logical
partitions count from 5 along the chain of extended boot records (EBRs); GPT partitions are
numbered by their slot in the partition entry array, unused slots (all-zero type GUID) skipped.

References: the UEFI specification 2.10, section 5.2 (legacy MBR) and 5.3 (GPT header
and partition entries); Linux block/partitions/msdos.c for the EBR chain.
"""

from __future__ import annotations

import struct
import zlib
from typing import Callable

MBR_SIGNATURE = b"\x55\xaa"  # bytes 510-511
MBR_TABLE = 446  # four 16-byte entries
MBR_ENTRY = struct.Struct("<B3sB3sII")  # status, CHS first, type, CHS last, first LBA, sectors
EXTENDED_TYPES = (0x05, 0x0F, 0x85)  # CHS extended, LBA extended, Linux extended
GPT_SIGNATURE = b"EFI PART"
# signature, revision, header size, header CRC32, reserved, my LBA, alternate LBA, first usable,
# last usable, disk GUID, partition entry LBA, number of entries, entry size, entries CRC32
GPT_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")
GPT_ENTRY = struct.Struct("<16s16sQQQ72s")  # type GUID, unique GUID, first LBA, last LBA, attributes, name
MAX_GPT_ENTRIES_BYTES = 1 << 20  # a sanity limit: the standard array is 128 * 128 bytes
MAX_LOGICAL = 1024  # EBRs followed before giving up (a loop guard on top of the ordering check)

Reader = Callable[[int, int], bytes]


class PartitionError(ValueError):
    """No partition table, a corrupt one, or no such partition."""


def find_partition(read: Reader, disk_size: int, number: int, sector_size: int = 512) -> tuple[int, int]:
    """(offset, length) in bytes of partition `number` (from 1) of a disk of `disk_size` bytes."""
    if number < 1:
        raise PartitionError("partition numbers count from 1")
    if disk_size < 2 * sector_size:
        raise PartitionError(f"the disk ({disk_size} bytes) is too small to hold a partition table")
    head = read(0, 2 * sector_size)
    if head[sector_size:sector_size + 8] == GPT_SIGNATURE:
        offset, length = _gpt_partition(read, head[sector_size:], disk_size, number, sector_size)
    elif head[510:512] == MBR_SIGNATURE:
        offset, length = _mbr_partition(read, head[:sector_size], disk_size, number, sector_size)
    else:
        raise PartitionError("the disk has no MBR or GPT partition table signature")
    if offset + length > disk_size:
        raise PartitionError(f"partition {number} ({offset}+{length} bytes) runs past the end of the disk "
                             f"({disk_size} bytes)")
    return offset, length


# -- MBR --------------------------------------------------------------------------------------
def mbr_entries(sector: bytes) -> list[tuple[int, int, int]]:
    """The four (type, first LBA, sectors) entries of an MBR or EBR."""
    entries = []
    for index in range(4):
        _, _, kind, _, first, count = MBR_ENTRY.unpack_from(sector, MBR_TABLE + 16 * index)
        entries.append((kind, first, count))
    return entries


def _mbr_partition(read: Reader, mbr: bytes, disk_size: int, number: int, sector_size: int) -> tuple[int, int]:
    entries = mbr_entries(mbr)
    if number <= 4:
        kind, first, count = entries[number - 1]
        if kind == 0 or count == 0:
            raise PartitionError(f"MBR partition {number} is empty")
        if kind in EXTENDED_TYPES:
            raise PartitionError(f"MBR partition {number} is an extended partition (its logical "
                                 f"partitions are numbered from 5)")
        return first * sector_size, count * sector_size

    for kind, first, count in entries:
        if kind in EXTENDED_TYPES and count > 0:
            extended_start, extended_end = first * sector_size, (first + count) * sector_size
            break
    else:
        raise PartitionError(f"MBR logical partition {number} selected, but there is no extended partition")

    # Each EBR holds the logical partition (first LBA relative to this EBR) and a link to the
    # next EBR (first LBA relative to the start of the extended partition).  Links must go
    # strictly forward, so a corrupt chain cannot loop.
    ebr = extended_start
    for logical in range(5, 5 + MAX_LOGICAL):
        if ebr % sector_size or ebr < sector_size or ebr + sector_size > disk_size:
            raise PartitionError(f"invalid EBR chain: an EBR at byte {ebr} is outside the disk")
        sector = read(ebr, sector_size)
        if sector[510:512] != MBR_SIGNATURE:
            raise PartitionError(f"invalid EBR chain: no boot signature in the EBR at byte {ebr}")
        (kind, first, count), (link_kind, link_first, link_count) = mbr_entries(sector)[:2]
        if logical == number:
            if kind == 0 or count == 0:
                raise PartitionError(f"MBR logical partition {number} is empty")
            offset, length = ebr + first * sector_size, count * sector_size
            if offset <= ebr or offset + length > extended_end:
                raise PartitionError(f"MBR logical partition {number} ({offset}+{length} bytes) is not inside "
                                     f"its extended partition ({extended_start}-{extended_end})")
            return offset, length
        if link_first == 0 and link_count == 0:
            break
        following = extended_start + link_first * sector_size
        if following <= ebr:
            raise PartitionError(f"invalid EBR chain: the EBR at byte {ebr} links back to byte {following}")
        ebr = following
    raise PartitionError(f"MBR logical partition {number} not found (the disk has {logical - 4})")


# -- GPT --------------------------------------------------------------------------------------
def _gpt_header(block: bytes) -> tuple:
    fields = GPT_HEADER.unpack_from(block)
    size = fields[2]
    if fields[0] != GPT_SIGNATURE:
        raise PartitionError("no GPT header signature")
    if not GPT_HEADER.size <= size <= len(block):
        raise PartitionError(f"GPT header size {size} is invalid")
    header = bytearray(block[:size])
    header[16:20] = bytes(4)  # the CRC is computed with its own field zeroed
    if zlib.crc32(header) != fields[3]:
        raise PartitionError("GPT header checksum mismatch")
    return fields


def _gpt_entries(read: Reader, header: tuple, disk_size: int, sector_size: int) -> tuple[bytes, int, int]:
    entries_lba, count, entry_size, entries_crc = header[10:14]
    if entry_size < GPT_ENTRY.size or entry_size % 8:
        raise PartitionError(f"GPT partition entry size {entry_size} is invalid")
    total = count * entry_size
    if total > MAX_GPT_ENTRIES_BYTES or entries_lba * sector_size + total > disk_size:
        raise PartitionError(f"GPT partition entry array ({count} entries of {entry_size} bytes at LBA "
                             f"{entries_lba}) does not fit the disk")
    array = read(entries_lba * sector_size, total)
    if zlib.crc32(array) != entries_crc:
        raise PartitionError("GPT partition entry array checksum mismatch")
    return array, count, entry_size


def _gpt_partition(read: Reader, lba1: bytes, disk_size: int, number: int, sector_size: int) -> tuple[int, int]:
    # A damaged primary header or entry array falls back to the backup copy in the last LBA,
    # as Linux and most partitioning tools do.
    problems = []
    for where in ("primary", "backup"):
        try:
            block = lba1 if where == "primary" else read(disk_size - disk_size % sector_size - sector_size,
                                                         sector_size)
            header = _gpt_header(block)
            array, count, entry_size = _gpt_entries(read, header, disk_size, sector_size)
            break
        except PartitionError as e:
            problems.append(f"{where}: {e}")
    else:
        raise PartitionError(f"no valid GPT ({'; '.join(problems)})")
    if number > count:
        raise PartitionError(f"GPT partition {number} is out of range (the table has {count} entries)")
    kind, _, first, last, _, _ = GPT_ENTRY.unpack_from(array, (number - 1) * entry_size)
    if kind == bytes(16):
        raise PartitionError(f"GPT partition {number} not found (its entry is unused)")
    if last < first:
        raise PartitionError(f"GPT partition {number} ends (LBA {last}) before it starts (LBA {first})")
    return first * sector_size, (last - first + 1) * sector_size

"""GUID Partition Tables, read (find a partition, with the backup header when the primary one
is damaged) and written (the sectors of a GPT disk).

Quotes are from the UEFI Specification 2.10, section 5 ("GUID Partition Table (GPT) Disk
Layout").  Partitions are numbered by their slot in the partition entry array, unused
slots (all-zero type GUID) skipped.  When writing, sectors are 512 bytes and the partition
entry array has the minimum size the spec allows, 128 entries of 128 bytes (16 KiB, 32
sectors), so the primary structures fill LBA 0..33 and the backup ones the last 33 sectors; a
disk of more partitions gets the next multiple of 128 entries, as nbdkit's partitioning plugin.
"""

from __future__ import annotations

import struct
import uuid
import zlib
from dataclasses import dataclass

from . import mbr
from .errors import PartitionError
from .readers import Reader

SECTOR = mbr.SECTOR
ENTRY_COUNT = 128
ENTRY_SIZE = 128
TABLE_SECTORS = ENTRY_COUNT * ENTRY_SIZE // SECTOR  # 32
PRIMARY_SECTORS = 2 + TABLE_SECTORS  # protective MBR, header, entries
BACKUP_SECTORS = TABLE_SECTORS + 1  # entries, header
FIRST_USABLE_LBA = PRIMARY_SECTORS  # 34
MAX_ENTRIES_BYTES = 1 << 20  # a sanity limit, read or written (the standard array is 128 * 128 bytes)

# "Linux filesystem data" (util-linux, systemd's Discoverable Partitions Specification).
# nbdkit 1.32 writes the ASCII text "0FC63DAF-8483-47" instead of these 16 bytes.
LINUX_FILESYSTEM = uuid.UUID("0FC63DAF-8483-4772-8E79-3D69D8477DE4")

# Table 5.7 "Defined GPT Partition Entry - Attributes": bit 2 "Legacy BIOS Bootable".
ATTR_LEGACY_BIOS_BOOTABLE = 1 << 2

SIGNATURE = b"EFI PART"
REVISION = 0x00010000
HEADER_SIZE = 92

# Table 5.5 "GPT Header": Signature, Revision, HeaderSize, HeaderCRC32, Reserved, MyLBA,
# AlternateLBA, FirstUsableLBA, LastUsableLBA, DiskGUID, PartitionEntryLBA,
# NumberOfPartitionEntries, SizeOfPartitionEntry, PartitionEntryArrayCRC32.
HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")
# Table 5.6 "GPT Partition Entry": PartitionTypeGUID, UniquePartitionGUID, StartingLBA,
# EndingLBA (inclusive), Attributes, PartitionName (36 UTF-16LE code units).
ENTRY = struct.Struct("<16s16sQQQ72s")
HEADER_CRC = (16, 20)  # HeaderCRC32, zeroed while the CRC is computed

assert HEADER.size == HEADER_SIZE and ENTRY.size == ENTRY_SIZE


@dataclass(frozen=True)
class Partition:
    first_lba: int
    last_lba: int  # inclusive, as in the entry
    type_guid: uuid.UUID
    unique_guid: uuid.UUID
    name: str = ""
    attributes: int = 0


def entry_count_for(partitions: int) -> int:
    """Entries of the array for this many partitions: 128, or the next multiple of 128."""
    count = max(ENTRY_COUNT, -(-partitions // ENTRY_COUNT) * ENTRY_COUNT)
    if count * ENTRY_SIZE > MAX_ENTRIES_BYTES:
        raise PartitionError(f"at most {MAX_ENTRIES_BYTES // ENTRY_SIZE} partitions")
    return count


def table_sectors(entry_count: int = ENTRY_COUNT) -> int:
    return entry_count * ENTRY_SIZE // SECTOR


def primary_sectors(entry_count: int = ENTRY_COUNT) -> int:
    """Protective MBR, header, entries."""
    return 2 + table_sectors(entry_count)


def backup_sectors(entry_count: int = ENTRY_COUNT) -> int:
    """Entries, header."""
    return table_sectors(entry_count) + 1


def disk_sectors(partition_start_lba: int, partition_sectors: int) -> int:
    """Size in sectors of a disk holding one partition and the backup GPT right after it."""
    return partition_start_lba + partition_sectors + BACKUP_SECTORS


def last_usable_lba(total_sectors: int, entry_count: int = ENTRY_COUNT) -> int:
    return total_sectors - backup_sectors(entry_count) - 1


def protective_mbr(total_sectors: int) -> bytes:
    """LBA 0.  Table 5.4 "Protective MBR": one record of OSType 0xEE, StartingCHS 0x000200,
    StartingLBA 1, "SizeInLBA: Set to the size of the disk minus one.  Set to 0xFFFFFFFF if
    the size of the disk is too large to be represented in this field."  EndingCHS is the
    CHS of the last block, "0xFFFFFF if it is not possible to represent the value"."""
    size_in_lba = min(total_sectors - 1, 0xFFFFFFFF)
    return mbr.mbr_sector([mbr.pack_record(mbr.PROTECTIVE_TYPE, 1, size_in_lba, first_chs=b"\x00\x02\x00",
                                           last_chs=b"\xff\xff\xff")])


def partition_array(partitions: list[Partition], entry_count: int = ENTRY_COUNT) -> bytes:
    """The partition entry array (16 KiB for 128 entries); unused entries are zero ("Unused Entry"
    type GUID)."""
    if len(partitions) > entry_count:
        raise PartitionError(f"at most {entry_count} partitions")
    array = bytearray(entry_count * ENTRY_SIZE)
    for index, p in enumerate(partitions):
        name = p.name.encode("utf-16-le")
        if len(name) > 72:
            raise PartitionError(f"partition name {p.name!r} is longer than 36 UTF-16 code units")
        array[index * ENTRY_SIZE:(index + 1) * ENTRY_SIZE] = ENTRY.pack(
            p.type_guid.bytes_le, p.unique_guid.bytes_le, p.first_lba, p.last_lba, p.attributes, name)
    return bytes(array)


def header(total_sectors: int, disk_guid: uuid.UUID, array_crc: int, primary: bool,
           entry_count: int = ENTRY_COUNT) -> bytes:
    """LBA 1 (primary) or the last LBA (backup), padded to a sector.

    "The HeaderCRC32 field is computed over HeaderSize bytes with HeaderCRC32 zeroed"; the
    CRC is the standard CRC-32 (zlib's).  The backup swaps MyLBA and AlternateLBA and points
    PartitionEntryLBA at the backup array just before it."""
    last = total_sectors - 1
    my_lba, alternate_lba = (1, last) if primary else (last, 1)
    entries_lba = 2 if primary else last - table_sectors(entry_count)
    fields = [SIGNATURE, REVISION, HEADER_SIZE, 0, 0, my_lba, alternate_lba, primary_sectors(entry_count),
              last_usable_lba(total_sectors, entry_count), disk_guid.bytes_le, entries_lba, entry_count, ENTRY_SIZE,
              array_crc]
    fields[3] = zlib.crc32(HEADER.pack(*fields))
    return HEADER.pack(*fields).ljust(SECTOR, b"\0")


def build(total_sectors: int, disk_guid: uuid.UUID, partitions: list[Partition],
          entry_count: int = ENTRY_COUNT) -> tuple[bytes, bytes]:
    """(primary, backup): the first primary_sectors(entry_count) and the last
    backup_sectors(entry_count) sectors of the disk."""
    first_usable, reserved = primary_sectors(entry_count), primary_sectors(entry_count) + backup_sectors(entry_count)
    if total_sectors < reserved + 1:
        raise PartitionError(f"a GPT disk needs more than {reserved} sectors")
    last_usable = last_usable_lba(total_sectors, entry_count)
    for p in partitions:
        if not first_usable <= p.first_lba <= p.last_lba <= last_usable:
            raise PartitionError(f"partition LBA {p.first_lba}..{p.last_lba} is outside the usable area "
                                 f"{first_usable}..{last_usable}")
    array = partition_array(partitions, entry_count)
    array_crc = zlib.crc32(array)
    primary = protective_mbr(total_sectors) + header(total_sectors, disk_guid, array_crc, True, entry_count) + array
    backup = array + header(total_sectors, disk_guid, array_crc, False, entry_count)
    return primary, backup


# -- Reading ----------------------------------------------------------------------------------

def _check_header(block: bytes) -> tuple:
    fields = HEADER.unpack_from(block)
    size = fields[2]
    if fields[0] != SIGNATURE:
        raise PartitionError("no GPT header signature")
    if not HEADER.size <= size <= len(block):
        raise PartitionError(f"GPT header size {size} is invalid")
    header_bytes = bytearray(block[:size])
    header_bytes[HEADER_CRC[0]:HEADER_CRC[1]] = bytes(4)
    if zlib.crc32(header_bytes) != fields[3]:
        raise PartitionError("GPT header checksum mismatch")
    return fields


def _read_entries(read: Reader, fields: tuple, disk_size: int, sector_size: int) -> tuple[bytes, int, int]:
    entries_lba, count, entry_size, entries_crc = fields[10:14]
    if entry_size < ENTRY.size or entry_size % 8:
        raise PartitionError(f"GPT partition entry size {entry_size} is invalid")
    total = count * entry_size
    if total > MAX_ENTRIES_BYTES or entries_lba * sector_size + total > disk_size:
        raise PartitionError(f"GPT partition entry array ({count} entries of {entry_size} bytes at LBA "
                             f"{entries_lba}) does not fit the disk")
    array = read(entries_lba * sector_size, total)
    if zlib.crc32(array) != entries_crc:
        raise PartitionError("GPT partition entry array checksum mismatch")
    return array, count, entry_size


def find_partition(read: Reader, lba1: bytes, disk_size: int, number: int, sector_size: int) -> tuple[int, int]:
    """(offset, length) in bytes of partition `number` (from 1); `lba1` is the primary header's sector.

    A damaged primary header or entry array falls back to the backup copy in the last LBA, as
    Linux and most partitioning tools do."""
    problems = []
    for where in ("primary", "backup"):
        try:
            block = lba1 if where == "primary" else read(disk_size - disk_size % sector_size - sector_size,
                                                         sector_size)
            array, count, entry_size = _read_entries(read, _check_header(block), disk_size, sector_size)
            break
        except PartitionError as e:
            problems.append(f"{where}: {e}")
    else:
        raise PartitionError(f"no valid GPT ({'; '.join(problems)})")
    if number > count:
        raise PartitionError(f"GPT partition {number} is out of range (the table has {count} entries)")
    kind, _, first, last, _, _ = ENTRY.unpack_from(array, (number - 1) * entry_size)
    if kind == bytes(16):
        raise PartitionError(f"GPT partition {number} not found (its entry is unused)")
    if last < first:
        raise PartitionError(f"GPT partition {number} ends (LBA {last}) before it starts (LBA {first})")
    return first * sector_size, (last - first + 1) * sector_size

"""MBR (DOS) partition tables, read (with logical partitions in an extended partition) and written.

Numbering follows Linux, qemu-nbd -P and nbdkit's partition filter: primary partitions are
1-4 by their slot in the table (empty and extended slots are not servable), logical
partitions count from 5 along the chain of extended boot records (EBRs).

References: the UEFI specification 2.10, section 5.2.1 (legacy MBR, Tables 5.1 and 5.2);
Linux block/partitions/msdos.c for the EBR chain.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .errors import PartitionError
from .readers import Reader

SECTOR = 512
BOOT_CODE_SIZE = 440  # Table 5.1 "BootCode": bytes 0-439
DISK_SIGNATURE = 440  # "UniqueMBRDiskSignature", 4 bytes
TABLE = 446  # "PartitionRecord": four 16-byte records
SIGNATURE_OFFSET = 510
SIGNATURE = b"\x55\xaa"  # bytes 510-511
# Table 5.2 "Legacy MBR Partition Record": BootIndicator, StartingCHS, OSType, EndingCHS,
# StartingLBA, SizeInLBA.
RECORD = struct.Struct("<B3sB3sII")
BOOTABLE = 0x80  # BootIndicator of the active partition
EXTENDED_TYPES = (0x05, 0x0F, 0x85)  # CHS extended, LBA extended, Linux extended
PROTECTIVE_TYPE = 0xEE  # a GPT disk's protective MBR (UEFI 5.2.3)
MAX_LOGICAL = 1024  # EBRs followed before giving up (a loop guard on top of the ordering check)


@dataclass(frozen=True)
class Record:
    """One partition record: OSType, StartingLBA and SizeInLBA (CHS fields are not used)."""

    kind: int
    first_lba: int
    sectors: int


# -- Reading ----------------------------------------------------------------------------------

def records(sector: bytes) -> list[Record]:
    """The four partition records of an MBR or EBR."""
    result = []
    for index in range(4):
        _, _, kind, _, first, count = RECORD.unpack_from(sector, TABLE + RECORD.size * index)
        result.append(Record(kind, first, count))
    return result


def has_signature(sector: bytes) -> bool:
    return sector[SIGNATURE_OFFSET:SIGNATURE_OFFSET + 2] == SIGNATURE


def find_partition(read: Reader, mbr: bytes, disk_size: int, number: int, sector_size: int) -> tuple[int, int]:
    """(offset, length) in bytes of partition `number` (from 1) of the disk whose first sector is `mbr`."""
    table = records(mbr)
    if number <= 4:
        record = table[number - 1]
        if record.kind == 0 or record.sectors == 0:
            raise PartitionError(f"MBR partition {number} not found (its entry is empty)")
        if record.kind in EXTENDED_TYPES:
            raise PartitionError(f"MBR partition {number} not found: it is the extended partition "
                                 f"(its logical partitions are numbered from 5)")
        return record.first_lba * sector_size, record.sectors * sector_size

    for record in table:
        if record.kind in EXTENDED_TYPES and record.sectors > 0:
            extended_start = record.first_lba * sector_size
            extended_end = (record.first_lba + record.sectors) * sector_size
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
        if not has_signature(sector):
            raise PartitionError(f"invalid EBR chain: no boot signature in the EBR at byte {ebr}")
        partition, link = records(sector)[:2]
        if logical == number:
            if partition.kind == 0 or partition.sectors == 0:
                raise PartitionError(f"MBR partition {number} not found (its logical entry is empty)")
            offset, length = ebr + partition.first_lba * sector_size, partition.sectors * sector_size
            if offset <= ebr or offset + length > extended_end:
                raise PartitionError(f"MBR logical partition {number} ({offset}+{length} bytes) is not inside "
                                     f"its extended partition ({extended_start}-{extended_end})")
            return offset, length
        if link.first_lba == 0 and link.sectors == 0:
            break
        following = extended_start + link.first_lba * sector_size
        if following <= ebr:
            raise PartitionError(f"invalid EBR chain: the EBR at byte {ebr} links back to byte {following}")
        ebr = following
    raise PartitionError(f"MBR partition {number} not found (the disk has {logical - 4} logical partitions)")


# -- Writing ----------------------------------------------------------------------------------

def chs(lba: int, heads: int = 255, sectors_per_track: int = 63) -> bytes:
    """The 3-byte CHS address of an LBA (head, sector | cylinder high bits, cylinder low byte),
    the largest one (1023/heads-1/sectors) when the cylinder does not fit in 10 bits."""
    cylinder, rest = divmod(lba, heads * sectors_per_track)
    head, sector = divmod(rest, sectors_per_track)
    if cylinder > 1023:
        cylinder, head, sector = 1023, heads - 1, sectors_per_track - 1
    return bytes((head, (sector + 1) | (cylinder >> 2 & 0xC0), cylinder & 0xFF))


def pack_record(kind: int, first_lba: int, sectors: int, bootable: bool = False,
                first_chs: bytes | None = None, last_chs: bytes | None = None) -> bytes:
    """A 16-byte partition record; the CHS fields are computed unless given."""
    return RECORD.pack(BOOTABLE if bootable else 0, first_chs if first_chs is not None else chs(first_lba),
                       kind, last_chs if last_chs is not None else chs(first_lba + sectors - 1),
                       first_lba, sectors)


def mbr_sector(partition_records: list[bytes], boot_code: bytes = b"", disk_signature: int = 0) -> bytes:
    """Sector 0: boot code, disk signature, up to four records (from pack_record), 0x55AA."""
    if len(partition_records) > 4 or len(boot_code) > BOOT_CODE_SIZE:
        raise PartitionError("an MBR holds four partition records and 440 bytes of boot code")
    sector = bytearray(SECTOR)
    sector[:len(boot_code)] = boot_code
    struct.pack_into("<I", sector, DISK_SIGNATURE, disk_signature)
    for index, record in enumerate(partition_records):
        sector[TABLE + RECORD.size * index:TABLE + RECORD.size * (index + 1)] = record
    sector[SIGNATURE_OFFSET:SIGNATURE_OFFSET + 2] = SIGNATURE
    return bytes(sector)

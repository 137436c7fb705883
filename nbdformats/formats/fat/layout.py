"""FAT geometry and on-disk metadata, sans-IO: BPB, FSInfo, MBR and FAT contents.

References: Microsoft "FAT: General Overview of On-Disk Format" 1.03 (the BPB fields and
the rule that the cluster count alone decides FAT12/16/32), mkfs.fat 4.2 for automatic
choices and the standard floppy formats.
"""

from __future__ import annotations

import struct
import sys
from array import array
from bisect import bisect_left
from dataclasses import dataclass, replace
from itertools import repeat
from operator import floordiv
from typing import Sequence

from .. import mbr
from . import FatError

SECTOR = mbr.SECTOR
PARTITION_START = 2048  # sectors (1 MiB), as nbdkit and partitioning tools
MAX_PARTITION_SECTORS = 0xFFFFFFFF  # an MBR entry holds 32-bit sector counts

# The cluster count decides the FAT type for every reader (spec section 3.5), so a
# FAT32 needs at least 65525 clusters even when the files would fit in fewer.
FAT12_MAX_CLUSTERS = 4084
FAT16_MIN_CLUSTERS = 4085
FAT16_MAX_CLUSTERS = 65524
FAT32_MIN_CLUSTERS = 65525
FAT32_MAX_CLUSTERS = 0x0FFFFFF5 - 1  # clusters 2 .. 0x0FFFFFF5
END_OF_CHAIN = {12: 0xFFF, 16: 0xFFFF, 32: 0x0FFFFFFF}
MAX_SECTORS_PER_CLUSTER = 64  # 32 KiB clusters: the largest every FAT driver accepts
FAT32_RESERVED_SECTORS = 32
FSINFO_SECTOR = 1
BACKUP_BOOT_SECTOR = 6
PARTITION_TYPES = {12: 0x01, 16: 0x0E, 32: 0x0C}  # FAT12, FAT16 (LBA), FAT32 (LBA)
HARD_DISK_ROOT_ENTRIES = 512  # mkfs.fat's default for FAT12/16 outside floppy formats


class LayoutError(FatError):
    """The files cannot be laid out as asked (too big, too small, wrong FAT type)."""


@dataclass(frozen=True)
class FloppyFormat:
    kib: int
    sectors_per_cluster: int
    root_entries: int
    media: int
    sectors_per_track: int
    heads: int


# The PC floppy formats (as mkfs.fat), bare FAT12 without a partition table.
FLOPPY_FORMATS = (
    FloppyFormat(360, 2, 112, 0xFD, 9, 2),
    FloppyFormat(720, 2, 112, 0xF9, 9, 2),
    FloppyFormat(1200, 1, 224, 0xF9, 15, 2),
    FloppyFormat(1440, 1, 224, 0xF0, 18, 2),
    FloppyFormat(2880, 2, 224, 0xF0, 36, 2),
)


@dataclass(frozen=True)
class Needs:
    """What the tree needs, for any cluster size: byte sizes of the directories (each
    takes at least one cluster), of the non-empty files, and of the root directory."""

    directory_sizes: Sequence[int]
    file_sizes: Sequence[int]
    root_size: int

    def clusters(self, cluster_size: int, root_in_data: bool) -> int:
        total = sum(map(floordiv, map((cluster_size - 1).__add__, self.file_sizes), repeat(cluster_size)))
        total += sum(max(1, -(-size // cluster_size)) for size in self.directory_sizes)
        if root_in_data:
            total += max(1, -(-self.root_size // cluster_size))
        return total

    @property
    def root_entries(self) -> int:
        return self.root_size // 32


@dataclass(frozen=True)
class Geometry:
    fat_bits: int
    sectors_per_cluster: int
    reserved_sectors: int
    fat_sectors: int  # per FAT; there are two
    root_entries: int  # the fixed root directory of FAT12/16 (0 on FAT32)
    total_sectors: int  # of the file system
    clusters: int
    media: int = 0xF8
    sectors_per_track: int = 63
    heads: int = 255
    hidden_sectors: int = 0  # where the file system starts on the disk
    drive_number: int = 0x80

    @property
    def cluster_size(self) -> int:
        return self.sectors_per_cluster * SECTOR

    @property
    def root_sectors(self) -> int:
        return self.root_entries * 32 // SECTOR

    @property
    def root_start(self) -> int:
        """First sector of the FAT12/16 root directory (of the data region on FAT32)."""
        return self.reserved_sectors + 2 * self.fat_sectors

    @property
    def data_start(self) -> int:
        return self.root_start + self.root_sectors

    def cluster_sector(self, cluster: int) -> int:
        """First sector (from the start of the file system) of a data cluster."""
        return self.data_start + (cluster - 2) * self.sectors_per_cluster

    @property
    def partitioned(self) -> bool:
        return self.hidden_sectors != 0

    @property
    def disk_size(self) -> int:
        return (self.hidden_sectors + self.total_sectors) * SECTOR


def _fat_sectors(bits: int, clusters: int) -> int:
    return -(-((clusters + 2) * bits) // (8 * SECTOR))


def _geometry(bits: int, sectors_per_cluster: int, root_entries: int, *, total: int | None = None,
              clusters: int | None = None, **fields: int) -> Geometry:
    """A geometry from either the file system's sector count or its cluster count.

    On FAT32 the reserved area grows so that clusters start cluster-aligned (as
    mkfs.fat does); FAT12/16 keep the one reserved sector old systems expect.
    """
    reserved = FAT32_RESERVED_SECTORS if bits == 32 else 1
    root = root_entries * 32 // SECTOR
    if total is not None:
        # Size the FATs for every sector being a cluster: a bound, slightly generous.
        fat = _fat_sectors(bits, max(0, (total - reserved - root) // sectors_per_cluster))
        if bits == 32:
            reserved += -(reserved + 2 * fat) % sectors_per_cluster
        clusters = max(0, (total - reserved - root - 2 * fat) // sectors_per_cluster)
    else:
        assert clusters is not None
        fat = _fat_sectors(bits, clusters)
        if bits == 32:
            reserved += -(reserved + 2 * fat) % sectors_per_cluster
        total = reserved + root + 2 * fat + clusters * sectors_per_cluster
    return Geometry(bits, sectors_per_cluster, reserved, fat, root_entries, total, clusters, **fields)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _plan_floppy(fs_sectors: int | None, needs: Needs) -> Geometry | None:
    """The smallest standard floppy format holding the files (or the one of that size)."""
    for fmt in FLOPPY_FORMATS:
        if fs_sectors is not None and fs_sectors != fmt.kib * 2:
            continue
        geometry = _geometry(12, fmt.sectors_per_cluster, fmt.root_entries, total=fmt.kib * 2,
                             media=fmt.media, sectors_per_track=fmt.sectors_per_track, heads=fmt.heads,
                             drive_number=0x00)
        if needs.root_entries <= fmt.root_entries and \
                needs.clusters(geometry.cluster_size, False) <= geometry.clusters:
            return geometry
        if fs_sectors is not None:
            raise LayoutError(
                f"the files do not fit in a {fmt.kib} KiB floppy ({needs.root_entries} root directory "
                f"entries of {fmt.root_entries}, {needs.clusters(geometry.cluster_size, False)} clusters "
                f"of {geometry.clusters})")
    return None


def _plan_fat12_16(bits: int, fs_sectors: int | None, needs: Needs,
                   max_sectors_per_cluster: int = MAX_SECTORS_PER_CLUSTER) -> Geometry:
    """FAT12/16 with a fixed root directory: the smallest cluster size that fits."""
    low, high = (1, FAT12_MAX_CLUSTERS) if bits == 12 else (FAT16_MIN_CLUSTERS, FAT16_MAX_CLUSTERS)
    root_entries = max(HARD_DISK_ROOT_ENTRIES, _round_up(needs.root_entries, 16))
    if root_entries > 0xFFF0:
        raise LayoutError(f"the root directory needs {needs.root_entries} entries; FAT{bits} holds "
                          f"at most {0xFFF0} (use fat=32)")
    per_cluster = 1
    while per_cluster <= max_sectors_per_cluster:
        needed = needs.clusters(per_cluster * SECTOR, False)
        if fs_sectors is None:
            if needed > high:
                per_cluster *= 2
                continue
            return _geometry(bits, per_cluster, root_entries, clusters=max(needed, low))
        geometry = _geometry(bits, per_cluster, root_entries, total=fs_sectors)
        if geometry.clusters > high:
            per_cluster *= 2
            continue
        if geometry.clusters < low:
            raise LayoutError(f"FAT{bits} needs at least {low} clusters: the size is too small "
                              f"(use fat=12 or fat=auto)")
        if needed > geometry.clusters:
            raise LayoutError(f"the files need {needed} clusters of {per_cluster * SECTOR} bytes, "
                              f"the size leaves room for {geometry.clusters}")
        return geometry
    if fs_sectors is None:
        raise LayoutError(f"the files are too big for FAT{bits} (use fat=32 or fat=auto)")
    raise LayoutError(f"the size is too big for FAT{bits} (use fat=32 or fat=auto)")


def _fat32_sectors_per_cluster(fs_sectors: int) -> int:
    """mkfs.fat's (and Microsoft format's) FAT32 cluster size for a file system size."""
    mib = 2048
    if fs_sectors > 32 * 1024 * mib:
        return 64
    if fs_sectors > 16 * 1024 * mib:
        return 32
    if fs_sectors > 8 * 1024 * mib:
        return 16
    if fs_sectors > 260 * mib:
        return 8
    return 1


def _plan_fat32(fs_sectors: int | None, needs: Needs) -> Geometry:
    if fs_sectors is None:
        # Just big enough: the usual cluster size for the data, made smaller while that
        # avoids padding up to FAT32's minimum cluster count.
        per_cluster = _fat32_sectors_per_cluster(needs.clusters(SECTOR, True))
        while per_cluster > 1 and needs.clusters(per_cluster * SECTOR, True) < FAT32_MIN_CLUSTERS:
            per_cluster //= 2
        needed = needs.clusters(per_cluster * SECTOR, True)
        if needed > FAT32_MAX_CLUSTERS:
            raise LayoutError("the files are too big for FAT32")
        return _geometry(32, per_cluster, 0, clusters=max(needed, FAT32_MIN_CLUSTERS))
    per_cluster = _fat32_sectors_per_cluster(fs_sectors)
    while True:
        geometry = _geometry(32, per_cluster, 0, total=fs_sectors)
        if geometry.clusters > FAT32_MAX_CLUSTERS:
            raise LayoutError("the size is too big for FAT32 (at most 8 TiB)")
        needed = needs.clusters(per_cluster * SECTOR, True)
        if geometry.clusters >= FAT32_MIN_CLUSTERS and needed <= geometry.clusters:
            return geometry
        if per_cluster == 1:
            break
        per_cluster //= 2
    if geometry.clusters < FAT32_MIN_CLUSTERS:
        raise LayoutError(f"FAT32 needs at least {FAT32_MIN_CLUSTERS} clusters (a file system of "
                          f"about 33 MiB); use fat=16, fat=12 or fat=auto for smaller disks")
    raise LayoutError(f"the files need {needed} clusters of {SECTOR} bytes, the size leaves "
                      f"room for {geometry.clusters}")


def _auto_fat(partitioned: bool | None, fs_sectors: int | None, needs: Needs) -> int:
    """FAT type as mkfs.fat picks it: FAT32 from 512 MiB, FAT12 for floppies and while
    2 KiB clusters stay under FAT12's limit, FAT16 between."""
    if fs_sectors is not None:
        if fs_sectors * SECTOR >= 512 << 20:
            return 32
        if not partitioned and any(fs_sectors == f.kib * 2 for f in FLOPPY_FORMATS):
            return 12
        return 12 if fs_sectors // 4 <= FAT12_MAX_CLUSTERS else 16
    if not partitioned and _plan_floppy(None, needs) is not None:
        return 12
    try:
        _plan_fat12_16(12, None, needs, max_sectors_per_cluster=4)
        return 12
    except LayoutError:
        pass
    try:
        if _plan_fat12_16(16, None, needs).total_sectors * SECTOR < 512 << 20:
            return 16
    except LayoutError:
        pass
    return 32


def _fs_sectors(disk_size: int | None, partitioned: bool | None) -> int | None:
    """The sectors a `disk_size` disk leaves for the file system (None: no size given)."""
    if disk_size is None:
        return None
    fs_sectors = disk_size // SECTOR - (PARTITION_START if partitioned else 0)
    if fs_sectors <= 0:
        raise LayoutError(f"size {disk_size} is too small")
    return fs_sectors


def plan(fat: str, partition: str | None, disk_size: int | None, needs: Needs) -> Geometry:
    """The geometry for `fat` (12, 16, 32, auto) and `partition` (mbr, none, or None for
    the default: none for FAT12, mbr otherwise), sized `disk_size` or just big enough."""
    if fat == "auto":
        partitioned = None if partition is None else partition == "mbr"
        bits = _auto_fat(partitioned, _fs_sectors(disk_size, partitioned), needs)
    else:
        bits = int(fat)
    partitioned = (partition == "mbr") if partition is not None else bits != 12
    fs_sectors = _fs_sectors(disk_size, partitioned)
    geometry: Geometry | None = None
    if bits == 12 and not partitioned:
        geometry = _plan_floppy(fs_sectors, needs)
    if geometry is None:
        if bits == 32:
            geometry = _plan_fat32(fs_sectors, needs)
        else:
            geometry = _plan_fat12_16(bits, fs_sectors, needs)
    if partitioned:
        if geometry.total_sectors > MAX_PARTITION_SECTORS:
            raise LayoutError("an MBR partition holds at most 2 TiB (use partition=none)")
        geometry = replace(geometry, hidden_sectors=PARTITION_START)
    return geometry


# -- Sectors ---------------------------------------------------------------------------

# Code of a non-bootable volume: INT 18h ("boot failed, try the next device"), then halt.
_NOT_BOOTABLE_CODE = bytes.fromhex("cd18f4ebfd")
OEM_NAME = b"MSWIN4.1"  # what Windows writes; some drivers check it


def bpb_end(fat_bits: int) -> int:
    """Where boot code may start: after the BPB and its extension (0x3E or 0x5A)."""
    return 0x5A if fat_bits == 32 else 0x3E


def boot_sector(geometry: Geometry, label: bytes, serial: int) -> bytearray:
    """The volume boot record: jump, BPB, extended BPB, stub code and signature."""
    g = geometry
    sector = bytearray(SECTOR)
    code_at = bpb_end(g.fat_bits)
    sector[0:3] = bytes((0xEB, code_at - 2, 0x90))
    small_total = g.total_sectors if g.fat_bits != 32 and g.total_sectors < 0x10000 else 0
    struct.pack_into("<8sHBHBHHBHHHII", sector, 3, OEM_NAME, SECTOR, g.sectors_per_cluster,
                     g.reserved_sectors, 2, g.root_entries, small_total, g.media,
                     g.fat_sectors if g.fat_bits != 32 else 0, g.sectors_per_track, g.heads,
                     g.hidden_sectors, 0 if small_total else g.total_sectors)
    if g.fat_bits == 32:
        struct.pack_into("<IHHIHH12x", sector, 0x24, g.fat_sectors, 0, 0, 2, FSINFO_SECTOR,
                         BACKUP_BOOT_SECTOR)
        extended = 0x40
    else:
        extended = 0x24
    fs_type = f"FAT{g.fat_bits}".ljust(8).encode()
    struct.pack_into("<BBBI11s8s", sector, extended, g.drive_number, 0, 0x29, serial, label, fs_type)
    sector[code_at:code_at + len(_NOT_BOOTABLE_CODE)] = _NOT_BOOTABLE_CODE
    sector[510:512] = b"\x55\xaa"
    return sector


def with_boot_code(volume_boot_record: bytes | bytearray, code: bytes, keep: tuple[int, int]) -> bytearray:
    """`code` (a 512-byte boot sector) with bytes keep[0]:keep[1] (the BPB) taken from
    `volume_boot_record`, and the 0x55AA signature."""
    sector = bytearray(code)
    start, end = keep
    sector[start:end] = volume_boot_record[start:end]
    sector[510:512] = b"\x55\xaa"
    return sector


def fsinfo_sector(free_clusters: int, next_free: int) -> bytes:
    """FAT32 FSInfo (spec section 5): free cluster count and hint, between signatures."""
    sector = bytearray(SECTOR)
    struct.pack_into("<I", sector, 0, 0x41615252)
    struct.pack_into("<IIII", sector, 484, 0x61417272, free_clusters, next_free, 0)
    struct.pack_into("<I", sector, 508, 0xAA550000)
    return bytes(sector)


def mbr_sector(geometry: Geometry, disk_signature: int, boot_code: bytes | None) -> bytes:
    """A DOS partition table with one FAT partition, active when `boot_code` is given."""
    record = mbr.pack_record(PARTITION_TYPES[geometry.fat_bits], geometry.hidden_sectors, geometry.total_sectors,
                             bootable=boot_code is not None)
    return mbr.mbr_sector([record], _NOT_BOOTABLE_CODE if boot_code is None else boot_code, disk_signature)


# -- The FAT ---------------------------------------------------------------------------

class FatTable:
    """One copy of the FAT, generated on demand from how clusters were allocated.

    Objects occupy consecutive runs of clusters from cluster 2 up to `allocated_end`
    (exclusive); `chain_ends` (ascending) holds the last cluster of every run.  Each
    cluster of a run points to the next, the last holds end-of-chain, the rest are free.
    """

    def __init__(self, geometry: Geometry, chain_ends: Sequence[int], allocated_end: int) -> None:
        self.bits = geometry.fat_bits
        self.size = geometry.fat_sectors * SECTOR
        self.entry_count = geometry.clusters + 2
        self.end_of_chain = END_OF_CHAIN[self.bits]
        self.media_entry = (self.end_of_chain & ~0xFF) | geometry.media
        self.chain_ends = chain_ends
        self.allocated_end = allocated_end
        self._fat12: bytes | None = None
        if self.bits == 12:  # at most 6 KiB: built once
            self._fat12 = self._pack12(self.entries(0, self.entry_count + self.entry_count % 2))

    def entries(self, first: int, end: int) -> array:
        """FAT entries first..end-1 (entries past the last cluster are 0)."""
        out = array("I" if self.bits == 32 else "H" if self.bits == 16 else "I")
        low = max(first, 2)
        high = min(end, self.allocated_end)
        for index in range(first, min(end, 2)):
            out.append(self.media_entry if index == 0 else self.end_of_chain)
        if low < high:
            out.extend(range(low + 1, high + 1))
            ends = self.chain_ends
            i = bisect_left(ends, low)
            base = low - first
            while i < len(ends) and ends[i] < high:
                out[base + ends[i] - low] = self.end_of_chain
                i += 1
        missing = (end - first) - len(out)
        if missing > 0:
            out.frombytes(bytes(missing * out.itemsize))
        return out

    @staticmethod
    def _pack12(values: array) -> bytes:
        out = bytearray()
        for i in range(0, len(values) - 1, 2):
            a, b = values[i], values[i + 1]
            out += bytes((a & 0xFF, (a >> 8) | ((b & 0xF) << 4), b >> 4))
        return bytes(out)

    def read(self, offset: int, length: int) -> bytes:
        """Bytes offset..offset+length of this FAT copy."""
        if self._fat12 is not None:
            return self._fat12[offset:offset + length].ljust(length, b"\0")
        width = self.bits // 8
        first = offset // width
        end = -(-(offset + length) // width)
        values = self.entries(first, end)
        if sys.byteorder == "big":
            values.byteswap()
        skip = offset - first * width
        return values.tobytes()[skip:skip + length]

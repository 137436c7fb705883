"""Find a partition of an MBR or GPT disk: `find_partition(read, disk_size, number, sector_size)`
asks `read(offset, n)` for the few sectors it needs and returns the partition's (offset,
length) in bytes.  The tables themselves are mbr.py and gpt.py (read and written there)."""

from __future__ import annotations

from . import gpt, mbr
from .errors import PartitionError
from .readers import Reader

__all__ = ["PartitionError", "find_partition"]


def find_partition(read: Reader, disk_size: int, number: int, sector_size: int = 512) -> tuple[int, int]:
    """(offset, length) in bytes of partition `number` (from 1) of a disk of `disk_size` bytes."""
    if number < 1:
        raise PartitionError("partition numbers count from 1")
    if disk_size < 2 * sector_size:
        raise PartitionError(f"the disk ({disk_size} bytes) is too small to hold a partition table")
    head = read(0, 2 * sector_size)
    if head[sector_size:sector_size + len(gpt.SIGNATURE)] == gpt.SIGNATURE:
        offset, length = gpt.find_partition(read, head[sector_size:], disk_size, number, sector_size)
    elif mbr.has_signature(head):
        offset, length = mbr.find_partition(read, head[:sector_size], disk_size, number, sector_size)
    else:
        raise PartitionError("the disk has no MBR or GPT partition table signature")
    if offset + length > disk_size:
        raise PartitionError(f"partition {number} ({offset}+{length} bytes) runs past the end of the disk "
                             f"({disk_size} bytes)")
    return offset, length

"""partition filter: serve one partition of an MBR or GPT disk (nbdkit-partition-filter compatible).

MBR primary (1-4) and logical (5 and up) partitions, GPT partitions (with the backup header
when the primary one is damaged).  The table is read when a connection opens, so each
connection sees the table as it is then.
"""

from __future__ import annotations

import errno

from ..api.chain import Filter, Layer
from ..api.errors import ConfigError, NBDError
from ..api.params import Enum, Int, Param
from ..formats.partitions import PartitionError, find_partition
from .offset import RangeHandle


def sector_size_of(layer: Layer, configured: str | None) -> int:
    """partition-sectorsize=, else the minimum block size below if it is 512 or 4096, else 512."""
    if configured is not None:
        return 4096 if configured in ("4096", "4k", "4K") else 512
    constraints = layer.block_size()
    return constraints[0] if constraints and constraints[0] in (512, 4096) else 512


def locate(layer: Layer, number: int, sector_size: int) -> tuple[int, int]:
    """(offset, length) of partition `number` of the disk below."""

    def read(offset: int, length: int) -> bytes:
        buf = bytearray(length)
        layer.pread(memoryview(buf), offset, 0)
        return bytes(buf)

    return find_partition(read, layer.get_size(), number, sector_size)


class PartitionFilter(Filter):
    """Serve one partition of a partitioned disk: partition=N (MBR incl. logical, GPT)."""

    name = "partition"
    partition = Param(Int(minimum=1), required=True, help="The partition to serve, counting from 1")
    partition_sectorsize = Param(Enum("512", "4096", "4k", "4K"),
                                 help="Sector size the table's LBAs count in (default: the minimum block "
                                      "size of the plugin if 512 or 4096, else 512)")

    def get_ready(self) -> None:
        # A missing table or partition is reported at start-up when the plugin can be opened now.
        with self.below_if_available() as below:
            if below is None:
                return
            try:
                locate(below, self.partition, sector_size_of(below, self.partition_sectorsize))
            except PartitionError as e:
                raise ConfigError(f"partition: {e}") from None
            except NBDError:
                return  # the plugin could not be read now; each connection tries again

    class Handle(RangeHandle):
        def __init__(self, filter: "PartitionFilter", next: Layer, readonly: bool, export_name: str) -> None:
            super().__init__(filter, next, readonly, export_name)
            try:
                self.start, self.length = locate(next, filter.partition,
                                                 sector_size_of(next, filter.partition_sectorsize))
            except PartitionError as e:
                raise NBDError(errno.EINVAL, f"partition: {e}") from None


FILTER = PartitionFilter

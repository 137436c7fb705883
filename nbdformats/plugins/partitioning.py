"""partitioning plugin: files as the partitions of a virtual disk with an MBR or GPT partition table
(nbdkit-partitioning-plugin compatible).

The layout is nbdkit's: the partition table, then each file aligned to alignment= (default 1 MiB)
and padded to whole sectors, then (GPT) the backup table.  With MBR and more than four files, the
fourth record is an extended partition and each file from the fourth on is a logical partition
preceded by its extended boot record.  The tables are built once with the shared structures of
formats/mbr.py and formats/gpt.py; reads and writes of a partition go to its file, and the tables
and padding can only be "written" with what they already hold.
"""

from __future__ import annotations

import bisect
import errno
import logging
import os
import uuid
from dataclasses import dataclass
from typing import Iterable, Iterator

from ..api.chain import (EMULATE, EXTENT_DATA, EXTENT_HOLE, EXTENT_ZERO, Extents, Holes, Plugin, PluginHandle,
                         pread_sparse_by_extents)
from ..api.errors import ConfigError, NBDError
from ..api.params import Param, ParamType, Path, Size, params_of
from ..api.zeroes import fill_zero, is_zero
from ..formats import gpt, mbr
from ..formats.errors import PartitionError
from ._sparse import data_and_holes, seeks_holes

log = logging.getLogger(__name__)

SECTOR = mbr.SECTOR
MAX_ALIGNMENT = 2048 * SECTOR  # 1 MiB, also the default
DEFAULT_MBR_ID = 0x83  # Linux filesystem
EXTENDED_PARTITION = 0x0F  # "W95 Ext'd (LBA)", as nbdkit uses for the extended partition and EBR links
# The largest disk MBR addresses, less room for the padding the files may need (as nbdkit).
MAX_MBR_DISK_SIZE = 0xFFFFFFFF * SECTOR - 5 * MAX_ALIGNMENT
# nbdkit writes every CHS address as "too large to represent" (cylinder 1023, head 254, sector 63).
CHS_UNUSED = bytes((254, 0xFF, 0xFF))


class MbrId(ParamType[int]):
    metavar = "0xN|default"

    def parse(self, text: str) -> int:
        if text.lower() == "default":
            return DEFAULT_MBR_ID
        try:
            value = int(text, 0)
        except ValueError:
            raise ValueError("not a byte (write hexadecimal with 0x: 0x83)") from None
        if not 0 <= value <= 255:
            raise ValueError("must be between 0 and 0xff")
        return value


class TypeGuid(ParamType[uuid.UUID]):
    metavar = "GUID|default"

    def parse(self, text: str) -> uuid.UUID:
        if text.lower() == "default":
            return gpt.LINUX_FILESYSTEM
        body = text[1:-1] if len(text) == 38 and text[0] == "{" and text[-1] == "}" else text
        if len(body) != 36 or [i for i, c in enumerate(body) if c == "-"] != [8, 13, 18, 23]:
            raise ValueError("could not validate GUID (like 0FC63DAF-8483-4772-8E79-3D69D8477DE4)")
        try:
            return uuid.UUID(body)
        except ValueError:
            raise ValueError("could not validate GUID (like 0FC63DAF-8483-4772-8E79-3D69D8477DE4)") from None


class PartitionType(ParamType[str]):
    metavar = "mbr|gpt"

    def parse(self, text: str) -> str:
        kind = {"mbr": "mbr", "dos": "mbr", "gpt": "gpt"}.get(text.lower())
        if kind is None:
            raise ValueError("unknown partition-type (use mbr or gpt)")
        return kind


def _alignment(value: int) -> None:
    if value & (value - 1) or value % SECTOR:
        raise ValueError(f"must be a power of 2 and a multiple of the sector size {SECTOR}")


@dataclass
class PartitionFile:
    path: str
    given_name: str  # as on the command line: the GPT partition name, as nbdkit
    alignment: int
    mbr_id: int
    type_guid: uuid.UUID
    size: int = 0
    fd: int = -1
    seeks_holes: bool = False  # its filesystem answers SEEK_DATA/SEEK_HOLE
    start: int = 0  # where the partition starts on the disk


@dataclass
class Region:
    start: int
    length: int
    data: bytes | None = None  # a table (None: a file's or zero padding)
    file: PartitionFile | None = None

    @property
    def end(self) -> int:
        return self.start + self.length


class Layout:
    """The regions of the disk in order: tables, padding (zeroes) and files."""

    def __init__(self) -> None:
        self.regions: list[Region] = []
        self.starts: list[int] = []
        self.size = 0

    def append(self, length: int, *, data: bytes | None = None, file: PartitionFile | None = None,
               alignment: int = 0) -> Region:
        if alignment and self.size % alignment:
            self.append(alignment - self.size % alignment)  # zero padding before
        region = Region(self.size, length, data, file)
        self.regions.append(region)
        self.starts.append(region.start)
        self.size += length
        if file is not None and self.size % SECTOR:
            self.append(SECTOR - self.size % SECTOR)  # a partition is whole sectors
        return region

    def pieces(self, count: int, offset: int) -> Iterator[tuple[Region, int, int]]:
        """(region, offset within it, length) covering [offset, offset + count)."""
        index = bisect.bisect_right(self.starts, offset) - 1
        end = offset + count
        while offset < end:
            region = self.regions[index]
            length = min(end, region.end) - offset
            yield region, offset - region.start, length
            offset += length
            index += 1


def sectors(length: int) -> int:
    return -(-length // SECTOR)


def record(kind: int, first_lba: int, length: int, bootable: bool = False) -> bytes:
    return mbr.pack_record(kind, first_lba, sectors(length), bootable, CHS_UNUSED, CHS_UNUSED)


def build_mbr(files: list[PartitionFile]) -> Layout:
    layout = Layout()
    table = layout.append(SECTOR)
    ebrs = []
    for index, f in enumerate(files):
        if len(files) > 4 and index >= 3:
            ebrs.append(layout.append(SECTOR))
        f.start = layout.append(f.size, file=f, alignment=f.alignment).start
    primaries = files if len(files) <= 4 else files[:3]
    records = [record(f.mbr_id, f.start // SECTOR, f.size, index == 0) for index, f in enumerate(primaries)]
    if ebrs:
        # The extended partition runs from the first EBR to the end of the disk.
        records.append(record(EXTENDED_PARTITION, ebrs[0].start // SECTOR, layout.size - ebrs[0].start))
        logical = files[3:]
        for index, (ebr, f) in enumerate(zip(ebrs, logical)):
            # First record: the logical partition, from its EBR; second: the next EBR, from the first EBR.
            links = [record(f.mbr_id, (f.start - ebr.start) // SECTOR, f.size)]
            if index + 1 < len(logical):
                following, next_file = ebrs[index + 1], logical[index + 1]
                links.append(record(EXTENDED_PARTITION, (following.start - ebrs[0].start) // SECTOR,
                                    next_file.start + next_file.size - following.start))
            ebr.data = mbr.mbr_sector(links)
    table.data = mbr.mbr_sector(records)
    return layout


def gpt_name(given: str) -> str:
    """nbdkit names a GPT partition after its file as given, when ASCII and short enough."""
    return given if given.isascii() and len(given) < 36 else ""


def build_gpt(files: list[PartitionFile]) -> Layout:
    try:
        entry_count = gpt.entry_count_for(len(files))  # 128, or the next multiple of 128, as nbdkit
    except PartitionError as e:
        raise ConfigError(f"partitioning: {e} with GPT (got {len(files)})") from None
    layout = Layout()
    primary = layout.append(gpt.primary_sectors(entry_count) * SECTOR)
    for f in files:
        f.start = layout.append(f.size, file=f, alignment=f.alignment).start
    backup = layout.append(gpt.backup_sectors(entry_count) * SECTOR)
    partitions = [gpt.Partition(f.start // SECTOR, (f.start + f.size - 1) // SECTOR, f.type_guid, uuid.uuid4(),
                                gpt_name(f.given_name), gpt.ATTR_LEGACY_BIOS_BOOTABLE if index == 0 else 0)
                  for index, f in enumerate(files)]
    try:
        primary.data, backup.data = gpt.build(layout.size // SECTOR, uuid.uuid4(), partitions, entry_count)
    except PartitionError as e:
        raise ConfigError(f"partitioning: {e}") from None
    return layout


class PartitioningPlugin(Plugin):
    """A partitioned disk (MBR or GPT) whose partitions are files; writes go to the files."""

    name = "partitioning"
    debug_flag_help = {"regions": "log the layout of the disk (tables, padding, files)"}
    file = Param(Path("file"), required=True, repeat=True, magic=True,
                 help="A file holding one partition (repeat for each; bare arguments work too)")
    partition_type = Param(PartitionType(),
                           help="The partition table: mbr (dos) or gpt; default: gpt for more than 4 files or "
                                "about 2 TB, else mbr")
    alignment = Param(Size(minimum=SECTOR, maximum=MAX_ALIGNMENT), default=MAX_ALIGNMENT, check=_alignment,
                      help="Alignment of the following files' partitions (default 1M)")
    mbr_id = Param(MbrId(), default=DEFAULT_MBR_ID,
                   help="MBR partition type byte of the following files (default 0x83, Linux)")
    type_guid = Param(TypeGuid(), default=gpt.LINUX_FILESYSTEM,
                      help="GPT partition type GUID of the following files (default Linux filesystem)")

    def configure(self, pairs: Iterable[tuple[str, str]]) -> None:
        # alignment=, mbr-id= and type-guid= apply to the files after them: read in order.
        declared = {param.key: param for param in params_of(type(self))}
        alignment, mbr_id, type_guid = MAX_ALIGNMENT, DEFAULT_MBR_ID, gpt.LINUX_FILESYSTEM
        self.files: list[PartitionFile] = []
        self.table: str | None = None
        for key, text in pairs:
            if key not in declared:
                raise ConfigError(f"partitioning: unknown parameter {key!r} (known: {', '.join(sorted(declared))})")
            value = declared[key].parse(text)
            if key == "file":
                self.files.append(PartitionFile(value, text, alignment, mbr_id, type_guid))
            elif key == "partition-type":
                self.table = value
            elif key == "alignment":
                alignment = value
            elif key == "mbr-id":
                mbr_id = value
            else:
                type_guid = value
        self.config_complete()

    def config_complete(self) -> None:
        if not self.files:
            raise ConfigError("partitioning: at least one file= parameter must be supplied")
        for f in self.files:
            f.size = os.stat(f.path).st_size
            if f.size == 0:
                raise ConfigError(f"partitioning: {f.given_name}: zero length partitions are not allowed")
        total = sum(f.size for f in self.files)
        needs_gpt = total > MAX_MBR_DISK_SIZE
        if self.table is None:
            self.table = "gpt" if needs_gpt or len(self.files) > 4 else "mbr"
        elif self.table == "mbr" and needs_gpt:
            raise ConfigError(f"partitioning: MBR supports a virtual disk of about 2 TB, but the {len(self.files)} "
                              f"file(s) hold {total} bytes (> {MAX_MBR_DISK_SIZE}): use partition-type=gpt")

    def get_ready(self) -> None:
        self.layout = build_gpt(self.files) if self.table == "gpt" else build_mbr(self.files)
        self.writable = True
        for f in self.files:
            try:
                f.fd = os.open(f.path, os.O_RDWR | os.O_CLOEXEC)
            except OSError as e:  # a file we may not write (nbdkit refuses it): the disk is read-only
                if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                    raise
                f.fd = os.open(f.path, os.O_RDONLY | os.O_CLOEXEC)
                self.writable = False
            f.seeks_holes = seeks_holes(f.fd)
        if self.debug_flags.get("regions"):
            for index, region in enumerate(self.layout.regions):
                kind = region.file.given_name if region.file else "data" if region.data is not None else "zero"
                log.debug("region[%d]: %x-%x type=%s", index, region.start, region.end - 1, kind)

    def cleanup(self) -> None:
        for f in self.files:
            if f.fd >= 0:
                os.close(f.fd)

    class Handle(PluginHandle):
        def __init__(self, plugin: "PartitioningPlugin", readonly: bool, export_name: str) -> None:
            self.plugin = plugin
            self.layout = plugin.layout

        def get_size(self) -> int:
            return self.layout.size

        def can_write(self) -> bool:
            return self.plugin.writable

        def can_multi_conn(self) -> bool:
            return True  # one layout and the same files for every connection

        def can_cache(self) -> int:
            return EMULATE  # reading fills the host's page cache

        def pread(self, buf: memoryview, offset: int, flags: int) -> None:
            done = 0
            for region, at, length in self.layout.pieces(len(buf), offset):
                view = buf[done:done + length]
                if region.file is not None:
                    while view:
                        n = os.preadv(region.file.fd, [view], at)
                        if n == 0:
                            raise NBDError(errno.EIO, f"pread: {region.file.given_name}: unexpected end of file")
                        view, at = view[n:], at + n
                elif region.data is not None:
                    view[:] = region.data[at:at + length]
                else:
                    fill_zero(view)
                done += length

        def pread_sparse(self, buf: memoryview, offset: int, flags: int) -> Holes:
            return pread_sparse_by_extents(self, buf, offset, flags)  # padding and the files' holes

        def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
            done = 0
            for region, at, length in self.layout.pieces(len(buf), offset):
                view = buf[done:done + length]
                if region.file is not None:
                    while view:
                        n = os.pwritev(region.file.fd, [view], at)
                        view, at = view[n:], at + n
                elif region.data is not None:
                    if view != region.data[at:at + length]:
                        raise NBDError(errno.EIO, "partitioning: attempt to change the partition table")
                elif not is_zero(view):
                    raise NBDError(errno.EIO, "partitioning: attempt to write non-zeroes to padding")
                done += length

        def flush(self, flags: int) -> None:
            for f in self.plugin.files:
                os.fdatasync(f.fd)

        def extents(self, count: int, offset: int, flags: int, extents: Extents) -> None:
            for region, at, length in self.layout.pieces(count, offset):
                if region.file is not None:
                    runs = data_and_holes(region.file.fd, at, at + length) if region.file.seeks_holes \
                        else [(at, length, True)]
                    for start, run, is_data in runs:
                        extents.add(region.start + start, run, EXTENT_DATA if is_data else EXTENT_HOLE | EXTENT_ZERO)
                else:
                    extents.add(region.start + at, length,
                                EXTENT_DATA if region.data is not None else EXTENT_HOLE | EXTENT_ZERO)


PLUGIN = PartitioningPlugin

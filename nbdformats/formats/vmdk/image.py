"""Reading a VMDK (sans-IO): the descriptor, then its extents, each a file of its own.

A hosted sparse extent maps grains through two levels: "the grain directory ... entries point
to grain tables", each grain table entry is the sector of a grain, 0 for a grain not allocated
(read from the parent, or zeroes).  A streamOptimized extent has "gdOffset = GD_AT_END": the real
header is the footer near the end of the file, and its grains are compressed, each behind a grain
marker holding its LBA and compressed size.  Flat extents hold the data as is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from .. import inflate
from ..blockmap import Kind, Run, TableCache, read_exact
from ..errors import check_size
from ..readers import Reader
from .descriptor import MAX_DESCRIPTOR, Descriptor, ExtentLine, parse_descriptor
from .errors import VmdkError
from .structs import (COMPRESSION_DEFLATE, COWD_MAGIC, DESCRIPTOR_SIGNATURE, FLAG_COMPRESSED, FLAG_MARKERS,
                      FLAG_ZEROED_GRAIN_GTE, FOOTER_AREA, GD_AT_END, GRAIN_MARKER, GRAIN_TABLE_ENTRY, MARKER,
                      MARKER_EOS, MARKER_FOOTER, SECTOR, SPARSE_HEADER, SPARSE_MAGIC, ZEROED_GRAIN)

MAX_GRAIN_SECTORS = 1 << 16  # 32 MiB grains (qemu-img and VMware write 64 KiB ones)
MAX_GTES_PER_GT = 512  # as qemu: "L2 table size too big" beyond
MAX_GRAIN_DIRECTORY = 64 << 20  # bytes: a directory for over 500 TiB of 64 KiB grains


@dataclass(frozen=True)
class SparseHeader:
    version: int
    capacity: int  # sectors
    grain_sectors: int
    descriptor_offset: int  # sectors
    descriptor_size: int  # sectors
    gtes_per_gt: int
    gd_offset: int  # sectors
    compressed: bool
    markers: bool
    zeroed_grains: bool


def parse_sparse_header(block: bytes, where: str) -> SparseHeader:
    (magic, version, flags, capacity, grain, descriptor_offset, descriptor_size, gtes, _rgd, gd_offset, _overhead,
     _unclean, _single, _non, _double1, _double2, compression) = SPARSE_HEADER.unpack(block)
    if magic != SPARSE_MAGIC:
        raise VmdkError(f"{where}: the magic number is {magic!r}, not 'KDMV'")
    if not 1 <= version <= 3:
        raise VmdkError(f"{where}: unsupported sparse extent version {version} (1 to 3 are supported)")
    if grain < 1 or grain & (grain - 1) or grain > MAX_GRAIN_SECTORS:
        raise VmdkError(f"{where}: the grainSize is {grain} sectors, not a power of two up to {MAX_GRAIN_SECTORS}")
    if not 1 <= gtes <= MAX_GTES_PER_GT:
        raise VmdkError(f"{where}: numGTEsPerGT is {gtes}, not 1 to {MAX_GTES_PER_GT}")
    compressed = bool(flags & FLAG_COMPRESSED)
    if compressed and compression != COMPRESSION_DEFLATE:
        raise VmdkError(f"{where}: unsupported compressAlgorithm {compression} (1, deflate, is supported)")
    check_size(capacity * SECTOR, f"{where}: the capacity", error=VmdkError)
    return SparseHeader(version, capacity, grain, descriptor_offset, descriptor_size, gtes, gd_offset, compressed,
                        bool(flags & FLAG_MARKERS), bool(flags & FLAG_ZEROED_GRAIN_GTE))


def read_sparse_header(read: Reader, file_size: int, name: str) -> SparseHeader:
    """The header of a sparse extent; for a streamOptimized one, the footer's copy."""
    header = parse_sparse_header(read_exact(read, 0, SECTOR, f"{name}: the sparse header", VmdkError),
                                 f"{name}: the sparse header")
    if header.gd_offset != GD_AT_END:
        return header
    # "the footer ... is a copy of the header ... located at the end of the file", between a footer
    # marker and the end-of-stream marker.
    if file_size < SECTOR + FOOTER_AREA:
        raise VmdkError(f"{name}: the grain directory is at the end of the file, but the file has no room for a "
                        "footer: the file is truncated")
    end = file_size - file_size % SECTOR
    area = read_exact(read, end - FOOTER_AREA, FOOTER_AREA, f"{name}: the footer", VmdkError)
    footer_marker, eos = MARKER.unpack_from(area), MARKER.unpack_from(area, 2 * SECTOR)
    if footer_marker[1:] != (0, MARKER_FOOTER) or eos != (0, 0, MARKER_EOS):
        raise VmdkError(f"{name}: the grain directory is at the end of the file, but the file does not end with a "
                        "footer and an end-of-stream marker: the file is truncated or corrupt")
    footer = parse_sparse_header(area[SECTOR:2 * SECTOR], f"{name}: the footer")
    if footer.gd_offset == GD_AT_END:
        raise VmdkError(f"{name}: the footer's gdOffset is GD_AT_END too")
    return footer


def read_descriptor(read: Reader, file_size: int, name: str) -> tuple[Descriptor, SparseHeader | None]:
    """The descriptor of the VMDK in `read`, and its sparse header when the descriptor is embedded
    (monolithicSparse, streamOptimized: then the file is the disk's only extent)."""
    magic = read_exact(read, 0, min(file_size, len(DESCRIPTOR_SIGNATURE)), f"{name}: the start", VmdkError)
    if magic.startswith(COWD_MAGIC):
        raise VmdkError(f"{name}: an ESX sparse extent (COWD) is not supported")
    if magic.startswith(SPARSE_MAGIC):
        header = read_sparse_header(read, file_size, name)
        if not header.descriptor_size:  # a bare sparse extent: the disk is this one extent
            return Descriptor("", 0xFFFFFFFF, (ExtentLine(header.capacity, "SPARSE", "", 0),), None), header
        length = header.descriptor_size * SECTOR
        check_size(length, f"{name}: the embedded descriptor's size", MAX_DESCRIPTOR, VmdkError)
        check_size(header.descriptor_offset * SECTOR + length, f"{name}: the embedded descriptor's end", file_size,
                   VmdkError, f"the file's size, {file_size}")
        descriptor = parse_descriptor(read_exact(read, header.descriptor_offset * SECTOR, length,
                                                 f"{name}: the embedded descriptor", VmdkError))
        # As qemu: the file itself is the disk's extent, whatever the embedded text names.
        return Descriptor(descriptor.create_type, descriptor.cid, (ExtentLine(header.capacity, "SPARSE", "", 0),),
                          descriptor.parent), header
    if not magic.startswith(DESCRIPTOR_SIGNATURE):
        raise VmdkError(f"{name}: not a VMDK: neither a sparse extent ('KDMV') nor a descriptor file "
                        f"('{DESCRIPTOR_SIGNATURE.decode()}')")
    check_size(file_size, f"{name}: the descriptor file's size", MAX_DESCRIPTOR, VmdkError)
    return parse_descriptor(read_exact(read, 0, file_size, f"{name}: the descriptor", VmdkError)), None


class SparseExtent:
    """A hosted sparse extent's header and grain directory."""

    def __init__(self, header: SparseHeader, read: Reader, file_size: int, sectors: int, name: str) -> None:
        if sectors > header.capacity:
            raise VmdkError(f"{name}: the descriptor gives the extent {sectors} sectors, its header's capacity is "
                            f"only {header.capacity}")
        self.header, self.file_size, self.name = header, file_size, name
        self.grain_bytes = header.grain_sectors * SECTOR
        self.table_bytes = self.grain_bytes * header.gtes_per_gt  # guest bytes per grain table
        entries = -(-header.capacity * SECTOR // self.table_bytes)
        check_size(entries * GRAIN_TABLE_ENTRY, f"{name}: the grain directory's size", MAX_GRAIN_DIRECTORY, VmdkError)
        check_size(header.gd_offset * SECTOR + entries * GRAIN_TABLE_ENTRY, f"{name}: the grain directory's end "
                   f"(gdOffset {header.gd_offset})", file_size, VmdkError, f"the file's size, {file_size}")
        self.directory = np.frombuffer(read_exact(read, header.gd_offset * SECTOR, entries * GRAIN_TABLE_ENTRY,
                                                  f"{name}: the grain directory", VmdkError), dtype="<u4")
        self.size = sectors * SECTOR

    def grain_table(self, index: int, read: Reader) -> np.ndarray:
        start = int(self.directory[index]) * SECTOR
        length = self.header.gtes_per_gt * GRAIN_TABLE_ENTRY
        check_size(start + length, f"{self.name}: the end of grain table {index} (grain directory entry "
                   f"{int(self.directory[index])})", self.file_size, VmdkError, f"the file's size, {self.file_size}")
        return np.frombuffer(read_exact(read, start, length, f"{self.name}: grain table {index}", VmdkError),
                             dtype="<u4")


@dataclass(frozen=True)
class Extent:
    start: int  # guest offset
    size: int
    line: ExtentLine
    sparse: SparseExtent | None


class VmdkImage:
    """A checked VMDK: its descriptor and extents, shared by all connections.  `extent_files`
    has the (reader, size) of each extent's file (None for ZERO extents), in the descriptor's
    order; the readers each call is given follow the same order.  `name` is the image's, for
    messages about an embedded extent."""

    def __init__(self, descriptor: Descriptor, extent_files: Sequence[tuple[Reader, int] | None],
                 embedded: SparseHeader | None, cache_bytes: int, name: str) -> None:
        self.descriptor = descriptor
        self.embedded = embedded is not None  # the descriptor is inside the disk's one sparse extent
        self.identity = f"{descriptor.cid:08x}"
        self.parent = descriptor.parent
        self.size = descriptor.size
        self.cache = TableCache(cache_bytes)
        self.extents: list[Extent] = []
        start = 0
        for number, (line, file) in enumerate(zip(descriptor.extents, extent_files)):
            name = line.filename or name
            sparse = None
            if line.kind == "SPARSE":
                assert file is not None
                read, file_size = file
                header = embedded if embedded is not None else read_sparse_header(read, file_size, name)
                sparse = SparseExtent(header, read, file_size, line.sectors, name)
            elif line.kind == "FLAT":
                assert file is not None
                check_size((line.offset + line.sectors) * SECTOR, f"{name}: the flat extent's end (offset "
                           f"{line.offset} + {line.sectors} sectors)", file[1], VmdkError,
                           f"the file's size, {file[1]}: the extent is truncated")
            self.extents.append(Extent(start, line.sectors * SECTOR, line, sparse))
            start += line.sectors * SECTOR
        self.starts = [extent.start for extent in self.extents]

    def runs(self, offset: int, length: int, files: Sequence[Reader]) -> Iterator[Run]:
        end = min(offset + length, self.size)
        position = offset
        for number, extent in enumerate(self.extents):
            extent_end = extent.start + extent.size
            if extent_end <= position:
                continue
            if position >= end:
                return
            stop = min(end, extent_end)
            if extent.line.kind == "ZERO":
                yield Run(position, stop - position, Kind.ZERO)
            elif extent.sparse is None:
                yield Run(position, stop - position, Kind.DATA,
                          extent.line.offset * SECTOR + position - extent.start, number)
            else:
                yield from self._grains(number, extent, extent.sparse, position, stop, files[number])
            position = stop

    def _grains(self, number: int, extent: Extent, sparse: SparseExtent, start: int, end: int,
                read: Reader) -> Iterator[Run]:
        header = sparse.header
        position = start
        while position < end:
            relative = position - extent.start
            table_index, in_table = divmod(relative, sparse.table_bytes)
            table_end = min(end, position - in_table + sparse.table_bytes)
            if not int(sparse.directory[table_index]):
                yield Run(position, table_end - position, Kind.PARENT)
                position = table_end
                continue
            table = self.cache.get((number, 0, table_index), lambda: sparse.grain_table(table_index, read))
            assert isinstance(table, np.ndarray)
            while position < table_end:
                grain_index, within = divmod(position - extent.start, sparse.grain_bytes)
                run_end = min(table_end, position - within + sparse.grain_bytes)
                entry = int(table[grain_index % header.gtes_per_gt])
                if entry == 0:
                    yield Run(position, run_end - position, Kind.PARENT)
                elif entry == ZEROED_GRAIN and header.zeroed_grains:
                    yield Run(position, run_end - position, Kind.ZERO)
                elif header.compressed:
                    yield Run(position, run_end - position, Kind.COMPRESSED, entry, number)
                else:
                    host = entry * SECTOR + within
                    check_size(host + run_end - position, f"{sparse.name}: the end of grain {grain_index} (grain "
                               f"table entry {entry})", sparse.file_size, VmdkError,
                               f"the file's size, {sparse.file_size}")
                    yield Run(position, run_end - position, Kind.DATA, host, number)
                position = run_end

    def decompress(self, run: Run, files: Sequence[Reader]) -> bytes:
        extent = self.extents[run.file]
        assert extent.sparse is not None
        grain_index, within = divmod(run.offset - extent.start, extent.sparse.grain_bytes)
        grain = self.cache.get((run.file, 1, run.host),
                               lambda: self._inflate(extent, extent.sparse, grain_index, run.host,  # type: ignore[arg-type]
                                                     files[run.file]))
        return bytes(grain[within:within + run.length])

    def _inflate(self, extent: Extent, sparse: SparseExtent, grain_index: int, sector: int, read: Reader) -> bytes:
        """A compressed grain: "a grain marker ... lba, size, data", the data a zlib stream."""
        offset = sector * SECTOR
        where = f"{sparse.name}: compressed grain {grain_index} at sector {sector}"
        limit = 2 * sparse.grain_bytes + SECTOR  # deflate never grows data that much
        if sparse.header.markers:
            lba, size = GRAIN_MARKER.unpack(read_exact(read, offset, GRAIN_MARKER.size, where, VmdkError))
            if lba != grain_index * sparse.header.grain_sectors:
                raise VmdkError(f"{where}: its marker gives LBA {lba}, not the grain's "
                                f"{grain_index * sparse.header.grain_sectors}")
            check_size(size, f"{where}: the compressed size", limit, VmdkError)
            offset += GRAIN_MARKER.size
        else:
            size = min(limit, sparse.file_size - offset)
        check_size(offset + size, f"{where}: the end of its data", sparse.file_size, VmdkError,
                   f"the file's size, {sparse.file_size}")
        needed = min(sparse.grain_bytes, extent.size - grain_index * sparse.grain_bytes)
        inflater = inflate.decompressobj()
        try:
            # One byte more than a grain, so a lying stream cannot make us allocate more.
            data = inflater.decompress(read_exact(read, offset, size, where, VmdkError), sparse.grain_bytes + 1)
        except inflate.InflateError as e:
            raise VmdkError(f"{where}: corrupt compressed data: {e}") from None
        if len(data) > sparse.grain_bytes:
            raise VmdkError(f"{where}: decodes to more than the grain's {sparse.grain_bytes} bytes")
        if len(data) < needed or not inflater.eof:
            raise VmdkError(f"{where}: decodes to {len(data)} bytes{'' if inflater.eof else ' and is cut short'}, "
                            f"not the grain's {needed} (its compressed size is wrong or the file is truncated)")
        return data[:needed]

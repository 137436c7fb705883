"""Reading a qcow2 image: guest offsets to host clusters through the L1 and L2 tables (sans-IO).

`Qcow2Image` is what all connections share: the checked header, the chosen L1 table (the
active one or a snapshot's) and a bounded cache of L2 tables and decompressed clusters.  It
reads through the `read(offset, length)` each call is given, so it never holds on to one
connection's layer.  `Qcow2Disk` is one connection's view: the image with its reader, its
backing disk and its cipher, answering reads (with the ranges that read as zeroes left as
holes) and allocation maps.

From docs/interop/qcow2.txt: "Given an offset into the virtual disk, the offset into the
image file can be obtained as follows: l2_index = (offset / cluster_size) % l2_entries;
l1_index = (offset / cluster_size) / l2_entries; l2_table = load_cluster(l1_table[l1_index]);
cluster_offset = l2_table[l2_index]".  Each L2 table is classified once, when it is loaded
(numpy over its entries), into runs of clusters of one kind that lie contiguously in the file;
a request then finds its runs by bisection, so a 2 MiB read of 4 KiB clusters costs a few
lookups, not 512 Python steps, and a sequential reader pays no per-request array work.
"""

from __future__ import annotations

import bisect
import itertools
import threading
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from enum import IntEnum
from typing import Callable, Iterator, Protocol

import numpy as np
import zstandard

from .. import inflate
from ..readers import Reader
from .errors import Qcow2Error
from .header import Header, check_table, read_header
from .snapshots import find_snapshot, read_snapshots
from .structs import (COMPRESSED_SECTOR, COMPRESSION_ZSTD, ENTRY, L1_OFFSET_MASK, L2_COMPRESSED, L2_OFFSET_MASK,
                      L2_ZERO, SUBCLUSTERS)

ReadInto = Callable[[memoryview, int], None]  # fill the buffer from this offset of the image file
Holes = list[tuple[int, int]]  # (start, length) ranges of a buffer that read as zeroes

MAX_L2_TABLES_PER_MAP = 256  # allocation maps stop after this many L2 tables (the caller asks again)
# LUKS in qcow2: 512-byte sectors, IVs from "the physical disk sector" (the host offset).
ENCRYPTION_SECTOR = 512
_UNITS = np.arange(SUBCLUSTERS, dtype=np.uint64)
_serials = itertools.count()
_DECOMPRESS_ERRORS: tuple[type[Exception], ...] = (*inflate.InflateError, zstandard.ZstdError)


class Kind(IntEnum):
    UNALLOCATED = 0  # reads from the backing file, or zeroes without one
    ZERO = 1  # "the cluster reads as all zeros"
    DATA = 2
    COMPRESSED = 3


_KINDS = tuple(Kind)  # by value
INVALID = len(_KINDS)  # a unit whose L2 entry breaks the spec: reading it is an error



@dataclass(frozen=True)
class Run:
    """`length` guest bytes at `offset` of one kind; `host` is where DATA starts in the image
    file, or a COMPRESSED cluster's descriptor (its L2 entry)."""

    offset: int
    length: int
    kind: Kind
    host: int = 0


@dataclass(frozen=True)
class TableRuns:
    """An L2 table classified into runs: run i starts at unit `starts[i]` of the table (units are
    clusters, or subclusters with extended L2), is of kind `kinds[i]` (a Kind or INVALID) and
    begins at host offset or descriptor `hosts[i]`; `span` is the guest bytes the table maps."""

    table: np.ndarray  # the entries, to explain an INVALID one
    starts: array[int]
    kinds: bytes
    hosts: array[int]
    span: int

    @property
    def nbytes(self) -> int:
        return self.table.nbytes + len(self.starts) * 17


CacheKey = tuple[int, str, int]  # (image serial, "l2" or "cluster", host offset or descriptor)
Cached = bytes | TableRuns


class ByteCache:
    """A thread-safe LRU of immutable bytes (L2 tables, decompressed clusters), bounded by
    their total size; one cache may serve several images (the images of a backing chain)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._items: OrderedDict[CacheKey, Cached] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: CacheKey) -> Cached | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: CacheKey, value: Cached) -> None:
        with self._lock:
            if key in self._items:
                return
            self._items[key] = value
            self._bytes += value.nbytes if isinstance(value, TableRuns) else len(value)
            while self._bytes > self.limit and len(self._items) > 1:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= dropped.nbytes if isinstance(dropped, TableRuns) else len(dropped)


class Qcow2Image:
    """A checked qcow2 image, its chosen L1 table and the caches, shared by connections."""

    def __init__(self, header: Header, l1: np.ndarray, disk_size: int, file_size: int, cache: ByteCache) -> None:
        self.header, self.l1, self.size, self.file_size, self.cache = header, l1, disk_size, file_size, cache
        self.serial = next(_serials)  # its part of the shared cache
        self.cluster_bits = header.cluster_bits
        self.cluster_size = header.cluster_size
        self.extended = header.extended_l2
        # A run of the same kind is made of units: clusters, or the 32 subclusters of each.
        self.unit_bits = self.cluster_bits - (5 if self.extended else 0)
        self.table_bits = self.cluster_bits + (header.l2_entries.bit_length() - 1)  # guest bytes per L2 table
        # "Compressed Clusters Descriptor (x = 62 - (cluster_bits - 8))": offset below bit x, then
        # the count of additional 512-byte sectors.
        self.compressed_shift = 62 - (self.cluster_bits - 8)
        self.compressed_offset_mask = (1 << self.compressed_shift) - 1
        self.compressed_sectors_mask = (1 << (self.cluster_bits - 8)) - 1

    # The mapping -------------------------------------------------------------------------------
    def runs(self, offset: int, length: int, read: Reader, max_tables: int | None = None) -> Iterator[Run]:
        """The runs covering guest [offset, offset + length), in order; with `max_tables`, they
        stop after that many L2 tables (allocation maps may answer part of a range)."""
        end = min(offset + length, self.size)
        position = offset
        tables = 0
        while position < end:
            index = position >> self.table_bits
            table_end = min(end, (index + 1) << self.table_bits)
            l2_offset = int(self.l1[index]) & L1_OFFSET_MASK
            if not l2_offset:
                # Unallocated L2 tables: skip to the next allocated one in one step.
                last = ((end - 1) >> self.table_bits) + 1
                allocated = np.flatnonzero(self.l1[index:last] & np.uint64(L1_OFFSET_MASK))
                table_end = end if not len(allocated) else min(end, (index + int(allocated[0])) << self.table_bits)
                yield Run(position, table_end - position, Kind.UNALLOCATED)
                position = table_end
                continue
            if max_tables is not None and tables >= max_tables:
                return
            tables += 1
            yield from self._table_runs(l2_offset, index, read, position, table_end)
            position = table_end

    def _table_runs(self, l2_offset: int, l1_index: int, read: Reader, start: int, end: int) -> Iterator[Run]:
        """The runs of guest [start, end), which lie within the L2 table of L1 entry `l1_index`:
        found by bisection in the table's runs, classified once when the table is loaded (a
        sequential reader costs a few list lookups per request, not a numpy pass)."""
        runs = self._runs_of_table(l2_offset, l1_index, read)
        base = l1_index << self.table_bits
        unit_bits = self.unit_bits
        index = bisect.bisect_right(runs.starts, (start - base) >> unit_bits) - 1
        while True:
            run_start = base + (runs.starts[index] << unit_bits)
            run_end = base + (runs.starts[index + 1] << unit_bits) if index + 1 < len(runs.starts) else base + runs.span
            lo, hi = max(start, run_start), min(end, run_end)
            kind = runs.kinds[index]
            if kind == INVALID:
                raise self._invalid_entry(runs.table, base, lo)
            host = runs.hosts[index]
            if kind == Kind.DATA:
                host += lo - run_start
            yield Run(lo, hi - lo, _KINDS[kind], host)
            if hi >= end:
                return
            index += 1

    def _runs_of_table(self, l2_offset: int, l1_index: int, read: Reader) -> TableRuns:
        runs = self.cache.get((self.serial, "l2", l2_offset))
        if runs is None:
            if l2_offset % self.cluster_size:
                raise Qcow2Error(f"L1 entry {l1_index}: the L2 table offset {l2_offset:#x} is not cluster-aligned")
            check_table(l2_offset, self.cluster_size // ENTRY, ENTRY, f"the L2 table of L1 entry {l1_index}",
                        self.cluster_size, self.file_size)
            words = np.frombuffer(read(l2_offset, self.cluster_size), dtype=">u8").astype(np.uint64)
            runs = self._classify_table(words.reshape(-1, 2) if self.extended else words)
            self.cache.put((self.serial, "l2", l2_offset), runs)
        assert isinstance(runs, TableRuns)
        return runs

    def _classify_table(self, table: np.ndarray) -> TableRuns:
        """The runs of a whole L2 table.  A run breaks where the kind changes, where data stops
        being contiguous in the file, and at each compressed cluster (each decompresses on its own)."""
        kinds, hosts = self._classify(table)
        unit = 1 << self.unit_bits
        units_per_cluster = 1 << (self.cluster_bits - self.unit_bits)
        breaks = np.ones(len(kinds), dtype=bool)
        compressed = kinds[1:] == Kind.COMPRESSED
        breaks[1:] = ((kinds[1:] != kinds[:-1])
                      | ((kinds[1:] == Kind.DATA) & (hosts[1:] != hosts[:-1] + np.uint64(unit)))
                      | (compressed & (np.arange(1, len(kinds)) % units_per_cluster == 0)))
        starts = np.flatnonzero(breaks)
        return TableRuns(table, array("q", starts.astype(np.int64).tobytes()),
                         kinds[starts].astype(np.int8).tobytes(),
                         array("Q", hosts[starts].astype(np.uint64).tobytes()), len(kinds) << self.unit_bits)

    def _classify(self, entries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per unit (cluster or subcluster) of L2 `entries`: its Kind (INVALID for entries that
        break the spec, explained by `_invalid_entry` when read) and its host offset (DATA) or
        descriptor (COMPRESSED)."""
        words = entries[:, 0] if self.extended else entries
        compressed = (words & np.uint64(L2_COMPRESSED)) != 0
        hosts = np.where(compressed, words, words & np.uint64(L2_OFFSET_MASK))
        misaligned = ~compressed & ((hosts & np.uint64(self.cluster_size - 1)) != 0)
        if not self.extended:
            zero = ~compressed & ((words & np.uint64(L2_ZERO)) != 0)
            kinds = np.where(compressed, Kind.COMPRESSED,
                             np.where(zero, Kind.ZERO, np.where(hosts != 0, Kind.DATA, Kind.UNALLOCATED)))
            return np.where(misaligned, INVALID, kinds), hosts
        # "Subcluster Allocation Bitmap: bits 0-31 allocation status, 32-63 reads as zeros".
        bitmaps = entries[:, 1][:, None]
        allocated = ((bitmaps >> _UNITS) & np.uint64(1)) != 0
        zero = ((bitmaps >> (_UNITS + np.uint64(32))) & np.uint64(1)) != 0
        compressed = np.repeat(compressed[:, None], SUBCLUSTERS, axis=1)
        has_host = np.repeat((hosts != 0)[:, None], SUBCLUSTERS, axis=1)
        invalid = (~compressed & allocated & (zero | ~has_host)) | misaligned[:, None]
        kinds = np.where(invalid, INVALID, np.where(compressed, Kind.COMPRESSED,
                         np.where(zero, Kind.ZERO, np.where(allocated, Kind.DATA, Kind.UNALLOCATED))))
        unit_hosts = np.where(compressed, hosts[:, None], hosts[:, None] + (_UNITS << np.uint64(self.unit_bits)))
        return kinds.reshape(-1), unit_hosts.reshape(-1)

    def _invalid_entry(self, table: np.ndarray, base: int, guest: int) -> Qcow2Error:
        """Why the L2 entry of guest offset `guest` (in the table of guest offset `base`) is invalid."""
        cluster = (guest - base) >> self.cluster_bits
        entry = table[cluster]
        word = int(entry[0] if self.extended else entry)
        cluster_guest = base + (cluster << self.cluster_bits)
        host = word & L2_OFFSET_MASK
        if not word & L2_COMPRESSED and host % self.cluster_size:
            return Qcow2Error(f"the L2 entry of guest offset {cluster_guest} points to host offset {host:#x}, "
                              "which is not cluster-aligned")
        subcluster = (guest - cluster_guest) >> self.unit_bits
        return Qcow2Error(f"the extended L2 entry of guest offset {cluster_guest} is invalid for subcluster "
                          f"{subcluster} (allocated, but zero or without a host cluster)")

    # Compressed clusters ---------------------------------------------------------------------
    def compressed_cluster(self, descriptor: int, read: Reader) -> bytes:
        """The decompressed cluster a compressed L2 entry describes (cached)."""
        cached = self.cache.get((self.serial, "cluster", descriptor))
        if cached is not None:
            assert isinstance(cached, bytes)
            return cached
        offset = descriptor & self.compressed_offset_mask
        sectors = ((descriptor >> self.compressed_shift) & self.compressed_sectors_mask) + 1
        # "Number of additional 512-byte sectors used for the compressed data, beyond the sector
        # containing the offset"; the last may be cut short by the end of the file.
        length = sectors * COMPRESSED_SECTOR - offset % COMPRESSED_SECTOR
        if offset >= self.file_size:
            raise Qcow2Error(f"a compressed cluster at host offset {offset:#x} starts past the end of the file "
                             f"({self.file_size} bytes)")
        data = read(offset, min(length, self.file_size - offset))
        cluster = self._decompress(data, offset)
        self.cache.put((self.serial, "cluster", descriptor), cluster)
        return cluster

    def _decompress(self, data: bytes, offset: int) -> bytes:
        """Exactly one cluster from `data`: "decompression stops when it has produced a cluster"."""
        size = self.cluster_size
        try:
            if self.header.compression_type == COMPRESSION_ZSTD:
                reader = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True)
                pieces, got = [], 0
                while got < size:
                    piece = reader.read(size - got)
                    if not piece:
                        break
                    pieces.append(piece)
                    got += len(piece)
                cluster = b"".join(pieces)
            else:
                cluster = inflate.decompressobj(-15).decompress(data, size)  # raw deflate, as qemu writes
        except _DECOMPRESS_ERRORS as e:
            raise Qcow2Error(f"the compressed cluster at host offset {offset:#x} is corrupt: {e}") from None
        if len(cluster) != size:
            raise Qcow2Error(f"the compressed cluster at host offset {offset:#x} decodes to {len(cluster)} bytes, "
                             f"not the {size}-byte cluster (its compressed size is wrong or the file is truncated)")
        return cluster


def open_image(read: Reader, file_size: int, cache: ByteCache, snapshot: str | None = None) -> Qcow2Image:
    """Check the header and load the L1 table: the active one, or the snapshot's (by id or name)."""
    header = read_header(read, file_size)
    l1_offset, l1_size, disk_size = header.l1_offset, header.l1_size, header.size
    if snapshot is not None:
        chosen = find_snapshot(read_snapshots(read, header, file_size), snapshot)
        l1_offset, l1_size, disk_size = chosen.l1_offset, chosen.l1_size, chosen.disk_size
        needed = header.l1_entries_needed(disk_size)
        if l1_size < needed:
            raise Qcow2Error(f"snapshot {snapshot!r}: its L1 table has {l1_size} entries, too few for its "
                             f"{disk_size}-byte disk (it needs {needed})")
    l1 = np.frombuffer(read(l1_offset, l1_size * ENTRY), dtype=">u8").astype(np.uint64)
    return Qcow2Image(header, l1, disk_size, file_size, cache)


class Disk(Protocol):
    """What a qcow2 image reads unallocated clusters from: its backing file (another Qcow2Disk,
    or a raw file the filter provides)."""

    size: int

    def read_into(self, buf: memoryview, offset: int) -> Holes:
        """Fill `buf` from `offset`, except the returned ranges, which read as zeroes."""
        ...

    def allocation(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """(offset, length, reads_as_zero) from `offset` on, ascending and contiguous; may stop short."""
        ...


class Cipher(Protocol):
    def decrypt(self, data: memoryview, first_sector: int) -> None: ...


class Qcow2Disk:
    """One connection's view of a qcow2 image: its file read through `read` (metadata) and
    `read_into` (data, straight into the caller's buffer), its backing disk, its cipher."""

    def __init__(self, image: Qcow2Image, read: Reader, read_into: ReadInto, backing: Disk | None = None,
                 cipher: Cipher | None = None) -> None:
        self.image, self.read, self._read_into = image, read, read_into
        self.size = image.size
        self.backing, self.cipher = backing, cipher

    def read_into(self, buf: memoryview, offset: int) -> Holes:
        holes: Holes = []
        for run in self.image.runs(offset, len(buf), self.read):
            piece = buf[run.offset - offset:run.offset - offset + run.length]
            if run.kind == Kind.DATA:
                self._read_data(piece, run.host)
            elif run.kind == Kind.COMPRESSED:
                cluster = self.image.compressed_cluster(run.host, self.read)
                start = run.offset & (self.image.cluster_size - 1)
                piece[:] = cluster[start:start + run.length]
            elif run.kind == Kind.UNALLOCATED and self.backing is not None and run.offset < self.backing.size:
                backed = min(run.length, self.backing.size - run.offset)
                for start, length in self.backing.read_into(piece[:backed], run.offset):
                    _add_hole(holes, run.offset - offset + start, length)
                if backed < run.length:  # "or the backing file is smaller than the image ... zeros"
                    _add_hole(holes, run.offset - offset + backed, run.length - backed)
            else:
                _add_hole(holes, run.offset - offset, run.length)
        return holes

    def _read_data(self, piece: memoryview, host: int) -> None:
        end = host + len(piece)
        if end > self.image.file_size:
            raise Qcow2Error(f"data at host offset {host:#x} ends at {end}, past the end of the file "
                             f"({self.image.file_size} bytes): the image is truncated")
        if self.cipher is None:
            self._read_into(piece, host)
            return
        start = host - host % ENCRYPTION_SECTOR
        stop = -(-end // ENCRYPTION_SECTOR) * ENCRYPTION_SECTOR
        sealed = memoryview(bytearray(stop - start))
        self._read_into(sealed, start)
        self.cipher.decrypt(sealed, start // ENCRYPTION_SECTOR)
        piece[:] = sealed[host - start:host - start + len(piece)]

    def allocation(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """Data, compressed and (backing) data clusters are data; zero clusters, unallocated ones
        without a backing file and what lies past its end read as zeroes (as qemu reports them)."""
        found: list[tuple[int, int, bool]] = []
        for run in self.image.runs(offset, length, self.read, MAX_L2_TABLES_PER_MAP):
            if run.kind in (Kind.DATA, Kind.COMPRESSED):
                found.append((run.offset, run.length, False))
            elif run.kind == Kind.UNALLOCATED and self.backing is not None and run.offset < self.backing.size:
                backed = min(run.length, self.backing.size - run.offset)
                below = self.backing.allocation(run.offset, backed)
                found.extend(below)
                reached = below[-1][0] + below[-1][1] if below else run.offset
                if reached < run.offset + backed:
                    break  # the backing file answered part of the range: so do we
                if backed < run.length:
                    found.append((run.offset + backed, run.length - backed, True))
            else:
                found.append((run.offset, run.length, True))
        return found


def _add_hole(holes: Holes, start: int, length: int) -> None:
    if holes and holes[-1][0] + holes[-1][1] == start:
        holes[-1] = (holes[-1][0], holes[-1][1] + length)
    else:
        holes.append((start, length))


def luks_header_reader(read: Reader, header: Header) -> tuple[Reader, int]:
    """A reader over the LUKS header inside the image and its length: "the key-material-offset
    is relative to the start of the LUKS header clusters in the qcow2 container"."""
    assert header.encryption is not None
    base, length = header.encryption

    def read_luks(offset: int, count: int) -> bytes:
        return read(base + offset, count)

    return read_luks, length

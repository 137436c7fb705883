"""What the block-mapped image formats share (VMDK, VHD, VHDX, VDI): runs of the guest disk
mapped to their file, a bounded cache of tables, and a disk layered over its parent.

A format's image (shared by all connections) maps guest ranges to `Run`s: DATA lies at `host`
in one of its files, ZERO reads as zeroes, PARENT reads from the parent disk (zeroes without
one), COMPRESSED is a grain the format decodes itself.  `LayeredDisk` is one connection's view:
the image with that connection's readers and its parent disk, answering reads (with the ranges
that read as zeroes left as holes) and allocation maps.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from enum import IntEnum
from typing import Callable, Iterator, Literal, Protocol, Sequence

import numpy as np

from .errors import FormatError
from .readers import Reader

ReadInto = Callable[[memoryview, int], None]  # fill the buffer from this offset of a file
Holes = list[tuple[int, int]]  # (start, length) ranges of a buffer that read as zeroes
Allocation = list[tuple[int, int, bool]]  # (offset, length, reads_as_zero), ascending and contiguous

MAX_MAP_BYTES = 1 << 30  # an allocation map answers at most this much at once (the client asks again)


class Kind(IntEnum):
    DATA = 0
    ZERO = 1
    PARENT = 2
    COMPRESSED = 3


@dataclass(frozen=True, slots=True)
class Run:
    """`length` guest bytes at `offset`; DATA lies at `host` in file number `file`; COMPRESSED
    is described by `host` (the format's own meaning, e.g. the sector of a VMDK grain)."""

    offset: int
    length: int
    kind: Kind
    host: int = 0
    file: int = 0


class Image(Protocol):
    """A parsed image, shared by all connections: it reads its tables through the readers each
    call is given (one per file of the image), so it never holds on to a connection."""

    size: int

    def runs(self, offset: int, length: int, files: Sequence[Reader]) -> Iterator[Run]:
        """The runs covering guest [offset, offset + length) within the disk, in order."""
        ...

    def decompress(self, run: Run, files: Sequence[Reader]) -> bytes:
        """The guest bytes of a COMPRESSED run (run.length of them), decoded from its grain."""
        ...


class Disk(Protocol):
    """What a disk reads unallocated ranges from: its parent (another LayeredDisk)."""

    size: int

    def read_into(self, buf: memoryview, offset: int) -> Holes: ...

    def allocation(self, offset: int, length: int) -> Allocation: ...


class TableCache:
    """A thread-safe LRU of immutable tables (bytes or numpy arrays), bounded by their size."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._items: OrderedDict[tuple[int, ...], bytes | np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple[int, ...], load: Callable[[], bytes | np.ndarray]) -> bytes | np.ndarray:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
                return value
        value = load()  # outside the lock: other connections go on reading meanwhile
        with self._lock:
            if key not in self._items:
                self._items[key] = value
                self._bytes += _nbytes(value)
                while self._bytes > self.limit and len(self._items) > 1:
                    self._bytes -= _nbytes(self._items.popitem(last=False)[1])
        return value


def _nbytes(value: bytes | np.ndarray) -> int:
    return value.nbytes if isinstance(value, np.ndarray) else len(value)


def read_exact(read: Reader, offset: int, length: int, what: str, error: type[FormatError]) -> bytes:
    """`length` bytes at `offset`, or `error` saying the file is truncated there."""
    data = read(offset, length)
    if len(data) != length:
        raise error(f"{what} at offset {offset} ({length} bytes) lies past the end of the file: "
                    "the image is truncated")
    return data


def block_spans(start: int, end: int, block_size: int) -> Iterator[tuple[int, int, int, int]]:
    """Guest [start, end) cut at block boundaries: (block, offset within it, span start, span end)."""
    position = start
    while position < end:
        block, within = divmod(position, block_size)
        span_end = min(end, (block + 1) * block_size)
        yield block, within, position, span_end
        position = span_end


def bitmap_runs(bitmap: bytes, bitorder: Literal["big", "little"], first_sector: int, sector_size: int, start: int, end: int,
                present: Run) -> Iterator[Run]:
    """Split the DATA run `present` of guest [start, end) by a sector bitmap: set sectors read
    from `present`, clear ones from the parent.  The bitmap's first bit is sector `first_sector`;
    `bitorder` is "big" when that bit is the most significant of its byte (VHD), "little" when it
    is the least (VHDX)."""
    bits = np.unpackbits(np.frombuffer(bitmap, dtype=np.uint8), bitorder=bitorder)
    lo, hi = start // sector_size - first_sector, -(-end // sector_size) - first_sector
    window = bits[lo:hi]
    if len(window) != hi - lo:
        raise FormatError(f"a sector bitmap of {len(bits)} bits does not cover sectors {lo}-{hi}")
    changes = np.flatnonzero(window[1:] != window[:-1]) + 1
    edges = [0, *changes.tolist(), len(window)]
    for a, b in zip(edges, edges[1:]):
        run_start = max(start, (first_sector + lo + a) * sector_size)
        run_end = min(end, (first_sector + lo + b) * sector_size)
        if window[a]:
            yield Run(run_start, run_end - run_start, Kind.DATA, present.host + run_start - present.offset,
                      present.file)
        else:
            yield Run(run_start, run_end - run_start, Kind.PARENT)


class LayeredDisk:
    """One connection's view of an image: its files' readers and its parent disk (or None)."""

    def __init__(self, image: Image, files: Sequence[Reader], files_into: Sequence[ReadInto],
                 parent: Disk | None = None) -> None:
        self.image, self.files, self.files_into, self.parent = image, files, files_into, parent
        self.size = image.size

    def read_into(self, buf: memoryview, offset: int) -> Holes:
        holes: Holes = []
        for run in self._merged(offset, len(buf)):
            piece = buf[run.offset - offset:run.offset - offset + run.length]
            if run.kind == Kind.DATA:
                self.files_into[run.file](piece, run.host)
            elif run.kind == Kind.COMPRESSED:
                piece[:] = self.image.decompress(run, self.files)
            elif run.kind == Kind.PARENT and self.parent is not None and run.offset < self.parent.size:
                backed = min(run.length, self.parent.size - run.offset)
                for start, length in self.parent.read_into(piece[:backed], run.offset):
                    _add_hole(holes, run.offset - offset + start, length)
                if backed < run.length:  # a parent smaller than its child reads as zeroes past its end
                    _add_hole(holes, run.offset - offset + backed, run.length - backed)
            else:
                _add_hole(holes, run.offset - offset, run.length)
        return holes

    def allocation(self, offset: int, length: int) -> Allocation:
        """Data and compressed runs are data; zero runs, parent runs without a parent and what lies
        past the parent's end read as zeroes (as qemu reports them)."""
        found: Allocation = []
        for run in self._merged(offset, min(length, MAX_MAP_BYTES)):
            if run.kind in (Kind.DATA, Kind.COMPRESSED):
                _add_extent(found, run.offset, run.length, False)
            elif run.kind == Kind.PARENT and self.parent is not None and run.offset < self.parent.size:
                backed = min(run.length, self.parent.size - run.offset)
                below = self.parent.allocation(run.offset, backed)
                for start, size, zero in below:
                    _add_extent(found, start, size, zero)
                reached = below[-1][0] + below[-1][1] if below else run.offset
                if reached < run.offset + backed:
                    break  # the parent answered part of the range: so do we
                if backed < run.length:
                    _add_extent(found, run.offset + backed, run.length - backed, True)
            else:
                _add_extent(found, run.offset, run.length, True)
        return found

    def _merged(self, offset: int, length: int) -> Iterator[Run]:
        """The image's runs, with DATA runs that follow one another in the same file joined, so
        a large read is one read of the file where the image is laid out in order."""
        pending: Run | None = None
        for run in self.image.runs(offset, length, self.files):
            if (pending is not None and run.kind == Kind.DATA and pending.kind == Kind.DATA
                    and run.file == pending.file and run.host == pending.host + pending.length):
                pending = Run(pending.offset, pending.length + run.length, Kind.DATA, pending.host, pending.file)
                continue
            if pending is not None:
                yield pending
            pending = run
        if pending is not None:
            yield pending


def _add_hole(holes: Holes, start: int, length: int) -> None:
    if holes and holes[-1][0] + holes[-1][1] == start:
        holes[-1] = (holes[-1][0], holes[-1][1] + length)
    else:
        holes.append((start, length))


def _add_extent(found: Allocation, offset: int, length: int, zero: bool) -> None:
    if found and found[-1][2] == zero and found[-1][0] + found[-1][1] == offset:
        found[-1] = (found[-1][0], found[-1][1] + length, zero)
    else:
        found.append((offset, length, zero))

"""What the gzip, xz and zstd filters share: a read-only view of decompressed data.
(`SourceHandle`, that view, also serves the zip filter's deflated members and the archive
filter's unpacked ones.)

A filter subclasses `DecompressFilter` and implements `load(below, reader)`, which inspects
the compressed data once per export and returns a `Source` (the uncompressed size and a
`read_into`).  Sources are shared by all connections to the same export and must be
thread-safe; each call is given the calling connection's reader, so a source never keeps a
closed connection's layer.  The default export is loaded at start-up, so bad input is a
start-up error and the first client does not wait.
"""

from __future__ import annotations

import bisect
import errno
import logging
import os
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from ..api.chain import NONE, Filter, FilterHandle, Layer, OpenNext
from ..api.errors import ConfigError, NBDError
from ..api.params import Param, Size
from ..formats.errors import FormatError, check_size
from ..formats.readers import Reader
from ._format_errors import nbd_error
from ._layer_bytes import read_bytes
from ._spill import ChunkDecoder, InOrder, Spill

log = logging.getLogger(__name__)

MIN_CACHE_BYTES = 96 << 20  # a block cache may keep more than its depth of units up to this


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class ReadAhead:
    """The server's read-ahead threads: one per core, shared by every BlockSource (every xz and
    zstd export), so at most that many units are decoded ahead at once server-wide (lzma and
    zstandard release the GIL: they decode in parallel, on the other cores).

    Started at the first read-ahead; stop() (the filters' cleanup, when the server exits) ends
    them.  Each job reads through the reader of the connection that asked for it, so a
    connection that closes first withdraws its jobs and waits for its running ones (release()).
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.cond = threading.Condition()
        self.jobs: deque[tuple["BlockSource", Unit, Reader]] = deque()
        self.running: list[tuple["BlockSource", Unit, Reader]] = []
        self.threads: list[threading.Thread] = []
        self.stopping = False

    def submit(self, source: "BlockSource", unit: Unit, reader: Reader) -> bool:
        """Queue a job; False when the pool is stopping (the caller gives back its reservation)."""
        with self.cond:
            if self.stopping:
                return False
            self.threads = [t for t in self.threads if t.is_alive()]
            if len(self.threads) < self.workers:
                thread = threading.Thread(target=self._work, name="decompress-read-ahead", daemon=True)
                self.threads.append(thread)
                thread.start()
            self.jobs.append((source, unit, reader))
            self.cond.notify()
            return True

    def _work(self) -> None:
        while True:
            with self.cond:
                while not self.jobs and not self.stopping:
                    self.cond.wait()
                if self.stopping:
                    return
                job = self.jobs.popleft()
                self.running.append(job)
            try:
                job[0].prefetch(job[1], job[2])
            finally:
                with self.cond:
                    self.running.remove(job)
                    self.cond.notify_all()

    def release(self, reader: Reader) -> None:
        """A connection closes: drop its queued jobs, wait for its running ones."""
        with self.cond:
            dropped = [job for job in self.jobs if job[2] is reader]
            for job in dropped:
                self.jobs.remove(job)
            while any(job[2] is reader for job in self.running):
                self.cond.wait()
        for source, unit, _ in dropped:
            source.withdraw(unit)

    def stop(self, timeout: float = 30.0) -> None:
        """End the threads (running decodes finish first); a later submit() starts them again."""
        with self.cond:
            self.stopping = True
            dropped, self.jobs = list(self.jobs), deque()
            threads, self.threads = self.threads, []
            self.cond.notify_all()
        for source, unit, _ in dropped:
            source.withdraw(unit)
        for thread in threads:
            thread.join(timeout)
        with self.cond:
            self.stopping = False
        if threads:
            log.debug("decompress: %d read-ahead threads stopped", len(threads))


READ_AHEAD = ReadAhead(_cores())

class Source(Protocol):
    """Read-only data of a known size, shared by all connections (so thread-safe)."""

    @property
    def size(self) -> int | None:
        """None until decoding has found it; known before any handle serves the source."""

    def read_into(self, buf: memoryview, offset: int, reader: Any) -> None: ...


class DecompressError(FormatError):
    """The compressed data is corrupt, truncated or unsupported (the message says which)."""


def layer_reader(layer: Layer) -> Reader:
    """read(offset, length) over a layer: short at the end of the data, chunked for big reads."""

    def read(offset: int, length: int) -> bytes:
        return read_bytes(layer, offset, max(0, min(length, layer.get_size() - offset)))

    return read


def read_exact(reader: Reader, offset: int, length: int, what: str) -> bytes:
    data = reader(offset, length)
    if len(data) != length:
        raise DecompressError(f"truncated file: {what} at offset {offset} needs {length} bytes, "
                              f"only {len(data)} are there")
    return data


class SourceHandle(FilterHandle):
    """A connection's read-only view of a Source shared by all connections; `reader` is what
    the source reads its input through on this connection (a Reader over the layer below,
    or the layer itself for the archive filter's spills)."""

    def __init__(self, filter: Filter, next: Layer, source: Source, reader: Any, cache_mode: int = NONE) -> None:
        self.filter, self.next = filter, next
        self.source, self.reader = source, reader
        self.cache_mode = cache_mode  # EMULATE where reading ahead pays (it fills a spill or an index)

    def get_size(self) -> int:
        size = self.source.size
        assert size is not None, "a source is served only once its size is known"
        return size

    def block_size(self) -> tuple[int, int, int] | None:
        return None

    def can_write(self) -> bool:
        return False

    def can_flush(self) -> bool:
        return False

    def can_trim(self) -> bool:
        return False

    def can_zero(self) -> int:
        return NONE

    def can_fast_zero(self) -> bool:
        return False

    def can_fua(self) -> int:
        return NONE

    def can_extents(self) -> bool:
        return False

    def can_cache(self) -> int:
        return self.cache_mode

    def can_multi_conn(self) -> bool:
        return True  # read-only: every connection sees the same bytes

    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        try:
            self.source.read_into(buf, offset, self.reader)
        except (FormatError, MemoryError) as e:
            raise nbd_error(e) from None

    def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        raise NBDError(errno.EROFS, f"{self.filter.name}: the data is read-only")

    def flush(self, flags: int) -> None:
        pass

    def close(self) -> None:
        release = getattr(self.source, "release", None)
        if release is not None:  # no read-ahead uses this connection's reader once it is closed
            release(self.reader)


class DecompressFilter(Filter):
    """Base of the decompressing filters (read-only; one shared Source per export)."""

    max_size = Param(Size(minimum=1), key="max-size",
                     help="Refuse data that decompresses to more than this (decompression bomb "
                          "protection); default: no limit beyond the size the file declares")

    def get_ready(self) -> None:
        self._sources: dict[str, Source] = {}
        self._loading: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        try:
            below = self.open_below(True, "")
        except (NBDError, OSError) as e:
            log.debug("%s: cannot open the layer below at start-up (%s); loading at connection", self.name, e)
            return
        try:
            self.source_for(below, "")
        except NBDError as e:
            raise ConfigError(str(e)) from None
        finally:
            below.close()

    def cleanup(self) -> None:
        READ_AHEAD.stop()  # the server exits: its read-ahead threads end

    def load(self, below: Layer, reader: Reader) -> Source:
        """Inspect the compressed data (size, index); raise a FormatError or NBDError."""
        raise NotImplementedError

    def source_for(self, below: Layer, export_name: str) -> Source:
        with self._lock:
            source = self._sources.get(export_name)
            if source is not None:
                return source
            loading = self._loading.setdefault(export_name, threading.Lock())
        with loading:  # one load per export, even when clients connect at once
            with self._lock:
                source = self._sources.get(export_name)
            if source is None:
                try:
                    source = self.load(below, layer_reader(below))
                except (FormatError, MemoryError) as e:
                    raise nbd_error(e, f"{self.name}: ") from None
                except NBDError as e:
                    raise NBDError(e.errno, f"{self.name}: {e}") from None
                size = source.size
                assert size is not None, "load() returns a source whose size is known"
                try:
                    check_size(size, "the uncompressed size")
                except FormatError as e:
                    raise nbd_error(e, f"{self.name}: ") from None
                if self.max_size is not None and size > self.max_size:
                    raise NBDError(errno.EFBIG, f"{self.name}: the data decompresses to {source.size} "
                                                f"bytes, more than max-size={self.max_size}")
                with self._lock:
                    self._sources[export_name] = source
            return source

    def open(self, next_open: OpenNext, readonly: bool, export_name: str) -> FilterHandle:
        # Decompressed data is read-only: the layer below is opened read-only too.
        return super().open(next_open, True, export_name)

    class Handle(SourceHandle):
        def __init__(self, filter: "DecompressFilter", next: Layer, readonly: bool, export_name: str) -> None:
            super().__init__(filter, next, filter.source_for(next, export_name), layer_reader(next))


@dataclass(frozen=True)
class Unit:
    """An independently decodable piece: an xz block, a zstd frame."""

    out: int  # uncompressed offset
    size: int  # uncompressed size
    offset: int  # compressed offset
    length: int  # compressed length
    number: int  # for messages


class BlockSource:
    """A Source made of independently decodable units, decoded whole and kept in an LRU cache.

    `decode(unit, reader)` returns a unit's output; units larger than `max_unit` are instead
    decoded on demand into a spill file through `stream(unit)`, a ChunkDecoder.

    Once a read passes the middle of a unit, the next units are decoded ahead by the server's
    read-ahead threads (READ_AHEAD), up to one per core and at most max_depth - 1, so a
    sequential reader finds them ready.  Only while fewer connections read the source than
    there are read-ahead threads: with as many, each connection's own decoding keeps every core
    busy, and nbdcopy's connections, each copying its own 128 MiB region, made the read-ahead
    decode the first units of the next region, long read and evicted, a second time (3 of 32
    units of a 512 MiB xz image).  Units being decoded ahead count in the cache limit
    from the moment they are queued: cached plus ahead stays within max_depth units (or
    MIN_CACHE_BYTES), the least recently used units going first.  Beyond that, memory holds
    only the units that requests are decoding themselves (at most one per request thread).
    A unit whose read-ahead failed (corrupt) is not tried ahead again; the read that needs it
    decodes it and fails with EIO.
    """

    def __init__(self, name: str, units: list[Unit], decode: Callable[[Unit, Reader], bytes],
                 stream: Callable[[Unit], ChunkDecoder], max_unit: int, max_depth: int, unit_word: str = "block") -> None:
        self.name, self.unit_word = name, unit_word
        self.units = units
        self.outs = [u.out for u in units]
        self.size = units[-1].out + units[-1].size if units else 0
        self.decode, self.stream = decode, stream
        self.max_unit, self.max_depth = max_unit, max_depth
        self.cache: OrderedDict[int, bytes] = OrderedDict()
        self.cached_bytes = 0
        self.spills: dict[int, Spill] = {}
        self.lock = threading.Lock()
        self.unit_locks: dict[int, threading.Lock] = {}
        self.ahead = min(READ_AHEAD.workers, max_depth - 1)
        self.reserved: dict[int, int] = {}  # units queued or being decoded ahead: number -> size
        self.reserved_bytes = 0
        self.failed: set[int] = set()  # units whose read-ahead failed: not tried ahead again
        self.readers: set[int] = set()  # the connections that have read (ids of their readers)

    def read_into(self, buf: memoryview, offset: int, reader: Reader) -> None:
        end = offset + len(buf)
        if end > self.size:
            raise NBDError(errno.EIO, f"{self.name}: read beyond the end ({self.size} bytes)")
        index = bisect.bisect_right(self.outs, offset) - 1
        self.readers.add(id(reader))
        position = offset
        while position < end:
            unit = self.units[index]
            lo, hi = position - unit.out, min(end, unit.out + unit.size) - unit.out
            target = buf[position - offset:position - offset + hi - lo]
            if unit.size > self.max_unit:
                self._spill(unit).read_into(target, lo, reader)
            else:
                target[:] = memoryview(self._unit_data(unit, reader))[lo:hi]
                if hi * 2 > unit.size and self.ahead > 0 and len(self.readers) < READ_AHEAD.workers:
                    self._read_ahead(index + 1, reader)
            position += hi - lo
            index += 1

    def release(self, reader: Reader) -> None:
        """The connection reading through `reader` closes: no read-ahead uses it afterwards."""
        self.readers.discard(id(reader))
        READ_AHEAD.release(reader)

    def _over_limit(self, units: int, size: int) -> bool:
        return units > self.max_depth and size > MIN_CACHE_BYTES

    def _evict(self, extra_units: int = 0, extra_bytes: int = 0) -> None:
        """Drop least recently used units until cached + ahead (+ extra) is within the limit.
        Small units (1 MiB zstd frames) get MIN_CACHE_BYTES: readers with many requests in
        flight (nbdcopy: 4 connections x 16 MiB) would thrash N units.  Caller holds the lock."""
        while self.cache and self._over_limit(len(self.cache) + len(self.reserved) + extra_units,
                                              self.cached_bytes + self.reserved_bytes + extra_bytes):
            self.cached_bytes -= len(self.cache.popitem(last=False)[1])

    def _read_ahead(self, index: int, reader: Reader) -> None:
        """Queue the next units not cached, being decoded or failed, while fewer than `ahead`
        are queued; each is reserved in the cache limit (making room if need be)."""
        for unit in self.units[index:index + self.ahead]:
            with self.lock:
                if len(self.reserved) >= self.ahead:
                    return
                decoding = self.unit_locks.get(unit.number)
                if (unit.number in self.reserved or unit.number in self.cache or unit.number in self.failed
                        or unit.size > self.max_unit or (decoding is not None and decoding.locked())):
                    continue
                self._evict(1, unit.size)
                if self._over_limit(len(self.cache) + len(self.reserved) + 1,
                                    self.cached_bytes + self.reserved_bytes + unit.size):
                    return  # no room even with the cache empty
                self.reserved[unit.number] = unit.size
                self.reserved_bytes += unit.size
            if not READ_AHEAD.submit(self, unit, reader):
                self.withdraw(unit)
                return

    def withdraw(self, unit: Unit) -> None:
        """A queued read-ahead is dropped or done: give back its reservation."""
        with self.lock:
            size = self.reserved.pop(unit.number, None)
            if size is not None:
                self.reserved_bytes -= size

    def prefetch(self, unit: Unit, reader: Reader) -> None:
        """Decode `unit` ahead (on a read-ahead thread); errors are left to the read that needs it."""
        try:
            self._unit_data(unit, reader, ahead=True)
        except Exception as e:  # corrupt: the read that needs the unit decodes it again and fails
            with self.lock:
                self.failed.add(unit.number)
            log.debug("%s: read-ahead of %s %d failed: %s", self.name, self.unit_word, unit.number, e)
        finally:
            self.withdraw(unit)

    def _unit_data(self, unit: Unit, reader: Reader, ahead: bool = False) -> bytes:
        with self.lock:
            data = self.cache.get(unit.number)
            if data is not None:
                self.cache.move_to_end(unit.number)
                return data
            unit_lock = self.unit_locks.setdefault(unit.number, threading.Lock())
        with unit_lock:  # decode each unit once even when several readers want it
            with self.lock:
                data = self.cache.get(unit.number)
            if data is None:
                data = self.decode(unit, reader)
                if len(data) != unit.size:
                    raise NBDError(errno.EIO, f"{self.name}: {self.unit_word} {unit.number} decodes to {len(data)} "
                                              f"bytes, not the {unit.size} its index says")
                with self.lock:
                    if ahead:  # its reservation becomes the cached unit
                        size = self.reserved.pop(unit.number, None)
                        if size is not None:
                            self.reserved_bytes -= size
                    self.cache[unit.number] = data
                    self.cached_bytes += len(data)
                    self._evict()
        return data

    def _spill(self, unit: Unit) -> Spill:
        with self.lock:
            spill = self.spills.get(unit.number)
            if spill is None:
                log.info("%s: %s %d is %d bytes, more than the cache limit %d: decoding it into a "
                         "spill file on demand", self.name, self.unit_word, unit.number, unit.size, self.max_unit)
                spill = self.spills[unit.number] = Spill(InOrder(self.stream(unit)), unit.size,
                                                         f"{self.name} {self.unit_word} {unit.number}")
            return spill

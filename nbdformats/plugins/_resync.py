"""The mirror's online rebuild of a stale copy (the target) while clients keep reading and writing.

From the moment a rebuild starts, client writes go to the target too (as to a copy in sync, but it
does not count for write-quorum and is not read).  The rebuild copies the disk from a copy in sync:
for each span of chunks marked in its dirty map (at first, all of them) it asks the source which ranges
read as zeroes (block status) and zeroes them on the target, then copies the rest in pieces of 1 MiB.
A client write that overlaps the copy of a range in time may reach the target before or after the copy
does, so the chunks it wrote there are marked again (`WriteTracker.copying`) and the next pass copies
them again.  Copying a range takes milliseconds, so such writes are few and each pass has less to do;
once at most LAST_STEP_BYTES are marked, new writes wait while the rest is copied and the target is
flushed and made a copy in sync.

resync-rate= limits the bytes of data copied per second (zeroed ranges are not counted).  Memory is
bounded: one byte per chunk (chunks are 1 MiB, larger on disks over 1 TiB) and one 1 MiB buffer.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import threading
import time
from typing import Callable, Iterator

from ..api.errors import NBDError
from ..api.zeroes import write_zeroes
from ..client import NBDClient, wait_all
from ..protocol import wire as P

log = logging.getLogger("nbdformats")

MIB = 1024 * 1024
MOST_CHUNKS = 1 << 20  # the dirty map holds at most this many chunks (1 MiB of memory)
SPAN_CHUNKS = 64  # chunks taken from the map at once (one block status request for them)
COPY_PIECE = MIB  # data copied at once: a client write races with a copy only while it lasts
LAST_STEP_BYTES = 16 * MIB  # at most this much is copied while writes wait
PROGRESS_INTERVAL = 10.0  # seconds between progress lines in the log


def chunk_size(disk_size: int) -> int:
    """1 MiB, or the power of two that keeps the dirty map within MOST_CHUNKS."""
    chunk = MIB
    while chunk * MOST_CHUNKS < disk_size:
        chunk *= 2
    return chunk


class DirtyMap:
    """The chunks a rebuild must copy (again): one byte per chunk, 1 if marked."""

    def __init__(self, size: int, chunk: int) -> None:
        self.size, self.chunk = size, chunk
        self._marks = bytearray(b"\x01") * -(-size // chunk)  # everything is to copy at first
        self._lock = threading.Lock()

    def mark(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        first, end = offset // self.chunk, (offset + length - 1) // self.chunk + 1
        with self._lock:
            self._marks[first:end] = b"\x01" * (end - first)

    def take(self, start: int, most: int) -> tuple[int, int] | None:
        """The next marked run of chunks from chunk `start` (at most `most`), unmarked: (first chunk,
        count), or None if none is marked from there."""
        with self._lock:
            first = self._marks.find(1, start)
            if first < 0:
                return None
            end = self._marks.find(0, first, first + most)
            if end < 0:
                end = min(first + most, len(self._marks))
            self._marks[first:end] = bytes(end - first)
            return first, end - first

    def marked_bytes(self) -> int:
        with self._lock:
            return self._marks.count(1) * self.chunk


def overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


class WriteTracker:
    """Client writes as a rebuild sees them: which are in flight, and which overlap a copy in time.

    Every write (write, zero, trim) runs inside `tracking()`, and every copy of a range inside
    `copying()`: when the copy ends, the writes that overlap its range and were in flight when it began,
    or started before it ended, are marked in the dirty map.  `held()` makes new writes wait and waits
    for those in flight.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._in_flight: dict[int, tuple[int, int]] = {}  # [start, end) of each write in flight
        self._keys = itertools.count()
        self._copying: tuple[int, int] | None = None
        self._raced: list[tuple[int, int]] = []  # the writes that overlap it
        self._held = False

    @contextlib.contextmanager
    def tracking(self, offset: int, length: int) -> Iterator[None]:
        written = (offset, offset + length)
        with self._changed:
            while self._held:
                self._changed.wait()
            key = next(self._keys)
            self._in_flight[key] = written
            if self._copying is not None and overlap(self._copying, written):
                self._raced.append(written)
        try:
            yield
        finally:
            with self._changed:
                del self._in_flight[key]
                if not self._in_flight:
                    self._changed.notify_all()

    @contextlib.contextmanager
    def copying(self, dirty: DirtyMap, start: int, end: int) -> Iterator[None]:
        with self._changed:
            self._copying = (start, end)
            self._raced = [written for written in self._in_flight.values() if overlap(written, self._copying)]
        try:
            yield
        finally:
            with self._changed:
                raced, self._copying, self._raced = self._raced, None, []
            for written_start, written_end in raced:
                dirty.mark(max(start, written_start), min(end, written_end) - max(start, written_start))

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        with self._changed:
            self._held = True
            while self._in_flight:
                self._changed.wait()
        try:
            yield
        finally:
            with self._changed:
                self._held = False
                self._changed.notify_all()


class Stopped(Exception):
    """The mirror is stopping: the rebuild gave up where it was."""


class Rebuild:
    """Makes `target` hold what the copies in sync hold, then calls `rejoin()` (see the module's doc).

    `source()` gives the connection to a copy in sync, asked again for every span (the copy it was may
    have failed meanwhile).  Any failure raises (NBDError) and the rebuild starts over later.
    """

    def __init__(self, name: str, size: int, target: NBDClient, source: Callable[[], NBDClient],
                 writes: WriteTracker, rejoin: Callable[[], None], rate: int, stopping: threading.Event) -> None:
        self.name = name  # "server 1 (/tmp/b.sock)"
        self.size = size
        self.target = target
        self.source = source
        self.writes = writes
        self.rejoin = rejoin
        self.rate = rate  # data bytes per second, 0 for no limit
        self.stopping = stopping
        self.failure: str | None = None  # why a client write to the target failed
        self._buffer = memoryview(bytearray(COPY_PIECE))
        self.started = time.monotonic()
        self.copied = self.zeroed = 0  # bytes of data copied, of ranges zeroed
        self._rate_clock = self.started  # when the data copied so far may have been copied at `rate`
        self._reported = self.started
        self.pass_number, self.position = 1, 0  # where the copy is

    def status(self) -> dict[str, object]:
        """For --stats-json: where the rebuild is and how fast it goes."""
        seconds = time.monotonic() - self.started
        return {"server": self.name, "pass": self.pass_number, "position": self.position, "size": self.size,
                "copied": self.copied, "zeroed": self.zeroed, "seconds": round(seconds, 3),
                "copied_mib_per_s": round(self.copied / MIB / max(seconds, 1e-3), 1)}

    def fail(self, reason: str) -> None:
        """A client write to the target failed: the rebuild stops at its next step."""
        self.failure = reason

    def _check(self) -> None:
        if self.stopping.is_set():
            raise Stopped
        if self.failure is not None:
            raise NBDError(errno.EIO, f"a write to it failed: {self.failure}")

    def run(self) -> None:
        dirty = DirtyMap(self.size, chunk_size(self.size))
        passes = 1
        while True:
            self._copy_marked(dirty, pass_number=passes, limited=True)
            self._flush_target()  # most data durable before writes are held for the last step
            left = dirty.marked_bytes()
            if left <= LAST_STEP_BYTES:
                break
            passes += 1
            log.info("mirror: rebuilding %s: pass %d: copying again the %d MiB written while they were copied",
                     self.name, passes, left // MIB)
        with self.writes.held():
            self._copy_marked(dirty, pass_number=passes, limited=False)
            self._flush_target()
            self._check()
            self.rejoin()
        seconds = time.monotonic() - self.started
        log.info("mirror: %s rebuilt in %.1f s and %d pass%s: %d MiB of data copied (%.0f MiB/s), %d MiB "
                 "zeroed", self.name, seconds, passes, "es" if passes > 1 else "", self.copied // MIB,
                 self.copied / MIB / max(seconds, 1e-3), self.zeroed // MIB)

    def _flush_target(self) -> None:
        if self.target.can_flush:
            self.target.flush()

    def _copy_marked(self, dirty: DirtyMap, pass_number: int, limited: bool) -> None:
        chunk = dirty.chunk
        position = 0
        while (run := dirty.take(position, SPAN_CHUNKS)) is not None:
            self._check()
            first, count = run
            start, end = first * chunk, min(self.size, (first + count) * chunk)
            source = self.source()
            self.pass_number, self.position = pass_number, start
            with self.writes.copying(dirty, start, end):  # from asking which ranges read as zeroes to zeroing them
                extents = list(self._extents(source, start, end))
                for offset, length, zero in extents:
                    if zero:
                        self._zero(offset, length)
            for offset, length, zero in extents:
                if not zero:
                    self._copy(dirty, source, offset, length, limited)
            position = first + count
            self.pass_number, self.position = pass_number, end
            self._report(pass_number, end)

    @staticmethod
    def _extents(source: NBDClient, start: int, end: int) -> Iterator[tuple[int, int, bool]]:
        """(offset, length, reads as zeroes) over [start, end), as the source's block status says."""
        position = start
        while position < end and source.can_block_status:
            extents = source.block_status(end - position, position)
            if not extents:
                break
            for length, state in extents:
                length = min(length, end - position)
                yield position, length, bool(state & P.STATE_ZERO)
                position += length
                if position >= end:
                    return
        if position < end:  # no block status: everything is data
            yield position, end - position, False

    def _zero(self, offset: int, length: int) -> None:
        target = self.target
        if target.can_zero:
            target.zero(length, offset)  # without NO_HOLE: the target may punch a hole
        else:
            write_zeroes(lambda buf, at, flags: target.pwrite(buf, at), length, offset)
        self.zeroed += length

    def _copy(self, dirty: DirtyMap, source: NBDClient, offset: int, length: int, limited: bool) -> None:
        for at in range(offset, offset + length, COPY_PIECE):
            self._check()
            buf = self._buffer[:min(COPY_PIECE, offset + length - at)]
            with self.writes.copying(dirty, at, at + len(buf)):
                wait_all(source.submit_split(P.CMD_READ, at, len(buf), into=buf))
                wait_all(self.target.submit_split(P.CMD_WRITE, at, len(buf), payload=buf))
            self.copied += len(buf)
            self.position = at + len(buf)
            if limited:
                self._keep_to_rate(len(buf))

    def _keep_to_rate(self, nbytes: int) -> None:
        if not self.rate:
            return
        self._rate_clock = max(self._rate_clock, time.monotonic()) + nbytes / self.rate
        wait = self._rate_clock - time.monotonic()
        if wait > 0 and self.stopping.wait(wait):
            raise Stopped

    def _report(self, pass_number: int, position: int) -> None:
        now = time.monotonic()
        if now - self._reported < PROGRESS_INTERVAL:
            return
        self._reported = now
        speed = self.copied / MIB / max(now - self.started, 1e-3)
        if pass_number == 1:
            log.info("mirror: rebuilding %s: %d%% (%d of %d MiB), %d MiB of data copied at %.0f MiB/s",
                     self.name, 100 * position // max(self.size, 1), position // MIB, self.size // MIB,
                     self.copied // MIB, speed)
        else:
            log.info("mirror: rebuilding %s: pass %d at %d of %d MiB, %d MiB of data copied at %.0f MiB/s",
                     self.name, pass_number, position // MIB, self.size // MIB, self.copied // MIB, speed)

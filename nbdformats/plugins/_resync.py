"""The mirror's online rebuild of a stale copy, while clients keep reading and writing.

Client writes go to the copies in sync only.  Each marks the chunks it touched in a dirty map once it is
done on them (before it is acknowledged), and the rebuild clears a chunk's mark before it reads that
chunk from a copy in sync, so a chunk written after its copy started is copied again:

1. The map starts with every chunk marked.  A pass takes the marked chunks in order, asks a copy in sync
   which of them read as zeroes (block status), zeroes those on the target and copies the rest; the
   next pass copies what was written meanwhile, and so on while more than LAST_STEP_BYTES are marked.
2. Then new writes wait (`WriteTracker.held`) and the rebuild waits for those in flight, copies the few
   chunks still marked, flushes the target and makes it a copy in sync: the writes that follow go to it.

resync-rate= limits the bytes of data copied per second (zeroed ranges are not counted).  Memory is
bounded: one byte per chunk (chunks are at least 1 MiB, more on disks over 1 TiB) and two copy buffers.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Callable, Iterator

from ..api.zeroes import write_zeroes
from ..client import Command, NBDClient, wait_all
from ..protocol import wire as P

log = logging.getLogger("nbdformats")

MIB = 1024 * 1024
MOST_CHUNKS = 1 << 20  # the dirty map holds at most this many chunks (1 MiB of memory)
SPAN_CHUNKS = 64  # chunks taken from the map at once (one block status request for them)
COPY_PIECE = 4 * MIB  # data is read into one buffer while the other is written
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


class WriteTracker:
    """What a rebuild needs to know of client writes: where they wrote, and a moment when none is in flight.

    Every write (write, zero, trim) runs inside `tracking()`: when it is done, failed or not, its range
    is marked in `dirty`, the map of the rebuild running if any.  `held()` makes new writes wait and
    waits for those in flight (the rebuild's last step).
    """

    def __init__(self) -> None:
        self.dirty: DirtyMap | None = None
        self._changed = threading.Condition()
        self._in_flight = 0
        self._held = False

    @contextlib.contextmanager
    def tracking(self, offset: int, length: int) -> Iterator[None]:
        with self._changed:
            while self._held:
                self._changed.wait()
            self._in_flight += 1
        try:
            yield
        finally:
            dirty = self.dirty
            if dirty is not None:
                dirty.mark(offset, length)
            with self._changed:
                self._in_flight -= 1
                if not self._in_flight:
                    self._changed.notify_all()

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
    have failed meanwhile).  Any failure raises (NBDError, OSError) and the rebuild starts over later.
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
        self._buffers = [memoryview(bytearray(COPY_PIECE)) for _ in range(2)]
        self.started = time.monotonic()
        self.copied = self.zeroed = 0  # bytes of data copied, of ranges zeroed
        self._rate_clock = self.started  # when the data copied so far may have been copied at `rate`
        self._reported = self.started

    def run(self) -> None:
        dirty = DirtyMap(self.size, chunk_size(self.size))
        self.writes.dirty = dirty
        try:
            passes = 1
            while True:
                self._copy_marked(dirty, pass_number=passes, limited=True)
                self._flush_target()  # most data durable before writes are held for the last step
                left = dirty.marked_bytes()
                if left <= LAST_STEP_BYTES:
                    break
                passes += 1
                log.info("mirror: rebuilding %s: pass %d: copying the %d MiB written during the last pass",
                         self.name, passes, left // MIB)
            with self.writes.held():
                self._copy_marked(dirty, pass_number=passes, limited=False)
                self._flush_target()
                self.rejoin()
        finally:
            self.writes.dirty = None
        seconds = time.monotonic() - self.started
        log.info("mirror: %s rebuilt in %.1f s: %d MiB of data copied (%.0f MiB/s), %d MiB of zeroes, "
                 "%d passes", self.name, seconds, self.copied // MIB, self.copied / MIB / max(seconds, 1e-3),
                 self.zeroed // MIB, passes)

    def _flush_target(self) -> None:
        if self.target.can_flush:
            self.target.flush()

    def _copy_marked(self, dirty: DirtyMap, pass_number: int, limited: bool) -> None:
        chunk = dirty.chunk
        position = 0
        while (run := dirty.take(position, SPAN_CHUNKS)) is not None:
            if self.stopping.is_set():
                raise Stopped
            first, count = run
            start, end = first * chunk, min(self.size, (first + count) * chunk)
            source = self.source()
            for offset, length, zero in self._extents(source, start, end):
                if zero:
                    self._zero(offset, length)
                else:
                    self._copy(source, offset, length, limited)
            position = first + count
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

    def _copy(self, source: NBDClient, offset: int, length: int, limited: bool) -> None:
        """Read each piece into one buffer while the previous piece is written from the other."""
        writing: list[Command] = []
        for index, at in enumerate(range(offset, offset + length, COPY_PIECE)):
            buf = self._buffers[index % 2][:min(COPY_PIECE, offset + length - at)]
            wait_all(source.submit_split(P.CMD_READ, at, len(buf), into=buf))
            wait_all(writing)  # the previous piece: its buffer is the one read into next
            writing = self.target.submit_split(P.CMD_WRITE, at, len(buf), payload=buf)
            self.copied += len(buf)
            if limited:
                self._keep_to_rate(len(buf))
        wait_all(writing)

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

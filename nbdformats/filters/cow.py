"""cow filter: a temporary writable overlay over a read-only plugin (nbdkit-cow-filter compatible).

The layer below is opened read-only and never written.  Writes go to a sparse temporary file
under $TMPDIR (default /var/tmp), unlinked at once so it vanishes with the server, at the
same offsets as on the disk.  The disk is cut into blocks of cow-block-size; each block is
absent (read from the plugin), ALLOCATED (read from the overlay) or ZEROED (reads as zeroes:
zero and trim of whole blocks, which also frees the overlay's space).  A partial write to an
absent block copies the block from the plugin first.  All connections share one overlay.

Concurrency: requests of all connections run in parallel threads.  Each block is guarded by one
of LOCK_STRIPES locks, taken in ascending order around every change, so concurrent partial
writes to one block cannot lose an update, and a cow-on-read copy never overwrites newer data.
"""

from __future__ import annotations

import errno
import os
import tempfile
from typing import Iterator

from ..api.chain import (EXTENT_DATA, EXTENT_HOLE, EXTENT_ZERO, FLAG_FUA, NATIVE, NONE, Extents, Filter, FilterHandle,
                         Layer)
from ..api.errors import NBDError
from ..api.params import Bool, Param, ParamType, Size, parse_bool
from ..api.syscalls import punch_hole
from ..api.zeroes import fill_zero
from ._blocklocks import BlockLocks

ALLOCATED, ZEROED = 1, 2


class CowOnRead(ParamType):
    """`true`, `false`, or an absolute path: on while that path exists."""

    metavar = "true|false|/PATH"

    def parse(self, text: str) -> bool | str:
        return text if text.startswith("/") else parse_bool(text)


class Overlay(BlockLocks):
    """The shared overlay file and the state of each block (absent blocks are not in `states`)."""

    def __init__(self, block_size: int) -> None:
        super().__init__()
        directory = os.environ.get("TMPDIR") or "/var/tmp"
        fd, path = tempfile.mkstemp(prefix="nbdformats-cow-", dir=directory)
        os.unlink(path)
        self.fd = fd
        self.block_size = block_size
        self.states: dict[int, int] = {}
        # After a resize: the disk's size, and how much of the plugin is still visible (absent
        # blocks read as zeroes from there on).  None: never resized, the plugin's size.
        self.size: int | None = None
        self.plugin_end: int | None = None

    def close(self) -> None:
        os.close(self.fd)

    def runs(self, offset: int, end: int) -> Iterator[tuple[int, int, int | None]]:
        """(start, stop, state) of the runs of blocks with one state covering [offset, end)."""
        if end <= offset:
            return
        bs, states = self.block_size, self.states
        block = offset // bs
        start = offset
        state = states.get(block)
        while True:
            block += 1
            stop = min(block * bs, end)
            if stop >= end:
                yield start, end, state
                return
            following = states.get(block)
            if following != state:
                yield start, stop, state
                start, state = stop, following

    def read(self, buf: memoryview, offset: int) -> None:
        done = 0
        while done < len(buf):
            n = os.preadv(self.fd, [buf[done:]], offset + done)
            if n == 0:  # never written (past the file's end): zeroes
                fill_zero(buf[done:])
                return
            done += n

    def write(self, buf: memoryview, offset: int) -> None:
        done = 0
        while done < len(buf):
            done += os.pwritev(self.fd, [buf[done:]], offset + done)

    def zero_blocks(self, first: int, last: int) -> None:
        """Make blocks first..last read as zeroes and free their space (caller holds their locks)."""
        bs = self.block_size
        try:
            punch_hole(self.fd, first * bs, (last - first + 1) * bs)
        except OSError:
            pass  # the ZEROED state alone makes them read as zeroes
        for block in range(first, last + 1):
            self.states[block] = ZEROED


class CowFilter(Filter):
    """Make any plugin writable: writes go to a temporary overlay, the plugin is never written."""

    name = "cow"
    cow_block_size = Param(Size(minimum=4096, maximum=1 << 30, power_of_two=True), default=64 * 1024,
                           help="Block size of the overlay (a power of two, at least 4K; default 64K)")
    cow_on_read = Param(CowOnRead(), default=False,
                        help="Also keep data read from the plugin in the overlay (true, false, or an "
                             "absolute path: on while it exists)")
    cow_on_cache = Param(Bool(), default=False,
                         help="Copy data named by cache (prefetch) requests into the overlay")

    def get_ready(self) -> None:
        self.overlay = Overlay(self.cow_block_size)

    def cleanup(self) -> None:
        self.overlay.close()

    def open(self, next_open, readonly: bool, export_name: str) -> FilterHandle:
        below = next_open(True, export_name)  # the plugin is never written
        try:
            return self.Handle(self, below, readonly, export_name)
        except BaseException:
            below.close()
            raise

    def copy_on_read(self) -> bool:
        setting = self.cow_on_read
        return os.path.exists(setting) if isinstance(setting, str) else setting

    class Handle(FilterHandle):
        filter: "CowFilter"

        def __init__(self, filter: "CowFilter", next: Layer, readonly: bool, export_name: str) -> None:
            super().__init__(filter, next, readonly, export_name)
            self.overlay = filter.overlay
            self.bs = filter.cow_block_size

        @property
        def size(self) -> int:
            """The disk's size now (every connection shares the overlay and its resizes)."""
            size = self.overlay.size
            return self.next.get_size() if size is None else size

        def get_size(self) -> int:
            return self.size

        def can_resize(self) -> bool:
            return True  # the overlay's size, not the plugin's (which is never written)

        def resize(self, size: int) -> None:
            overlay = self.overlay
            with overlay.all():
                old = self.size
                if size < old:
                    # Blocks past the end go; the file's tail past `size` is cut, so the block
                    # the disk now ends in reads zeroes after it if it grows again.
                    for block in [b for b in overlay.states if b * self.bs >= size]:
                        del overlay.states[block]
                    if os.fstat(overlay.fd).st_size > size:
                        os.ftruncate(overlay.fd, size)
                visible = self.next.get_size() if overlay.plugin_end is None else overlay.plugin_end
                overlay.plugin_end = min(visible, size)
                overlay.size = size

        def _read_below(self, part: memoryview, start: int) -> None:
            """Read absent blocks' bytes from the plugin: zeroes past what a shrink hid."""
            end = self.overlay.plugin_end
            visible = len(part) if end is None else max(0, min(len(part), end - start))
            if visible:
                self.next.pread(part[:visible], start, 0)
            if visible < len(part):
                fill_zero(part[visible:])

        def can_write(self) -> bool:
            return True

        def can_flush(self) -> bool:
            return True

        def can_trim(self) -> bool:
            return True

        def can_zero(self) -> int:
            return NATIVE

        def can_fast_zero(self) -> bool:
            return True

        def can_fua(self) -> int:
            return NATIVE  # a FUA write is written, then flushed (below)

        def can_multi_conn(self) -> bool:
            return True  # one overlay for every connection, no per-connection caching

        def can_extents(self) -> bool:
            return True

        def can_cache(self) -> int:
            if self.filter.cow_on_cache:
                return NATIVE
            return NATIVE if self.next.can_cache() != NONE else NONE

        # -- reads ---------------------------------------------------------------------------
        def pread(self, buf: memoryview, offset: int, flags: int) -> None:
            overlay = self.overlay
            for start, stop, state in overlay.runs(offset, offset + len(buf)):
                part = buf[start - offset:stop - offset]
                if state == ALLOCATED:
                    overlay.read(part, start)
                elif state == ZEROED:
                    fill_zero(part)
                else:
                    self._read_below(part, start)
                    if self.filter.copy_on_read():
                        self._keep(part, start)

        def _keep(self, data: memoryview, offset: int) -> None:
            """Store the whole blocks of `data` (read from the plugin) that are still absent."""
            bs, overlay = self.bs, self.overlay
            end = offset + len(data)
            first = -(-offset // bs)
            last_end = end if end == self.size else end - end % bs  # the disk's last block may be short
            if first * bs >= last_end:
                return
            last = (last_end - 1) // bs
            with overlay.locked(first, last):
                for block in range(first, last + 1):
                    if block not in overlay.states:
                        start = block * bs
                        overlay.write(data[start - offset:min(start + bs, last_end) - offset], start)
                        overlay.states[block] = ALLOCATED

        def _block(self, block: int) -> bytearray:
            """The current content of a block (caller holds its lock)."""
            start = block * self.bs
            data = bytearray(min(self.bs, self.size - start))
            state = self.overlay.states.get(block)
            if state == ALLOCATED:
                self.overlay.read(memoryview(data), start)
            elif state is None:
                self._read_below(memoryview(data), start)
            return data

        # -- writes --------------------------------------------------------------------------
        def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
            self._change(offset, len(buf), buf)
            self._flush_if_fua(flags)

        def zero(self, count: int, offset: int, flags: int) -> None:
            self._change(offset, count, None)
            self._flush_if_fua(flags)

        def trim(self, count: int, offset: int, flags: int) -> None:
            # The whole blocks are dropped and read as zeroes; trimmed bytes of partial blocks
            # are zeroed too, so a trim never exposes the plugin's data again.
            self._change(offset, count, None)
            self._flush_if_fua(flags)

        def _flush_if_fua(self, flags: int) -> None:
            if flags & FLAG_FUA:
                self.flush(0)

        def _change(self, offset: int, count: int, data: memoryview | None) -> None:
            """Write `data` (None: zeroes) over [offset, offset+count) in the overlay."""
            bs, overlay, end = self.bs, self.overlay, offset + count
            first, last = offset // bs, (end - 1) // bs
            with overlay.locked(first, last):
                if end > self.size:  # this connection's size is older than another one's shrink
                    raise NBDError(errno.ENOSPC, "write past the end of the disk: another connection shrank it")
                block = first
                while block <= last:
                    start = block * bs
                    stop = min(start + bs, self.size)
                    if offset <= start and end >= stop:  # whole blocks: one I/O for the run
                        run_end = min(end - (end - start) % bs if end < self.size else end, self.size)
                        run_last = (run_end - 1) // bs
                        if data is None:
                            overlay.zero_blocks(block, run_last)
                        else:
                            overlay.write(data[start - offset:run_end - offset], start)
                            for b in range(block, run_last + 1):
                                overlay.states[b] = ALLOCATED
                        block = run_last + 1
                        continue
                    lo, hi = max(offset, start), min(end, stop)
                    piece = data[lo - offset:hi - offset] if data is not None else None
                    if overlay.states.get(block) == ALLOCATED:  # just the changed bytes
                        if piece is None:
                            overlay.write(memoryview(bytes(hi - lo)), lo)
                        else:
                            overlay.write(piece, lo)
                    else:
                        content = self._block(block)
                        content[lo - start:hi - start] = piece if piece is not None else bytes(hi - lo)
                        overlay.write(memoryview(content), start)
                        overlay.states[block] = ALLOCATED
                    block += 1

        def flush(self, flags: int) -> None:
            # The overlay does not outlive the server, but FLUSH still means "on stable storage"
            # until then, as nbdkit's cow filter does it (blk_flush: fdatasync of the overlay).
            try:
                os.fdatasync(self.overlay.fd)
            except OSError as e:
                raise NBDError(e.errno or errno.EIO, f"cow: flushing the overlay failed: {e.strerror}") from None

        # -- metadata ------------------------------------------------------------------------
        def extents(self, count: int, offset: int, flags: int, extents: Extents) -> None:
            end = min(offset + count, extents.end)
            for start, stop, state in self.overlay.runs(offset, end):
                if state == ALLOCATED:
                    extents.add(start, stop - start, EXTENT_DATA)
                elif state == ZEROED:
                    extents.add(start, stop - start, EXTENT_HOLE | EXTENT_ZERO)
                else:
                    hidden = self.overlay.plugin_end  # a shrink hid the plugin from here: zeroes
                    visible = stop if hidden is None else max(start, min(stop, hidden))
                    if start < visible:
                        inner = Extents(start, visible)
                        self.next.extents(visible - start, start, flags, inner)
                        for piece_start, length, kind in inner:
                            extents.add(piece_start, length, kind)
                        if inner.covered < visible:
                            return  # the plugin answered less: the client asks again from there
                    if visible < stop:
                        extents.add(visible, stop - visible, EXTENT_HOLE | EXTENT_ZERO)

        def cache(self, count: int, offset: int, flags: int) -> None:
            if not self.filter.cow_on_cache:
                if self.next.can_cache() != NONE:
                    self.next.cache(count, offset, flags)
                return
            bs = self.bs
            start = offset - offset % bs
            end = min(offset + count + (-(offset + count) % bs), self.size)
            buf = bytearray(min(end - start, 64 * bs))
            position = start
            while position < end:
                n = min(len(buf), end - position)
                for run_start, run_stop, state in self.overlay.runs(position, position + n):
                    if state is None:
                        part = memoryview(buf)[run_start - position:run_stop - position]
                        self._read_below(part, run_start)
                        self._keep(part, run_start)
                position += n


FILTER = CowFilter

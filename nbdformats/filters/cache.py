"""cache filter: serve a slow plugin from a local cache file (nbdkit-cache-filter compatible).

The disk is cut into blocks of `cache-min-block-size` (or the block size of the temporary
filesystem, if larger).  Cached blocks live in a sparse temporary file under $TMPDIR
(default /var/tmp), unlinked at once so that it vanishes with the server, at the same
offsets as on the disk.  Each block is absent (not cached), CLEAN (the plugin has the same
data), DIRTY (only the cache has the latest data) or DIRTY_ZERO (dirty, all zeroes: a hole
in the cache file, written back as a zero request).

Modes, as nbdkit: `writeback` keeps writes in the cache until a flush (FUA writes go through
at once); `writethrough` sends every write to the plugin before replying; `unsafe` is
writeback whose flush does nothing.  Trim goes to the plugin (as in nbdkit) after dropping
the blocks it covers.  Extents come from the plugin with dirty blocks painted over them.

Beyond nbdkit:
- cache-max-size: clean blocks are reclaimed (least recently used first) by a background
  thread between the high and low thresholds; only above the maximum does a request reclaim
  itself, then writing dirty blocks back (nbdkit drops dirty blocks, losing data).
- ENOSPC/EDQUOT on the cache file: reclaim clean blocks and retry, then dirty ones; if the
  cache still has no room the block goes to the plugin directly.  Every write back outside
  a flush is followed by a flush of the plugin (except in unsafe mode), so a flushed write
  is never lost, whichever connection flushes.
- One cache per export name (nbdkit shares one across exports).
- Online resize (NBD_CMD_RESIZE) passes through to the plugin; cached blocks past a new,
  smaller end are dropped (dirty ones too: those bytes are gone from the disk), so growing
  again reads zeroes, as from the plugin.

Concurrency: requests of all connections run in parallel threads.  Each block is
guarded by one of LOCK_STRIPES locks, held across its cache file I/O, plugin I/O and state
change, so concurrent writes to one block cannot tear it or lose an update; a request takes
the locks of its blocks in ascending stripe order (no deadlock), reclaim only try-locks.
"""

from __future__ import annotations

import errno
import logging
import os
import tempfile
import threading
from collections import OrderedDict
from typing import Iterator

from ..api.chain import (EXTENT_DATA, EXTENT_ZERO, FLAG_FAST_ZERO, FLAG_FUA, NATIVE, NONE, Extents,
                         Filter, FilterHandle, Layer)
from ..api.errors import ConfigError, NBDError
from ..api.params import Enum, Int, Param, ParamType, Size, parse_bool
from ..api.syscalls import punch_hole
from ..api.zeroes import write_zeroes
from ._blocklocks import BlockLocks

log = logging.getLogger("nbdformats.cache")

CLEAN, DIRTY, DIRTY_ZERO = 1, 2, 3
WRITEBACK_RUN = 32  # at most this many consecutive dirty blocks go to the plugin in one call
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
ENOSPC_RECLAIM_BLOCKS = 16  # blocks freed before each retry of a write that found no space


class CacheOnRead(ParamType):
    """`true`, `false`, or an absolute path: on while that path exists."""

    metavar = "true|false|/PATH"

    def parse(self, text: str) -> bool | str:
        if text.startswith("/"):
            return text
        try:
            return parse_bool(text)
        except ValueError:
            raise ValueError("use true, false or an absolute /PATH") from None


def overlay(extents: list[tuple[int, int, int]], overrides: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Paint `overrides` over contiguous `extents`; both are sorted (offset, length, type) lists."""
    result: list[tuple[int, int, int]] = []
    i = 0
    for offset, length, kind in extents:
        position, end = offset, offset + length
        while position < end:
            while i < len(overrides) and overrides[i][0] + overrides[i][1] <= position:
                i += 1
            if i < len(overrides) and overrides[i][0] <= position:
                stop = min(end, overrides[i][0] + overrides[i][1])
                result.append((position, stop - position, overrides[i][2]))
            else:
                stop = min(end, overrides[i][0]) if i < len(overrides) else end
                result.append((position, stop - position, kind))
            position = stop
    return result


class BlockCache(BlockLocks):
    """One export's cache: the sparse unlinked file, each block's state, locks and reclaim.

    `states` is ordered least recently used first.  `meta` guards `states` and `dirty` and
    is held only briefly, never while waiting for a block lock.
    """

    def __init__(self, directory: str, block_size: int, max_size: int | None, high_percent: int,
                 low_percent: int) -> None:
        super().__init__()
        fd, path = tempfile.mkstemp(prefix="nbdformats-cache-", dir=directory)
        os.unlink(path)
        self.fd = fd
        self.block_size = block_size
        self.size = 0  # the disk's size: set by each connection that opens, and by resize
        self.states: OrderedDict[int, int] = OrderedDict()
        self.dirty: set[int] = set()
        self.meta = threading.Lock()
        self.max_size = max_size
        self.closed = False
        self.warned_no_space = False
        self.reclaim_wanted = threading.Event()
        if max_size is not None:
            self.high = max_size * high_percent // 100
            self.low = max_size * low_percent // 100
            self.reclaimer = threading.Thread(target=self._reclaim_in_background, daemon=True,
                                              name="nbdformats-cache-reclaim")
            self.reclaimer.start()

    def close(self) -> None:
        self.closed = True
        if self.max_size is not None:  # stop the reclaimer before its fd number can be reused
            self.reclaim_wanted.set()
            self.reclaimer.join()
        os.close(self.fd)

    # -- states --------------------------------------------------------------------------------
    def state(self, block: int, touch: bool = True) -> int | None:
        with self.meta:
            state = self.states.get(block)
            if state is not None and touch:
                self.states.move_to_end(block)
            return state

    def set_state(self, block: int, state: int) -> None:
        with self.meta:
            self.states[block] = state
            self.states.move_to_end(block)
            if state == CLEAN:
                self.dirty.discard(block)
            else:
                self.dirty.add(block)

    def punch(self, block: int) -> None:
        """Free a block's space: it reads as zeroes (caller holds its lock)."""
        punch_hole(self.fd, block * self.block_size, self.block_size)

    def drop(self, block: int) -> None:
        """Forget a block and free its space (caller holds its lock)."""
        self.punch(block)
        with self.meta:
            self.states.pop(block, None)
            self.dirty.discard(block)

    def dirty_blocks(self, first: int = 0, end: int | None = None) -> list[tuple[int, int]]:
        """Sorted (block, state) of the dirty blocks in [first, end)."""
        with self.meta:
            if not self.dirty:
                return []
            if end is not None and end - first <= len(self.dirty):
                blocks: Iterator[int] | list[int] = (b for b in range(first, end) if b in self.dirty)
            else:
                blocks = sorted(b for b in self.dirty if b >= first and (end is None or b < end))
            return [(b, self.states[b]) for b in blocks]

    # -- the cache file ------------------------------------------------------------------------
    def read(self, buf: memoryview, offset: int) -> None:
        done = 0
        while done < len(buf):
            n = os.preadv(self.fd, [buf[done:]], offset + done)
            if n == 0:  # beyond what was ever written: a hole
                buf[done:] = bytes(len(buf) - done)
                return
            done += n

    def write(self, data: memoryview, offset: int) -> None:
        done = 0
        while done < len(data):
            done += os.pwrite(self.fd, data[done:], offset + done)

    def allocated(self) -> int:
        return os.fstat(self.fd).st_blocks * 512

    def cut(self, size: int) -> None:
        """The disk shrank to `size`: forget the blocks past it and zero the cached tail of the
        block it ends in, which a later grow exposes (caller holds every block lock)."""
        with self.meta:
            gone = [block for block in self.states if block * self.block_size >= size]
        for block in gone:
            self.drop(block)
        tail_end = min(-(-size // self.block_size) * self.block_size, self.size)
        if size < tail_end and self.state(size // self.block_size, touch=False) is not None:
            self.write(memoryview(bytes(tail_end - size)), size)

    # -- reclaim -------------------------------------------------------------------------------
    def reclaim(self, until: int, write_back: "Writeback | None" = None, limit: int | None = None) -> int:
        """Free blocks, least recently used first, until the file holds at most `until` bytes
        (or `limit` blocks were freed).  Clean blocks go first; dirty ones only if `write_back`
        is given, which sends them to the plugin before they are dropped.  Blocks whose lock
        is busy (including those the caller holds) are skipped.  Returns the blocks freed.
        """
        freed = 0
        # DIRTY_ZERO blocks are holes: dropping them would free nothing.
        for wanted in ((CLEAN,) if write_back is None else (CLEAN, DIRTY)):
            with self.meta:
                candidates = [b for b, s in self.states.items() if s == wanted]
            for block in candidates:
                if self.allocated() <= until or (limit is not None and freed >= limit) or self.closed:
                    return freed
                lock = self.stripe(block)
                if not lock.acquire(blocking=False):
                    continue
                try:
                    state = self.state(block, touch=False)
                    if state != wanted:
                        continue
                    if state == DIRTY:
                        assert write_back is not None
                        write_back(block, block, state)
                    self.drop(block)
                    freed += 1
                finally:
                    lock.release()
        return freed

    def after_growth(self, write_back: "Writeback") -> None:
        """Keep within cache-max-size: wake the background reclaim above the high threshold,
        reclaim here (dirty blocks too) only above the maximum."""
        if self.max_size is None:
            return
        used = self.allocated()
        if used > self.high:
            self.reclaim_wanted.set()
        if used > self.max_size:
            self.reclaim(self.high, write_back)

    def _reclaim_in_background(self) -> None:
        while True:
            self.reclaim_wanted.wait()
            self.reclaim_wanted.clear()
            if self.closed:
                return
            try:
                if self.allocated() > self.high:
                    self.reclaim(self.low)
            except OSError as e:
                log.warning("cache: reclaim failed: %s", e)


class Writeback:
    """Callable that sends dirty blocks first..last (locked by the caller, all in `state`) to
    the plugin through one connection's layer below, and marks them clean."""

    def __init__(self, handle: "CacheFilter.Handle") -> None:
        self.handle = handle
        self.written = False  # whether anything went to the plugin (and may need a flush)

    def __call__(self, first: int, last: int, state: int) -> None:
        h = self.handle
        start = first * h.blksize
        end = min((last + 1) * h.blksize, h.store.size)
        if state == DIRTY_ZERO:
            h.zero_below(end - start, start, 0)
        else:
            data = memoryview(bytearray(end - start))
            h.store.read(data, start)
            h.next.pwrite(data, start, 0)
        for block in range(first, last + 1):
            h.store.set_state(block, CLEAN)
        self.written = True


class CacheFilter(Filter):
    """Cache the plugin's data in a local sparse file (writeback, writethrough or unsafe)."""

    name = "cache"
    mode = Param(Enum("writeback", "writethrough", "unsafe"), default="writeback", key="cache",
                 help="writeback: writes reach the plugin on flush/FUA; writethrough: on every write; "
                      "unsafe: only when the cache must make room (flush does nothing)")
    cache_min_block_size = Param(Size(minimum=4096, maximum=1 << 30, power_of_two=True), default=65536,
                                 help="cache block size (power of two >= 4K; at least the filesystem's block size)")
    cache_max_size = Param(Size(minimum=1 << 20), help="limit of the space the cache file uses (>= 1M)")
    cache_high_threshold = Param(Int(minimum=1), default=95,
                                 help="percentage of cache-max-size above which reclaim starts")
    cache_low_threshold = Param(Int(minimum=1), default=80,
                                help="percentage of cache-max-size at which reclaim stops")
    cache_on_read = Param(CacheOnRead(), default=False,
                          help="cache what is read too: true, false, or /PATH (on while PATH exists)")

    def config_complete(self) -> None:
        if self.cache_max_size is not None and self.cache_low_threshold >= self.cache_high_threshold:
            raise ConfigError("cache: cache-low-threshold must be less than cache-high-threshold")

    def get_ready(self) -> None:
        self.directory = os.environ.get("TMPDIR") or "/var/tmp"
        try:
            with tempfile.TemporaryFile(dir=self.directory):
                pass
            filesystem_block = os.statvfs(self.directory).f_bsize
        except OSError as e:
            raise ConfigError(f"cache: cannot create the cache file in {self.directory}: {e.strerror}") from None
        self.blksize = max(self.cache_min_block_size, filesystem_block)
        self.stores: dict[str, BlockCache] = {}
        self.stores_lock = threading.Lock()

    def cleanup(self) -> None:
        for export_name, store in getattr(self, "stores", {}).items():
            if self.mode == "writeback" and store.dirty:
                self.write_back_at_exit(export_name)
            store.close()

    def write_back_at_exit(self, export_name: str) -> None:
        """Dirty blocks left by clients that never flushed: write them back before the
        cache file goes away (nbdkit loses them)."""
        try:
            below = self.open_below(False, export_name)
        except Exception as e:
            log.error("cache: cannot open the plugin to write back at exit: %s", e)
            return
        try:
            self.Handle(self, below, False, export_name).flush(0)
        except Exception as e:
            log.error("cache: write back at exit failed: %s", e)
        finally:
            below.close()

    def store_for(self, export_name: str) -> BlockCache:
        with self.stores_lock:
            store = self.stores.get(export_name)
            if store is None:
                store = BlockCache(self.directory, self.blksize, self.cache_max_size,
                                   self.cache_high_threshold, self.cache_low_threshold)
                self.stores[export_name] = store
            return store

    def caching_reads(self) -> bool:
        setting = self.cache_on_read
        return os.path.exists(setting) if isinstance(setting, str) else setting

    class Handle(FilterHandle):
        filter: "CacheFilter"

        def __init__(self, filter: "CacheFilter", next: Layer, readonly: bool, export_name: str) -> None:
            super().__init__(filter, next, readonly, export_name)
            self.store = filter.store_for(export_name)
            self.blksize = filter.blksize
            self.store.size = next.get_size()  # the plugin may have changed size since the last open
            self.mode = filter.mode

        # -- what we advertise -------------------------------------------------------------
        def can_cache(self) -> int:
            return NATIVE

        def can_zero(self) -> int:
            return NATIVE  # in the cache; written back as zero requests, or zeroes if must be

        def can_fast_zero(self) -> bool:
            return True  # punching holes in the cache is fast; writethrough defers to the plugin

        def can_flush(self) -> bool:
            return True if self.mode == "unsafe" else self.next.can_flush()

        def can_fua(self) -> int:
            if self.mode == "unsafe":
                return NATIVE
            return NATIVE if self.next.can_fua() != NONE else NONE

        def can_multi_conn(self) -> bool:
            # The cache is shared and a flush writes back every connection's dirty blocks;
            # in writethrough mode writes go to each connection's own plugin handle.
            return self.next.can_multi_conn() if self.mode == "writethrough" else True

        # -- helpers -------------------------------------------------------------------------
        def blocks(self, offset: int, count: int) -> Iterator[tuple[int, int, int]]:
            """(block, start, end) of each block piece of [offset, offset + count)."""
            end = offset + count
            while offset < end:
                block = offset // self.blksize
                piece_end = min(end, (block + 1) * self.blksize)
                yield block, offset, piece_end
                offset = piece_end

        def block_range(self, block: int) -> tuple[int, int]:
            start = block * self.blksize
            return start, min(start + self.blksize, self.store.size)

        def through(self, flags: int) -> bool:
            return self.mode == "writethrough" or (self.mode == "writeback" and bool(flags & FLAG_FUA))

        def zero_below(self, count: int, offset: int, flags: int) -> None:
            """Zero in the plugin, by writing zeroes if the layer below cannot zero."""
            if flags & FLAG_FAST_ZERO and not self.next.can_fast_zero():
                raise NBDError(errno.ENOTSUP, "fast zero is not possible below the cache")
            if self.next.can_zero() != NONE:
                self.next.zero(count, offset, flags)
                return
            write_zeroes(self.next.pwrite, count, offset, flags & FLAG_FUA)

        def flush_after_write_back(self, writeback: Writeback) -> None:
            # A write back outside a flush goes through this connection's plugin handle;
            # flush it now so a flush on any connection covers it (multi-conn).
            if writeback.written and self.mode != "unsafe" and self.next.can_flush():
                self.next.flush(0)

        def keep_within_limits(self) -> None:
            if self.store.max_size is None:
                return
            writeback = Writeback(self)
            self.store.after_growth(writeback)
            self.flush_after_write_back(writeback)

        def store_block_data(self, block: int, data: memoryview, offset: int, for_write: bool = True) -> bool:
            """Write `data` into the cache file at `offset` (inside `block`, whose lock the
            caller holds).  When the filesystem is full, reclaim clean blocks (and for a
            write, dirty ones too) and retry; False if there is still no room."""
            for write_back_dirty in ((False, True) if for_write else (False,)):
                while True:
                    try:
                        self.store.write(data, offset)
                        return True
                    except OSError as e:
                        if e.errno not in NO_SPACE:
                            raise
                    writeback = Writeback(self) if write_back_dirty else None
                    freed = self.store.reclaim(0, writeback, limit=ENOSPC_RECLAIM_BLOCKS)
                    if writeback is not None:
                        self.flush_after_write_back(writeback)
                    if not freed:
                        break
            # Warn once per cache; it may keep happening while the filesystem stays full.
            report = log.debug if self.store.warned_no_space else log.warning
            self.store.warned_no_space = True
            report("cache: no space in %s for block %d: blocks that do not fit go to the plugin",
                   self.filter.directory, block)
            return False

        def bypass(self, block: int, content: memoryview) -> None:
            """The cache has no room for `block` (whole new content given): send it to the
            plugin and forget the cached copy."""
            start, _ = self.block_range(block)
            self.next.pwrite(content, start, 0)
            if self.mode != "unsafe" and self.next.can_flush():
                self.next.flush(0)
            self.store.drop(block)

        def fill(self, block: int) -> memoryview:
            """Read a whole block from the plugin and cache it clean (if there is room)."""
            start, end = self.block_range(block)
            content = memoryview(bytearray(end - start))
            self.next.pread(content, start, 0)
            if self.store_block_data(block, content, start, for_write=False):
                self.store.set_state(block, CLEAN)
                self.keep_within_limits()
            return content

        def update_block(self, block: int, start: int, end: int, data: memoryview | None, through: bool) -> None:
            """Apply a write (`data`) or zero (None) of [start, end) inside `block` to the cache.
            With `through` the plugin already has it.  The caller holds the block's lock."""
            block_start, block_end = self.block_range(block)
            state = self.store.state(block)
            if start == block_start and end == block_end:
                if data is None:
                    self.store.punch(block)
                elif not self.store_block_data(block, data, start):
                    self.bypass(block, data)
                    return
                self.store.set_state(block, CLEAN if through else DIRTY_ZERO if data is None else DIRTY)
                return
            if state is None and through:
                return  # the plugin has it; nothing cached to update
            piece = data if data is not None else memoryview(bytes(end - start))
            if state is None:  # read-modify-write from the plugin
                content = memoryview(bytearray(block_end - block_start))
                self.next.pread(content, block_start, 0)
                content[start - block_start:end - block_start] = piece
                if not self.store_block_data(block, content, block_start):
                    self.bypass(block, content)
                    return
            elif not self.store_block_data(block, piece, start):
                content = memoryview(bytearray(block_end - block_start))
                self.store.read(content, block_start)
                content[start - block_start:end - block_start] = piece
                self.bypass(block, content)
                return
            if not through:
                new_state = DIRTY_ZERO if state == DIRTY_ZERO and data is None else DIRTY
            elif state == DIRTY_ZERO and data is not None:
                new_state = DIRTY  # the plugin lacks the zeroes of the rest of the block
            else:
                assert state is not None  # not cached and written through: returned above
                new_state = state  # the plugin got the same change: clean stays clean, dirty dirty
            self.store.set_state(block, new_state)

        # -- data calls ----------------------------------------------------------------------
        def pread(self, buf: memoryview, offset: int, flags: int) -> None:
            caching = self.filter.caching_reads()
            store = self.store
            end = offset + len(buf)
            position = offset
            while position < end:
                block = position // self.blksize
                piece_end = min(end, (block + 1) * self.blksize)
                if not caching and store.state(block, touch=False) is None:
                    # A run of uncached blocks is read from the plugin in one call; a block
                    # that becomes cached meanwhile was written concurrently with this read.
                    while piece_end < end and store.state(piece_end // self.blksize, touch=False) is None:
                        piece_end = min(end, piece_end + self.blksize)
                    self.next.pread(buf[position - offset:piece_end - offset], position, 0)
                    position = piece_end
                    continue
                view = buf[position - offset:piece_end - offset]
                with store.stripe(block):
                    if store.state(block) is not None:
                        store.read(view, position)
                    elif caching:
                        block_start = block * self.blksize
                        view[:] = self.fill(block)[position - block_start:piece_end - block_start]
                    else:
                        self.next.pread(view, position, 0)
                position = piece_end

        def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
            through = self.through(flags)
            first, last = offset // self.blksize, (offset + len(buf) - 1) // self.blksize
            with self.store.locked(first, last):
                if through:  # first: if the plugin fails, the cache is unchanged
                    self.next.pwrite(buf, offset, flags)
                for block, start, end in self.blocks(offset, len(buf)):
                    self.update_block(block, start, end, buf[start - offset:end - offset], through)
            self.keep_within_limits()

        def zero(self, count: int, offset: int, flags: int) -> None:
            through = self.through(flags)
            first, last = offset // self.blksize, (offset + count - 1) // self.blksize
            with self.store.locked(first, last):
                if through:
                    self.zero_below(count, offset, flags)
                for block, start, end in self.blocks(offset, count):
                    self.update_block(block, start, end, None, through)
            self.keep_within_limits()

        def trim(self, count: int, offset: int, flags: int) -> None:
            # Trimmed data is unspecified: drop whole blocks (dirty or not) and clean partial
            # ones (they will be read again from the plugin); dirty partial blocks keep their
            # data, which a later write back may restore over the trimmed range.
            first, last = offset // self.blksize, (offset + count - 1) // self.blksize
            with self.store.locked(first, last):
                for block, start, end in self.blocks(offset, count):
                    state = self.store.state(block, touch=False)
                    whole = (start, end) == self.block_range(block)
                    if state is not None and (whole or state == CLEAN):
                        self.store.drop(block)
                self.next.trim(count, offset, flags)

        def flush(self, flags: int) -> None:
            if self.mode == "unsafe":
                return
            first_error = self.write_back_all()
            self.next.flush(0)
            if first_error is not None:
                raise first_error

        def write_back_all(self) -> NBDError | None:
            """Write every dirty block back, in runs of consecutive blocks; keep going after an
            error and return the first one (as nbdkit)."""
            first_error: NBDError | None = None
            writeback = Writeback(self)
            dirty = [block for block, _ in self.store.dirty_blocks()]
            for index in range(0, len(dirty), WRITEBACK_RUN):
                batch = dirty[index:index + WRITEBACK_RUN]
                with self.store.locked(batch[0], batch[-1]):
                    for first, last, state in self.dirty_runs(batch):
                        try:
                            writeback(first, last, state)
                        except (NBDError, OSError) as e:
                            log.error("cache: write back of blocks %d-%d failed: %s", first, last, e)
                            if first_error is None:
                                first_error = e if isinstance(e, NBDError) else NBDError(e.errno or errno.EIO, str(e))
            return first_error

        def dirty_runs(self, blocks: list[int]) -> list[tuple[int, int, int]]:
            """(first, last, state) runs of consecutive blocks still dirty in the same way
            (states may have changed before the caller got the locks)."""
            runs: list[tuple[int, int, int]] = []
            for block in blocks:
                state = self.store.state(block, touch=False)
                if state not in (DIRTY, DIRTY_ZERO):
                    continue
                if runs and runs[-1][1] == block - 1 and runs[-1][2] == state:
                    runs[-1] = (runs[-1][0], block, state)
                else:
                    runs.append((block, block, state))
            return runs

        def resize(self, size: int) -> None:
            # Every block lock: no request of any connection is between the cache and the plugin.
            with self.store.all():
                self.next.resize(size)  # first: if the plugin refuses, the cache is unchanged
                size = self.next.get_size()
                if size < self.store.size:
                    self.store.cut(size)
                self.store.size = size

        def cache(self, count: int, offset: int, flags: int) -> None:
            first, last = offset // self.blksize, (offset + count - 1) // self.blksize
            for block in range(first, last + 1):
                with self.store.stripe(block):
                    if self.store.state(block) is None:
                        self.fill(block)

        def extents(self, count: int, offset: int, flags: int, extents: Extents) -> None:
            end = offset + count
            dirty = self.store.dirty_blocks(offset // self.blksize, (end - 1) // self.blksize + 1)
            if not dirty:
                self.next.extents(count, offset, flags, extents)
                return
            below = Extents(offset, end)
            self.next.extents(count, offset, flags, below)
            overrides = []
            for block, state in dirty:
                start, stop = self.block_range(block)
                start, stop = max(start, offset), min(stop, below.covered)
                if start < stop:
                    overrides.append((start, stop - start, EXTENT_ZERO if state == DIRTY_ZERO else EXTENT_DATA))
            for piece in overlay(list(below), overrides):
                extents.add(*piece)


FILTER = CacheFilter

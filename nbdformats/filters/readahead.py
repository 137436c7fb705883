"""readahead filter: prefetch what a sequential reader will want next (nbdkit-readahead-filter compatible).

After each read, a background thread (one per connection) asks the layer below to cache the
data following it.  The window starts at 32K, doubles (up to 4M) while reads run ahead of
the last prefetch, stays while reads move forward, and drops back to 32K on a backward read.

The layer below must support cache natively and the chain must be parallel, or the filter
does nothing (and says so): put the cache filter, or cow with cow-on-cache=true, below it.
Unlike nbdkit, the window is per connection, so two readers do not disturb each other.
"""

from __future__ import annotations

import logging
import queue
import threading

from ..api.chain import NATIVE, Filter, FilterHandle, Layer, ThreadModel

log = logging.getLogger("nbdformats.readahead")

READAHEAD_MIN = 32 * 1024
READAHEAD_MAX = 4 * 1024 * 1024
MAX_QUEUED = 64  # prefetches waiting; beyond this the reader is faster than prefetching and they are dropped


class Window:
    """nbdkit's adaptive readahead window (sans-IO): `after_read` gives the range to prefetch."""

    def __init__(self) -> None:
        self.size = READAHEAD_MIN
        self.last_offset = 0
        self.last_readahead = 0

    def after_read(self, offset: int, count: int, disk_size: int) -> tuple[int, int] | None:
        start = offset + count
        prefetch = (start, min(self.size, disk_size - start)) if start < disk_size else None
        if self.last_readahead < offset:  # reading beyond what we fetched: fetch more
            self.size = min(self.size * 2, READAHEAD_MAX)
        elif self.last_offset >= offset:  # not moving forward: back to the minimum
            self.size = READAHEAD_MIN
        self.last_offset = offset
        self.last_readahead = start + (prefetch[1] if prefetch else 0)
        return prefetch


class ReadaheadFilter(Filter):
    """Prefetch data after each read, with a window that grows on sequential reads."""

    name = "readahead"
    resize_passthrough = True
    # Prefetches run in a thread next to the requests: the chain must run in worker threads.

    class Handle(FilterHandle):
        def __init__(self, filter: "ReadaheadFilter", next: Layer, readonly: bool, export_name: str) -> None:
            super().__init__(filter, next, readonly, export_name)
            self.working = next.can_cache() == NATIVE and filter.final_thread_model == ThreadModel.PARALLEL
            if not self.working:
                log.warning("readahead: the layer below does not support NBD_CMD_CACHE natively, or the "
                            "chain is not parallel, so the filter does nothing%s",
                            "" if next.can_cache() == NATIVE else " (try --filter=cache after this filter)")
                return
            self.window = Window()
            self.window_lock = threading.Lock()
            self.commands: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
            self.closing = threading.Event()
            self.thread = threading.Thread(target=self._prefetch, daemon=True, name="nbdformats-readahead")
            self.thread.start()

        def _prefetch(self) -> None:
            while (command := self.commands.get()) is not None:
                if self.closing.is_set():
                    continue  # the connection is going: skip what is left
                offset, count = command
                try:
                    self.next.cache(count, offset, 0)
                except Exception as e:  # a failed prefetch only costs speed
                    log.debug("readahead: cache [%d, +%d) failed: %s", offset, count, e)

        def pread(self, buf: memoryview, offset: int, flags: int) -> None:
            if self.working:
                with self.window_lock:
                    prefetch = self.window.after_read(offset, len(buf), self.next.get_size())
                if prefetch is not None and self.commands.qsize() < MAX_QUEUED:
                    self.commands.put(prefetch)
            self.next.pread(buf, offset, flags)

        def close(self) -> None:
            if self.working:
                self.closing.set()
                self.commands.put(None)
                self.thread.join()


FILTER = ReadaheadFilter

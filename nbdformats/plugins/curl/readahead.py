"""Read-ahead for one sequential reader: small reads become large ranged requests, fetched early.

The object is cut into windows of `window` bytes.  A read that continues an earlier read (or
falls in a window already fetched or on its way) is served from windows, and windows after it
are fetched in the background by the plugin's pool, so while the client is busy (decompressing,
writing) the next megabytes are already travelling.  Any other read goes straight to the
server at its own size: random access costs nothing extra.

How far ahead grows as the kernel's read-ahead does: one window when a stream starts, doubled
each time a window fetched ahead of need has been read to its end, up to `depth`; a window
thrown away unread halves it.  So a short sequential run (a filter reading one compressed block, then jumping elsewhere)
wastes at most a window or two, and a long one keeps `depth` windows in flight.

A window is dropped once all its bytes have been served, or when it is more than `depth`
windows behind a read (too far for a request merely overtaken by others); at most
2 * depth + 4 windows are held, so memory stays bounded per connection.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from concurrent.futures import CancelledError, Executor, Future
from typing import Callable

Fetch = Callable[[memoryview, int], None]  # fill the buffer with the object's bytes at offset


@dataclass
class _Window:
    future: Future[memoryview]
    served: int  # bytes handed out (or skipped by the reader) so far
    ahead: bool  # fetched ahead of need, not for the read that created it


class ReadAhead:
    def __init__(self, fetch: Fetch, size: int, window: int, depth: int, executor: Executor) -> None:
        self.fetch, self.size, self.window, self.depth = fetch, size, window, depth
        self.executor = executor
        self.count = (size + window - 1) // window
        self.limit = 2 * depth + 4
        self.ahead = 1  # windows to keep in flight past the current read (1 .. depth)
        self.windows: dict[int, _Window] = {}
        # Ends of recent reads: with many requests in flight, the next read of a sequential
        # client starts where one of these ended, not necessarily the last one.
        self.recent_ends: deque[int] = deque(maxlen=128)
        self.lock = threading.Lock()

    def _fetch_window(self, index: int) -> memoryview:
        start = index * self.window
        data = memoryview(bytearray(min(self.window, self.size - start)))
        self.fetch(data, start)
        return data

    def read(self, buf: memoryview, offset: int) -> None:
        end = offset + len(buf)
        first, last = offset // self.window, (end - 1) // self.window
        with self.lock:
            streaming = first in self.windows or first - 1 in self.windows or offset in self.recent_ends
            # A read of depth windows or more is a large request already: it goes straight.
            streaming = streaming and last - first < self.depth
            self.recent_ends.append(end)
            if streaming:
                try:
                    for index in range(first, min(last + 1 + self.ahead, self.count)):
                        if index not in self.windows:
                            # The reader is past the bytes before `offset`: count them as served.
                            self.windows[index] = _Window(self.executor.submit(self._fetch_window, index),
                                                          max(0, offset - index * self.window), index > last)
                except RuntimeError:  # the executor is shut down: the server is exiting
                    streaming = False
            if streaming:
                self._evict(first)
                needed = [(index, self.windows[index]) for index in range(first, last + 1)]
        if not streaming:
            self.fetch(buf, offset)
            return
        for index, window in needed:
            start = index * self.window
            lo, hi = max(offset, start), min(end, start + self.window)
            try:
                data = window.future.result()
            except CancelledError:  # evicted before it started by a read elsewhere: fetch directly
                self.fetch(buf[lo - offset:hi - offset], lo)
                continue
            except BaseException:
                self._forget(index, window)  # a later read fetches it again (the error may pass)
                raise
            buf[lo - offset:hi - offset] = data[lo - start:hi - start]
            with self.lock:
                if self.windows.get(index) is window:
                    window.served += hi - lo
                    if window.served >= len(data):
                        del self.windows[index]
                        if window.ahead:  # read-ahead paid off: look further
                            self.ahead = min(self.ahead * 2, self.depth)

    def _evict(self, current: int) -> None:
        """Drop windows far behind `current`, then the farthest ones while too many are held."""
        for index in [i for i in self.windows if i < current - self.depth]:
            self._drop(index)
        while len(self.windows) > self.limit:
            lowest = min(self.windows)
            self._drop(lowest if lowest < current else max(self.windows))

    def _drop(self, index: int) -> None:
        window = self.windows.pop(index)
        window.future.cancel()
        if window.ahead and window.served == 0:  # fetched for nothing: look less far ahead
            self.ahead = max(1, self.ahead // 2)

    def _forget(self, index: int, window: _Window) -> None:
        with self.lock:
            if self.windows.get(index) is window:
                del self.windows[index]

    def close(self) -> None:
        with self.lock:
            for window in self.windows.values():
                window.future.cancel()
            self.windows.clear()

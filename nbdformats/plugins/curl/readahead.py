"""Read-ahead for one sequential reader: small reads become large ranged requests, fetched early.

The object is cut into windows of `window` bytes.  A read that continues an earlier read (or
falls in a window already fetched or on its way) is served from windows, and the `depth`
windows after it are fetched in the background by the plugin's pool, so while the client is
busy (decompressing, writing) the next megabytes are already travelling.  Any other read goes
straight to the server at its own size: random access costs nothing extra.

A window is dropped once all its bytes have been served; windows a reader jumped away from are
evicted when more than `limit` are held, so memory stays under (limit * window) bytes.
"""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import CancelledError, Executor, Future
from typing import Callable

Fetch = Callable[[memoryview, int], None]  # fill the buffer with the object's bytes at offset


class ReadAhead:
    def __init__(self, fetch: Fetch, size: int, window: int, depth: int, executor: Executor) -> None:
        self.fetch, self.size, self.window, self.depth = fetch, size, window, depth
        self.executor = executor
        self.count = (size + window - 1) // window
        self.limit = 2 * depth + 4
        self.windows: dict[int, Future[memoryview]] = {}
        self.served: dict[int, int] = {}
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
            self.recent_ends.append(end)
            if streaming:
                for index in range(first, min(last + 1 + self.depth, self.count)):
                    if index not in self.windows:
                        self.windows[index] = self.executor.submit(self._fetch_window, index)
                        # The reader is past the bytes before `offset`: count them as served.
                        self.served[index] = max(0, offset - index * self.window)
                self._evict(first)
                needed = [(index, self.windows[index]) for index in range(first, last + 1)]
        if not streaming:
            self.fetch(buf, offset)
            return
        for index, future in needed:
            start = index * self.window
            lo, hi = max(offset, start), min(end, start + self.window)
            try:
                data = future.result()
            except CancelledError:  # evicted by a read far away before it started: fetch directly
                self.fetch(buf[lo - offset:hi - offset], lo)
                continue
            except BaseException:
                self._forget(index, future)  # a later read fetches it again (the error may pass)
                raise
            buf[lo - offset:hi - offset] = data[lo - start:hi - start]
            with self.lock:
                if self.windows.get(index) is future:
                    self.served[index] += hi - lo
                    if self.served[index] >= len(data):
                        del self.windows[index], self.served[index]

    def _evict(self, current: int) -> None:
        """Keep at most `limit` windows: drop those farthest behind `current`, then farthest ahead."""
        while len(self.windows) > self.limit:
            victim = min(self.windows) if min(self.windows) < current else max(self.windows)
            self.windows.pop(victim).cancel()
            del self.served[victim]

    def _forget(self, index: int, future: Future[memoryview]) -> None:
        with self.lock:
            if self.windows.get(index) is future:
                del self.windows[index], self.served[index]

    def close(self) -> None:
        with self.lock:
            for future in self.windows.values():
                future.cancel()
            self.windows.clear()
            self.served.clear()

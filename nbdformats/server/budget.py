"""Bytes of requests in flight: READ replies being built or sent, WRITE payloads received but not
yet written.  Without a bound, a client that pipelines 64 MiB reads and never reads the replies
makes the server hold them all, and many such clients exhaust memory.

Each connection has a Budget whose parent is the server's: a request takes room in both before
its buffer is allocated and gives it back once the reply is sent (or the write done).  A request
waits while either is full, except that one request always fits in an empty budget, so a request
larger than the limit still runs, alone.
"""

from __future__ import annotations

import threading

CONNECTION_LIMIT = 64 * 1024 * 1024  # nbdkit's largest request: one always fits
SERVER_LIMIT = 512 * 1024 * 1024


class Budget:
    def __init__(self, limit: int, parent: "Budget | None" = None) -> None:
        self.limit = limit
        self.parent = parent
        self.used = 0
        self._changed = threading.Condition()

    def _fits(self, n: int) -> bool:
        return self.used == 0 or self.used + n <= self.limit

    def try_acquire(self, n: int) -> bool:
        """Take n bytes if there is room here and in the parent, without waiting."""
        with self._changed:
            if not self._fits(n):
                return False
            if self.parent is not None and not self.parent.try_acquire(n):
                return False
            self.used += n
            return True

    def acquire(self, n: int) -> None:
        """Take n bytes, waiting for room here, then in the parent."""
        with self._changed:
            while not self._fits(n):
                self._changed.wait()
            self.used += n
        if self.parent is not None:
            self.parent.acquire(n)

    def release(self, n: int) -> None:
        if not n:
            return
        if self.parent is not None:
            self.parent.release(n)
        with self._changed:
            self.used -= n
            self._changed.notify_all()

"""Bytes of requests in flight: READ replies being built or sent, WRITE payloads received but not
yet written.  Without a bound, a client that pipelines 64 MiB reads and never reads the replies
makes the server hold them all, and many such clients exhaust memory.

Each connection has a Budget (CONNECTION_LIMIT) whose parent is the server's (SERVER_LIMIT): a
request takes room before its buffer is allocated and gives it back once the reply is sent (or the
write done).  A connection's first SMALL_ALLOWANCE bytes in flight are its own; only what it holds
beyond them is charged to the server, so however many hostile clients fill the server's budget, a
well-behaved client's small requests still run.  A request waits while there is no room, except
that one request always fits in an empty budget, so a request larger than the limit still runs,
alone.  Memory pinned by requests is thus at most SERVER_LIMIT + connections x SMALL_ALLOWANCE,
plus one request.
"""

from __future__ import annotations

import ctypes
import threading

CONNECTION_LIMIT = 64 * 1024 * 1024  # nbdkit's largest request: one always fits
SERVER_LIMIT = 512 * 1024 * 1024
SMALL_ALLOWANCE = 256 * 1024  # per connection, not charged to the server: small I/O never waits for others
# When the server's budget empties after holding this much, freed buffers go back to the kernel:
# glibc keeps up to its trim threshold (256 MiB, server/listeners.py tune_malloc) for reuse.
RETURN_MEMORY_AFTER = 128 * 1024 * 1024
# The trim runs this long after the budget empties: a buffer's room is given back just before the
# buffer itself is freed (by that thread, or by another connection's thread a moment later), and a
# trim at the instant of emptying missed those, leaving up to a few requests' worth in the heap.
RETURN_MEMORY_DELAY = 0.5
_trim_lock = threading.Lock()
_trim_timer: "threading.Timer | None" = None


def return_free_memory() -> None:
    """malloc_trim(0): give the heap's free pages back to the kernel (glibc; elsewhere nothing)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def return_free_memory_soon() -> None:
    """return_free_memory() RETURN_MEMORY_DELAY from now, once however often this is called."""
    global _trim_timer
    with _trim_lock:
        if _trim_timer is not None:
            return
        _trim_timer = threading.Timer(RETURN_MEMORY_DELAY, _trim_when_due)
        _trim_timer.daemon = True
        _trim_timer.start()


def _trim_when_due() -> None:
    global _trim_timer
    with _trim_lock:
        _trim_timer = None
    return_free_memory()


class Budget:
    def __init__(self, limit: int, parent: "Budget | None" = None, allowance: int = 0) -> None:
        self.limit = limit
        self.parent = parent
        self.allowance = allowance  # bytes held without charging the parent
        self.used = 0
        self.peak = 0  # the most held since the budget was last empty
        # Every request takes and gives back room: the lock is taken directly (a C context
        # manager), and release() notifies only when someone waits.
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._waiting = 0

    def _fits(self, n: int) -> bool:
        return self.used == 0 or self.used + n <= self.limit

    def _charged(self, used: int) -> int:
        """What holding `used` bytes costs the parent."""
        return used - self.allowance if used > self.allowance else 0

    def try_acquire(self, n: int) -> bool:
        """Take n bytes if there is room here and in the parent, without waiting."""
        with self._lock:
            used = self.used
            if used and used + n > self.limit:
                return False
            extra = self._charged(used + n) - self._charged(used)
            if extra and self.parent is not None and not self.parent.try_acquire(extra):
                return False
            self._take(n)
            return True

    def acquire(self, n: int) -> None:
        """Take n bytes, waiting for room here, then in the parent."""
        with self._lock:
            while not self._fits(n):
                self._waiting += 1
                try:
                    self._changed.wait()
                finally:
                    self._waiting -= 1
            extra = self._charged(self.used + n) - self._charged(self.used)
            self._take(n)
        if extra and self.parent is not None:
            self.parent.acquire(extra)

    def _take(self, n: int) -> None:
        self.used += n
        if self.used > self.peak:
            self.peak = self.used

    def release(self, n: int) -> None:
        if not n:
            return
        with self._lock:
            used = self.used
            extra = self._charged(used) - self._charged(used - n)
            self.used = used - n
            if self._waiting:
                self._changed.notify_all()
            emptied_after_much = self.used == 0 and self.peak >= RETURN_MEMORY_AFTER
            if self.used == 0:
                self.peak = 0
        if extra and self.parent is not None:
            self.parent.release(extra)
        if emptied_after_much and self.parent is None:
            return_free_memory_soon()

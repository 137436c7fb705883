"""Adaptive busy polling for the next request, as qemu's event loop does (poll-max-ns).

At queue depth 1 the next request comes some 20-40 us after our reply.  A server asleep in
recv() or epoll then waits another ~20 us for its idle CPU to be woken (an IPI; in a VM, an
exit), which is more than a page-cache read or write costs.  So before sleeping, a connection
tries non-blocking receives for a while.  The window doubles (from FIRST_WINDOW_NS up to the
`--busy-poll` maximum) while requests keep arriving within the maximum, and drops to zero after
a longer wait, so an idle connection burns no CPU.  At most one poller per spare CPU runs at a
time (none on one CPU, where the client needs the CPU we would spin on), and each try yields
the CPU first to anything else runnable on it.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Callable

DEFAULT_MAX_US = 64  # covers the 20-40 us between a reply and the next request on this machine
FIRST_WINDOW_NS = 4000

_spare_cpus = (os.cpu_count() or 1) - 1
_pollers = threading.BoundedSemaphore(max(1, _spare_cpus))


class BusyPoll:
    """One connection's polling window."""

    def __init__(self, max_us: int) -> None:
        self.max_ns = max_us * 1000 if _spare_cpus > 0 else 0
        self.window_ns = 0

    def poll(self, try_receive: Callable[[], int | None]) -> int | None:
        """Call `try_receive` (non-blocking: None when nothing has arrived) until it returns a
        result or the window ends; None if the caller should wait the normal way."""
        window = self.window_ns
        if not window or not _pollers.acquire(blocking=False):
            return None
        try:
            clock = time.perf_counter_ns
            deadline = clock() + window
            while True:
                received = try_receive()
                if received is not None:
                    return received
                if clock() > deadline:
                    return None
                os.sched_yield()  # a client on this CPU runs first
        finally:
            _pollers.release()

    def waited(self, nanoseconds: int) -> None:
        """After waiting `nanoseconds` for data (polling that found none, then sleeping): adapt the window."""
        if nanoseconds > self.max_ns:
            self.window_ns = 0  # idle: wait the normal way at once next time
        elif nanoseconds > self.window_ns:
            self.window_ns = min(self.max_ns, max(FIRST_WINDOW_NS, self.window_ns * 2))

"""Counting client connections (not opens of the chain) for exitlast, exitwhen and limit.

A client may open the chain more than once on one connection (NBD_OPT_INFO, then NBD_OPT_GO),
so these filters count connections, from the server's preconnect() to its disconnected()
notification.  nbdkit counts opens instead, so its exitlast filter exits after a client's
NBD_OPT_INFO and drops the connection.
"""

from __future__ import annotations

import threading
from typing import Any, Callable


class ConnectionTracker:
    """Live client connections; `on_end(remaining)` runs (without the lock) when one ends."""

    def __init__(self, on_end: Callable[[int], None] | None = None) -> None:
        self.lock = threading.Lock()
        self.live: set[int] = set()
        self.on_end = on_end

    def count(self) -> int:
        with self.lock:
            return len(self.live)

    def connected(self, client: Any, limit: int = 0) -> bool:
        """Count a new connection; False (and nothing counted) if `limit` (0: none) is reached."""
        with self.lock:
            if limit and len(self.live) >= limit:
                return False
            self.live.add(id(client))
            return True

    def disconnected(self, client: Any) -> None:
        with self.lock:
            if id(client) not in self.live:
                return
            self.live.discard(id(client))
            remaining = len(self.live)
        if self.on_end is not None:
            self.on_end(remaining)

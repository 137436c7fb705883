"""Counting client connections (not opens of the chain) for exitlast, exitwhen, limit and noparallel.

A client may open the chain more than once on one connection (NBD_OPT_INFO, then NBD_OPT_GO)
and keep the connection between the two, so a connection is counted from its first open
until its socket is gone: closed by us, or shut down by the peer.  When the last open of a
connection closes while its socket is still alive (after NBD_OPT_INFO), a watcher thread
waits for the socket to go or for the next open.  nbdkit counts opens instead, so its
exitlast filter exits after a client's NBD_OPT_INFO and drops the connection.
"""

from __future__ import annotations

import os
import select
import threading
import time
from typing import Any, Callable

WATCH_INTERVAL = 0.05  # seconds between checks of a connection that is between opens
_GONE_EVENTS = select.POLLHUP | select.POLLERR | select.POLLNVAL | getattr(select, "POLLRDHUP", 0x2000)


def socket_identity(client: Any) -> tuple[int, int] | None:
    """(fd, inode) of a client socket, or None if it is closed."""
    try:
        fd = client.fileno()
        return (fd, os.fstat(fd).st_ino) if fd >= 0 else None
    except (OSError, ValueError):
        return None


def socket_gone(client: Any, identity: tuple[int, int] | None) -> bool:
    """True once a socket (whose socket_identity() was `identity`) is closed or shut down by the peer."""
    now = socket_identity(client)
    if now is None or now != identity:  # closed (and maybe its fd reused)
        return True
    poller = select.poll()
    poller.register(now[0], _GONE_EVENTS)
    return any(events & _GONE_EVENTS for _, events in poller.poll(0))


class _Connection:
    __slots__ = ("client", "identity", "opens", "watched")

    def __init__(self, client: Any) -> None:
        self.client = client
        self.identity = socket_identity(client)
        self.opens = 0
        self.watched = False

    def gone(self) -> bool:
        return socket_gone(self.client, self.identity)


class ConnectionTracker:
    """Live client connections; `on_end(remaining)` runs (without the lock) when one ends."""

    def __init__(self, on_end: Callable[[int], None] | None = None) -> None:
        self.lock = threading.Lock()
        self.connections: dict[int, _Connection] = {}
        self.on_end = on_end
        self._anonymous = 0  # opens without a known client (in-process use): one connection each

    def count(self) -> int:
        with self.lock:
            return len(self.connections) + self._anonymous

    def opened(self, client: Any, limit: int = 0) -> bool:
        """Count an open; False (and nothing counted) if it is a new connection beyond `limit` (0: none)."""
        with self.lock:
            connection = self.connections.get(id(client)) if client is not None else None
            if connection is None and limit and len(self.connections) + self._anonymous >= limit:
                # A connection dropped while it was still opening never closes its open: forget it.
                for key, other in list(self.connections.items()):
                    if other.gone():
                        del self.connections[key]
                if len(self.connections) + self._anonymous >= limit:
                    return False
            if client is None:
                self._anonymous += 1
                return True
            if connection is None:
                connection = self.connections[id(client)] = _Connection(client)
            connection.opens += 1
            return True

    def closed(self, client: Any) -> None:
        with self.lock:
            if client is None:
                self._anonymous -= 1
                remaining = len(self.connections) + self._anonymous
            else:
                connection = self.connections.get(id(client))
                if connection is None:
                    return
                connection.opens -= 1
                if connection.opens > 0:
                    return
                if not connection.gone():
                    if not connection.watched:
                        connection.watched = True
                        threading.Thread(target=self._watch, args=(connection,), daemon=True,
                                         name="nbdformats-connection-watch").start()
                    return
                del self.connections[id(client)]
                remaining = len(self.connections) + self._anonymous
        if self.on_end is not None:
            self.on_end(remaining)

    def _watch(self, connection: _Connection) -> None:
        while True:
            time.sleep(WATCH_INTERVAL)
            with self.lock:
                if connection.opens > 0:  # opened again (NBD_OPT_GO after NBD_OPT_INFO)
                    connection.watched = False
                    return
                if not connection.gone():
                    continue
                if self.connections.pop(id(connection.client), None) is None:
                    return  # already forgotten (pruned by a limit check)
                remaining = len(self.connections) + self._anonymous
            if self.on_end is not None:
                self.on_end(remaining)
            return

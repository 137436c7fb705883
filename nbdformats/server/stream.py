"""The one I/O layer under a connection: a byte stream the handshake and the engine read and write.

Three kinds, one interface: a plain socket (TCP, Unix, --fd, -s on a socket), TLS over a socket
(tls/memorybio.py: safe for one reading and one writing thread at once), and a pair of file
descriptors for `-s` when stdin is not a socket (nbdkit's fuzzing runs `nbdkit -s < file`).
Reads and writes block; `timeout` bounds a read during the handshake.  Sends gather a list of
buffers: one sendmsg per batch of replies on a plain socket.
"""

from __future__ import annotations

import os
import select
import socket
from typing import Any, Sequence

from ..tls.memorybio import TLSSocket

SEND_BUFFER = 2 * 1024 * 1024  # room in the kernel for several large replies (capped by net.core.wmem_max)
IOV_MAX = 1024


class Stream:
    """A connection's byte stream.  `socket` is the client's socket (None for a pipe or file)."""

    socket: socket.socket | None = None
    can_busy_poll = False  # non-blocking tries are cheap and meaningful (a plain socket)

    @property
    def hangup_fd(self) -> int | None:
        """A descriptor that polls POLLRDHUP when the client hangs up (api.sleep watches it)."""
        return self.socket.fileno() if self.socket is not None else None

    def recv_into(self, buf: memoryview, timeout: float | None = None) -> int:
        """Receive into buf; 0 at the end of the stream.  Raises TimeoutError after `timeout` seconds."""
        raise NotImplementedError

    def try_recv_into(self, buf: memoryview) -> int | None:
        """Receive what has already arrived, without waiting: None when nothing has."""
        return None

    def has_input(self) -> bool:
        """Whether bytes wait to be received (the watchdog asks while every thread is busy)."""
        return False

    def send(self, buffers: Sequence[Any]) -> None:
        raise NotImplementedError

    def stop_reading(self) -> None:
        """Wake a thread blocked in recv_into with an end of stream (server shutdown)."""

    def close(self) -> None:
        raise NotImplementedError


class SocketStream(Stream):
    can_busy_poll = True

    def __init__(self, sock: socket.socket) -> None:
        self.socket = self.sock = sock
        sock.setblocking(True)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        except OSError:
            pass

    def recv_into(self, buf: memoryview, timeout: float | None = None) -> int:
        if timeout is None:
            return self.sock.recv_into(buf)
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv_into(buf)
        finally:
            self.sock.settimeout(None)

    def try_recv_into(self, buf: memoryview) -> int | None:
        try:
            return self.sock.recv_into(buf, 0, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None

    def has_input(self) -> bool:
        try:
            return bool(self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except OSError:  # nothing (BlockingIOError), or the connection is gone
            return False

    def send(self, buffers: Sequence[Any]) -> None:
        sendmsg = self.sock.sendmsg
        if len(buffers) == 1:
            self.sock.sendall(buffers[0])
            return
        pending = list(buffers)
        while pending:
            sent = sendmsg(pending[:IOV_MAX])
            # Rare: the socket buffer filled part way; drop what went out and send the rest.
            while sent:
                first = len(pending[0])
                if sent >= first:
                    sent -= first
                    pending.pop(0)
                else:
                    pending[0] = memoryview(pending[0])[sent:]
                    sent = 0

    def stop_reading(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()


class TLSStream(Stream):
    def __init__(self, tls: TLSSocket) -> None:
        self.tls = tls
        self.socket = tls.raw

    def recv_into(self, buf: memoryview, timeout: float | None = None) -> int:
        if timeout is None:
            return self.tls.recv_into(buf)
        self.tls.settimeout(timeout)
        try:
            return self.tls.recv_into(buf)
        finally:
            self.tls.settimeout(None)

    def send(self, buffers: Sequence[Any]) -> None:
        self.tls.send_buffers(buffers)

    def stop_reading(self) -> None:
        try:
            self.tls.shutdown(socket.SHUT_RD)
        except OSError:
            pass

    def close(self) -> None:
        self.tls.close()


class PipeStream(Stream):
    """`-s` when stdin or stdout is a pipe or a file rather than a socket."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self.read_fd, self.write_fd = read_fd, write_fd
        self._wake_read, self._wake_write = os.pipe()  # stop_reading() wakes a blocked read

    def recv_into(self, buf: memoryview, timeout: float | None = None) -> int:
        ready, _, _ = select.select([self.read_fd, self._wake_read], [], [], timeout)
        if not ready:
            raise TimeoutError("no data in time")
        if self._wake_read in ready:
            return 0
        return os.readv(self.read_fd, [buf])

    def send(self, buffers: Sequence[Any]) -> None:
        for data in buffers:
            view = memoryview(data).cast("B")
            while view:
                view = view[os.write(self.write_fd, view):]

    def stop_reading(self) -> None:
        os.write(self._wake_write, b"x")

    def close(self) -> None:
        for fd in {self.read_fd, self.write_fd, self._wake_read, self._wake_write}:
            try:
                os.close(fd)
            except OSError:
                pass

"""TLS over a connected socket through memory BIOs, safe for one reader and one writer at once.

OpenSSL objects must not be used by two threads at the same time, which an ssl.SSLSocket read
by one thread while another writes would do.  Here one lock guards the SSL object and its BIOs,
and the socket itself is read and written outside it, so a thread waiting for the peer never
blocks a thread that encrypts.  Encrypted bytes go out in the order the SSL object produced
them: they are taken from the outgoing BIO and sent under the send lock.  The server's
transmission engine and our NBD client both use it.
"""

from __future__ import annotations

import socket
import ssl
import threading
from typing import Any, Sequence, cast

RECORD = 256 * 1024  # plaintext encrypted per step: a 64 MiB reply does not double in memory
RECEIVE = 256 * 1024


class TLSClosed(ConnectionError):
    """The peer closed the connection during the TLS handshake."""


class TLSSocket:
    def __init__(self, raw: socket.socket, context: ssl.SSLContext, *, server_side: bool,
                 hostname: str | None = None) -> None:
        self.raw = raw
        self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._incoming, self._outgoing, server_side=server_side,
                                     server_hostname=None if server_side else hostname)
        self._ssl_lock = threading.Lock()  # the SSL object and its BIOs
        self._send_lock = threading.Lock()  # taking bytes from the outgoing BIO and sending them

    def do_handshake(self) -> None:
        """Run the TLS handshake (blocking; the raw socket's timeout applies to each wait)."""
        while True:
            try:
                with self._ssl_lock:
                    self._ssl.do_handshake()
                self._flush()
                return
            except ssl.SSLWantReadError:
                self._flush()
                if not self._fill():
                    raise TLSClosed("the peer closed the connection during the TLS handshake") from None

    def _flush(self) -> None:
        with self._send_lock:
            with self._ssl_lock:
                data = self._outgoing.read()
            if data:
                self.raw.sendall(data)

    def _fill(self) -> bool:
        data = self.raw.recv(RECEIVE)
        with self._ssl_lock:
            if data:
                self._incoming.write(data)
            else:
                self._incoming.write_eof()
        return bool(data)

    def sendall(self, data: Any) -> None:
        self.send_buffers([data])

    def send_buffers(self, buffers: Sequence[Any]) -> None:
        """Encrypt and send buffers in order, in records of up to RECORD bytes."""
        with self._send_lock:
            for data in buffers:
                view = memoryview(data).cast("B")
                for start in range(0, len(view), RECORD):
                    with self._ssl_lock:
                        self._ssl.write(view[start:start + RECORD])
                        encrypted = self._outgoing.read()
                    self.raw.sendall(encrypted)

    def recv_into(self, buf: memoryview) -> int:
        """Decrypt into buf; 0 at the end of the stream."""
        while True:
            try:
                with self._ssl_lock:
                    n = cast(int, self._ssl.read(len(buf), buf))  # into buf: a count
                    pending = self._outgoing.pending
            except ssl.SSLWantReadError:
                if not self._fill():
                    return 0
                continue
            except ssl.SSLZeroReturnError:
                return 0
            except ssl.SSLEOFError:  # the peer closed without close_notify
                return 0
            if pending:  # e.g. an answer to a TLS 1.3 key update
                self._flush()
            return n

    def settimeout(self, timeout: float | None) -> None:
        self.raw.settimeout(timeout)

    def shutdown(self, how: int) -> None:
        self.raw.shutdown(how)

    def close(self) -> None:
        self.raw.close()

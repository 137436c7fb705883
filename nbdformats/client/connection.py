"""An NBD client: talks to any NBD server (ours, nbdkit, qemu-nbd) without libnbd.

Three layers, top to bottom of this file:

- `parse_uri()` turns nbd://, nbds://, nbd+unix:// and nbds+unix:// URIs (libnbd's syntax) into an
  `Address`.
- `negotiate()` is the client side of the handshake as a sans-IO generator: it yields `Recv(n)`,
  `Send(data)` or `StartTLS()` and returns a `Negotiated` (size, flags, block sizes, what was agreed:
  structured replies, extended headers, base:allocation).  `ReplyDecoder` splits the reply stream of
  the transmission phase into chunks, sans-IO too, in the get_buffer()/buffer_updated() shape of the
  server's RequestDecoder: READ data is received straight into the caller's buffer.
- `NBDClient` is the thin blocking layer: a socket, a send lock and one reader thread.  Any number of
  threads may send requests at once; they are pipelined on the one connection and replies are matched
  to requests by cookie.

    with NBDClient.connect("nbd+unix:///disk?socket=/tmp/sock") as nbd:
        data = nbd.pread(4096, 0)
        nbd.pwrite(b"hello", 0, P.CMD_FLAG_FUA)
        extents = nbd.block_status(nbd.size, 0)        # [(length, P.STATE_HOLE | P.STATE_ZERO), ...]

Request flags are the wire flags of `protocol` (CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, ...).  A request the
server fails raises NBDError with the server's errno and message; a broken connection raises NBDError(EIO)
for every request in flight and after.  `send_request()` sends one raw request (any type, flags and
bounds, for tests) and returns the finished `Command` instead of raising.

Nothing waits forever for a server that stops answering: `connect(timeout=)` bounds connecting and the
whole handshake, and with `request_timeout=` a request that gets no reply in time fails with ETIMEDOUT
and breaks the connection (every request in flight fails with it, later ones with EIO).
"""

from __future__ import annotations

import errno
import getpass
import itertools
import os
import socket
import threading
import time
from dataclasses import replace
from typing import Any, Callable, Iterable, TypeVar

from ..api.errors import NBDError
from ..protocol import wire as P
from ..protocol.errors import ProtocolError
from ..tls.memorybio import TLSClosed, TLSSocket
from .address import DEFAULT_MAXIMUM, Address, HandshakeError, parse_uri, tls_context
from .negotiate import Negotiated, Recv, Send, negotiate
from .replies import Command, ReplyDecoder, encode_request, wait_all

ZERO_TRIM_PIECE = 1 << 30  # TRIM / WRITE_ZEROES / CACHE longer than this are sent as several requests


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = bytearray(size)
    view = memoryview(data)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            raise HandshakeError("the server closed the connection during the handshake")
        got += n
    return bytes(data)


def _send_all(sock: "socket.socket | TLSSocket", header: bytes, payload: Any) -> None:
    """Header and payload in as few system calls as possible, without joining them in memory."""
    if payload is None or not len(payload):
        sock.sendall(header)
        return
    if isinstance(sock, TLSSocket):
        sock.sendall(header)
        sock.sendall(payload)
        return
    parts = [memoryview(header), memoryview(payload).cast("B")]
    while parts:
        sent = sock.sendmsg(parts)
        while sent:
            if sent >= len(parts[0]):
                sent -= len(parts.pop(0))
            else:
                parts[0] = parts[0][sent:]
                sent = 0


Result = TypeVar("Result")


def _within(timeout: float, address: Address, talk: Callable[[socket.socket], Result]) -> Result:
    """Connect to `address` and run `talk` on the socket (the handshake), all within `timeout` seconds.

    A timer shuts the socket down when the time is up: that wakes whatever waits on it, the TLS
    handshake included, so the bound holds however the server dribbles its bytes.  The socket is closed
    if `talk` fails; a timeout raises TimeoutError (ETIMEDOUT).
    """
    deadline = time.monotonic() + timeout
    try:
        sock = _open_socket(address, timeout)
    except TimeoutError:
        raise TimeoutError(errno.ETIMEDOUT, f"no connection to {address.describe()} within {timeout:g} s") from None
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    timer = threading.Timer(max(0.0, deadline - time.monotonic()), expire)
    timer.daemon = True
    timer.start()
    try:
        return talk(sock)
    except BaseException as e:
        sock.close()
        if isinstance(e, OSError) and (expired.is_set() or isinstance(e, TimeoutError)):
            raise TimeoutError(errno.ETIMEDOUT, f"{address.describe()} did not finish the handshake within "
                                                f"{timeout:g} s") from None
        raise
    finally:
        timer.cancel()


def _open_socket(address: Address, timeout: float | None) -> socket.socket:
    if address.fd is not None:
        sock = socket.socket(fileno=os.dup(address.fd))
        sock.settimeout(timeout)
        return sock
    if address.unix is not None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(address.unix)
        except BaseException:
            sock.close()
            raise
        return sock
    sock = socket.create_connection((address.host, address.port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def handshake(sock: socket.socket, address: Address, *, structured: bool = True, extended: bool = True,
              meta_contexts: Iterable[str] = (P.BASE_ALLOCATION,),
              list_exports: bool = False) -> tuple[socket.socket, Negotiated]:
    """Run `negotiate()` on a connected socket; returns the socket (wrapped if TLS started) and the result."""
    steps = negotiate(address.export, tls=address.tls, structured=structured, extended=extended,
                      meta_contexts=meta_contexts, list_exports=list_exports)
    answer: bytes | None = None
    while True:
        try:
            step = steps.send(answer)
        except StopIteration as stop:
            return sock, stop.value
        answer = None
        if isinstance(step, Recv):
            answer = _recv_exact(sock, step.size) if step.size else b""
        elif isinstance(step, Send):
            sock.sendall(step.data)
        else:
            if address.tls_psk_file:
                from ..tls.psk import psk_client_context
                context = psk_client_context(address.tls_psk_file, address.tls_username or getpass.getuser())
            else:
                context = tls_context(address.tls_certificates, address.tls_verify)
            hostname = address.tls_hostname or address.host
            if not hostname or address.tls_psk_file:
                context.check_hostname = False  # a Unix socket has no name to check
            tls = TLSSocket(sock, context, server_side=False, hostname=hostname)
            try:
                tls.do_handshake()
            except TLSClosed as e:
                raise HandshakeError(str(e)) from None
            sock = tls  # type: ignore[assignment]


class NBDClient:
    """One connection to an NBD server, usable from many threads at once.

    Data methods split requests larger than the server's maximum block size into pipelined pieces.
    """

    def __init__(self, sock: socket.socket | TLSSocket, info: Negotiated, address: Address | None = None, *,
                 request_timeout: float | None = None) -> None:
        self.sock = sock
        self.info = info
        self.address = address
        self.request_timeout = request_timeout
        self.context_id = info.meta_contexts.get(P.BASE_ALLOCATION)
        self.max_payload = max(min(info.maximum or DEFAULT_MAXIMUM, 64 * 1024 * 1024), 1)
        self._commands: dict[int, Command] = {}
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._cookies = itertools.count(1)
        self._failure: str | None = None  # why the connection is unusable
        self._closing = False
        self._decoder = ReplyDecoder(self._commands, structured=info.structured, extended=info.extended)
        self._stopped = threading.Event()  # the connection failed or is closing: the watchdog ends
        sock.settimeout(None)
        self._reader = threading.Thread(target=self._read_replies, name="nbd-client-reader", daemon=True)
        self._reader.start()
        if request_timeout is not None:
            threading.Thread(target=self._expire_requests, args=(request_timeout,), name="nbd-client-watchdog",
                             daemon=True).start()

    # -- Connecting ----------------------------------------------------------------------------
    @classmethod
    def connect(cls, target: str | Address, *, export: str | None = None, tls: str | None = None,
                structured: bool = True, extended: bool = True,
                meta_contexts: Iterable[str] = (P.BASE_ALLOCATION,), timeout: float = 60.0,
                request_timeout: float | None = None) -> "NBDClient":
        """Connect to a URI or Address and finish the handshake.  `timeout` bounds connecting and the
        whole handshake, `request_timeout` the wait for each request's reply (None: no limit).  Raises
        OSError (HandshakeError, TimeoutError, ssl.SSLError, ...) on failure."""
        address = parse_uri(target) if isinstance(target, str) else target
        if export is not None:
            address = replace(address, export=export)
        if tls is not None:
            address = replace(address, tls=tls)
        sock, info = _within(timeout, address, lambda sock: handshake(
            sock, address, structured=structured, extended=extended, meta_contexts=meta_contexts))
        return cls(sock, info, address, request_timeout=request_timeout)

    @staticmethod
    def list_exports(target: str | Address, *, tls: str | None = None,
                     timeout: float = 60.0) -> list[tuple[str, str]]:
        """The server's exports as (name, description) pairs (NBD_OPT_LIST), within `timeout` seconds."""
        address = parse_uri(target) if isinstance(target, str) else target
        if tls is not None:
            address = replace(address, tls=tls)
        sock, info = _within(timeout, address, lambda sock: handshake(sock, address, list_exports=True))
        sock.close()
        return info.exports or []

    def __enter__(self) -> "NBDClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- What the server offers ----------------------------------------------------------------
    @property
    def size(self) -> int:
        return self.info.size

    def _flag(self, flag: int) -> bool:
        return bool(self.info.flags & flag)

    @property
    def read_only(self) -> bool:
        return self._flag(P.TF_READ_ONLY)

    @property
    def can_flush(self) -> bool:
        return self._flag(P.TF_SEND_FLUSH)

    @property
    def can_fua(self) -> bool:
        return self._flag(P.TF_SEND_FUA)

    @property
    def can_trim(self) -> bool:
        return self._flag(P.TF_SEND_TRIM)

    @property
    def can_zero(self) -> bool:
        return self._flag(P.TF_SEND_WRITE_ZEROES)

    @property
    def can_fast_zero(self) -> bool:
        return self._flag(P.TF_SEND_FAST_ZERO)

    @property
    def can_cache(self) -> bool:
        return self._flag(P.TF_SEND_CACHE)

    @property
    def can_multi_conn(self) -> bool:
        return self._flag(P.TF_CAN_MULTI_CONN)

    @property
    def is_rotational(self) -> bool:
        return self._flag(P.TF_ROTATIONAL)

    @property
    def can_block_status(self) -> bool:
        return self.context_id is not None

    # -- Requests ------------------------------------------------------------------------------
    def submit(self, type: int, offset: int, length: int, flags: int = 0, *, payload: Any = None,
               into: memoryview | None = None) -> Command:
        """Send one request without waiting; `wait()` or `result()` on the returned Command.

        READ data goes into `into` (len(into) == length); WRITE sends `payload`.  No checks: the
        server judges the request (fuzz and fault tests rely on that).
        """
        command = Command(type, flags, offset, length, buf=into, payload=payload)
        if type == P.CMD_READ and into is None:
            command.buf = memoryview(bytearray(length))
        with self._lock:
            if self._failure is not None or self._closing:
                command.fail(errno.EIO if self._failure else errno.ESHUTDOWN,
                             self._failure or "the connection is closing")
                command.finish()
                return command
            command.cookie = next(self._cookies)
            command.sent = time.monotonic()
            self._commands[command.cookie] = command
        header = encode_request(command, self.info.extended)
        try:
            with self._send_lock:
                _send_all(self.sock, header, payload)
        except OSError as e:
            self._connection_failed(f"sending to the server failed: {e}")
        return command

    def send_request(self, type: int, offset: int, length: int, flags: int = 0, *, payload: Any = None,
                     into: memoryview | None = None) -> Command:
        """Send one raw request and wait for its reply; errors are returned in `.error`, not raised."""
        return self.submit(type, offset, length, flags, payload=payload, into=into).wait()

    def submit_split(self, type: int, offset: int, length: int, flags: int = 0, *, payload: Any = None,
                     into: memoryview | None = None) -> list[Command]:
        """Like submit(), in pieces the server accepts: READ and WRITE at most its maximum block size,
        TRIM, WRITE_ZEROES and CACHE at most 1 GiB.  All pieces are in flight at once."""
        if type in (P.CMD_READ, P.CMD_WRITE):
            source = into if type == P.CMD_READ else payload
            assert source is not None, "READ needs `into`, WRITE a payload"
            view = memoryview(source).cast("B")
            length, step = len(view), self.max_payload
            if type == P.CMD_READ:
                into = view
            else:
                payload = view
        else:
            step = ZERO_TRIM_PIECE
        if length <= step:
            return [self.submit(type, offset, length, flags, payload=payload, into=into)]
        commands = []
        for done in range(0, length, step):
            n = min(step, length - done)
            if type == P.CMD_READ:
                commands.append(self.submit(type, offset + done, n, flags, into=view[done:done + n]))
            elif type == P.CMD_WRITE:
                commands.append(self.submit(type, offset + done, n, flags, payload=view[done:done + n]))
            else:
                commands.append(self.submit(type, offset + done, n, flags))
        return commands

    def pread(self, count: int, offset: int, flags: int = 0) -> bytearray:
        buf = bytearray(count)
        self.pread_into(memoryview(buf), offset, flags)
        return buf

    def pread_into(self, buf: memoryview | bytearray, offset: int, flags: int = 0) -> None:
        view = memoryview(buf).cast("B")
        wait_all(self.submit_split(P.CMD_READ, offset, len(view), flags, into=view))

    def pwrite(self, buf: Any, offset: int, flags: int = 0) -> None:
        wait_all(self.submit_split(P.CMD_WRITE, offset, len(buf), flags, payload=buf))

    def flush(self, flags: int = 0) -> None:
        self.submit(P.CMD_FLUSH, 0, 0, flags).result()

    def resize(self, size: int) -> None:
        """NBD_CMD_RESIZE (the resize extension; needs NBD_FLAG_SEND_RESIZE): the new size travels
        in the request's offset field.  Afterwards `size` is the new size."""
        if not self._flag(P.TF_SEND_RESIZE):
            raise NBDError(errno.ENOTSUP, "the server does not offer resizing")
        self.submit(P.CMD_RESIZE, size, 0).result()
        self.info = replace(self.info, size=size)

    def trim(self, count: int, offset: int, flags: int = 0) -> None:
        wait_all(self.submit_split(P.CMD_TRIM, offset, count, flags))

    def zero(self, count: int, offset: int, flags: int = 0) -> None:
        wait_all(self.submit_split(P.CMD_WRITE_ZEROES, offset, count, flags))

    def cache(self, count: int, offset: int, flags: int = 0) -> None:
        wait_all(self.submit_split(P.CMD_CACHE, offset, count, flags))

    def block_status(self, count: int, offset: int, flags: int = 0) -> list[tuple[int, int]]:
        """base:allocation extents from `offset` as (length, STATE_HOLE|STATE_ZERO flags).

        They may cover less than `count` (ask again from where they end) or, for the last one, more.
        """
        if self.context_id is None:
            raise NBDError(errno.ENOTSUP, "the server did not agree to base:allocation block status")
        if not self.info.extended:
            count = min(count, 1 << 31)
        command = self.submit(P.CMD_BLOCK_STATUS, offset, count, flags).result()
        return command.status.get(self.context_id, [])

    # -- Connection ----------------------------------------------------------------------------
    @property
    def failure(self) -> str | None:
        """Why the connection broke, or None while it works."""
        return self._failure

    def _read_replies(self) -> None:
        decoder, sock = self._decoder, self.sock
        try:
            while True:
                n = sock.recv_into(decoder.get_buffer())
                if n == 0:
                    raise ConnectionError("the server closed the connection")
                for command in decoder.buffer_updated(n):
                    with self._lock:
                        self._commands.pop(command.cookie, None)
        except Exception as e:  # whatever stops the reader fails the requests waiting for it
            if not (self._closing and not self._commands):
                self._connection_failed(str(e) if isinstance(e, (OSError, ProtocolError)) else repr(e))

    def _expire_requests(self, timeout: float) -> None:
        """The watchdog: the oldest request in flight gets `timeout` seconds for its reply, or the server
        is taken for hung and the connection broken.  Requests are kept in the order they were sent, so
        the oldest has the earliest deadline; with none in flight, waking every `timeout` seconds is soon
        enough, as a request sent meanwhile is not due before then."""
        while True:
            with self._lock:
                oldest = next(iter(self._commands.values()), None)
            wait = timeout if oldest is None else oldest.sent + timeout - time.monotonic()
            if wait <= 0:
                assert oldest is not None
                name = P.COMMAND_NAMES.get(oldest.type, str(oldest.type))
                self._connection_failed(f"{name} got no reply in {timeout:g} s", errno.ETIMEDOUT)
                return
            if self._stopped.wait(wait):
                return

    def _connection_failed(self, reason: str, error: int = errno.EIO) -> None:
        """Fail every request in flight with `error`, and all later ones with EIO."""
        with self._lock:
            if self._failure is None:
                self._failure = f"connection to the NBD server lost: {reason}"
            pending = list(self._commands.values())
            self._commands.clear()
        self._stopped.set()
        for command in pending:
            if not command.done:
                command.fail(error, self._failure)
                command.finish()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self, timeout: float = 10.0) -> None:
        """Wait for requests in flight, say NBD_CMD_DISC and close the socket."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            pending = list(self._commands.values())
        self._stopped.set()
        deadline = time.monotonic() + timeout
        for command in pending:
            try:
                command.wait(max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                break
        if self._failure is None:
            try:
                with self._send_lock:
                    self.sock.sendall(encode_request(Command(P.CMD_DISC, 0, 0, 0), self.info.extended))
            except OSError:
                pass
        # The server closes after DISC; the reader sees the end of the stream.
        self._reader.join(max(0.1, min(2.0, deadline - time.monotonic())))
        if self._reader.is_alive():
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._reader.join(2.0)
        if self._commands:
            self._connection_failed("closed")
        self.sock.close()

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
"""

from __future__ import annotations

import _thread
import errno
import getpass
import itertools
import os
import socket
import ssl
import struct
import threading
import time
import urllib.parse
from dataclasses import dataclass, field, replace
from typing import Any, Generator, Iterable

from . import protocol as P
from .errors import NBDError, ProtocolError

DEFAULT_PORT = 10809
# "a client desiring maximum interoperability SHOULD ... limit NBD_CMD_READ and NBD_CMD_WRITE commands
# to a maximum block size of 2^25 (33,554,432)" when the server advertises no block size constraints.
DEFAULT_MAXIMUM = 32 * 1024 * 1024
MAX_OPTION_REPLY = 1024 * 1024  # longest option reply payload we accept
MAX_OPTION_REPLIES = 100_000  # replies to one option (exports in a list)
MAX_CHUNK_PAYLOAD = 64 * 1024 * 1024  # non-data chunk payloads (block status descriptors, errors)
ZERO_TRIM_PIECE = 1 << 30  # TRIM / WRITE_ZEROES / CACHE longer than this are sent as several requests
SCRATCH_SIZE = 256 * 1024


class HandshakeError(ConnectionError):
    """The server could not be reached, refused the export, or does not speak NBD as expected."""


# -- Addresses ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Address:
    """Where a server is and how to talk to it (what an NBD URI says)."""

    unix: str | None = None  # Unix socket path
    host: str | None = None  # TCP host name or address
    port: int = DEFAULT_PORT
    fd: int | None = None  # an already connected socket (nbdkit's socket-fd=)
    export: str = ""
    tls: str = "off"  # off, on (if the server offers it), require
    tls_certificates: str | None = None  # directory with ca-cert.pem [client-cert.pem client-key.pem]
    tls_verify: bool = True
    tls_hostname: str | None = None  # name checked in the server certificate (default: host)
    tls_psk_file: str | None = None  # pre-shared keys (psktool's format) instead of certificates
    tls_username: str | None = None  # whose key from tls_psk_file (default: the login name)

    def describe(self) -> str:
        where = self.unix or (f"fd {self.fd}" if self.fd is not None else f"{self.host}:{self.port}")
        return f"{where} export {self.export!r}" if self.export else where


_SCHEMES = {"nbd": ("tcp", "off"), "nbds": ("tcp", "require"), "nbd+unix": ("unix", "off"),
            "nbds+unix": ("unix", "require")}


def parse_uri(uri: str) -> Address:
    """An NBD URI as libnbd reads it (https://github.com/NetworkBlockDevice/nbd/blob/master/doc/uri.md).

    nbd[s]://HOST[:PORT][/EXPORT] and nbd[s]+unix:///[EXPORT]?socket=PATH; query parameters
    tls-certificates=DIR, tls-verify-peer=BOOL, tls-hostname=NAME.  The export is the path
    after its first "/", percent-decoded.
    """
    parts = urllib.parse.urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        if scheme.endswith("+vsock"):
            raise ValueError(f"{uri}: vsock URIs are not supported")
        raise ValueError(f"{uri}: not an NBD URI (use nbd://, nbds://, nbd+unix:// or nbds+unix://)")
    transport, tls = _SCHEMES[scheme]
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
    unknown = set(query) - {"socket", "tls-certificates", "tls-verify-peer", "tls-hostname", "tls-username",
                            "tls-psk-file"}
    if unknown:
        raise ValueError(f"{uri}: unknown URI query parameter {sorted(unknown)[0]!r}")

    def one(key: str) -> str | None:
        values = query.get(key)
        return values[-1] if values else None

    path = urllib.parse.unquote(parts.path)
    export = path[1:] if path.startswith("/") else path
    verify = one("tls-verify-peer")
    fields: dict[str, Any] = dict(export=export, tls=tls, tls_certificates=one("tls-certificates"),
                                  tls_hostname=one("tls-hostname"), tls_psk_file=one("tls-psk-file"),
                                  tls_username=one("tls-username") or parts.username)
    if verify is not None:
        fields["tls_verify"] = verify.lower() not in ("0", "false", "no", "off")
    if transport == "unix":
        socket_path = one("socket")
        if not socket_path:
            raise ValueError(f"{uri}: a Unix socket URI needs ?socket=PATH")
        if parts.hostname:
            raise ValueError(f"{uri}: a Unix socket URI has no host (write {scheme}:///EXPORT?socket=...)")
        return Address(unix=socket_path, **fields)
    if one("socket") is not None:
        raise ValueError(f"{uri}: socket= needs the nbd+unix:// scheme")
    if not parts.hostname:
        raise ValueError(f"{uri}: no host name")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise ValueError(f"{uri}: bad port") from None
    return Address(host=parts.hostname, port=port, **fields)


def tls_context(certificates_dir: str | None, verify: bool) -> ssl.SSLContext:
    """A client context with nbdkit/libnbd's file layout: DIR/ca-cert.pem, DIR/client-cert.pem, client-key.pem.

    Without a directory the system's trusted CAs verify the server.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if certificates_dir:
        ca = os.path.join(certificates_dir, "ca-cert.pem")
        if verify or os.path.exists(ca):
            context.load_verify_locations(ca)
        cert = os.path.join(certificates_dir, "client-cert.pem")
        if os.path.exists(cert):
            context.load_cert_chain(cert, os.path.join(certificates_dir, "client-key.pem"))
    elif verify:
        context.load_default_certs()
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


# -- Handshake (sans-IO) -----------------------------------------------------------------------
@dataclass(frozen=True)
class Recv:
    """The handshake needs exactly `size` more bytes from the server."""

    size: int


@dataclass(frozen=True)
class Send:
    data: bytes


@dataclass(frozen=True)
class StartTLS:
    """The server accepted STARTTLS: run the TLS handshake on the socket, then resume."""


@dataclass
class Negotiated:
    """What the handshake settled."""

    style: str = "fixed-newstyle"  # or "newstyle", "oldstyle"
    size: int = 0
    flags: int = 0  # transmission flags (TF_*)
    minimum: int = 1
    preferred: int = 4096
    maximum: int = DEFAULT_MAXIMUM
    export_name: str = ""
    description: str = ""
    structured: bool = False
    extended: bool = False
    tls: bool = False
    meta_contexts: dict[str, int] = field(default_factory=dict)  # name -> context id
    exports: list[tuple[str, str]] | None = None  # (name, description) when listing


@dataclass(frozen=True)
class OptionReply:
    option: int
    type: int
    data: bytes

    @property
    def is_error(self) -> bool:
        return bool(self.type & (1 << 31))

    def message(self) -> str:
        return self.data.decode("utf-8", "replace") if self.is_error else ""


_OPTION_ERRORS = {
    P.REP_ERR_UNSUP: "not supported", P.REP_ERR_POLICY: "refused by policy", P.REP_ERR_INVALID: "invalid",
    P.REP_ERR_PLATFORM: "not available on this platform", P.REP_ERR_TLS_REQD: "TLS is required",
    P.REP_ERR_UNKNOWN: "unknown export", P.REP_ERR_SHUTDOWN: "server shutting down",
    P.REP_ERR_BLOCK_SIZE_REQD: "block size negotiation required", P.REP_ERR_TOO_BIG: "too big",
    P.REP_ERR_EXT_HEADER_REQD: "extended headers required",
}

Handshake = Generator["Recv | Send | StartTLS", "bytes | None", Negotiated]


def _option(option: int, payload: bytes = b"") -> Generator[Recv | Send, bytes | None, list[OptionReply]]:
    """Send one option and collect its replies up to the final ACK or error."""
    yield Send(P.OPTION_HEADER.pack(P.IHAVEOPT, option, len(payload)) + payload)
    replies: list[OptionReply] = []
    while len(replies) < MAX_OPTION_REPLIES:
        header = yield Recv(P.OPTION_REPLY.size)
        magic, echoed, reply_type, length = P.OPTION_REPLY.unpack(header)
        if magic != P.OPTION_REPLY_MAGIC:
            raise HandshakeError(f"bad option reply magic {magic:#x}")
        if echoed != option:
            raise HandshakeError(f"server answered option {echoed} to option {option}")
        if length > MAX_OPTION_REPLY:
            raise HandshakeError(f"option reply of {length} bytes is too long")
        data = (yield Recv(length)) if length else b""
        reply = OptionReply(option, reply_type, data)  # type: ignore[arg-type]
        replies.append(reply)
        if reply_type == P.REP_ACK or reply.is_error:
            return replies
    raise HandshakeError(f"too many replies to option {option}")


def _describe_error(reply: OptionReply) -> str:
    reason = _OPTION_ERRORS.get(reply.type, f"error {reply.type & 0x7FFFFFFF}")
    message = reply.message()
    return f"{reason}: {message}" if message else reason


def negotiate(export_name: str = "", *, tls: str = "off", structured: bool = True, extended: bool = True,
              meta_contexts: Iterable[str] = (P.BASE_ALLOCATION,), list_exports: bool = False) -> Handshake:
    """The client side of the handshake.  Drive it with send(): None after Send/StartTLS, bytes after Recv.

    tls: "off", "on" (use TLS if the server offers it) or "require".  With list_exports the result
    holds the server's export list and the connection is then aborted (no transmission phase).
    """
    greeting = yield Recv(16)
    magic, second = struct.unpack(">QQ", greeting)
    if magic != P.NBDMAGIC:
        raise HandshakeError("not an NBD server (bad greeting magic)")
    if second == P.OLDSTYLE_MAGIC:
        rest = yield Recv(8 + 4 + 124)
        if tls == "require":
            raise HandshakeError("TLS is required but the server speaks the oldstyle protocol (no TLS)")
        if list_exports:
            raise HandshakeError("an oldstyle server cannot list exports")
        size, flags = struct.unpack_from(">QI", rest)
        return Negotiated(style="oldstyle", size=size, flags=flags & 0xFFFF)
    if second != P.IHAVEOPT:
        raise HandshakeError(f"unknown handshake style {second:#x}")
    (server_flags,) = P.U16.unpack((yield Recv(2)))
    fixed = bool(server_flags & P.FLAG_FIXED_NEWSTYLE)
    no_zeroes = bool(server_flags & P.FLAG_NO_ZEROES)
    client_flags = (P.CLIENT_FLAG_FIXED_NEWSTYLE if fixed else 0) | (P.CLIENT_FLAG_NO_ZEROES if no_zeroes else 0)
    yield Send(P.CLIENT_FLAGS.pack(client_flags))
    result = Negotiated(style="fixed-newstyle" if fixed else "newstyle")
    if not fixed:
        # Plain newstyle servers drop the connection on any option they do not know.
        if tls == "require":
            raise HandshakeError("TLS is required but the server is not fixed-newstyle (no STARTTLS)")
        if list_exports:
            raise HandshakeError("the server is not fixed-newstyle: it cannot list exports")
        return (yield from _export_name(result, export_name, no_zeroes))

    if tls != "off":
        reply = (yield from _option(P.OPT_STARTTLS))[-1]
        if reply.type == P.REP_ACK:
            yield StartTLS()
            result.tls = True
        elif tls == "require":
            raise HandshakeError(f"the server refused TLS ({_describe_error(reply)})")

    if list_exports:
        replies = yield from _option(P.OPT_LIST)
        if replies[-1].is_error:
            raise HandshakeError(f"the server refused to list exports ({_describe_error(replies[-1])})")
        result.exports = [_parse_server_reply(r.data) for r in replies if r.type == P.REP_SERVER]
        yield Send(P.OPTION_HEADER.pack(P.IHAVEOPT, P.OPT_ABORT, 0))
        return result

    if extended:
        reply = (yield from _option(P.OPT_EXTENDED_HEADERS))[-1]
        if reply.type == P.REP_ACK:
            result.extended = result.structured = True
    if structured and not result.extended:
        reply = (yield from _option(P.OPT_STRUCTURED_REPLY))[-1]
        result.structured = reply.type == P.REP_ACK
    queries = [q.encode() for q in meta_contexts]
    if result.structured and queries:
        name = export_name.encode()
        payload = P.U32.pack(len(name)) + name + P.U32.pack(len(queries))
        payload += b"".join(P.U32.pack(len(q)) + q for q in queries)
        for reply in (yield from _option(P.OPT_SET_META_CONTEXT, payload)):
            if reply.type == P.REP_META_CONTEXT and len(reply.data) >= 4:
                (context_id,) = P.U32.unpack_from(reply.data)
                result.meta_contexts[reply.data[4:].decode("utf-8", "replace")] = context_id

    name = export_name.encode()
    requests = (P.INFO_BLOCK_SIZE, P.INFO_NAME, P.INFO_DESCRIPTION)
    payload = P.U32.pack(len(name)) + name + P.U16.pack(len(requests)) + b"".join(P.U16.pack(r) for r in requests)
    replies = yield from _option(P.OPT_GO, payload)
    final = replies[-1]
    if final.type == P.REP_ERR_UNSUP:  # a server older than NBD_OPT_GO
        return (yield from _export_name(result, export_name, no_zeroes))
    if final.is_error:
        hint = " (use TLS: tls=on, tls=require or an nbds:// URI)" if final.type == P.REP_ERR_TLS_REQD else ""
        raise HandshakeError(f"the server refused export {export_name!r}: {_describe_error(final)}{hint}")
    result.export_name = export_name
    have_export = False
    for reply in replies:
        if reply.type != P.REP_INFO or len(reply.data) < 2:
            continue
        (info,) = P.U16.unpack_from(reply.data)
        if info == P.INFO_EXPORT and len(reply.data) == P.INFO_EXPORT_PAYLOAD.size:
            _, result.size, result.flags = P.INFO_EXPORT_PAYLOAD.unpack(reply.data)
            have_export = True
        elif info == P.INFO_BLOCK_SIZE and len(reply.data) == P.INFO_BLOCK_SIZE_PAYLOAD.size:
            _, result.minimum, result.preferred, result.maximum = P.INFO_BLOCK_SIZE_PAYLOAD.unpack(reply.data)
        elif info == P.INFO_NAME:
            result.export_name = reply.data[2:].decode("utf-8", "replace")
        elif info == P.INFO_DESCRIPTION:
            result.description = reply.data[2:].decode("utf-8", "replace")
    if not have_export:
        raise HandshakeError("the server sent no export size and flags (NBD_INFO_EXPORT)")
    if not result.structured:
        result.meta_contexts.clear()
    return result


def _export_name(result: Negotiated, export_name: str, no_zeroes: bool) -> Handshake:
    """NBD_OPT_EXPORT_NAME, for servers without NBD_OPT_GO: no error is possible, only a closed socket."""
    name = export_name.encode()
    yield Send(P.OPTION_HEADER.pack(P.IHAVEOPT, P.OPT_EXPORT_NAME, len(name)) + name)
    data = yield Recv(P.EXPORT_NAME_REPLY.size + (0 if no_zeroes else 124))
    result.size, result.flags = P.EXPORT_NAME_REPLY.unpack_from(data)  # type: ignore[arg-type]
    result.export_name = export_name
    # Meta contexts and structured replies were negotiated already; EXPORT_NAME keeps them.
    return result


def _parse_server_reply(data: bytes) -> tuple[str, str]:
    if len(data) < 4:
        raise HandshakeError("malformed export list entry")
    (length,) = P.U32.unpack_from(data)
    if 4 + length > len(data):
        raise HandshakeError("malformed export list entry")
    return data[4:4 + length].decode("utf-8", "replace"), data[4 + length:].decode("utf-8", "replace")


# -- Transmission (sans-IO) --------------------------------------------------------------------
# NBD error numbers are Linux errno values; anything else is mapped to EINVAL, as libnbd does.
_NBD_ERRNO = {P.NBD_EPERM: errno.EPERM, P.NBD_EIO: errno.EIO, P.NBD_ENOMEM: errno.ENOMEM,
              P.NBD_EINVAL: errno.EINVAL, P.NBD_ENOSPC: errno.ENOSPC, P.NBD_EOVERFLOW: errno.EOVERFLOW,
              P.NBD_ENOTSUP: errno.ENOTSUP, P.NBD_ESHUTDOWN: errno.ESHUTDOWN}


def nbd_to_errno(code: int) -> int:
    return _NBD_ERRNO.get(code, errno.EINVAL)


class Command:
    """One request and what its replies said.  `wait()` blocks until the last reply chunk arrived."""

    __slots__ = ("type", "flags", "offset", "length", "cookie", "buf", "payload", "error", "message",
                 "error_offset", "covered", "status", "chunk_types", "done", "_waiter")

    def __init__(self, type: int, flags: int, offset: int, length: int, *, buf: memoryview | None = None,
                 payload: Any = None) -> None:
        self.type, self.flags, self.offset, self.length = type, flags, offset, length
        self.cookie = 0
        self.buf = buf  # READ: where the data goes (len == length)
        self.payload = payload  # WRITE: the data sent
        self.error = 0  # errno; 0 = success
        self.message = ""
        self.error_offset: int | None = None
        self.covered = 0  # READ: bytes of data and holes received
        self.status: dict[int, list[tuple[int, int]]] = {}  # BLOCK_STATUS: context id -> [(length, flags)]
        self.chunk_types: list[int] = []  # reply types as received (simple reply: -1), for tests
        self.done = False
        self._waiter = _thread.allocate_lock()
        self._waiter.acquire()

    def fail(self, error: int, message: str) -> None:
        if not self.error:  # the first error reported is the one returned
            self.error, self.message = error, message

    def finish(self) -> None:
        if self.type == P.CMD_READ and not self.error and self.covered != self.length:
            self.fail(errno.EIO, f"the server sent {self.covered} of {self.length} bytes")
        self.done = True
        self._waiter.release()

    def wait(self, timeout: float | None = None) -> "Command":
        """Block until the command finished; returns self (check `.error`)."""
        if not self._waiter.acquire(True, -1 if timeout is None else timeout):
            raise TimeoutError(f"{P.COMMAND_NAMES.get(self.type, self.type)} got no reply in {timeout}s")
        self._waiter.release()
        return self

    def result(self) -> "Command":
        """Wait, then raise NBDError if the server failed the request."""
        self.wait()
        if self.error:
            name = P.COMMAND_NAMES.get(self.type, str(self.type))
            raise NBDError(self.error, f"{name} [{self.offset}, +{self.length}): {self.message or os.strerror(self.error)}")
        return self


def wait_all(commands: Iterable[Command]) -> None:
    """Wait for every command (their buffers are in use until then), then raise the first error."""
    commands = list(commands)
    for command in commands:
        command.wait()
    for command in commands:
        command.result()


def encode_request(command: Command, extended: bool) -> bytes:
    if extended:
        return P.EXTENDED_REQUEST.pack(P.EXTENDED_REQUEST_MAGIC, command.flags, command.type, command.cookie,
                                       command.offset, command.length)
    return P.REQUEST.pack(P.REQUEST_MAGIC, command.flags, command.type, command.cookie, command.offset,
                          command.length)


class ReplyDecoder:
    """Turns the reply stream into finished Commands.  Receive bytes into `get_buffer()`, then call
    `buffer_updated(n)`.  `commands` maps cookies to the requests in flight (the caller removes
    finished ones); a reply that breaks the protocol raises ProtocolError (drop the connection).
    """

    def __init__(self, commands: dict[int, Command], *, structured: bool, extended: bool) -> None:
        self.commands = commands
        self.structured = structured or extended
        self.extended = extended
        self._scratch = bytearray(SCRATCH_SIZE)
        self._view = memoryview(self._scratch)
        self._start = self._end = 0
        self._sink: memoryview | None = None  # where the current payload goes
        self._sink_filled = 0
        self._on_sink: Any = None  # called when the sink is full; returns a finished Command or None

    def get_buffer(self) -> memoryview:
        if self._sink is not None:
            return self._sink[self._sink_filled:]  # _parse() left no bytes in scratch
        if self._start == self._end:
            self._start = self._end = 0
        elif SCRATCH_SIZE - self._end < P.EXTENDED_REPLY.size:
            pending = self._end - self._start
            self._scratch[:pending] = self._scratch[self._start:self._end]
            self._start, self._end = 0, pending
        return self._view[self._end:]

    def buffer_updated(self, nbytes: int) -> list[Command]:
        if self._sink is not None:
            self._sink_filled += nbytes
        else:
            self._end += nbytes
        return self._parse()

    def receive(self, data: bytes) -> list[Command]:
        """Feed bytes that arrived by other means (tests)."""
        return P.feed(self, data)

    def _expect(self, sink: memoryview, on_full: Any) -> None:
        self._sink, self._sink_filled, self._on_sink = sink, 0, on_full

    def _parse(self) -> list[Command]:
        finished: list[Command] = []
        while True:
            if self._sink is not None:
                sink, filled = self._sink, self._sink_filled
                n = min(len(sink) - filled, self._end - self._start)
                if n:
                    sink[filled:filled + n] = self._view[self._start:self._start + n]
                    self._start += n
                    self._sink_filled = filled = filled + n
                if filled < len(sink):
                    return finished
                on_full, self._sink, self._on_sink = self._on_sink, None, None
                command = on_full(sink)
                if command is not None:
                    finished.append(command)
                continue
            available = self._end - self._start
            if available < 4:
                return finished
            (magic,) = P.U32.unpack_from(self._scratch, self._start)
            if self.extended:
                if magic != P.EXTENDED_REPLY_MAGIC:
                    raise ProtocolError(f"bad reply magic {magic:#x} (expected an extended reply)")
                if available < P.EXTENDED_REPLY.size:
                    return finished
                _, flags, type, cookie, _, length = P.EXTENDED_REPLY.unpack_from(self._scratch, self._start)
                self._start += P.EXTENDED_REPLY.size
                command = self._chunk(flags, type, cookie, length)
            elif magic == P.SIMPLE_REPLY_MAGIC:
                if available < P.SIMPLE_REPLY.size:
                    return finished
                _, error, cookie = P.SIMPLE_REPLY.unpack_from(self._scratch, self._start)
                self._start += P.SIMPLE_REPLY.size
                command = self._simple(error, cookie)
            elif magic == P.STRUCTURED_REPLY_MAGIC and self.structured:
                if available < P.STRUCTURED_REPLY.size:
                    return finished
                _, flags, type, cookie, length = P.STRUCTURED_REPLY.unpack_from(self._scratch, self._start)
                self._start += P.STRUCTURED_REPLY.size
                command = self._chunk(flags, type, cookie, length)
            else:
                raise ProtocolError(f"bad reply magic {magic:#x}")
            if command is not None:
                finished.append(command)

    def _command(self, cookie: int) -> Command:
        command = self.commands.get(cookie)
        if command is None or command.done:
            raise ProtocolError(f"reply for unknown cookie {cookie:#x}")
        return command

    def _simple(self, error: int, cookie: int) -> Command | None:
        command = self._command(cookie)
        command.chunk_types.append(-1)
        if error:
            command.fail(nbd_to_errno(error), "")
        elif command.type == P.CMD_READ and command.length:
            # The data follows the header, straight into the caller's buffer.
            assert command.buf is not None
            self._expect(command.buf, lambda _: self._simple_read_done(command))
            return None
        command.finish()
        return command

    def _simple_read_done(self, command: Command) -> Command:
        command.covered = command.length
        command.finish()
        return command

    def _chunk(self, flags: int, type: int, cookie: int, length: int) -> Command | None:
        command = self._command(cookie)
        command.chunk_types.append(type)
        done = bool(flags & P.REPLY_FLAG_DONE)
        if type == P.REPLY_TYPE_NONE:
            if length:
                raise ProtocolError("NBD_REPLY_TYPE_NONE with a payload")
            if not done:
                raise ProtocolError("NBD_REPLY_TYPE_NONE without the DONE flag")
            return self._finish(command, True)
        if type == P.REPLY_TYPE_OFFSET_DATA:
            if command.type != P.CMD_READ or length < 8:
                raise ProtocolError("unexpected NBD_REPLY_TYPE_OFFSET_DATA")
            self._expect(memoryview(bytearray(8)), lambda raw: self._data_offset(command, raw, length - 8, done))
            return None
        if length > MAX_CHUNK_PAYLOAD:
            raise ProtocolError(f"reply chunk of {length} bytes is too long")
        if length == 0:
            return self._payload(command, type, b"", done)
        self._expect(memoryview(bytearray(length)), lambda raw: self._payload(command, type, raw, done))
        return None

    def _data_offset(self, command: Command, raw: memoryview, count: int, done: bool) -> Command | None:
        (data_offset,) = P.U64.unpack(raw)
        start = data_offset - command.offset
        if start < 0 or start + count > command.length:
            raise ProtocolError(f"read data [{data_offset}, +{count}) outside the request")
        command.covered += count
        if count == 0:
            return self._finish(command, done)
        assert command.buf is not None
        self._expect(command.buf[start:start + count], lambda _: self._finish(command, done))
        return None

    def _payload(self, command: Command, type: int, raw: bytes | memoryview, done: bool) -> Command | None:
        if type == P.REPLY_TYPE_OFFSET_HOLE:
            if command.type != P.CMD_READ or len(raw) != P.HOLE_PAYLOAD.size:
                raise ProtocolError("malformed NBD_REPLY_TYPE_OFFSET_HOLE")
            hole_offset, hole_length = P.HOLE_PAYLOAD.unpack(raw)
            start = hole_offset - command.offset
            if start < 0 or start + hole_length > command.length or hole_length == 0:
                raise ProtocolError(f"hole [{hole_offset}, +{hole_length}) outside the request")
            assert command.buf is not None
            command.buf[start:start + hole_length] = bytes(hole_length)
            command.covered += hole_length
        elif type in (P.REPLY_TYPE_BLOCK_STATUS, P.REPLY_TYPE_BLOCK_STATUS_EXT):
            self._block_status(command, type, raw)
        elif type in (P.REPLY_TYPE_ERROR, P.REPLY_TYPE_ERROR_OFFSET) or type & (1 << 15):
            if len(raw) < P.ERROR_PAYLOAD.size:
                raise ProtocolError("malformed error chunk")
            code, message_length = P.ERROR_PAYLOAD.unpack_from(raw)
            end = P.ERROR_PAYLOAD.size + message_length
            if end > len(raw):
                raise ProtocolError("error message longer than its chunk")
            command.fail(nbd_to_errno(code) if code else errno.EIO,
                         bytes(raw[P.ERROR_PAYLOAD.size:end]).decode("utf-8", "replace"))
            if type == P.REPLY_TYPE_ERROR_OFFSET and len(raw) >= end + 8:
                (command.error_offset,) = P.U64.unpack_from(raw, end)
        else:
            raise ProtocolError(f"unknown reply chunk type {type}")
        return self._finish(command, done)

    def _block_status(self, command: Command, type: int, raw: bytes | memoryview) -> None:
        if command.type != P.CMD_BLOCK_STATUS:
            raise ProtocolError("block status chunk for another command")
        if type == P.REPLY_TYPE_BLOCK_STATUS_EXT:
            descriptor, start = P.BLOCK_DESCRIPTOR_EXT, P.BLOCK_STATUS_EXT_HEADER.size
            if len(raw) < start:
                raise ProtocolError("malformed block status chunk")
            context_id, count = P.BLOCK_STATUS_EXT_HEADER.unpack_from(raw)
            if start + count * descriptor.size != len(raw):
                raise ProtocolError("block status descriptor count does not match the chunk length")
        else:
            descriptor, start = P.BLOCK_DESCRIPTOR, 4
            if len(raw) < start or (len(raw) - start) % descriptor.size:
                raise ProtocolError("malformed block status chunk")
            (context_id,) = P.U32.unpack_from(raw)
        extents = command.status.setdefault(context_id, [])
        extents.extend(descriptor.iter_unpack(raw[start:]))  # type: ignore[arg-type]

    def _finish(self, command: Command, done: bool) -> Command | None:
        if not done:
            return None
        command.finish()
        return command


# -- Blocking client ---------------------------------------------------------------------------
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


class TLSSocket:
    """TLS over a connected socket through memory BIOs, safe for one reader and many writers at once.

    OpenSSL objects must not be used by two threads at the same time, which an ssl.SSLSocket read in a
    reader thread while request threads write would do.  Here one lock guards the SSL object and the
    encrypted bytes go out in the order it produced them (they are taken from the BIO and sent under
    the send lock).  Offers the few socket methods the client uses.
    """

    RECORD = 256 * 1024  # plaintext encrypted per step, so a 64 MiB write does not double in memory

    def __init__(self, raw: socket.socket, context: ssl.SSLContext, hostname: str | None) -> None:
        self.raw = raw
        self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._incoming, self._outgoing, server_hostname=hostname)
        self._ssl_lock = threading.Lock()  # the SSL object and its BIOs
        self._send_lock = threading.Lock()  # taking bytes from the outgoing BIO and sending them
        while True:
            try:
                with self._ssl_lock:
                    self._ssl.do_handshake()
                self._flush()
                return
            except ssl.SSLWantReadError:
                self._flush()
                if not self._fill():
                    raise HandshakeError("the server closed the connection during the TLS handshake") from None

    def _flush(self) -> None:
        with self._send_lock:
            with self._ssl_lock:
                data = self._outgoing.read()
            if data:
                self.raw.sendall(data)

    def _fill(self) -> bool:
        data = self.raw.recv(256 * 1024)
        if not data:
            return False
        with self._ssl_lock:
            self._incoming.write(data)
        return True

    def sendall(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        with self._send_lock:
            for start in range(0, len(view), self.RECORD):
                with self._ssl_lock:
                    self._ssl.write(view[start:start + self.RECORD])
                    encrypted = self._outgoing.read()
                self.raw.sendall(encrypted)

    def recv_into(self, buf: memoryview) -> int:
        while True:
            try:
                with self._ssl_lock:
                    n = self._ssl.read(len(buf), buf)
                    pending = self._outgoing.pending
            except ssl.SSLWantReadError:
                if not self._fill():
                    return 0
                continue
            except ssl.SSLZeroReturnError:
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
                from .tlspsk import psk_client_context
                context = psk_client_context(address.tls_psk_file, address.tls_username or getpass.getuser())
            else:
                context = tls_context(address.tls_certificates, address.tls_verify)
            hostname = address.tls_hostname or address.host
            if not hostname or address.tls_psk_file:
                context.check_hostname = False  # a Unix socket has no name to check
            sock = TLSSocket(sock, context, hostname)  # type: ignore[assignment]


class NBDClient:
    """One connection to an NBD server, usable from many threads at once.

    Data methods split requests larger than the server's maximum block size into pipelined pieces.
    """

    def __init__(self, sock: socket.socket | TLSSocket, info: Negotiated, address: Address | None = None) -> None:
        self.sock = sock
        self.info = info
        self.address = address
        self.context_id = info.meta_contexts.get(P.BASE_ALLOCATION)
        self.max_payload = max(min(info.maximum or DEFAULT_MAXIMUM, 64 * 1024 * 1024), 1)
        self._commands: dict[int, Command] = {}
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._cookies = itertools.count(1)
        self._failure: str | None = None  # why the connection is unusable
        self._closing = False
        self._decoder = ReplyDecoder(self._commands, structured=info.structured, extended=info.extended)
        sock.settimeout(None)
        self._reader = threading.Thread(target=self._read_replies, name="nbd-client-reader", daemon=True)
        self._reader.start()

    # -- Connecting ----------------------------------------------------------------------------
    @classmethod
    def connect(cls, target: str | Address, *, export: str | None = None, tls: str | None = None,
                structured: bool = True, extended: bool = True,
                meta_contexts: Iterable[str] = (P.BASE_ALLOCATION,), timeout: float | None = 60.0) -> "NBDClient":
        """Connect to a URI or Address and finish the handshake.  `timeout` bounds connecting and the
        handshake; requests have none.  Raises OSError (HandshakeError, ssl.SSLError, ...) on failure."""
        address = parse_uri(target) if isinstance(target, str) else target
        if export is not None:
            address = replace(address, export=export)
        if tls is not None:
            address = replace(address, tls=tls)
        sock = _open_socket(address, timeout)
        try:
            sock, info = handshake(sock, address, structured=structured, extended=extended,
                                   meta_contexts=meta_contexts)
        except BaseException:
            sock.close()
            raise
        return cls(sock, info, address)

    @staticmethod
    def list_exports(target: str | Address, *, tls: str | None = None,
                     timeout: float | None = 60.0) -> list[tuple[str, str]]:
        """The server's exports as (name, description) pairs (NBD_OPT_LIST)."""
        address = parse_uri(target) if isinstance(target, str) else target
        if tls is not None:
            address = replace(address, tls=tls)
        sock = _open_socket(address, timeout)
        try:
            sock, info = handshake(sock, address, list_exports=True)
            return info.exports or []
        finally:
            sock.close()

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
            view = memoryview(into if type == P.CMD_READ else payload).cast("B")
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

    def _connection_failed(self, reason: str) -> None:
        """Fail every request in flight, and all later ones."""
        with self._lock:
            if self._failure is None:
                self._failure = f"connection to the NBD server lost: {reason}"
            pending = list(self._commands.values())
            self._commands.clear()
        for command in pending:
            if not command.done:
                command.fail(errno.EIO, self._failure)
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

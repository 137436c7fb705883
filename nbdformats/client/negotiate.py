"""The client side of the handshake, sans-IO: `negotiate()` is a generator that yields `Recv(n)`,
`Send(data)` or `StartTLS()` and returns a `Negotiated` (size, flags, block sizes, what was agreed:
structured replies, extended headers, meta contexts)."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Generator, Iterable

from ..protocol import wire as P
from .address import DEFAULT_MAXIMUM, HandshakeError

MAX_OPTION_REPLIES = 100_000  # replies to one option (exports in a list)

MAX_OPTION_REPLY = 1024 * 1024  # longest option reply payload we accept


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
        assert header is not None  # a Recv is answered with bytes
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
    assert greeting is not None  # a Recv is answered with bytes
    magic, second = struct.unpack(">QQ", greeting)
    if magic != P.NBDMAGIC:
        raise HandshakeError("not an NBD server (bad greeting magic)")
    if second == P.OLDSTYLE_MAGIC:
        rest = yield Recv(8 + 4 + 124)
        assert rest is not None
        if tls == "require":
            raise HandshakeError("TLS is required but the server speaks the oldstyle protocol (no TLS)")
        if list_exports:
            raise HandshakeError("an oldstyle server cannot list exports")
        size, flags = struct.unpack_from(">QI", rest)
        return Negotiated(style="oldstyle", size=size, flags=flags & 0xFFFF)
    if second != P.IHAVEOPT:
        raise HandshakeError(f"unknown handshake style {second:#x}")
    flags_field = yield Recv(2)
    assert flags_field is not None
    (server_flags,) = P.U16.unpack(flags_field)
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


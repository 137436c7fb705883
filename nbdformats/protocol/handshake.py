"""The server side of the NBD handshake as a sans-IO state machine (no sockets, like h11).

Feed received bytes with `receive_data()`, take events with `next_event()`, answer the
events that need the backend (export list, export info, TLS) with the `reply_*` methods,
and send what `data_to_send()` returns.  Options that need no backend (STRUCTURED_REPLY,
EXTENDED_HEADERS, meta contexts, unknown or malformed options, TLS policy) are answered
here.  When `done` is true the connection enters the transmission phase.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from . import wire as P
from .errors import ProtocolError

MAX_OPTION_LENGTH = 64 * 1024  # no option we accept carries more; longer ones are refused unread
MAX_OPTIONS = 4096  # a client negotiating forever is dropped


@dataclass(frozen=True)
class HandshakePolicy:
    """What the server offers in the handshake (nbdkit's --mask-handshake, --no-sr, --no-mc): options
    for testing how clients cope with older or more limited servers."""

    global_flags: int = P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES  # --mask-handshake=MASK: these & MASK
    structured_replies: bool = True  # --no-sr: False, STRUCTURED_REPLY (and EXTENDED_HEADERS) refused
    meta_contexts: bool = True  # --no-mc: False, LIST/SET_META_CONTEXT refused


@dataclass(frozen=True)
class ExportInfo:
    """What a client learns about an export: size, transmission flags, block-size constraints."""

    name: str
    size: int
    flags: int
    minimum: int = 1
    preferred: int = 4096
    maximum: int = 32 * 1024 * 1024
    description: str = ""


# -- Events ----------------------------------------------------------------------------------
@dataclass
class NeedData:
    """More bytes are needed."""


@dataclass
class ListExports:
    """NBD_OPT_LIST: answer with reply_list()."""


@dataclass
class ExportRequest:
    """NBD_OPT_INFO / NBD_OPT_GO / NBD_OPT_EXPORT_NAME for `name`: answer with reply_export() or reply_error()."""

    option: int
    name: str
    info_requests: list[int] = field(default_factory=list)


@dataclass
class StartTLS:
    """NBD_OPT_STARTTLS accepted: upgrade the transport, then call tls_established()."""


@dataclass
class Abort:
    """The client aborted (NBD_OPT_ABORT) or must be disconnected: close after sending."""


@dataclass
class Ready:
    """The handshake finished: transmission starts with `export`."""

    export: ExportInfo


class ServerHandshake:
    def __init__(self, *, tls: str = "off", oldstyle: bool = False, policy: HandshakePolicy = HandshakePolicy()) -> None:
        self.tls = tls  # "off", "on" (offered), "require"
        self.oldstyle = oldstyle
        self.policy = policy
        self.fixed_newstyle = False  # the client speaks fixed newstyle: options may fail and negotiation go on
        self.tls_active = False
        self.structured_replies = False
        self.extended_headers = False
        self.meta_context_id: int | None = None  # set when base:allocation was negotiated
        self.no_zeroes = False
        self.done = False
        self.export: ExportInfo | None = None
        self._inbuf = bytearray()
        self._out = bytearray()
        self._state = "client_flags"
        self._pending: ExportRequest | ListExports | StartTLS | None = None
        self._option_count = 0
        self._skip = 0  # bytes of an oversized option still to discard
        if not oldstyle:
            self._out += P.GREETING.pack(P.NBDMAGIC, P.IHAVEOPT, policy.global_flags)

    # -- I/O boundary --------------------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        self._inbuf += data

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def leftover(self) -> bytes:
        """Bytes received after the handshake ended (the first requests, if the client pipelined)."""
        data = bytes(self._inbuf)
        self._inbuf.clear()
        return data

    # -- Events --------------------------------------------------------------------------------
    def next_event(self) -> NeedData | ListExports | ExportRequest | StartTLS | Abort | Ready:
        if self._pending is not None:
            raise RuntimeError("answer the previous event first")
        while True:
            if self._state == "closed":
                return Abort()
            if self._state == "client_flags":
                if len(self._inbuf) < 4:
                    return NeedData()
                (flags,) = P.CLIENT_FLAGS.unpack_from(self._inbuf)
                del self._inbuf[:4]
                if flags & ~self.policy.global_flags:  # a flag we did not offer (as nbdkit: drop the client)
                    self._state = "closed"
                    return Abort()
                self.fixed_newstyle = bool(flags & P.CLIENT_FLAG_FIXED_NEWSTYLE)
                self.no_zeroes = bool(flags & P.CLIENT_FLAG_NO_ZEROES)
                self._state = "options"
                continue
            if self._skip:
                n = min(self._skip, len(self._inbuf))
                del self._inbuf[:n]
                self._skip -= n
                if self._skip:
                    return NeedData()
                continue
            if len(self._inbuf) < P.OPTION_HEADER.size:
                return NeedData()
            magic, option, length = P.OPTION_HEADER.unpack_from(self._inbuf)
            if magic != P.IHAVEOPT:
                raise ProtocolError(f"bad option magic {magic:#x}")
            self._option_count += 1
            if self._option_count > MAX_OPTIONS:
                raise ProtocolError("too many options")
            if length > MAX_OPTION_LENGTH:
                del self._inbuf[:P.OPTION_HEADER.size]
                self._skip = length
                if option == P.OPT_EXPORT_NAME:
                    self._state = "closed"
                    return Abort()
                self._error(option, P.REP_ERR_TOO_BIG, "option too long")
                continue
            if len(self._inbuf) < P.OPTION_HEADER.size + length:
                return NeedData()
            data = bytes(self._inbuf[P.OPTION_HEADER.size:P.OPTION_HEADER.size + length])
            del self._inbuf[:P.OPTION_HEADER.size + length]
            event = self._handle_option(option, data)
            if event is not None:
                return event

    def _handle_option(self, option: int, data: bytes):
        if not self.fixed_newstyle and option != P.OPT_EXPORT_NAME:
            # A plain newstyle client may only send EXPORT_NAME (nbdkit answers others as invalid).
            return self._error(option, P.REP_ERR_INVALID, "only NBD_OPT_EXPORT_NAME without fixed newstyle")
        if self.tls == "require" and not self.tls_active and option not in (P.OPT_STARTTLS, P.OPT_ABORT):
            if option == P.OPT_EXPORT_NAME:
                self._state = "closed"  # no way to send an error to EXPORT_NAME
                return Abort()
            self._error(option, P.REP_ERR_TLS_REQD, "TLS is required: use STARTTLS")
            return None
        if option == P.OPT_ABORT:
            self._reply(option, P.REP_ACK)
            self._state = "closed"
            return Abort()
        if option == P.OPT_EXPORT_NAME:
            name = self._decode_name(data)
            if name is None:
                self._state = "closed"
                return Abort()
            self._pending = ExportRequest(option, name)
            return self._pending
        if option == P.OPT_LIST:
            if data:
                return self._error(option, P.REP_ERR_INVALID, "LIST takes no data")
            self._pending = ListExports()
            return self._pending
        if option in (P.OPT_INFO, P.OPT_GO):
            return self._parse_info(option, data)
        if option in (P.OPT_STRUCTURED_REPLY, P.OPT_EXTENDED_HEADERS) and not self.policy.structured_replies:
            # ERR_UNSUP as nbdkit's --no-sr (qemu 4.2 expects it); extended headers imply structured replies.
            return self._error(option, P.REP_ERR_UNSUP, "structured replies are disabled (--no-sr)")
        if option in (P.OPT_LIST_META_CONTEXT, P.OPT_SET_META_CONTEXT) and not self.policy.meta_contexts:
            return self._error(option, P.REP_ERR_UNSUP, "meta contexts are disabled (--no-mc)")
        if option == P.OPT_STRUCTURED_REPLY:
            if data:
                return self._error(option, P.REP_ERR_INVALID, "STRUCTURED_REPLY takes no data")
            if self.extended_headers:
                # "the server MUST NOT negotiate structured replies after extended headers"
                return self._error(option, P.REP_ERR_INVALID, "extended headers already negotiated")
            self.structured_replies = True
            return self._reply(option, P.REP_ACK)
        if option == P.OPT_EXTENDED_HEADERS:
            if data:
                return self._error(option, P.REP_ERR_INVALID, "EXTENDED_HEADERS takes no data")
            self.extended_headers = True
            # Extended headers imply structured replies.
            self.structured_replies = True
            return self._reply(option, P.REP_ACK)
        if option in (P.OPT_LIST_META_CONTEXT, P.OPT_SET_META_CONTEXT):
            return self._meta_context(option, data)
        if option == P.OPT_STARTTLS:
            if data:
                return self._error(option, P.REP_ERR_INVALID, "STARTTLS takes no data")
            if self.tls == "off":
                return self._error(option, P.REP_ERR_POLICY, "TLS is not enabled on this server")
            if self.tls_active:
                return self._error(option, P.REP_ERR_INVALID, "TLS is already active")
            self._reply(option, P.REP_ACK)
            self._pending = StartTLS()
            return self._pending
        return self._error(option, P.REP_ERR_UNSUP, f"option {option} is not supported")

    def _decode_name(self, raw: bytes) -> str | None:
        if len(raw) > P.MAX_STRING:
            return None
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return None

    def _parse_info(self, option: int, data: bytes):
        # C: 32 bits, length of name (unsigned); name; 16 bits, number of information requests; 16 bits each
        if len(data) < 6:
            return self._error(option, P.REP_ERR_INVALID, "option too short")
        (name_len,) = P.U32.unpack_from(data)
        if 4 + name_len + 2 > len(data):
            return self._error(option, P.REP_ERR_INVALID, "export name length exceeds the option")
        name = self._decode_name(data[4:4 + name_len])
        if name is None:
            return self._error(option, P.REP_ERR_INVALID, "export name is not valid UTF-8 or too long")
        (count,) = P.U16.unpack_from(data, 4 + name_len)
        if len(data) != 4 + name_len + 2 + 2 * count:
            return self._error(option, P.REP_ERR_INVALID, "information request count does not match length")
        requests = [P.U16.unpack_from(data, 6 + name_len + 2 * i)[0] for i in range(count)]
        self._pending = ExportRequest(option, name, requests)
        return self._pending

    def _meta_context(self, option: int, data: bytes):
        # C: 32 bits export name length, name, 32 bits number of queries, then (32 bits length, query) each
        if not self.structured_replies:
            return self._error(option, P.REP_ERR_INVALID, "negotiate structured replies first")
        try:
            (name_len,) = P.U32.unpack_from(data)
            if name_len > P.MAX_STRING:
                raise ValueError
            offset = 4 + name_len
            (count,) = P.U32.unpack_from(data, offset)
            offset += 4
            queries = []
            for _ in range(count):
                (qlen,) = P.U32.unpack_from(data, offset)
                offset += 4
                if qlen > P.MAX_STRING or offset + qlen > len(data):
                    raise ValueError
                queries.append(data[offset:offset + qlen].decode("utf-8"))
                offset += qlen
            if offset != len(data):
                raise ValueError
        except (ValueError, struct.error, UnicodeDecodeError):
            return self._error(option, P.REP_ERR_INVALID, "malformed meta context option")
        matches = []
        if option == P.OPT_LIST_META_CONTEXT and not queries:
            matches = [P.BASE_ALLOCATION]
        else:
            for query in queries:
                if query == P.BASE_ALLOCATION or (option == P.OPT_LIST_META_CONTEXT and query == "base:"):
                    if P.BASE_ALLOCATION not in matches:
                        matches.append(P.BASE_ALLOCATION)
        if option == P.OPT_SET_META_CONTEXT:
            self.meta_context_id = 1 if matches else None
        for name in matches:
            self._reply(option, P.REP_META_CONTEXT, P.U32.pack(1) + name.encode())
        return self._reply(option, P.REP_ACK)

    # -- Replies -------------------------------------------------------------------------------
    def _reply(self, option: int, reply_type: int, payload: bytes = b"") -> None:
        self._out += P.OPTION_REPLY.pack(P.OPTION_REPLY_MAGIC, option, reply_type, len(payload))
        self._out += payload
        return None

    def _error(self, option: int, code: int, message: str) -> None:
        return self._reply(option, code, message.encode()[:P.MAX_STRING])

    def reply_list(self, exports: list[tuple[str, str]]) -> None:
        """Answer ListExports with (name, description) pairs."""
        assert isinstance(self._pending, ListExports)
        self._pending = None
        for name, description in exports:
            raw = name.encode()
            self._reply(P.OPT_LIST, P.REP_SERVER, P.U32.pack(len(raw)) + raw + description.encode())
        self._reply(P.OPT_LIST, P.REP_ACK)

    def reply_error(self, code: int, message: str) -> None:
        """Refuse the pending ExportRequest or ListExports (EXPORT_NAME cannot be refused: we close)."""
        pending = self._pending
        assert pending is not None
        self._pending = None
        if isinstance(pending, ExportRequest) and pending.option == P.OPT_EXPORT_NAME:
            self._state = "closed"
            return
        option = pending.option if isinstance(pending, ExportRequest) else P.OPT_LIST
        self._error(option, code, message)

    def reply_export(self, info: ExportInfo) -> Ready | None:
        """Answer the pending ExportRequest.  Returns Ready if transmission starts now."""
        pending = self._pending
        assert isinstance(pending, ExportRequest)
        self._pending = None
        if pending.option == P.OPT_EXPORT_NAME:
            self._out += P.EXPORT_NAME_REPLY.pack(info.size, info.flags)
            if not self.no_zeroes:
                self._out += bytes(124)
            return self._finish(info)
        option = pending.option
        # NBD_INFO_EXPORT is always sent; the others when asked for (block size: always, it is cheap).
        self._reply(option, P.REP_INFO, P.INFO_EXPORT_PAYLOAD.pack(P.INFO_EXPORT, info.size, info.flags))
        if P.INFO_NAME in pending.info_requests:
            self._reply(option, P.REP_INFO, P.U16.pack(P.INFO_NAME) + info.name.encode())
        if P.INFO_DESCRIPTION in pending.info_requests and info.description:
            self._reply(option, P.REP_INFO, P.U16.pack(P.INFO_DESCRIPTION) + info.description.encode())
        self._reply(option, P.REP_INFO, P.INFO_BLOCK_SIZE_PAYLOAD.pack(
            P.INFO_BLOCK_SIZE, info.minimum, info.preferred, info.maximum))
        self._reply(option, P.REP_ACK)
        if option == P.OPT_GO:
            return self._finish(info)
        return None

    def _finish(self, info: ExportInfo) -> Ready:
        self.done = True
        self.export = info
        self._state = "transmission"
        if not self.structured_replies:
            self.meta_context_id = None
        return Ready(info)

    def tls_established(self) -> None:
        """Called once the transport speaks TLS: "the server MUST forget everything negotiated before"."""
        self._pending = None
        self.tls_active = True
        self.structured_replies = False
        self.extended_headers = False
        self.meta_context_id = None


def oldstyle_greeting(info: ExportInfo) -> bytes:
    """The whole oldstyle handshake: magic, size, flags and 124 zero bytes; transmission follows."""
    return P.OLDSTYLE_GREETING.pack(P.NBDMAGIC, P.OLDSTYLE_MAGIC, info.size, info.flags)

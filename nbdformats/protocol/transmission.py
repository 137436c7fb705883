"""The transmission phase on the wire, sans-IO: requests decoded from a byte stream, replies encoded.

`RequestDecoder` follows asyncio's BufferedProtocol shape (get_buffer / buffer_updated) so a
WRITE payload is received straight into the buffer handed to the plugin (copied at most once).
`ReplyEncoder` builds simple, structured or extended reply headers.  Nothing here touches a
socket or the backend chain: the server (server/) and the tests drive it.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass

from . import wire as P
from .errors import ProtocolError


MAX_PAYLOAD = 64 * 1024 * 1024  # largest READ/WRITE payload accepted (nbdkit's MAX_REQUEST_SIZE)
SCRATCH_SIZE = 256 * 1024


@dataclass(slots=True)
class Request:
    flags: int
    type: int
    cookie: int
    offset: int
    length: int
    payload: memoryview | None = None
    error: int = 0  # set by the decoder when the request must fail (its payload was drained)
    message: str = ""


def aligned_buffer(length: int, alignment: int) -> memoryview:
    if alignment <= 1:
        return memoryview(bytearray(length))
    raw = bytearray(length + alignment)
    import ctypes
    address = ctypes.addressof((ctypes.c_char * len(raw)).from_buffer(raw))
    start = -address % alignment
    return memoryview(raw)[start:start + length]


class RequestDecoder:
    """Turns received bytes into `Request`s.  Bytes go where `get_buffer()` says.

    A WRITE's payload is received into a buffer of its own, which `allocate_payload(length,
    alignment)` provides: the server replaces it to charge the payload to its memory budget first.
    """

    def __init__(self, *, extended: bool = False, max_payload: int = MAX_PAYLOAD, alignment: int = 1) -> None:
        self.extended = extended
        self.header = P.EXTENDED_REQUEST if extended else P.REQUEST
        self.magic = P.EXTENDED_REQUEST_MAGIC if extended else P.REQUEST_MAGIC
        self.max_payload = max_payload
        self.alignment = alignment
        self._scratch = bytearray(SCRATCH_SIZE)
        self._view = memoryview(self._scratch)
        self._start = 0  # first unparsed byte in scratch
        self._end = 0  # end of received bytes in scratch
        self._payload_request: Request | None = None  # a WRITE whose payload is still arriving
        self._payload_filled = 0
        self._drain = 0  # payload bytes of a refused request still to discard
        self.allocate_payload = aligned_buffer

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        if self._payload_request is not None:
            return self._payload_request.payload[self._payload_filled:]  # type: ignore[index]
        if self._drain:
            return self._view[:min(self._drain, SCRATCH_SIZE)]
        if self._start == self._end:
            self._start = self._end = 0
        elif SCRATCH_SIZE - self._end < self.header.size:
            # Move the partial header to the front so there is room for the rest.
            pending = self._end - self._start
            self._scratch[:pending] = self._scratch[self._start:self._end]
            self._start, self._end = 0, pending
        return self._view[self._end:]

    def buffer_updated(self, nbytes: int) -> list[Request]:
        if self._payload_request is not None:
            self._payload_filled += nbytes
            if self._payload_filled < self._payload_request.length:
                return []
            done, self._payload_request = self._payload_request, None
            return [done, *self._parse()]
        if self._drain:
            self._drain -= nbytes
            return [] if self._drain else self._parse()
        self._end += nbytes
        return self._parse()

    def abandon_payload(self) -> int:
        """Drop a WRITE whose payload was still arriving (the connection ended); returns its length."""
        request, self._payload_request = self._payload_request, None
        return request.length if request is not None else 0

    def receive(self, data: bytes) -> list[Request]:
        """Feed bytes that arrived by other means (tests, bytes left over from the handshake)."""
        return P.feed(self, data)

    def _parse(self) -> list[Request]:
        requests = []
        header, scratch = self.header, self._scratch
        while self._end - self._start >= header.size:
            magic, flags, type, cookie, offset, length = header.unpack_from(scratch, self._start)
            if magic != self.magic:
                raise ProtocolError(f"bad request magic {magic:#x}")
            self._start += header.size
            request = Request(flags, type, cookie, offset, length)
            has_payload = type == P.CMD_WRITE or (self.extended and flags & P.CMD_FLAG_PAYLOAD_LEN)
            if not has_payload:
                requests.append(request)
                continue
            if type != P.CMD_WRITE or length > self.max_payload:
                # Keep the stream in step: swallow the payload, then fail the request.
                request.error = errno.EINVAL
                request.message = (f"payload of {length} bytes exceeds the maximum {self.max_payload}"
                                   if type == P.CMD_WRITE else "payload not supported for this command")
                available = min(self._end - self._start, length)
                self._start += available
                requests.append(request)
                if available < length:
                    self._drain = length - available
                    return requests
                continue
            request.payload = self.allocate_payload(length, self.alignment)
            available = min(self._end - self._start, length)
            request.payload[:available] = self._view[self._start:self._start + available]
            self._start += available
            if available < length:
                self._payload_request = request
                self._payload_filled = available
                return requests
            requests.append(request)
        return requests


class ReplyEncoder:
    """Reply headers for the negotiated mode: simple, structured or extended."""

    def __init__(self, structured: bool, extended: bool) -> None:
        self.structured = structured or extended
        self.extended = extended

    def chunk_header(self, flags: int, type: int, cookie: int, offset: int, length: int) -> bytes:
        if self.extended:
            return P.EXTENDED_REPLY.pack(P.EXTENDED_REPLY_MAGIC, flags, type, cookie, offset, length)
        return P.STRUCTURED_REPLY.pack(P.STRUCTURED_REPLY_MAGIC, flags, type, cookie, length)

    @property
    def chunk_header_size(self) -> int:
        return P.EXTENDED_REPLY.size if self.extended else P.STRUCTURED_REPLY.size

    def ok(self, cookie: int, offset: int) -> bytes:
        if self.structured:
            return self.chunk_header(P.REPLY_FLAG_DONE, P.REPLY_TYPE_NONE, cookie, offset, 0)
        return P.SIMPLE_REPLY.pack(P.SIMPLE_REPLY_MAGIC, 0, cookie)

    def error(self, cookie: int, offset: int, err: int, message: str = "", at: int | None = None,
              done: bool = True) -> bytes:
        """An error reply; with `at`, a structured NBD_REPLY_TYPE_ERROR_OFFSET for that offset."""
        code = P.errno_to_nbd(err)
        if not self.structured:
            return P.SIMPLE_REPLY.pack(P.SIMPLE_REPLY_MAGIC, code, cookie)
        text = message.encode("utf-8", "replace")[:P.MAX_STRING]
        payload = P.ERROR_PAYLOAD.pack(code, len(text)) + text
        type = P.REPLY_TYPE_ERROR
        if at is not None:
            payload += P.U64.pack(at)
            type = P.REPLY_TYPE_ERROR_OFFSET
        flags = P.REPLY_FLAG_DONE if done else 0
        return self.chunk_header(flags, type, cookie, offset, len(payload)) + payload

    def read_data(self, cookie: int, offset: int, data_offset: int, length: int, done: bool,
                  alignment: int = 1) -> tuple[bytearray | memoryview, memoryview]:
        """A buffer holding the reply header(s) followed by room for `length` bytes of data.

        Returns (whole buffer to send, the data part to fill).
        """
        if self.structured:
            header, fields = self._data_header(P.REPLY_FLAG_DONE if done else 0, cookie, offset, length, data_offset)
        else:
            header, fields = P.SIMPLE_REPLY, (P.SIMPLE_REPLY_MAGIC, 0, cookie)
        head_size = header.size
        if alignment > 1:
            # Keep the data part aligned for O_DIRECT plugins.
            pad = -head_size % alignment
            whole: bytearray | memoryview = aligned_buffer(pad + head_size + length, alignment)[pad:]
        else:
            whole = bytearray(head_size + length)
        header.pack_into(whole, 0, *fields)
        return whole, memoryview(whole)[head_size:]

    def data_chunk(self, cookie: int, offset: int, data_offset: int, data: memoryview) -> list[bytes | memoryview]:
        """A structured NBD_REPLY_TYPE_OFFSET_DATA chunk (not the last one) as header and data."""
        header, fields = self._data_header(0, cookie, offset, len(data), data_offset)
        return [header.pack(*fields), data]

    def _data_header(self, flags: int, cookie: int, offset: int, length: int,
                     data_offset: int) -> tuple[struct.Struct, tuple[int, ...]]:
        """An NBD_REPLY_TYPE_OFFSET_DATA chunk's header and the offset of its `length` bytes of data."""
        if self.extended:
            return P.EXTENDED_DATA_HEADER, (P.EXTENDED_REPLY_MAGIC, flags, P.REPLY_TYPE_OFFSET_DATA, cookie, offset,
                                            8 + length, data_offset)
        return P.STRUCTURED_DATA_HEADER, (P.STRUCTURED_REPLY_MAGIC, flags, P.REPLY_TYPE_OFFSET_DATA, cookie,
                                          8 + length, data_offset)

    def hole(self, cookie: int, offset: int, hole_offset: int, length: int) -> bytes:
        payload = P.HOLE_PAYLOAD.pack(hole_offset, length)
        return self.chunk_header(0, P.REPLY_TYPE_OFFSET_HOLE, cookie, offset, len(payload)) + payload

    def block_status(self, cookie: int, offset: int, context_id: int, extents: list[tuple[int, int]],
                     done: bool) -> bytes:
        flags = P.REPLY_FLAG_DONE if done else 0
        if self.extended:
            body = bytearray(P.BLOCK_STATUS_EXT_HEADER.pack(context_id, len(extents)))
            for length, state in extents:
                body += P.BLOCK_DESCRIPTOR_EXT.pack(length, state)
            return self.chunk_header(flags, P.REPLY_TYPE_BLOCK_STATUS_EXT, cookie, offset, len(body)) + body
        body = bytearray(P.U32.pack(context_id))
        for length, state in extents:
            body += P.BLOCK_DESCRIPTOR.pack(length, state)
        return self.chunk_header(flags, P.REPLY_TYPE_BLOCK_STATUS, cookie, offset, len(body)) + body

"""Running requests against one connection's chain: checks, dispatch to the layer, replies.

Sans-IO like the codec it uses (protocol/transmission.py): `Transmission.process()` turns one
decoded request into a list of buffers to send; it calls the chain synchronously, on the
connection thread that received the request (server/engine.py).
"""

from __future__ import annotations

import errno
import logging

from ..api.chain import (EXTENT_HOLE, EXTENT_ZERO, FLAG_FAST_ZERO, FLAG_FUA, FLAG_MAY_TRIM, FLAG_REQ_ONE, NONE,
                         Extents, Holes, Layer)
from ..api.zeroes import fill_zero
from ..api.errors import NBDError
from ..protocol import wire as P
from ..protocol.handshake import ExportInfo
from ..protocol.transmission import MAX_PAYLOAD, ReplyEncoder, Request

log = logging.getLogger("nbdformats")

SPARSE_READ_MIN = 64 * 1024  # structured reads this large may answer zero ranges as holes (pread_sparse)
SPARSE_HOLE_MIN = 4096  # smaller zero ranges go out as data
MAX_DESCRIPTORS = 1 << 16  # block status descriptors in one reply; clients ask again for the rest


def transmission_flags(layer: Layer, structured: bool, multi_conn: bool = True) -> int:
    flags = P.TF_HAS_FLAGS
    if not layer.can_write():
        flags |= P.TF_READ_ONLY
    if layer.can_flush():
        flags |= P.TF_SEND_FLUSH
    if layer.can_fua() != NONE:
        flags |= P.TF_SEND_FUA
    if layer.is_rotational():
        flags |= P.TF_ROTATIONAL
    if layer.can_trim():
        flags |= P.TF_SEND_TRIM
    if layer.can_zero() != NONE:
        flags |= P.TF_SEND_WRITE_ZEROES
        if layer.can_fast_zero():
            flags |= P.TF_SEND_FAST_ZERO
    if structured:
        flags |= P.TF_SEND_DF
    if multi_conn and layer.can_multi_conn():
        flags |= P.TF_CAN_MULTI_CONN
    if layer.can_cache() != NONE:
        flags |= P.TF_SEND_CACHE
    if layer.can_resize():
        flags |= P.TF_SEND_RESIZE
    return flags


def export_info(name: str, layer: Layer, structured: bool, description: str = "",
                multi_conn: bool = True) -> ExportInfo:
    """What the handshake tells a client.  `multi_conn` False: the server serves one connection at
    a time (serialize_connections), so it never advertises multi-conn, as nbdkit."""
    # The chain's constraints are advertised as they are, as nbdkit does (a filter that splits
    # requests, blocksize, says 4G-1); reads and writes over MAX_PAYLOAD are refused whatever the
    # maximum says.  Without constraints we still advertise MAX_PAYLOAD, the largest we take.
    constraints = layer.block_size()
    minimum, preferred, maximum = constraints if constraints else (1, 4096, MAX_PAYLOAD)
    return ExportInfo(name=name, size=layer.get_size(), flags=transmission_flags(layer, structured, multi_conn),
                      minimum=minimum, preferred=max(preferred, minimum), maximum=maximum,
                      description=description)


# Flags each command accepts ("the server MUST reject any command flags it does not recognize").
_ALLOWED_FLAGS = {
    P.CMD_READ: P.CMD_FLAG_DF,
    P.CMD_WRITE: P.CMD_FLAG_FUA | P.CMD_FLAG_PAYLOAD_LEN,
    P.CMD_DISC: 0,
    P.CMD_FLUSH: 0,
    P.CMD_TRIM: P.CMD_FLAG_FUA,
    P.CMD_CACHE: 0,
    P.CMD_WRITE_ZEROES: P.CMD_FLAG_FUA | P.CMD_FLAG_NO_HOLE | P.CMD_FLAG_FAST_ZERO,
    P.CMD_BLOCK_STATUS: P.CMD_FLAG_REQ_ONE,
    P.CMD_RESIZE: 0,
}


class Transmission:
    """Runs requests against one connection's chain and encodes the replies."""

    def __init__(self, layer: Layer, info: ExportInfo, *, structured: bool, extended: bool,
                 meta_context_id: int | None, alignment: int = 1) -> None:
        self.layer = layer
        self.info = info
        self.size = info.size
        self.flags = info.flags
        self.replies = ReplyEncoder(structured, extended)
        self.structured = structured or extended
        self.meta_context_id = meta_context_id
        self.alignment = alignment

    def check(self, req: Request) -> tuple[int, str] | None:
        """Why a request must fail before it reaches the backend, or None."""
        if req.error:
            return req.error, req.message
        type, flags = req.type, req.flags
        allowed = _ALLOWED_FLAGS.get(type)
        if allowed is None:
            return errno.EINVAL, f"unknown command {type}"
        if flags & ~allowed:
            return errno.EINVAL, f"invalid flags {flags:#x} for {P.COMMAND_NAMES[type]}"
        tf = self.flags
        if type == P.CMD_READ:
            if req.length > min(self.info.maximum, MAX_PAYLOAD):
                return errno.EOVERFLOW if flags & P.CMD_FLAG_DF else errno.EINVAL, \
                    f"read of {req.length} bytes exceeds the maximum {min(self.info.maximum, MAX_PAYLOAD)}"
            if flags & P.CMD_FLAG_DF and not self.structured:
                return errno.EINVAL, "DF needs structured replies"
        elif type in (P.CMD_WRITE, P.CMD_TRIM, P.CMD_WRITE_ZEROES):
            if tf & P.TF_READ_ONLY:
                return errno.EPERM, "the export is read-only"
            if type == P.CMD_TRIM and not tf & P.TF_SEND_TRIM:
                return errno.EINVAL, "trim is not supported"
            if type == P.CMD_WRITE_ZEROES and not tf & P.TF_SEND_WRITE_ZEROES:
                return errno.EINVAL, "write zeroes is not supported"
            if flags & P.CMD_FLAG_FAST_ZERO and not tf & P.TF_SEND_FAST_ZERO:
                return errno.EINVAL, "fast zero is not supported"
            if flags & P.CMD_FLAG_FUA and not tf & P.TF_SEND_FUA:
                return errno.EINVAL, "FUA is not supported"
        elif type == P.CMD_FLUSH:
            if not tf & P.TF_SEND_FLUSH:
                return errno.EINVAL, "flush is not supported"
            return None
        elif type == P.CMD_CACHE:
            if not tf & P.TF_SEND_CACHE:
                return errno.EINVAL, "cache is not supported"
        elif type == P.CMD_BLOCK_STATUS:
            if self.meta_context_id is None:
                return errno.EINVAL, "no meta context was negotiated"
        elif type == P.CMD_DISC:
            return None
        elif type == P.CMD_RESIZE:
            # The resize extension: the new size travels in the offset field; length is zero.
            if not tf & P.TF_SEND_RESIZE:
                return (errno.EPERM if tf & P.TF_READ_ONLY else errno.EINVAL), "resize is not supported"
            if req.length:
                return errno.EINVAL, "resize takes the new size in the offset field and a zero length"
            if req.offset >= 1 << 63:  # sizes are signed 64-bit in every server and client we know
                return errno.EINVAL, "resize to a size of 2^63 bytes or more"
            return None
        if req.offset > self.size or (req.offset + req.length > self.size and not self._partial_ok(req)):
            return errno.EINVAL, f"request [{req.offset}, +{req.length}) is beyond the end of the disk ({self.size})"
        return None

    def _partial_ok(self, req: Request) -> bool:
        # Structured READ/BLOCK_STATUS past the end answer the valid part, then an offset error.
        return self.structured and req.type in (P.CMD_READ, P.CMD_BLOCK_STATUS) and req.offset < self.size

    def process(self, req: Request) -> list[bytes | bytearray | memoryview]:
        """Run one request (already through check()) and return the reply buffers.

        Every reply's last buffer starts with a reply header (stats read its error field).
        """
        try:
            type = req.type
            if type == P.CMD_RESIZE:
                self.layer.resize(req.offset)
                self.size = self.layer.get_size()
                return [self.replies.ok(req.cookie, req.offset)]
            if req.length == 0 and type != P.CMD_FLUSH:
                if type == P.CMD_BLOCK_STATUS and req.offset < self.size and not req.flags & P.CMD_FLAG_REQ_ONE:
                    # A status reply needs one nonzero extent; the spec lets the last one run past the request.
                    return self._block_status(req, minimum=1)
                return [self.replies.ok(req.cookie, req.offset)]
            if type == P.CMD_READ:
                return self._read(req)
            if type == P.CMD_WRITE:
                assert req.payload is not None  # the decoder gives every WRITE its payload
                self.layer.pwrite(req.payload, req.offset, FLAG_FUA if req.flags & P.CMD_FLAG_FUA else 0)
            elif type == P.CMD_FLUSH:
                self.layer.flush(0)
            elif type == P.CMD_TRIM:
                self.layer.trim(req.length, req.offset, FLAG_FUA if req.flags & P.CMD_FLAG_FUA else 0)
            elif type == P.CMD_WRITE_ZEROES:
                flags = FLAG_FUA if req.flags & P.CMD_FLAG_FUA else 0
                if not req.flags & P.CMD_FLAG_NO_HOLE:
                    flags |= FLAG_MAY_TRIM
                if req.flags & P.CMD_FLAG_FAST_ZERO:
                    flags |= FLAG_FAST_ZERO
                self.layer.zero(req.length, req.offset, flags)
            elif type == P.CMD_CACHE:
                self.layer.cache(req.length, req.offset, 0)
            elif type == P.CMD_BLOCK_STATUS:
                return self._block_status(req)
            return [self.replies.ok(req.cookie, req.offset)]
        except Exception as e:  # any failure of one request fails only that request
            err, message = self.failure(e, req)
            return [self.replies.error(req.cookie, req.offset, err, message)]

    def failure(self, e: BaseException, req: Request) -> tuple[int, str]:
        name = P.COMMAND_NAMES.get(req.type, str(req.type))
        if isinstance(e, NBDError):
            # EIO is the data or the backend failing (a corrupt block, a lost server): the operator
            # must see it, as nbdkit_error shows it; other errors answer the request's own fault.
            (log.warning if e.errno == errno.EIO else log.debug)("%s [%d, +%d): %s", name, req.offset, req.length, e)
            return e.errno, str(e)
        if isinstance(e, OSError) and e.errno:
            log.warning("%s [%d, +%d): %s", name, req.offset, req.length, e)
            return e.errno, e.strerror or str(e)
        log.error("%s [%d, +%d) failed", name, req.offset, req.length, exc_info=e)
        return errno.EIO, f"internal error: {type(e).__name__}"

    def _read(self, req: Request) -> list[bytes | bytearray | memoryview]:
        offset, length, cookie = req.offset, req.length, req.cookie
        valid = min(length, self.size - offset)
        tail_error = valid < length
        whole, data = self.replies.read_data(cookie, offset, offset, valid, done=not tail_error,
                                             alignment=self.alignment)
        if self.structured and valid >= SPARSE_READ_MIN and not req.flags & P.CMD_FLAG_DF:
            holes = self.layer.pread_sparse(data, offset, 0)
            if holes:
                return self._sparse_reply(req, data, holes, valid, tail_error)
        else:
            self.layer.pread(data, offset, 0)
        buffers: list[bytes | bytearray | memoryview] = [whole]
        if tail_error:
            buffers.append(self.replies.error(cookie, offset, errno.EINVAL, "read beyond the end of the disk",
                                              at=offset + valid))
        return buffers

    def _sparse_reply(self, req: Request, data: memoryview, holes: Holes, valid: int,
                      tail_error: bool) -> list[bytes | bytearray | memoryview]:
        """Data chunks (views of the read buffer) and hole chunks for what pread_sparse left unread.

        Holes smaller than SPARSE_HOLE_MIN are zero-filled and sent as data: a chunk of their
        own would cost more than their bytes."""
        offset, cookie = req.offset, req.cookie
        replies = self.replies
        buffers: list[bytes | bytearray | memoryview] = []
        position = 0  # start of the data not yet sent, relative to the buffer
        for start, length in holes:
            if start < position or length <= 0 or start + length > valid:
                raise NBDError(errno.EIO, f"pread_sparse reported a bad hole ({start}, {length})")
            if length < SPARSE_HOLE_MIN:
                fill_zero(data[start:start + length])
                continue
            if start > position:
                buffers += replies.data_chunk(cookie, offset, offset + position, data[position:start])
            buffers.append(replies.hole(cookie, offset, offset + start, length))
            position = start + length
        if position < valid:
            buffers += replies.data_chunk(cookie, offset, offset + position, data[position:valid])
        # The last buffer of a reply is a header, as everywhere: the final chunk is NONE or an error.
        if tail_error:
            buffers.append(replies.error(cookie, offset, errno.EINVAL, "read beyond the end of the disk",
                                         at=offset + valid))
        else:
            buffers.append(replies.ok(cookie, offset))
        return buffers

    def _block_status(self, req: Request, minimum: int = 0) -> list[bytes | bytearray | memoryview]:
        offset, cookie = req.offset, req.cookie
        valid = min(max(req.length, minimum), self.size - offset)
        tail_error = valid < req.length
        if not self.replies.extended:
            valid = min(valid, 0xFFFFFFFF)
        # As nbdkit: the chain may report past the request (a filter of whole blocks reports the
        # block), and the last descriptor may run past it: "the length of the final extent MAY
        # result in a sum larger than the original requested length" (NBD spec).  With REQ_ONE the
        # one descriptor stops at the request's end.
        extents = Extents(offset, self.size)
        flags = FLAG_REQ_ONE if req.flags & P.CMD_FLAG_REQ_ONE else 0
        self.layer.extents(valid, offset, flags, extents)
        if not len(extents):
            raise NBDError(errno.EIO, "the backend reported no extents")
        longest = 0xFFFFFFFF if not self.replies.extended else (1 << 63) - 1
        descriptors: list[tuple[int, int]] = []
        for start, length, type in extents:
            if flags:
                descriptors.append((min(length, valid), type & (EXTENT_HOLE | EXTENT_ZERO)))
                break
            descriptors.append((min(length, longest), type & (EXTENT_HOLE | EXTENT_ZERO)))
            if start + length >= offset + valid or len(descriptors) == MAX_DESCRIPTORS:
                break
        buffers: list[bytes | bytearray | memoryview] = [
            self.replies.block_status(cookie, offset, self.meta_context_id or 0, descriptors, done=not tail_error)]
        if tail_error:
            buffers.append(self.replies.error(cookie, offset, errno.EINVAL, "block status beyond the end of the disk",
                                              at=offset + valid))
        return buffers

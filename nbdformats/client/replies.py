"""Requests and the reply stream, sans-IO: a `Command` per request, `encode_request()`, and
`ReplyDecoder`, which splits replies into chunks in the get_buffer()/buffer_updated() shape of the
server's RequestDecoder, so READ data is received straight into the caller's buffer."""

from __future__ import annotations

import _thread
import errno
import os
from typing import Any, Iterable

from ..protocol import wire as P
from ..api.errors import NBDError
from ..protocol.errors import ProtocolError


SCRATCH_SIZE = 256 * 1024

MAX_CHUNK_PAYLOAD = 64 * 1024 * 1024  # non-data chunk payloads (block status descriptors, errors)


# NBD error numbers are Linux errno values; anything else is mapped to EINVAL, as libnbd does.
_NBD_ERRNO = {P.NBD_EPERM: errno.EPERM, P.NBD_EIO: errno.EIO, P.NBD_ENOMEM: errno.ENOMEM,
              P.NBD_EINVAL: errno.EINVAL, P.NBD_ENOSPC: errno.ENOSPC, P.NBD_EOVERFLOW: errno.EOVERFLOW,
              P.NBD_ENOTSUP: errno.ENOTSUP, P.NBD_ESHUTDOWN: errno.ESHUTDOWN}


def nbd_to_errno(code: int) -> int:
    return _NBD_ERRNO.get(code, errno.EINVAL)


class Command:
    """One request and what its replies said.  `wait()` blocks until the last reply chunk arrived."""

    __slots__ = ("type", "flags", "offset", "length", "cookie", "sent", "buf", "payload", "error", "message",
                 "error_offset", "covered", "status", "chunk_types", "done", "_waiter")

    def __init__(self, type: int, flags: int, offset: int, length: int, *, buf: memoryview | None = None,
                 payload: Any = None) -> None:
        self.type, self.flags, self.offset, self.length = type, flags, offset, length
        self.cookie = 0
        self.sent = 0.0  # time.monotonic() when it was submitted (the request timeout counts from there)
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

"""Random access to data that can only be produced forward: produce on demand into a spill.

Some data can only be decoded from its start: a single-frame zstd file, one huge xz block, a
member of an archive libarchive unpacks.  A `Spill` asks its `Producer` for output only as far
as reads need, storing it in memory or in an unlinked sparse temporary file (under $TMPDIR);
bytes below `done` are final and later reads of them come straight from the store.  So a read
near the start answers at once and nothing is produced twice.  A spill is shared by all
connections: each call passes the calling connection's reader on to the producer.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import tempfile
import threading
from typing import Any, Protocol

from ..api.errors import NBDError

log = logging.getLogger(__name__)

Piece = tuple[int, Any]  # (offset, bytes-like data), the data valid until the producer's next call


class Producer(Protocol):
    def read(self, reader: Any) -> Piece | None:
        """The next piece of output (a few MiB at most, never before the end of the previous
        piece), reading input through `reader`; None at the end of the data."""
        ...

    def close(self) -> None: ...


class ChunkDecoder(Protocol):
    def read(self, reader: Any) -> bytes:
        """The next piece of output (a few MiB at most); b"" at the end of the data."""
        ...


class InOrder:
    """A Producer over a ChunkDecoder, whose pieces follow one another."""

    def __init__(self, decoder: ChunkDecoder) -> None:
        self.decoder = decoder
        self.position = 0

    def read(self, reader: Any) -> Piece | None:
        chunk = self.decoder.read(reader)
        if not chunk:
            return None
        offset, self.position = self.position, self.position + len(chunk)
        return offset, chunk

    def close(self) -> None:
        pass


class Spill:
    """`size` bytes of `producer`'s output (None: unknown until produce_all()), produced on demand.

    `sparse`: the producer may skip ranges and end early (holes of a sparse archive member),
    which read as zeroes; otherwise output ending before `size` is an error.
    """

    def __init__(self, producer: Producer, size: int | None, what: str, *, in_memory: bool = False,
                 sparse: bool = False, max_size: int | None = None) -> None:
        assert size is not None or not (in_memory or sparse)
        self.producer = producer
        self.size = size
        self.what = what
        self.sparse = sparse
        self.max_size = max_size
        self.done = 0
        self.finished = False  # the producer has nothing more to give
        self.failed: NBDError | None = None  # a failed producer cannot go on: later reads fail alike
        self.lock = threading.Lock()
        # In memory: an anonymous mapping, whose pages cost nothing until written and go back to
        # the kernel on close (a bytearray would stay in the allocator's heap: see tune_malloc).
        self.memory: mmap.mmap | bytearray | None = None
        if in_memory and size is not None:
            self.memory = mmap.mmap(-1, size) if size else bytearray()
        self.fd: int | None = None

    def read_into(self, buf: memoryview, offset: int, reader: Any) -> None:
        end = offset + len(buf)
        if self.size is not None and end > self.size:
            raise NBDError(errno.EIO, f"{self.what}: read beyond the end ({self.size} bytes)")
        if end > self.done:
            with self.lock:
                self._produce_to(end, reader)
        if self.memory is not None:
            buf[:] = memoryview(self.memory)[offset:end]
            return
        assert self.fd is not None or not len(buf)
        done = 0
        while done < len(buf):
            n = os.preadv(self.fd, [buf[done:]], offset + done)  # type: ignore[arg-type]
            if n <= 0:
                raise NBDError(errno.EIO, f"{self.what}: short read from the spill file")
            done += n

    def produce_all(self, reader: Any) -> int:
        """Produce everything now (when the size is not declared); returns the size."""
        with self.lock:
            self._produce_to(1 << 63, reader)
        assert self.size is not None
        return self.size

    def _produce_to(self, end: int, reader: Any) -> None:
        """Produce until `end` bytes are final or the data ends (call with self.lock held)."""
        if self.failed is not None:
            raise NBDError(self.failed.errno, str(self.failed))
        try:
            if self.memory is None and self.fd is None:
                self._create_file()
            while self.done < end and not self.finished:
                piece = self.producer.read(reader)
                if piece is None:
                    self._finish()
                    return
                offset, data = piece
                if offset != self.done and not self.sparse:
                    raise NBDError(errno.EIO, f"{self.what}: the data skips from byte {self.done} to {offset}")
                piece_end = offset + len(data)
                if self.size is not None and piece_end > self.size:
                    raise NBDError(errno.EIO, f"{self.what}: the data decodes to more than the "
                                              f"declared {self.size} bytes")
                if self.max_size is not None and piece_end > self.max_size:
                    raise NBDError(errno.EFBIG, f"{self.what}: the data decompresses to more than "
                                                f"max-size={self.max_size}: refusing a decompression bomb")
                self._store(offset, data)
                self.done = max(self.done, piece_end)
                if self.done == self.size:
                    self._finish()  # every declared byte is here: the producer is not needed again
        except NBDError as e:
            self.failed = e
            self.producer.close()
            raise
        except OSError as e:
            raise NBDError(e.errno or errno.EIO, f"{self.what}: spill file: {e.strerror}") from None

    def _finish(self) -> None:
        self.finished = True
        self.producer.close()
        if self.size is None:
            self.size = self.done
        elif self.done < self.size:
            if not self.sparse:
                raise NBDError(errno.EIO, f"{self.what}: the data ends at {self.done} bytes, "
                                          f"not the declared {self.size}")
            self.done = self.size  # a trailing hole reads as zeroes

    def _create_file(self) -> None:
        self.fd, path = tempfile.mkstemp(prefix="nbdformats-spill-")
        os.unlink(path)  # gone with the process
        if self.size is not None:
            os.ftruncate(self.fd, self.size)  # sparse: holes cost nothing
        log.info("%s: decoding into a spill file in %s as reads need it", self.what, tempfile.gettempdir())

    def _store(self, offset: int, data: Any) -> None:
        if self.memory is not None:
            self.memory[offset:offset + len(data)] = data
            return
        assert self.fd is not None
        view = memoryview(data).cast("B")
        written = 0
        while written < len(view):
            written += os.pwrite(self.fd, view[written:], offset + written)

    def close(self) -> None:
        with self.lock:
            self.producer.close()
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None
            if isinstance(self.memory, mmap.mmap):
                self.memory.close()

    def __del__(self) -> None:
        if self.fd is not None:
            os.close(self.fd)

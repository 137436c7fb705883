"""Serving a forward-only decoder with random access: decode on demand into a spill file.

Some compressed data can only be decoded from its start (a single-frame zstd file, one huge
xz block).  `Spill` pulls output from a `ChunkDecoder` only as far as reads need, appending it
to an unlinked temporary file (under $TMPDIR); later reads of decoded ranges come straight
from that file.  So a read near the start answers at once and nothing is decoded twice.
"""

from __future__ import annotations

import errno
import logging
import os
import tempfile
import threading
from typing import Protocol

from ..core.errors import NBDError
from ._decompress import Reader

log = logging.getLogger(__name__)


class ChunkDecoder(Protocol):
    def read(self, reader: Reader) -> bytes:
        """The next piece of output (a few MiB at most); b"" at the end of the data."""
        ...


class Spill:
    """`size` bytes of output of `decoder`, decoded on demand into a temporary file."""

    def __init__(self, size: int | None, decoder: ChunkDecoder, what: str, max_size: int | None = None) -> None:
        self.size = size  # None: unknown until decode_all()
        self.max_size = max_size
        self.decoder = decoder
        self.what = what
        self.decoded = 0
        self.failed: NBDError | None = None
        self.lock = threading.Lock()
        self.fd: int | None = None

    def _decode_to(self, end: int, reader: Reader) -> None:
        """Decode until `end` bytes are in the spill file (call with self.lock held)."""
        if self.failed is not None:
            raise NBDError(self.failed.errno, str(self.failed))
        if self.fd is None:
            self.fd, path = tempfile.mkstemp(prefix="nbdformats-spill-")
            os.unlink(path)  # gone with the process
            log.info("%s: decoding into a spill file in %s as reads need it", self.what, tempfile.gettempdir())
        try:
            while self.decoded < end:
                chunk = self.decoder.read(reader)
                if not chunk:
                    if self.size is None:
                        self.size = self.decoded
                        return
                    raise NBDError(errno.EIO, f"{self.what}: the data ends at {self.decoded} bytes, "
                                              f"not the declared {self.size}")
                if self.size is not None and self.decoded + len(chunk) > self.size:
                    raise NBDError(errno.EIO, f"{self.what}: the data decodes to more than the "
                                              f"declared {self.size} bytes")
                if self.max_size is not None and self.decoded + len(chunk) > self.max_size:
                    raise NBDError(errno.EFBIG, f"{self.what}: the data decompresses to more than "
                                                f"max-size={self.max_size}: refusing a decompression bomb")
                written = 0
                while written < len(chunk):
                    written += os.pwrite(self.fd, memoryview(chunk)[written:], self.decoded + written)
                self.decoded += len(chunk)
        except NBDError as e:
            self.failed = e  # the decoder cannot go on: every later read fails the same way
            raise
        except OSError as e:
            raise NBDError(e.errno or errno.EIO, f"{self.what}: spill file: {e.strerror}") from None

    def decode_all(self, reader: Reader) -> int:
        """Decode everything now (when the size is not declared); returns the size."""
        with self.lock:
            self._decode_to(1 << 63, reader)
        assert self.size is not None
        return self.size

    def read_into(self, buf: memoryview, offset: int, reader: Reader) -> None:
        end = offset + len(buf)
        if self.size is not None and end > self.size:
            raise NBDError(errno.EIO, f"{self.what}: read beyond the end ({self.size} bytes)")
        if end > self.decoded:
            with self.lock:
                self._decode_to(end, reader)
        assert self.fd is not None or not len(buf)
        done = 0
        while done < len(buf):
            n = os.preadv(self.fd, [buf[done:]], offset + done)  # type: ignore[arg-type]
            if n <= 0:
                raise NBDError(errno.EIO, f"{self.what}: short read from the spill file")
            done += n

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __del__(self) -> None:
        self.close()

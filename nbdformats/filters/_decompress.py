"""What the gzip, xz and zstd filters share: a read-only view of decompressed data.

A filter subclasses `DecompressFilter` and implements `load(below, reader)`, which inspects
the compressed data once per export and returns a `Source` (the uncompressed size and a
`read_into`).  Sources are shared by all connections to the same export and must be
thread-safe; each call is given the calling connection's reader, so a source never keeps a
closed connection's layer.  The default export is loaded at start-up, so bad input is a
start-up error and the first client does not wait.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from typing import Callable, Protocol

from ..core.chain import NONE, Filter, FilterHandle, Layer, OpenNext
from ..core.errors import ConfigError, NBDError
from ..core.params import Param, Size

log = logging.getLogger(__name__)

Reader = Callable[[int, int], bytes]
READ_CHUNK = 4 << 20  # layers below may limit request sizes


class Source(Protocol):
    size: int

    def read_into(self, buf: memoryview, offset: int, reader: Reader) -> None: ...


class DecompressError(ValueError):
    """The compressed data is corrupt, truncated or unsupported (the message says which)."""


def layer_reader(layer: Layer) -> Reader:
    """read(offset, length) over a layer: short at the end of the data, chunked for big reads."""

    def read(offset: int, length: int) -> bytes:
        length = max(0, min(length, layer.get_size() - offset))
        buf = bytearray(length)
        view = memoryview(buf)
        for start in range(0, length, READ_CHUNK):
            layer.pread(view[start:start + READ_CHUNK], offset + start, 0)
        return bytes(buf)

    return read


def read_exact(reader: Reader, offset: int, length: int, what: str) -> bytes:
    data = reader(offset, length)
    if len(data) != length:
        raise DecompressError(f"truncated file: {what} at offset {offset} needs {length} bytes, "
                              f"only {len(data)} are there")
    return data


class Progress:
    """Log lines "NAME: WHAT 42% (...)" every few seconds during a long start-up step."""

    def __init__(self, name: str, what: str, interval: float = 2.0) -> None:
        self.name, self.what, self.interval = name, what, interval
        self.started = self.last = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            log.info("%s: %s %d%% (%d of %d compressed MiB)", self.name, self.what,
                     100 * done // max(total, 1), done >> 20, total >> 20)

    def finished(self, detail: str) -> None:
        log.info("%s: %s done in %.1f s: %s", self.name, self.what, time.monotonic() - self.started, detail)


class DecompressFilter(Filter):
    """Base of the decompressing filters (read-only; one shared Source per export)."""

    blocking = True  # decompression is heavy CPU work: run in worker threads
    max_size = Param(Size(minimum=1), key="max-size",
                     help="Refuse data that decompresses to more than this (decompression bomb "
                          "protection); default: no limit beyond the size the file declares")

    def get_ready(self) -> None:
        self._sources: dict[str, Source] = {}
        self._loading: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        try:
            below = self.open_below(True, "")
        except (NBDError, OSError) as e:
            log.debug("%s: cannot open the layer below at start-up (%s); loading at connection", self.name, e)
            return
        try:
            self.source_for(below, "")
        except NBDError as e:
            raise ConfigError(str(e)) from None
        finally:
            below.close()

    def load(self, below: Layer, reader: Reader) -> Source:
        """Inspect the compressed data (size, index); raise DecompressError or NBDError."""
        raise NotImplementedError

    def source_for(self, below: Layer, export_name: str) -> Source:
        with self._lock:
            source = self._sources.get(export_name)
            if source is not None:
                return source
            loading = self._loading.setdefault(export_name, threading.Lock())
        with loading:  # one load per export, even when clients connect at once
            with self._lock:
                source = self._sources.get(export_name)
            if source is None:
                try:
                    source = self.load(below, layer_reader(below))
                except DecompressError as e:
                    raise NBDError(errno.EIO, f"{self.name}: {e}") from None
                except NBDError as e:
                    raise NBDError(e.errno, f"{self.name}: {e}") from None
                if self.max_size is not None and source.size > self.max_size:
                    raise NBDError(errno.EFBIG, f"{self.name}: the data decompresses to {source.size} "
                                                f"bytes, more than max-size={self.max_size}")
                with self._lock:
                    self._sources[export_name] = source
            return source

    def open(self, next_open: OpenNext, readonly: bool, export_name: str) -> FilterHandle:
        # Decompressed data is read-only: the layer below is opened read-only too.
        return super().open(next_open, True, export_name)

    class Handle(FilterHandle):
        def __init__(self, filter: "DecompressFilter", next: Layer, readonly: bool, export_name: str) -> None:
            super().__init__(filter, next, readonly, export_name)
            self.source = filter.source_for(next, export_name)
            self.reader = layer_reader(next)

        def get_size(self) -> int:
            return self.source.size

        def block_size(self) -> tuple[int, int, int] | None:
            return None

        def can_write(self) -> bool:
            return False

        def can_flush(self) -> bool:
            return False

        def can_trim(self) -> bool:
            return False

        def can_zero(self) -> int:
            return NONE

        def can_fast_zero(self) -> bool:
            return False

        def can_fua(self) -> int:
            return NONE

        def can_extents(self) -> bool:
            return False

        def can_cache(self) -> int:
            return NONE

        def can_multi_conn(self) -> bool:
            return True  # read-only: every connection sees the same bytes

        def pread(self, buf: memoryview, offset: int, flags: int) -> None:
            self.source.read_into(buf, offset, self.reader)

        def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
            raise NBDError(errno.EROFS, f"{self.filter.name}: compressed data is read-only")

        def flush(self, flags: int) -> None:
            pass

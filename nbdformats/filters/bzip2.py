"""bzip2 filter: serve the uncompressed contents of a .bz2 file, read-only, with random access.

nbdkit's bzip2 filter (no parameters) unpacks the whole file into $TMPDIR before serving.  This
one reads by bzip2 block through indexed_bzip2 (PyPI, MIT or Apache-2.0): bzip2 blocks start at
any bit, marked by the 48-bit magic 0x314159265359; indexed_bzip2 finds them, decodes them in
parallel threads once to learn where each block's output starts (the index), and afterwards a
read decodes only the blocks it touches.  Every block's CRC is checked.

Evaluated against doing it here (finding the magic, re-aligning a block by its bit offset into a
stream of its own for Python's bz2): indexed_bzip2 decodes several times faster (its own decoder,
on every core), keeps the index, and refuses corrupt blocks with a CRC error; its file-object
input reads through the layer below.  It must be closed before the interpreter exits (its
threads abort the process otherwise), and its threads must not cross a fork (see Bzip2Source).
"""

from __future__ import annotations

import atexit
import errno
import io
import logging
import os
import threading
from typing import Any

import indexed_bzip2

from ..api.chain import Layer
from ..api.errors import NBDError
from ..api.params import Int, Param
from ._decompress import DecompressError, DecompressFilter, Reader

log = logging.getLogger(__name__)

# How indexed_bzip2 reports corrupt data: its decoder's checks (ValueError: "origPtr error", "selector
# out of range", a Huffman code that cannot be built), CRC mismatches and C++ exceptions (RuntimeError).
CORRUPT = (RuntimeError, ValueError)


class LayerFile(io.RawIOBase):
    """The layer below as the seekable binary file indexed_bzip2 reads."""

    def __init__(self, layer: Layer) -> None:
        super().__init__()
        self.layer, self.size, self.position = layer, layer.get_size(), 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = max(0, base + offset)
        return self.position

    def tell(self) -> int:
        return self.position

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), self.size - self.position))
        self.layer.pread(view[:n], self.position, 0)
        self.position += n
        return n


class Bzip2Source:
    """A bzip2 file indexed by block; reads are serialized (the reader seeks).

    indexed_bzip2's threads must not exist when the server forks to detach: the child would wait
    for them forever.  So the index is built by a reader that is closed again, reads use a reader
    made on demand from the index (which costs nothing to load), and that reader is closed before
    any fork."""

    def __init__(self, layer: Layer, threads: int) -> None:
        self.layer, self.threads = layer, threads
        self.layer_open = True
        self.lock = threading.Lock()
        indexer = indexed_bzip2.open(LayerFile(layer), parallelization=threads)
        try:
            self.size = indexer.seek(0, io.SEEK_END)  # decodes every block once: the index
            self.offsets = indexer.block_offsets()
        except CORRUPT as e:
            raise DecompressError(f"the bzip2 data is corrupt or truncated ({e})") from None
        finally:
            indexer.close()
        self.file: Any = None
        os.register_at_fork(before=self._close_reader)
        atexit.register(self.close)

    def read_into(self, buf: memoryview, offset: int, reader: Reader) -> None:
        try:
            with self.lock:
                if self.file is None:
                    self.file = indexed_bzip2.open(LayerFile(self.layer), parallelization=self.threads)
                    self.file.set_block_offsets(self.offsets)
                self.file.seek(offset)
                done = self.file.readinto(buf)
        except CORRUPT as e:
            raise NBDError(errno.EIO, f"bzip2: the block holding offset {offset} is corrupt ({e})") from None
        if done != len(buf):
            raise NBDError(errno.EIO, f"bzip2: {done} bytes at offset {offset}, not {len(buf)}")

    def _close_reader(self) -> None:
        with self.lock:
            if self.file is not None:
                self.file.close()
                self.file = None

    def close(self) -> None:
        """At cleanup, and at exit for a source whose cleanup did not run: once."""
        self._close_reader()
        layer, self.layer_open = self.layer_open, False
        if layer:
            self.layer.close()


class Bzip2Filter(DecompressFilter):
    """Serve a bzip2-compressed disk image read-only, with random access by bzip2 block."""

    name = "bzip2"
    bzip2_threads = Param(Int(minimum=1, maximum=64), key="bzip2-threads", default=min(os.cpu_count() or 1, 8),
                          help="Threads decoding blocks (to build the index at start-up, and ahead of reads)")

    def config_complete(self) -> None:
        self._opening = threading.local()
        self._open_sources: list[Bzip2Source] = []

    def source_for(self, below: Layer, export_name: str) -> Any:
        self._opening.export_name = export_name  # load() opens a layer of its own for this export
        return super().source_for(below, export_name)

    def load(self, below: Layer, reader: Reader) -> Bzip2Source:
        # indexed_bzip2 reads in its own threads, also between our calls: through a layer the
        # source keeps open, never a connection's.
        own = self.open_below(True, self._opening.export_name)
        try:
            source = Bzip2Source(own, self.bzip2_threads)
        except BaseException:
            own.close()
            raise
        self._open_sources.append(source)
        log.info("bzip2: %d bytes in %d blocks", source.size, len(source.offsets))
        return source

    def cleanup(self) -> None:
        for source in self._open_sources:
            source.close()


FILTER = Bzip2Filter

"""Bytes from a layer as format parsers want them: one call for any range, and many small
forward reads (headers) served from a window read ahead."""

from __future__ import annotations

from typing import Callable

from ..api.chain import Layer

READ_CHUNK = 4 << 20  # layers below may limit request sizes


def read_bytes(layer: Layer, offset: int, length: int) -> bytes:
    """`length` bytes at `offset` of `layer`, read in chunks of at most READ_CHUNK."""
    buf = bytearray(length)
    view = memoryview(buf)
    for start in range(0, length, READ_CHUNK):
        layer.pread(view[start:start + READ_CHUNK], offset + start, 0)
    return bytes(buf)


class WindowedReader:
    """read(offset, length) for a parser's many small forward reads (headers, checksums):
    served from one window of `window` bytes read ahead; larger reads go straight through."""

    def __init__(self, read: Callable[[int, int], bytes], size: int, window: int) -> None:
        self._read, self._size, self._window = read, size, window
        self._start, self._data = 0, b""

    def __call__(self, offset: int, length: int) -> bytes:
        start = offset - self._start
        if 0 <= start and start + length <= len(self._data):
            return self._data[start:start + length]
        if length >= self._window:
            return self._read(offset, length)
        self._start = offset
        self._data = self._read(offset, min(self._window, self._size - offset))
        return self._data[:length]

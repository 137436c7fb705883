"""How format code reads its input: a `read(offset, length) -> bytes` callable."""

from __future__ import annotations

from typing import Callable

Reader = Callable[[int, int], bytes]


class WindowedReader:
    """read(offset, length) for a parser's many small forward reads (headers, checksums):
    served from one window of `window` bytes read ahead; larger reads go straight through."""

    def __init__(self, read: Reader, size: int, window: int) -> None:
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

"""Zero-filled buffers without allocating request-sized zero bytes."""

from __future__ import annotations

ZERO_CHUNK = memoryview(bytes(1 << 20))


def fill_zero(buf: memoryview) -> None:
    for start in range(0, len(buf), len(ZERO_CHUNK)):
        piece = buf[start:start + len(ZERO_CHUNK)]
        piece[:] = ZERO_CHUNK[:len(piece)]


def is_zero(buf: memoryview) -> bool:
    for start in range(0, len(buf), len(ZERO_CHUNK)):
        piece = buf[start:start + len(ZERO_CHUNK)]
        if piece != ZERO_CHUNK[:len(piece)]:
            return False
    return True

"""Zeroes without request-sized allocations: one shared, immutable megabyte of zero bytes,
used in pieces to fill buffers, compare with, and write (zero requests emulated by writes)."""

from __future__ import annotations

from typing import Callable

ZEROES = memoryview(bytes(1 << 20))  # `bytes` is immutable: safe to share between threads


def fill_zero(buf: memoryview) -> None:
    for start in range(0, len(buf), len(ZEROES)):
        piece = buf[start:start + len(ZEROES)]
        piece[:] = ZEROES[:len(piece)]


def is_zero(buf: memoryview) -> bool:
    for start in range(0, len(buf), len(ZEROES)):
        piece = buf[start:start + len(ZEROES)]
        if piece != ZEROES[:len(piece)]:
            return False
    return True


def write_zeroes(pwrite: Callable[[memoryview, int, int], None], count: int, offset: int, flags: int = 0) -> None:
    """Zero [offset, offset + count) with pwrite(buf, offset, flags) calls of at most 1 MiB."""
    while count > 0:
        n = min(count, len(ZEROES))
        pwrite(ZEROES[:n], offset, flags)
        offset += n
        count -= n

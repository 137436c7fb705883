"""Bytes from a layer as format parsers want them: one call for any range."""

from __future__ import annotations

from ..api.chain import Layer

READ_CHUNK = 4 << 20  # layers below may limit request sizes


def read_bytes(layer: Layer, offset: int, length: int) -> bytes:
    """`length` bytes at `offset` of `layer`, read in chunks of at most READ_CHUNK."""
    buf = bytearray(length)
    view = memoryview(buf)
    for start in range(0, length, READ_CHUNK):
        layer.pread(view[start:start + READ_CHUNK], offset + start, 0)
    return bytes(buf)

"""Inflate through zlib-ng (python-zlib-ng) where it is installed: the same bytes as zlib's
inflate, faster (on 64 KiB and 2 MiB raw-deflate chunks of a disk image, faster than ISA-L's too,
which was used here before); zlib's otherwise.  Shared by the decoders of whole
deflate chunks: qcow2's compressed clusters and VMDK's compressed grains (gzip and zip streams go
through deflate_index, which calls zlib-ng's inflate directly)."""

from __future__ import annotations

import zlib
from typing import Any

try:
    from zlib_ng import zlib_ng
    ZLIB_NG = True
    InflateError: tuple[type[Exception], ...] = (zlib.error, getattr(zlib_ng, "error"))  # its stub calls it an instance
except ImportError:  # not installed: zlib does the work
    ZLIB_NG = False
    InflateError = (zlib.error,)


def decompressobj(wbits: int = zlib.MAX_WBITS, zdict: bytes | None = None) -> Any:
    """A decompressor as zlib.decompressobj makes one (`wbits` -15 for raw deflate, 15 for the
    zlib format, 31 for gzip), zlib-ng's when available."""
    module: Any = zlib_ng if ZLIB_NG else zlib
    return module.decompressobj(wbits, zdict=zdict) if zdict else module.decompressobj(wbits)

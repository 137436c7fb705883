"""Linux calls the os module lacks, through libc: fallocate with its modes.

Without it (not glibc/musl on Linux) fallocate raises EOPNOTSUPP, which every caller treats as
"cannot": punch holes or zero ranges some other way.
"""

from __future__ import annotations

import errno
import os

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

try:
    import ctypes
    import ctypes.util

    _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]

    def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
        if _libc.fallocate(fd, mode, offset, length) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
except (OSError, AttributeError):  # pragma: no cover - every Linux libc has it
    def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "fallocate unavailable")


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Free [offset, offset + length) of a file: it reads as zeroes; the size stays."""
    fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)

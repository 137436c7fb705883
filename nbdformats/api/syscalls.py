"""Linux calls the os module lacks, through libc: fallocate with its modes, and fstatfs's f_type.

Without them (not glibc/musl on Linux) fallocate raises EOPNOTSUPP and filesystem_type() is
None, which every caller treats as "cannot": punch holes or zero ranges some other way.
"""

from __future__ import annotations

import errno
import os

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
# Filesystems whose files live in memory: reading them never waits for a disk.
IN_MEMORY_FILESYSTEMS = {0x01021994, 0x858458F6}  # TMPFS_MAGIC, RAMFS_MAGIC

try:
    import ctypes
    import ctypes.util

    _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]

    def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
        if _libc.fallocate(fd, mode, offset, length) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    def filesystem_type(fd: int) -> int | None:
        """fstatfs's f_type (the filesystem's magic number), or None."""
        buf = ctypes.create_string_buffer(256)  # larger than struct statfs on every Linux ABI
        if _libc.fstatfs(fd, buf) != 0:
            return None
        return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF  # f_type, a long, comes first
except (OSError, AttributeError):  # pragma: no cover - every Linux libc has both
    def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "fallocate unavailable")

    def filesystem_type(fd: int) -> int | None:
        return None


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Free [offset, offset + length) of a file: it reads as zeroes; the size stays."""
    fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)

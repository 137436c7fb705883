"""Linux calls the os module lacks, through libc: fallocate with its modes, and openat2 for
opening a file confined to a directory.

Without them (not glibc/musl on Linux) fallocate raises EOPNOTSUPP, which every caller treats as
"cannot": punch holes or zero ranges some other way; open_beneath falls back to resolving the
name itself.
"""

from __future__ import annotations

import errno
import os
import platform

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
# openat2(2), Linux 5.6: RESOLVE_BENEATH refuses any path (absolute, "..", a symlink) that
# leaves the directory; RESOLVE_NO_MAGICLINKS refuses /proc/PID/fd-style links.
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_BENEATH = 0x08
# Its number in the unified syscall table; called only where that is known to be the table.
SYS_OPENAT2 = 437 if platform.machine() in ("x86_64", "aarch64", "riscv64", "ppc64le", "s390x") else None

try:
    import ctypes
    import ctypes.util

    _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]

    def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
        if _libc.fallocate(fd, mode, offset, length) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    class _OpenHow(ctypes.Structure):
        _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]

    _libc.syscall.restype = ctypes.c_long

    def openat2(dir_fd: int, path: str, flags: int, resolve: int) -> int:
        """openat2(2); OSError(ENOSYS) where the kernel or this machine does not have it."""
        if SYS_OPENAT2 is None:
            raise OSError(errno.ENOSYS, "openat2 unavailable")
        how = _OpenHow(flags, 0, resolve)
        fd = _libc.syscall(ctypes.c_long(SYS_OPENAT2), ctypes.c_int(dir_fd), os.fsencode(path), ctypes.byref(how),
                           ctypes.c_size_t(ctypes.sizeof(how)))
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)
        return fd
except (OSError, AttributeError):  # pragma: no cover - every Linux libc has these
    def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "fallocate unavailable")

    def openat2(dir_fd: int, path: str, flags: int, resolve: int) -> int:
        raise OSError(errno.ENOSYS, "openat2 unavailable")


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Free [offset, offset + length) of a file: it reads as zeroes; the size stays."""
    fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)


def open_beneath(dir_fd: int, directory: str, name: str, flags: int) -> int:
    """Open `name` in `directory` (whose real path `dir_fd` holds open) so that nothing outside
    it can be reached: no symlink, ".." or absolute path may lead out (OSError EXDEV or ELOOP).

    openat2 with RESOLVE_BENEATH where the kernel has it.  Otherwise the name is resolved first
    and must lie inside the directory, then each component of the resolved path is opened with
    O_NOFOLLOW from `dir_fd`: a symlink swapped in between fails instead of being followed."""
    try:
        return openat2(dir_fd, name, flags | os.O_CLOEXEC, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)
    except OSError as e:
        if e.errno not in (errno.ENOSYS, errno.EPERM):  # EPERM: a seccomp filter refusing the call
            raise
    target = os.path.realpath(os.path.join(directory, name))
    if os.path.commonpath([directory, target]) != directory or target == directory:
        raise OSError(errno.EXDEV, "it leads outside the directory", name)
    parts = os.path.relpath(target, directory).split(os.sep)
    parent = dir_fd
    try:
        for part in parts[:-1]:
            child = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
            if parent != dir_fd:
                os.close(parent)
            parent = child
        return os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
    finally:
        if parent != dir_fd:
            os.close(parent)

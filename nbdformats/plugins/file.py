"""file plugin: serve a regular file or block device, or every file of a directory as an export."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct

from ..api.chain import (EXTENT_DATA, EXTENT_HOLE, EXTENT_ZERO, FLAG_FAST_ZERO, FLAG_FUA, FLAG_MAY_TRIM, NATIVE,
                         Export, Extents, Holes, Plugin, PluginHandle, pread_sparse_by_extents)
from ..api.errors import ConfigError, NBDError
from ..api.params import Enum, Param, Path
from ..api.syscalls import FALLOC_FL_KEEP_SIZE, FALLOC_FL_ZERO_RANGE, fallocate, open_beneath, punch_hole
from ..api.zeroes import write_zeroes

BLKGETSIZE64 = 0x80081272
BLKDISCARD = 0x1277
BLKZEROOUT = 0x127F


class FilePlugin(Plugin):
    """Serve a file or block device (or each file of a directory as an export)."""

    name = "file"
    file = Param(Path("any"), magic=True, help="The file or block device to serve")
    dir = Param(Path("dir"), help="Serve every regular file in this directory as an export")
    directory = Param(Path("dir"), help="The same as dir= (nbdkit accepts both names)")
    cache = Param(Enum("default", "none"), default="default",
                  help="none: drop written pages from the page cache (fadvise DONTNEED) after each write")
    fadvise = Param(Enum("normal", "random", "sequential"), default="normal",
                    help="Access-pattern hint passed to posix_fadvise")

    def config_complete(self) -> None:
        if self.directory is not None:
            if self.dir is not None:
                raise ConfigError("file: dir= and directory= are the same parameter: give one")
            self.dir = self.directory
        if (self.file is None) == (self.dir is None):
            raise ConfigError("file: give exactly one of file=PATH or dir=DIRECTORY")
        if self.file is not None and os.path.isdir(self.file):
            self.dir, self.file = self.file, None

    def list_exports(self, readonly: bool, is_tls: bool) -> list[Export]:
        if self.dir is None:
            return [Export("")]
        # In the directory's own order, as nbdkit lists them; not the links that lead outside.
        directory = os.path.realpath(self.dir)
        return [Export(name) for name in os.listdir(directory)
                if os.path.isfile(path := os.path.join(directory, name))
                and os.path.commonpath([directory, os.path.realpath(path)]) == directory]

    def open_export(self, export_name: str, flags: int) -> int:
        """The file of an export opened with `flags`: file=, or a regular file of dir= that no
        symbolic link, ".." or absolute path leads out of the directory to (see docs/security.md)."""
        if self.dir is None:
            return os.open(self.file, flags | os.O_CLOEXEC)
        if not export_name:  # as nbdkit: a directory has no default export
            raise NBDError(errno.ENOENT, f"no default export: name a file of {self.dir} (nbdinfo --list shows them)")
        if export_name in (".", "..") or any(c in export_name for c in "/\0\n"):
            raise NBDError(errno.ENOENT, f"no export {export_name!r}")
        directory = os.path.realpath(self.dir)
        dir_fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            # O_NONBLOCK: a FIFO must not hang the open; it is refused below.
            fd = open_beneath(dir_fd, directory, export_name, flags | os.O_NONBLOCK)
        except OSError as e:
            if e.errno in (errno.EXDEV, errno.ELOOP):
                raise NBDError(errno.EPERM, f"export {export_name!r}: a symbolic link leading outside {self.dir}: "
                                            "refused") from None
            if e.errno == errno.ENOENT:
                raise NBDError(errno.ENOENT, f"no export {export_name!r} in {self.dir}") from None
            raise
        finally:
            os.close(dir_fd)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise NBDError(errno.ENOENT, f"no export {export_name!r} in {self.dir} (not a regular file)")
        os.set_blocking(fd, True)
        return fd

    class Handle(PluginHandle):
        def __init__(self, plugin: "FilePlugin", readonly: bool, export_name: str) -> None:
            self.plugin = plugin
            try:
                try:
                    self.fd = plugin.open_export(export_name, os.O_RDONLY if readonly else os.O_RDWR)
                except OSError as e:
                    if readonly or e.errno not in (errno.EACCES, errno.EROFS, errno.EPERM):
                        raise
                    self.fd = plugin.open_export(export_name, os.O_RDONLY)
                    readonly = True
            except OSError as e:
                raise NBDError(e.errno or errno.EIO, f"{export_name or plugin.file}: {e.strerror}") from None
            self.writable = not readonly
            st = os.fstat(self.fd)
            self.is_block = stat.S_ISBLK(st.st_mode)
            advice = {"normal": os.POSIX_FADV_NORMAL, "random": os.POSIX_FADV_RANDOM,
                      "sequential": os.POSIX_FADV_SEQUENTIAL}[plugin.fadvise]
            os.posix_fadvise(self.fd, 0, 0, advice)
            self.drop_cache = plugin.cache == "none"
            self.can_punch = self.can_zero_range = not self.is_block
            self.seek_data_works = not self.is_block
            self.data_region = (0, 0)  # [start, end) of data that extents() found last

        def get_size(self) -> int:
            if self.is_block:
                buf = fcntl.ioctl(self.fd, BLKGETSIZE64, b"\0" * 8)
                return struct.unpack("Q", buf)[0]
            return os.fstat(self.fd).st_size

        def can_write(self) -> bool:
            return self.writable

        def can_multi_conn(self) -> bool:
            return True  # all connections share the kernel's page cache; fdatasync covers them all

        def can_fua(self) -> int:
            return NATIVE

        def can_cache(self) -> int:
            return NATIVE

        def can_fast_zero(self) -> bool:
            return True  # zero() fails with ENOTSUP before writing when it cannot be fast

        def is_rotational(self) -> bool:
            if not self.is_block:
                return False
            try:
                dev = os.fstat(self.fd).st_rdev
                with open(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/queue/rotational") as f:
                    return f.read().strip() == "1"
            except OSError:
                return False

        def pread(self, buf: memoryview, offset: int, flags: int) -> None:
            fd, done, count = self.fd, 0, len(buf)
            while done < count:
                n = os.preadv(fd, [buf[done:]], offset + done)
                if n == 0:
                    raise NBDError(errno.EIO, "read past the end of the file")
                done += n

        def pread_sparse(self, buf: memoryview, offset: int, flags: int) -> Holes:
            """Read the data; holes (lseek SEEK_HOLE) are returned, not read."""
            if not self.seek_data_works:
                self.pread(buf, offset, flags)
                return ()
            return pread_sparse_by_extents(self, buf, offset, flags)

        def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
            fd, done, count = self.fd, 0, len(buf)
            try:
                while done < count:
                    done += os.pwritev(fd, [buf[done:]], offset + done)
            except OSError as e:
                raise NBDError(e.errno, f"write failed: {e.strerror}") from None
            if flags & FLAG_FUA:
                self.flush(0)
            if self.drop_cache:
                os.posix_fadvise(fd, offset, count, os.POSIX_FADV_DONTNEED)

        def flush(self, flags: int) -> None:
            try:
                os.fdatasync(self.fd)
            except OSError as e:
                raise NBDError(e.errno, f"flush failed: {e.strerror}") from None

        def trim(self, count: int, offset: int, flags: int) -> None:
            if self.can_punch:
                try:
                    punch_hole(self.fd, offset, count)
                except OSError as e:
                    if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                        raise NBDError(e.errno, f"trim failed: {e.strerror}") from None
                    self.can_punch = False  # trim is advisory: doing nothing is correct
            if flags & FLAG_FUA:
                self.flush(0)

        def zero(self, count: int, offset: int, flags: int) -> None:
            done = False
            if flags & FLAG_MAY_TRIM and self.can_punch:
                try:
                    punch_hole(self.fd, offset, count)
                    done = True
                except OSError:
                    self.can_punch = False
            if not done and self.can_zero_range:
                try:
                    fallocate(self.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, count)
                    done = True
                except OSError:
                    self.can_zero_range = False
            if not done and self.is_block:
                try:
                    fcntl.ioctl(self.fd, BLKZEROOUT, struct.pack("QQ", offset, count))
                    done = True
                except OSError:
                    pass
            if not done:
                if flags & FLAG_FAST_ZERO:  # writing zeroes would not be fast
                    raise NBDError(errno.ENOTSUP, "fast zero not possible here")
                write_zeroes(self.pwrite, count, offset)
            if flags & FLAG_FUA:
                self.flush(0)

        def extents(self, count: int, offset: int, flags: int, extents: Extents) -> None:
            if not self.seek_data_works:
                extents.add(offset, count, EXTENT_DATA)
                return
            end = offset + count
            position = offset
            try:
                while position < end:
                    region_start, region_end = self.data_region
                    if region_start <= position < region_end:
                        # Inside the data found last time: tmpfs's SEEK_HOLE walks page by page,
                        # so a sequential reader would rescan the region for every request.
                        # Data stays safe to report even if it was trimmed meanwhile.
                        extents.add(position, min(region_end, end) - position, EXTENT_DATA)
                        position = region_end
                        continue
                    try:
                        data = os.lseek(self.fd, position, os.SEEK_DATA)
                    except OSError as e:
                        if e.errno != errno.ENXIO:
                            raise
                        data = end  # only a hole up to the end of the file
                    if data > position:
                        extents.add(position, min(data, end) - position, EXTENT_HOLE | EXTENT_ZERO)
                        position = data
                        continue
                    hole = os.lseek(self.fd, position, os.SEEK_HOLE)
                    self.data_region = (position, hole)
                    extents.add(position, min(hole, end) - position, EXTENT_DATA)
                    position = hole
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                    raise NBDError(e.errno, f"extents failed: {e.strerror}") from None
                self.seek_data_works = False
                extents.add(position, end - position, EXTENT_DATA)

        def can_resize(self) -> bool:
            return self.writable and not self.is_block

        def resize(self, size: int) -> None:
            try:
                os.ftruncate(self.fd, size)
            except OSError as e:
                raise NBDError(e.errno, f"resize failed: {e.strerror}") from None

        def cache(self, count: int, offset: int, flags: int) -> None:
            os.posix_fadvise(self.fd, offset, count, os.POSIX_FADV_WILLNEED)

        def close(self) -> None:
            os.close(self.fd)


PLUGIN = FilePlugin

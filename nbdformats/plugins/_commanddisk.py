"""What the tmpdisk and ondemand plugins share: a disk file made by a shell command (mkfs by
default) with the plugin's parameters as shell variables, then served from its descriptor."""

from __future__ import annotations

import errno
import logging
import os
import re
import stat

from ..api.chain import FLAG_FUA, NATIVE, PluginHandle
from ..api.errors import ConfigError, NBDError
from ..api.syscalls import punch_hole
from . import _subprocess

log = logging.getLogger(__name__)

COMMAND_TIMEOUT = 600  # seconds: mkfs of a large disk is slow, but must end
SHELL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# nbdkit's default command: a sparse file of $size bytes with a $type (ext4) filesystem labelled $label.
DEFAULT_COMMAND = r"""
type="${type:-ext4}"
labelopt='-L'
case "$type" in
    ext?) extra='-F' ;;
    *fat|msdos) extra='-I' ;;
    ntfs) extra='-Q -F'; labelopt='-n' ;;
    xfs) extra='-f' ;;
esac
truncate -s $size "$disk"
if [ "x$label" = "x" ]; then
    mkfs -t "$type" $extra "$disk"
else
    mkfs -t "$type" $extra $labelopt "$label" "$disk"
fi
"""


def check_variable(key: str) -> None:
    """A parameter that becomes a shell variable."""
    if key == "disk":
        raise ConfigError("'disk' parameter cannot be set on the command line")
    if not SHELL_NAME.fullmatch(key):
        raise ConfigError(f"{key}=: not a shell variable name, so it cannot be passed to the command")


def make_disk(command: str, disk: str, size: int, variables: list[tuple[str, str]]) -> None:
    """Run the command that creates `disk`; its failure is an NBDError for the client's open."""
    script = "\n".join(["exec </dev/null >/dev/null",  # the command's output is not ours (and -s uses stdout)
                        f"disk={_subprocess.shell_quote(disk)}", f"size={size}",
                        *(f"{key}={_subprocess.shell_quote(value)}" for key, value in variables), "", command])
    try:
        result = _subprocess.run(["/bin/sh", "-c", script], stdout_limit=0, timeout=COMMAND_TIMEOUT)
    except _subprocess.ScriptFailed as e:
        raise NBDError(errno.EIO, f"command: {e}") from None
    if result.status != 0:
        raise NBDError(errno.EIO, f"command {result.describe()}")
    if result.stderr:
        log.debug("command: %s", result.stderr_text())


def disk_size(fd: int) -> int:
    """The size of a regular file or block device (whose st_size is 0)."""
    info = os.fstat(fd)
    return os.lseek(fd, 0, os.SEEK_END) if stat.S_ISBLK(info.st_mode) else info.st_size


class FileDiskHandle(PluginHandle):
    """A disk served from an open descriptor; subclasses open it and say whether flushes are real."""

    fd: int
    size: int
    durable_flush = True  # False: flush and FUA do nothing (the disk does not outlive the connection)
    can_punch_holes = True

    def get_size(self) -> int:
        return self.size

    def can_fua(self) -> int:
        return NATIVE

    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        while buf:
            n = os.preadv(self.fd, [buf], offset)
            if n == 0:
                raise NBDError(errno.EIO, "pread: unexpected end of file")
            buf, offset = buf[n:], offset + n

    def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        while buf:
            n = os.pwritev(self.fd, [buf], offset)
            buf, offset = buf[n:], offset + n
        if flags & FLAG_FUA:
            self.flush(0)

    def flush(self, flags: int) -> None:
        if self.durable_flush:
            os.fdatasync(self.fd)

    def trim(self, count: int, offset: int, flags: int) -> None:
        if self.can_punch_holes:
            try:
                punch_hole(self.fd, offset, count)
            except OSError as e:
                if e.errno in (errno.EPERM, errno.EIO):
                    raise
                # Trimming is advisory: a filesystem that cannot punch holes is not asked again.
                self.can_punch_holes = e.errno not in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENODEV)
                log.debug("ignoring failed fallocate during trim: %s", e.strerror)
        if flags & FLAG_FUA:
            self.flush(0)

    def close(self) -> None:
        os.close(self.fd)

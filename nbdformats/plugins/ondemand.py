"""ondemand plugin: persistent filesystems created on demand, one per export name
(nbdkit-ondemand-plugin compatible).

A client asking for export NAME gets the file dir/NAME, made by the command (mkfs by default) the
first time.  The export "" is the file "default".  A filesystem in use is locked (an open file
description lock), so a second client is refused, or waits with wait=true.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from ..api.chain import Export, Plugin
from ..api.errors import NBDError
from ..api.params import Bool, Param, Path, Size, String
from ._commanddisk import DEFAULT_COMMAND, FileDiskHandle, check_variable, disk_size, make_disk

NAME_MAX = 255


def lock(fd: int, readonly: bool, wait: bool) -> bool:
    """An OFD lock on the whole file (it excludes other opens in this process too); False if taken."""
    # struct flock: l_type, l_whence, l_start, l_len, l_pid (0 for OFD locks), padded as C does.
    request = struct.pack("@hhqqi4x", fcntl.F_RDLCK if readonly else fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
    while True:
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLKW if wait else fcntl.F_OFD_SETLK, request)
            return True
        except InterruptedError:
            continue
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EAGAIN):
                return False
            raise


class OndemandPlugin(Plugin):
    """Persistent filesystems made on demand: each export name is a file in dir=, created by mkfs."""

    name = "ondemand"
    accepts_any_key = True  # other parameters are shell variables for the command
    dir = Param(Path("dir"), required=True, help="Directory where the filesystems are kept")
    size = Param(Size(), required=True, magic=True,
                 help="Size of new filesystems; with command= only a suggestion ($size)")
    wait = Param(Bool(), default=False,
                 help="true: a client asking for a filesystem in use waits; false: it is refused")
    type = Param(String(), help="Filesystem type for mkfs -t (default ext4)")
    label = Param(String(), help="Filesystem label (default: none)")
    command = Param(String(), default=DEFAULT_COMMAND,
                    help="Shell commands that create the disk file \"$disk\" instead of mkfs ($size and the other "
                         "parameters are shell variables)")

    def __init__(self) -> None:
        self.variables: list[tuple[str, str]] = []

    def config(self, key: str, value: str) -> None:
        check_variable(key)
        self.variables.append((key, value))

    def config_complete(self) -> None:
        for key in ("type", "label"):
            if getattr(self, key) is not None:
                self.variables.append((key, getattr(self, key)))

    def list_exports(self, readonly: bool, is_tls: bool) -> list[Export]:
        # Files with "." (dot-files too, where commands may keep state) or ":" are not exports.
        names = [name for name in os.listdir(self.dir)
                 if "." not in name and ":" not in name and name != "default"]
        return [Export(""), *(Export(name) for name in sorted(names))]  # "" (the file "default") first

    def default_export(self, readonly: bool, is_tls: bool) -> str:
        return "default"

    class Handle(FileDiskHandle):
        def __init__(self, plugin: "OndemandPlugin", readonly: bool, export_name: str) -> None:
            if len(os.fsencode(export_name)) > NAME_MAX or any(c in export_name for c in "./:") or not export_name:
                raise NBDError(errno.EINVAL, f"ondemand: invalid export name {export_name!r} rejected")
            disk = os.path.join(plugin.dir, export_name)
            flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
            try:
                self.fd = os.open(disk, flags)
            except FileNotFoundError:
                make_disk(plugin.command, disk, plugin.size, plugin.variables)
                self.fd = os.open(disk, flags)
            try:
                if not lock(self.fd, readonly, plugin.wait):
                    raise NBDError(errno.EINVAL, f"ondemand: {export_name}: filesystem is locked by another client")
                self.size = disk_size(self.fd)
            except BaseException:
                os.close(self.fd)
                raise


PLUGIN = OndemandPlugin

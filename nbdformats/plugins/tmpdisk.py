"""tmpdisk plugin: a fresh temporary filesystem for each client (nbdkit-tmpdisk-plugin compatible).

Each connection runs the command (mkfs by default) on a new file in $TMPDIR (default /var/tmp),
serves it, and loses it when the client goes: the file is unlinked as soon as it is open.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from ..api.chain import Plugin
from ..api.params import Param, Size, String
from ._commanddisk import DEFAULT_COMMAND, FileDiskHandle, check_variable, disk_size, make_disk


class TmpdiskPlugin(Plugin):
    """A fresh temporary filesystem (or any disk a command makes) for each client, deleted after."""

    name = "tmpdisk"
    accepts_any_key = True  # other parameters are shell variables for the command
    size = Param(Size(), required=True, magic=True,
                 help="Size of each disk; with command= only a suggestion ($size), the disk it makes is served")
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
        # As nbdkit: where disks go is decided at start-up (the server may change directory later).
        self.directory = os.path.abspath(os.environ.get("TMPDIR") or "/var/tmp")

    class Handle(FileDiskHandle):
        durable_flush = False  # the disk dies with the connection: flush and FUA need not reach the platter

        def __init__(self, plugin: "TmpdiskPlugin", readonly: bool, export_name: str) -> None:
            # A directory of our own (mode 0700), so no other user can interfere with the file.
            directory = tempfile.mkdtemp(prefix="tmpdisk", dir=plugin.directory)
            disk = os.path.join(directory, "disk")
            try:
                make_disk(plugin.command, disk, plugin.size, plugin.variables)
                self.fd = os.open(disk, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
            finally:
                shutil.rmtree(directory, ignore_errors=True)  # the open descriptor keeps the disk
            try:
                self.size = disk_size(self.fd)
            except BaseException:
                os.close(self.fd)
                raise


PLUGIN = TmpdiskPlugin

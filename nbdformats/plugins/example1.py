"""example1 plugin: the smallest useful plugin, and nbdkit-example1-plugin's disk.

A read-only 100 MiB disk in memory that looks like a disk image with one empty Linux partition
(an MBR in sector 0, zeroes after it), as nbdkit's example1 serves.  nbdkit's tests use it to
exercise the server itself (start-up, pid files, sockets, TLS, --run), and it is the first
example of the plugin API: declare a name, answer get_size and pread.  Its boot code is not
nbdkit's: our MBR holds the partition record alone.
"""

from __future__ import annotations

from ..api.chain import Plugin, PluginHandle, ThreadModel
from ..api.zeroes import fill_zero
from ..formats.mbr import SECTOR, mbr_sector, pack_record

SIZE = 100 * 1024 * 1024
LINUX = 0x83
FIRST_LBA = 128
SECTOR_0 = mbr_sector([pack_record(LINUX, FIRST_LBA, SIZE // SECTOR - FIRST_LBA)])


class Example1Plugin(Plugin):
    """A minimal plugin: a static 100 MiB disk with one empty partition, read-only."""

    name = "example1"
    thread_model = ThreadModel.SERIALIZE_ALL_REQUESTS  # as nbdkit's example1 declares

    class Handle(PluginHandle):
        def __init__(self, plugin: "Example1Plugin", readonly: bool, export_name: str) -> None:
            pass  # every connection sees the same disk: no per-connection state

        def get_size(self) -> int:
            return SIZE

        def pread(self, buf: memoryview, offset: int, flags: int) -> None:
            fill_zero(buf)
            if offset < SECTOR:
                piece = SECTOR_0[offset:offset + len(buf)]
                buf[:len(piece)] = piece


PLUGIN = Example1Plugin

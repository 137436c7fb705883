"""info plugin: serves information about the client and server as the disk (nbdkit-info-plugin compatible).

mode=exportname (default) serves the export name the client asked for; base64exportname decodes it
from base64 first; address serves the client's address ("[::1]:58912", "127.0.0.1:40000", or
"unix"); time, uptime and conntime serve 12 bytes, seconds (64-bit) and microseconds (32-bit)
big-endian, of the wallclock time, the server's uptime or the connection's age at each read.
"""

from __future__ import annotations

import base64
import binascii
import errno
import socket
import struct
import time

from ..api.chain import NATIVE, Plugin, PluginHandle, current_client
from ..api.errors import NBDError
from ..api.params import Param, ParamType

MODES = {"exportname": "exportname", "export-name": "exportname", "base64exportname": "base64exportname",
         "base64-export-name": "base64exportname", "address": "address", "time": "time", "uptime": "uptime",
         "conntime": "conntime"}
TIME_MODES = ("time", "uptime", "conntime")


class Mode(ParamType):
    """nbdkit's spellings, in any case."""

    metavar = "exportname|base64exportname|address|time|uptime|conntime"

    def parse(self, text: str) -> str:
        try:
            return MODES[text.lower()]
        except KeyError:
            raise ValueError(f"unknown mode {text!r} (use {self.metavar})") from None


def address_of(client: socket.socket | None) -> bytes:
    """The client's address as nbdkit writes it; Unix sockets give "unix" (no host paths)."""
    if client is None:  # not a network connection (in-process use)
        return b""
    if client.family == socket.AF_UNIX:
        return b"unix"
    host, port = client.getpeername()[:2]
    return (f"[{host}]:{port}" if client.family == socket.AF_INET6 else f"{host}:{port}").encode()


class InfoPlugin(Plugin):
    """Serves the export name, the client's address, or the time, as a read-only disk."""

    name = "info"
    mode = Param(Mode(), default="exportname", magic=True, help="What to serve (default exportname)")

    def get_ready(self) -> None:
        self.started = time.time()

    def dump_plugin(self) -> None:
        print("info_address=yes")
        print("info_base64=yes")

    class Handle(PluginHandle):
        def __init__(self, plugin: "InfoPlugin", readonly: bool, export_name: str) -> None:
            self.mode = plugin.mode
            self.opened = time.time()
            self.started = plugin.started
            if self.mode == "exportname":
                self.data = export_name.encode()
            elif self.mode == "base64exportname":
                try:
                    self.data = base64.b64decode(export_name, validate=True)
                except (binascii.Error, ValueError) as e:
                    raise NBDError(errno.EINVAL, f"info: export name is not base64: {e}") from None
            elif self.mode == "address":
                self.data = address_of(current_client())
            else:
                self.data = bytes(12)  # the size; reads fill in the time

        def get_size(self) -> int:
            return len(self.data)

        def can_multi_conn(self) -> bool:
            # The same export name gives the same disk; addresses and times differ between connections.
            return self.mode in ("exportname", "base64exportname")

        def can_cache(self) -> int:
            return NATIVE

        def pread(self, buf: memoryview, offset: int, flags: int) -> None:
            data = self.data
            if self.mode in TIME_MODES:  # a fresh time at each read
                since = {"time": 0.0, "uptime": self.started, "conntime": self.opened}[self.mode]
                seconds, micros = divmod(round((time.time() - since) * 1_000_000), 1_000_000)
                data = struct.pack(">qI", seconds, micros)
            buf[:] = data[offset:offset + len(buf)]


PLUGIN = InfoPlugin

"""zero plugin: a read-only disk of zero bytes (nbdkit-zero-plugin compatible)."""

from __future__ import annotations

from ..api.chain import NATIVE, Plugin, PluginHandle


class ZeroPlugin(Plugin):
    """A disk of size zero, for testing corner cases of clients."""

    name = "zero"

    class Handle(PluginHandle):
        def __init__(self, plugin: "ZeroPlugin", readonly: bool, export_name: str) -> None:
            pass

        def get_size(self) -> int:
            return 0

        def can_multi_conn(self) -> bool:
            return True

        def can_cache(self) -> int:
            return NATIVE

        def pread(self, buf: memoryview, offset: int, flags: int) -> None:
            pass  # a disk of zero bytes has nothing to read


PLUGIN = ZeroPlugin

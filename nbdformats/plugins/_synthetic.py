"""What nbdkit's test plugins (null, full, pattern, random, sparse-random) share: a disk of
`size=` bytes whose content is computed, the same for every connection."""

from __future__ import annotations

from ..api.chain import NATIVE, Plugin, PluginHandle
from ..api.params import Param, Size


class SyntheticPlugin(Plugin):
    """Base class: a computed disk of `size=` bytes (the magic parameter)."""

    size = Param(Size(), required=True, magic=True, help="Size of the disk, e.g. 1G (nbdkit's size suffixes)")

    class Handle(PluginHandle):
        def __init__(self, plugin: "SyntheticPlugin", readonly: bool, export_name: str) -> None:
            self.plugin = plugin

        def get_size(self) -> int:
            return self.plugin.size

        def can_multi_conn(self) -> bool:
            return True  # every connection sees the same content

        def can_cache(self) -> int:
            return NATIVE  # nothing to prefetch: caching is a no-op

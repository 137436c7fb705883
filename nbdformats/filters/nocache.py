"""nocache filter: disable, emulate or ignore client cache (prefetch) requests
(nbdkit-nocache-filter compatible)."""

from __future__ import annotations

from ..api.chain import EMULATE, NATIVE, NONE, Filter, FilterHandle
from ..api.params import Enum, Param


class NocacheFilter(Filter):
    """Change the handling of NBD_CMD_CACHE: cachemode=none|emulate|nop."""

    name = "nocache"
    resize_passthrough = True
    cachemode = Param(Enum("none", "emulate", "nop"), default="none",
                      help="none: do not advertise cache; emulate: cache by reading (whatever the plugin "
                           "does); nop: accept cache requests and ignore them")

    class Handle(FilterHandle):
        filter: "NocacheFilter"

        def can_cache(self) -> int:
            # With EMULATE the chain turns each cache request into reads of the layer below.
            return {"none": NONE, "emulate": EMULATE, "nop": NATIVE}[self.filter.cachemode]

        def cache(self, count: int, offset: int, flags: int) -> None:
            pass  # only reached in nop mode


FILTER = NocacheFilter

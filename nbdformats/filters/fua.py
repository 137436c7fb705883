"""fua filter: change how Forced Unit Access and flush are handled (nbdkit-fua-filter compatible).

Unlike nbdkit 1.32, `fuamode=none` (the documented default) is accepted.
"""

from __future__ import annotations

import errno

from ..api.chain import EMULATE, FLAG_FUA, NATIVE, NONE, Filter, FilterHandle, Layer
from ..api.errors import ConfigError, NBDError
from ..api.params import Enum, Param

# fuamode -> what the filter advertises to the layer above (None: whatever the plugin says).
_ADVERTISED = {"none": NONE, "emulate": EMULATE, "native": NATIVE, "force": NATIVE,
               "discard": NATIVE, "pass": None}


class FuaFilter(Filter):
    """Disable, emulate, force or discard FUA and flush, as nbdkit's fua filter."""

    name = "fua"
    resize_passthrough = True  # its size is the size of the layer below
    fuamode = Param(Enum("none", "emulate", "native", "force", "pass", "discard"), default="none",
                    help="none: do not advertise FUA; emulate: FUA by flush; native: advertise "
                         "native FUA; force: FUA on every write, flush is a no-op; pass: no change; "
                         "discard: drop FUA and flush (unsafe)")

    def get_ready(self) -> None:
        # Refuse to start, rather than fail every connection, when the plugin is known to lack
        # what the mode needs.  A plugin that cannot be opened here (no default export, say)
        # is checked again when each connection opens it.
        if self.fuamode not in ("emulate", "native", "force"):
            return
        with self.below_if_available(readonly=False) as below:
            problem = self.unsupported(below) if below is not None else None
        if problem:
            raise ConfigError(f"fua: {problem}")

    def unsupported(self, below: Layer) -> str | None:
        """Why this mode cannot work over `below` (opened read-write), or None."""
        if not below.can_write():
            return None  # read-only: FUA and flush of writes do not matter
        if self.fuamode == "emulate" and not below.can_flush():
            return "fuamode=emulate requires the plugin to support flush"
        if self.fuamode in ("native", "force") and below.can_fua() == NONE:
            return f"fuamode={self.fuamode} requires the plugin to support FUA (or flush)"
        return None

    class Handle(FilterHandle):
        filter: "FuaFilter"

        def __init__(self, filter: "FuaFilter", next: Layer, readonly: bool, export_name: str) -> None:
            super().__init__(filter, next, readonly, export_name)
            problem = None if readonly else filter.unsupported(next)
            if problem:
                raise NBDError(errno.EOPNOTSUPP, problem)
            mode = filter.fuamode
            # FUA changes; with emulate the chain turns FUA into write + flush(), our flush.
            if mode == "force":
                self._fua_flags = lambda flags: flags | FLAG_FUA
            elif mode == "discard":
                self._fua_flags = lambda flags: flags & ~FLAG_FUA
            else:
                self._fua_flags = lambda flags: flags

        def can_flush(self) -> bool:
            if self.filter.fuamode in ("force", "discard"):
                return True  # our flush is a no-op, whatever the plugin can do
            return self.next.can_flush()

        def can_fua(self) -> int:
            advertised = _ADVERTISED[self.filter.fuamode]
            return self.next.can_fua() if advertised is None else advertised

        def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
            self.next.pwrite(buf, offset, self._fua_flags(flags))

        def zero(self, count: int, offset: int, flags: int) -> None:
            self.next.zero(count, offset, self._fua_flags(flags))

        def trim(self, count: int, offset: int, flags: int) -> None:
            self.next.trim(count, offset, self._fua_flags(flags))

        def flush(self, flags: int) -> None:
            # force: every write already had FUA; discard: flushes are dropped on purpose.
            if self.filter.fuamode not in ("force", "discard"):
                self.next.flush(flags)


FILTER = FuaFilter

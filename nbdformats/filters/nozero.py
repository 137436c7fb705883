"""nozero filter: turn off or emulate WRITE_ZEROES (nbdkit-nozero-filter compatible).

Mainly for measuring how much sparse-aware zeroing buys a client, and for testing the
fallbacks of clients and servers.
"""

from __future__ import annotations

import errno

from ..api.chain import (FLAG_FAST_ZERO, FLAG_FUA, FLAG_MAY_TRIM, NATIVE, NONE,
                         Filter, FilterHandle, Layer)
from ..api.errors import NBDError
from ..api.params import Enum, Param
from ..api.zeroes import ZEROES


class NozeroFilter(Filter):
    """Disable or emulate WRITE_ZEROES and fast zero, as nbdkit's nozero filter."""

    name = "nozero"
    resize_passthrough = True  # its size is the size of the layer below
    zeromode = Param(Enum("none", "emulate", "notrim", "plugin"), default="none",
                     help="none: do not advertise zeroing; emulate: zero by writing zeroes; "
                          "notrim: pass zero requests without the may-trim flag; plugin: pass them unchanged")
    fastzeromode = Param(Enum("default", "none", "slow", "ignore"), default="default",
                         help="default: slow with emulate, else the plugin's; none: do not advertise "
                              "fast zero; slow: fail fast zero requests with ENOTSUP; "
                              "ignore: treat fast zero as plain zero (unsafe)")

    class Handle(FilterHandle):
        filter: "NozeroFilter"

        def __init__(self, filter: "NozeroFilter", next: Layer, readonly: bool, export_name: str) -> None:
            super().__init__(filter, next, readonly, export_name)
            if not readonly and filter.zeromode in ("notrim", "plugin") and next.can_zero() == NONE:
                raise NBDError(errno.EOPNOTSUPP,
                               f"zeromode={filter.zeromode} requires the plugin to support zeroing")

        def can_zero(self) -> int:
            # Emulation is ours (not the chain's), so that fastzeromode=ignore and FUA work as
            # nbdkit documents: to the layer above we zero natively.
            if self.filter.zeromode == "none":
                return NONE
            return NATIVE

        def can_fast_zero(self) -> bool:
            mode, fast = self.filter.zeromode, self.filter.fastzeromode
            if mode == "none":
                return False
            if mode != "emulate" and fast == "default":
                return self.next.can_fast_zero()
            return fast != "none"

        def zero(self, count: int, offset: int, flags: int) -> None:
            mode, fast = self.filter.zeromode, self.filter.fastzeromode
            if flags & FLAG_FAST_ZERO:
                if fast in ("slow", "none") or (fast == "default" and mode == "emulate"):
                    raise NBDError(errno.ENOTSUP, "fast zero refused by the nozero filter")
                if fast == "ignore":
                    flags &= ~FLAG_FAST_ZERO
            if mode == "notrim":
                flags &= ~FLAG_MAY_TRIM
            if mode != "emulate":
                self.next.zero(count, offset, flags)
                return
            self._write_zeroes(count, offset, flags & FLAG_FUA)

        def _write_zeroes(self, count: int, offset: int, fua: int) -> None:
            # With native FUA below every chunk carries it; with emulated FUA (a flush) only
            # the last chunk does, as the flush covers the earlier ones too.
            native_fua = fua and self.next.can_fua() == NATIVE
            while count > 0:
                n = min(count, len(ZEROES))
                last = n == count
                self.next.pwrite(ZEROES[:n], offset, FLAG_FUA if native_fua or (fua and last) else 0)
                offset += n
                count -= n


FILTER = NozeroFilter

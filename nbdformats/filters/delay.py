"""delay filter: delay requests, to simulate a slow or remote disk (nbdkit-delay-filter compatible).

Delays are `SECS` (fractions allowed) or `NNms`.  rdelay= is delay-read=; wdelay= sets the
delay of writes, zeroes and trims, which delay-write=, delay-zero=, delay-trim= override.
Requests sleep in their connection's thread (api.sleep: nbdkit_nanosleep's rules), so a delayed
request does not hold up other connections, and a client that hangs up or a server that stops
is not kept waiting for the whole delay.
"""

from __future__ import annotations

import errno

from ..api.chain import FLAG_FAST_ZERO, Extents, Filter, FilterHandle, Holes, Layer, sleep
from ..api.errors import NBDError
from ..api.params import Bool, Param, ParamType


class Delay(ParamType):
    """`SECS` or `NNms` (returned in seconds)."""

    metavar = "SECS|NNms"

    def parse(self, text: str) -> float:
        body = text.strip()
        scale = 1.0
        if body.endswith("ms"):
            body, scale = body[:-2], 0.001
        try:
            seconds = float(body) * scale
        except ValueError:
            raise ValueError(f"{text!r} is not a delay (examples: 1, 0.5, 100ms)") from None
        if not 0 <= seconds < float("inf"):
            raise ValueError(f"{text!r} is not a delay")
        return seconds


def _delay(help: str) -> Param:
    return Param(Delay(), help=help)


class DelayFilter(Filter):
    """Delay reads, writes, zeroes, trims, extents, cache, opens and closes."""

    name = "delay"
    resize_passthrough = True
    rdelay = _delay("Delay of reads (same as delay-read=)")
    delay_read = _delay("Delay of reads")
    wdelay = _delay("Delay of writes, zeroes and trims")
    delay_write = _delay("Delay of writes (default: wdelay=)")
    delay_zero = _delay("Delay of zeroes (default: wdelay=)")
    delay_trim = _delay("Delay of trims (default: wdelay=)")
    delay_extents = _delay("Delay of block status (extents) requests")
    delay_cache = _delay("Delay of cache (prefetch) requests")
    delay_open = _delay("Delay of each client connection (open)")
    delay_close = _delay("Delay of each client disconnection (close)")
    delay_fast_zero = Param(Bool(), default=True,
                            help="false: fail fast zero requests at once with ENOTSUP instead of delaying them")

    def config_complete(self) -> None:
        def pick(*values: float | None) -> float:
            return next((v for v in values if v is not None), 0.0)

        self.delays = {"pread": pick(self.delay_read, self.rdelay),
                       "pwrite": pick(self.delay_write, self.wdelay),
                       "zero": pick(self.delay_zero, self.wdelay),
                       "trim": pick(self.delay_trim, self.wdelay),
                       "extents": pick(self.delay_extents),
                       "cache": pick(self.delay_cache),
                       "open": pick(self.delay_open),
                       "close": pick(self.delay_close)}

    def wait(self, op: str) -> None:
        seconds = self.delays[op]
        if seconds:
            sleep(seconds)  # wakes early (ESHUTDOWN) if the client hangs up or the server stops

    class Handle(FilterHandle):
        filter: "DelayFilter"

        def __init__(self, filter: "DelayFilter", next: Layer, readonly: bool, export_name: str) -> None:
            super().__init__(filter, next, readonly, export_name)
            filter.wait("open")

        def can_fast_zero(self) -> bool:
            # With delay-fast-zero=false, fast zeroes fail at once, so they are "fast".
            if self.filter.delays["zero"] and not self.filter.delay_fast_zero:
                return True
            return self.next.can_fast_zero()

        def pread(self, buf: memoryview, offset: int, flags: int) -> None:
            self.filter.wait("pread")
            self.next.pread(buf, offset, flags)

        def pread_sparse(self, buf: memoryview, offset: int, flags: int) -> Holes:
            self.filter.wait("pread")
            return self.next.pread_sparse(buf, offset, flags)

        def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
            self.filter.wait("pwrite")
            self.next.pwrite(buf, offset, flags)

        def zero(self, count: int, offset: int, flags: int) -> None:
            if flags & FLAG_FAST_ZERO and self.filter.delays["zero"] and not self.filter.delay_fast_zero:
                raise NBDError(errno.ENOTSUP, "delay: fast zero refused (delay-fast-zero=false)")
            self.filter.wait("zero")
            self.next.zero(count, offset, flags)

        def trim(self, count: int, offset: int, flags: int) -> None:
            self.filter.wait("trim")
            self.next.trim(count, offset, flags)

        def extents(self, count: int, offset: int, flags: int, extents: Extents) -> None:
            self.filter.wait("extents")
            self.next.extents(count, offset, flags, extents)

        def cache(self, count: int, offset: int, flags: int) -> None:
            self.filter.wait("cache")
            self.next.cache(count, offset, flags)

        def close(self) -> None:
            self.filter.wait("close")


FILTER = DelayFilter

"""retry filter: reopen the plugin and retry a request that failed (nbdkit-retry-filter compatible).

For plugins over unreliable networks: a failed request closes the connection to the plugin, waits
(retry-delay=, doubled each time with retry-exponential=yes), reopens it (read-only from then on
with retry-readonly=yes) and tries again, up to retries= times.
"""

from __future__ import annotations

import errno
import logging
from typing import Callable, TypeVar

from ..api.chain import (FLAG_FAST_ZERO, FLAG_FUA, NONE, Extents, Filter, FilterHandle, Holes, Layer, OpenNext,
                         ThreadModel, sleep)
from ..api.errors import NBDError
from ..api.params import Bool, Int, Param

log = logging.getLogger(__name__)
Result = TypeVar("Result")


def wait_or_give_up(seconds: float, failure: Exception) -> None:
    """Wait before a retry; when the client hangs up or the server stops meanwhile, the request
    fails with its own error (as nbdkit's retry filters)."""
    try:
        sleep(seconds)
    except NBDError:
        raise failure from None


class RetryFilter(Filter):
    """Reopen the plugin and retry when a request fails (with exponential back-off)."""

    name = "retry"
    thread_model = ThreadModel.SERIALIZE_REQUESTS  # the layer below is replaced under a request's feet otherwise
    retries = Param(Int(minimum=0, maximum=1000), default=5, help="How many times a request is retried (0: never)")
    retry_delay = Param(Int(minimum=1, maximum=3600), default=2, help="Seconds to wait before the first retry")
    retry_exponential = Param(Bool(), default=True, help="Double the wait before each further retry")
    retry_readonly = Param(Bool(), default=False,
                           help="After a failure, reopen the plugin read-only for the rest of the connection")

    def open(self, next_open: OpenNext, readonly: bool, export_name: str) -> FilterHandle:
        handle = super().open(next_open, readonly, export_name)
        assert isinstance(handle, RetryFilter.Handle)
        handle.reopen_below = lambda readonly: next_open(readonly, export_name)
        return handle

    class Handle(FilterHandle):
        filter: "RetryFilter"
        next: Layer | None  # type: ignore[assignment]  # None while the plugin could not be reopened
        reopen_below: Callable[[bool], Layer]

        def __init__(self, filter: "RetryFilter", next: Layer, readonly: bool, export_name: str) -> None:
            super().__init__(filter, next, readonly, export_name)
            self.readonly = readonly
            self.reopens = 0

        def close(self) -> None:
            log.debug("reopens needed: %d", self.reopens)

        def _retry(self, method: str, call: Callable[[Layer], Result], write: bool = False) -> Result:
            retry, delay = 0, self.filter.retry_delay
            while True:
                if write and self.reopens and self.filter.retry_readonly:
                    raise NBDError(errno.EROFS, "retry: the plugin was reopened read-only")
                try:
                    if self.next is None:
                        raise NBDError(errno.ESHUTDOWN, "retry: the plugin could not be reopened")
                    return call(self.next)
                except Exception as e:
                    if retry >= self.filter.retries:
                        log.debug("could not recover after %d retries", self.filter.retries)
                        raise
                    log.debug("%s failed: %s; retry %d: waiting %d seconds", method, e, retry + 1, delay)
                    wait_or_give_up(delay, e)
                retry += 1
                if self.filter.retry_exponential:
                    delay *= 2
                self._reopen()

        def _reopen(self) -> None:
            self.reopens += 1
            below, self.next = self.next, None
            if below is not None:
                try:
                    below.close()
                except Exception as e:
                    log.debug("closing the plugin before reopening it failed: %s", e)
            try:
                self.next = self.reopen_below(self.readonly or self.filter.retry_readonly)
            except Exception as e:
                log.debug("reopening the plugin failed: %s", e)

        @staticmethod
        def _in_range(below: Layer, count: int, offset: int, write: bool) -> None:
            # The plugin may have come back smaller.
            if offset + count > below.get_size():
                raise NBDError(errno.ENOSPC if write else errno.EIO, "retry: request beyond the end of the disk")

        @staticmethod
        def _fua_possible(below: Layer, flags: int) -> None:
            if flags & FLAG_FUA and below.can_fua() == NONE:
                raise NBDError(errno.EIO, "retry: the reopened plugin cannot do FUA")

        def pread(self, buf: memoryview, offset: int, flags: int) -> None:
            def call(below: Layer) -> None:
                self._in_range(below, len(buf), offset, False)
                below.pread(buf, offset, flags)
            self._retry("pread", call)

        def pread_sparse(self, buf: memoryview, offset: int, flags: int) -> Holes:
            def call(below: Layer) -> Holes:
                self._in_range(below, len(buf), offset, False)
                return below.pread_sparse(buf, offset, flags)
            return self._retry("pread", call)

        def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
            def call(below: Layer) -> None:
                self._in_range(below, len(buf), offset, True)
                if not below.can_write():
                    raise NBDError(errno.EROFS, "retry: the reopened plugin is read-only")
                self._fua_possible(below, flags)
                below.pwrite(buf, offset, flags)
            self._retry("pwrite", call, write=True)

        def trim(self, count: int, offset: int, flags: int) -> None:
            def call(below: Layer) -> None:
                self._in_range(below, count, offset, True)
                if not below.can_trim():
                    raise NBDError(errno.EROFS, "retry: the reopened plugin cannot trim")
                self._fua_possible(below, flags)
                below.trim(count, offset, flags)
            self._retry("trim", call, write=True)

        def flush(self, flags: int) -> None:
            def call(below: Layer) -> None:
                if not below.can_flush():
                    raise NBDError(errno.EIO, "retry: the reopened plugin cannot flush")
                below.flush(flags)
            self._retry("flush", call)

        def zero(self, count: int, offset: int, flags: int) -> None:
            if flags & FLAG_FAST_ZERO and (self.next is None or not self.next.can_fast_zero()):
                raise NBDError(errno.EOPNOTSUPP, "retry: fast zero is not possible")

            def call(below: Layer) -> None:
                self._in_range(below, count, offset, True)
                if below.can_zero() == NONE:
                    raise NBDError(errno.EROFS, "retry: the reopened plugin cannot zero")
                self._fua_possible(below, flags)
                below.zero(count, offset, flags)
            self._retry("zero", call, write=True)

        def extents(self, count: int, offset: int, flags: int, extents: Extents) -> None:
            def call(below: Layer) -> Extents:
                self._in_range(below, count, offset, False)
                if not below.can_extents():
                    raise NBDError(errno.EIO, "retry: the reopened plugin has no extents")
                found = Extents(extents.start, extents.end)  # each try starts afresh
                below.extents(count, offset, flags, found)
                return found
            for start, length, kind in self._retry("extents", call):
                extents.add(start, length, kind)

        def cache(self, count: int, offset: int, flags: int) -> None:
            def call(below: Layer) -> None:
                self._in_range(below, count, offset, False)
                if below.can_cache() == NONE:
                    raise NBDError(errno.EIO, "retry: the reopened plugin cannot cache")
                below.cache(count, offset, flags)
            self._retry("cache", call)


FILTER = RetryFilter

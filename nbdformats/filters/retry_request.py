"""retry-request filter: retry a request that failed, as it is (nbdkit-retry-request-filter compatible).

For plugins that fail now and then (a load balancer in front of flaky web servers): each failed
request, and by default each failed open, is tried again after retry-request-delay= seconds, up to
retry-request-retries= times.  Unlike the retry filter, the plugin is not reopened.
"""

from __future__ import annotations

import logging
from typing import Callable, TypeVar

from ..api.chain import Extents, Filter, FilterHandle, Holes, OpenNext
from ..api.params import Bool, Int, Param
from .retry import wait_or_give_up

log = logging.getLogger(__name__)
Result = TypeVar("Result")


class RetryRequestFilter(Filter):
    """Retry each failed request (and open) a few times, without reopening the plugin."""

    name = "retry-request"
    retry_request_retries = Param(Int(minimum=0, maximum=1000), default=2,
                                  help="How many times a request is retried (0: never)")
    retry_request_delay = Param(Int(minimum=1, maximum=3600), default=2, help="Seconds to wait before each retry")
    retry_request_open = Param(Bool(), default=True, help="false: do not retry opening the plugin")

    def retry(self, method: str, call: Callable[[], Result]) -> Result:
        attempt = 0
        while True:
            try:
                return call()
            except Exception as e:
                if attempt >= self.retry_request_retries:
                    raise
                log.debug("%s failed: %s; retry %d: waiting %d seconds", method, e, attempt + 1,
                          self.retry_request_delay)
                wait_or_give_up(self.retry_request_delay, e)
            attempt += 1

    def open(self, next_open: OpenNext, readonly: bool, export_name: str) -> FilterHandle:
        if not self.retry_request_open:
            return super().open(next_open, readonly, export_name)
        return super().open(lambda ro, name: self.retry("open", lambda: next_open(ro, name)), readonly, export_name)

    class Handle(FilterHandle):
        filter: "RetryRequestFilter"

        def pread(self, buf: memoryview, offset: int, flags: int) -> None:
            self.filter.retry("pread", lambda: self.next.pread(buf, offset, flags))

        def pread_sparse(self, buf: memoryview, offset: int, flags: int) -> Holes:
            return self.filter.retry("pread", lambda: self.next.pread_sparse(buf, offset, flags))

        def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
            self.filter.retry("pwrite", lambda: self.next.pwrite(buf, offset, flags))

        def trim(self, count: int, offset: int, flags: int) -> None:
            self.filter.retry("trim", lambda: self.next.trim(count, offset, flags))

        def flush(self, flags: int) -> None:
            self.filter.retry("flush", lambda: self.next.flush(flags))

        def zero(self, count: int, offset: int, flags: int) -> None:
            self.filter.retry("zero", lambda: self.next.zero(count, offset, flags))

        def extents(self, count: int, offset: int, flags: int, extents: Extents) -> None:
            def call() -> Extents:
                found = Extents(extents.start, extents.end)  # each try starts afresh
                self.next.extents(count, offset, flags, found)
                return found
            for start, length, kind in self.filter.retry("extents", call):
                extents.add(start, length, kind)

        def cache(self, count: int, offset: int, flags: int) -> None:
            self.filter.retry("cache", lambda: self.next.cache(count, offset, flags))


FILTER = RetryRequestFilter

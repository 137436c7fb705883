"""error filter: inject errors into requests, for testing clients (nbdkit-error-filter compatible).

error=, error-rate= and error-file= apply to every kind of request; error-pread=,
error-pread-rate=, error-pread-file= (and the same for pwrite, trim, zero, extents, cache)
override them for one kind.  A request fails with probability `rate` while the file (if any)
exists.  The failing request never reaches the plugin; the server carries on.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import threading
from dataclasses import dataclass

from ..api.chain import Extents, Filter, FilterHandle, Holes
from ..api.errors import NBDError
from ..api.params import Enum, Param, ParamType, Path

log = logging.getLogger("nbdformats.error")

OPERATIONS = ("pread", "pwrite", "trim", "zero", "extents", "cache")
# Errors the NBD protocol can carry (nbdkit 1.32 accepts the first six).
ERRORS = ("EPERM", "EIO", "ENOMEM", "EINVAL", "ENOSPC", "ESHUTDOWN", "EOVERFLOW", "ENOTSUP")


class Rate(ParamType):
    """`N%` (0% to 100%) or a probability from 0 to 1."""

    metavar = "N%|0..1"

    def parse(self, text: str) -> float:
        body = text.strip()
        percent = body.endswith("%")
        try:
            value = float(body[:-1] if percent else body)
        except ValueError:
            raise ValueError(f"{text!r} is not a rate (examples: 10%, 0.1, 100%)") from None
        if percent:
            value /= 100
        if not 0 <= value <= 1:
            raise ValueError(f"{text!r} is not between 0% and 100%")
        return value


@dataclass(frozen=True)
class Injection:
    error: str
    rate: float
    file: str | None


def _error_for(op: str) -> Param:
    return Param(Enum(*ERRORS), help=f"The error injected into {op} requests (default: error=)")


def _rate_for(op: str) -> Param:
    return Param(Rate(), help=f"Error rate of {op} requests (default: error-rate=)")


def _file_for(op: str) -> Param:
    return Param(Path(kind=None), help=f"Inject {op} errors only while this file exists (default: error-file=)")


class ErrorFilter(Filter):
    """Inject random errors: error=, error-rate=, error-file= and per-request variants."""

    name = "error"
    resize_passthrough = True
    error = Param(Enum(*ERRORS), default="EIO", help="The error injected")
    error_rate = Param(Rate(), default=0.0, help="Share of requests that fail: N% or a probability 0..1")
    error_file = Param(Path(kind=None), help="Inject errors only while this file exists")
    error_pread = _error_for("pread")
    error_pread_rate = _rate_for("pread")
    error_pread_file = _file_for("pread")
    error_pwrite = _error_for("pwrite")
    error_pwrite_rate = _rate_for("pwrite")
    error_pwrite_file = _file_for("pwrite")
    error_trim = _error_for("trim")
    error_trim_rate = _rate_for("trim")
    error_trim_file = _file_for("trim")
    error_zero = _error_for("zero")
    error_zero_rate = _rate_for("zero")
    error_zero_file = _file_for("zero")
    error_extents = _error_for("extents")
    error_extents_rate = _rate_for("extents")
    error_extents_file = _file_for("extents")
    error_cache = _error_for("cache")
    error_cache_rate = _rate_for("cache")
    error_cache_file = _file_for("cache")

    def config_complete(self) -> None:
        self.injections: dict[str, Injection] = {}
        for op in OPERATIONS:
            error, rate, file = (getattr(self, f"error_{op}{suffix}") for suffix in ("", "_rate", "_file"))
            self.injections[op] = Injection(error=error or self.error,
                                            rate=self.error_rate if rate is None else rate,
                                            file=file or self.error_file)
        self.random = random.Random()
        self.random_lock = threading.Lock()

    def maybe_fail(self, op: str) -> None:
        injection = self.injections[op]
        if injection.rate <= 0:
            return
        if injection.file is not None and not os.path.exists(injection.file):
            return
        if injection.rate < 1:
            with self.random_lock:
                if self.random.random() >= injection.rate:
                    return
        log.debug("injecting %s error into %s", injection.error, op)
        raise NBDError(getattr(errno, injection.error), f"injecting {injection.error} error into {op}")

    class Handle(FilterHandle):
        filter: "ErrorFilter"

        def pread(self, buf: memoryview, offset: int, flags: int) -> None:
            self.filter.maybe_fail("pread")
            self.next.pread(buf, offset, flags)

        def pread_sparse(self, buf: memoryview, offset: int, flags: int) -> Holes:
            self.filter.maybe_fail("pread")
            return self.next.pread_sparse(buf, offset, flags)

        def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
            self.filter.maybe_fail("pwrite")
            self.next.pwrite(buf, offset, flags)

        def trim(self, count: int, offset: int, flags: int) -> None:
            self.filter.maybe_fail("trim")
            self.next.trim(count, offset, flags)

        def zero(self, count: int, offset: int, flags: int) -> None:
            self.filter.maybe_fail("zero")
            self.next.zero(count, offset, flags)

        def extents(self, count: int, offset: int, flags: int, extents: Extents) -> None:
            self.filter.maybe_fail("extents")
            self.next.extents(count, offset, flags, extents)

        def cache(self, count: int, offset: int, flags: int) -> None:
            self.filter.maybe_fail("cache")
            self.next.cache(count, offset, flags)


FILTER = ErrorFilter

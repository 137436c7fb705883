"""rate filter: limit bandwidth with token buckets (nbdkit-rate-filter compatible, and more).

Rates are in bits per second with nbdkit's size suffixes (`10M` = 10 * 1024^2 bits/s).  Each
limit has separate buckets for reads and writes; zero, trim and cache cost nothing, as
they carry no data on the wire.  A request pays every bucket that applies, in order:
its connection's, its client's, the direction's (read-rate=/write-rate=), the server's.

Buckets start full and hold `burstiness` seconds of tokens.  A request takes what the
bucket has and sleeps for the rest in slices of at most SLICE_SECONDS, taking again after
each, so large requests pay smoothly, concurrent requests share the tokens, and a rate
changed by a file or the schedule applies within a slice.

Sleeping happens in the connection's own threads, so a throttled connection does not hold up
the others; each sleeping request keeps one of its threads busy.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Generic, TypeVar

from ..api.chain import Filter, FilterHandle, Holes, Layer, current_client
from ..api.errors import ConfigError, NBDError
from ..api.params import Float, Param, ParamType, Path, parse_size

log = logging.getLogger("nbdformats.rate")

SLICE_SECONDS = 0.1  # longest single sleep: how soon a rate change or a competitor is noticed
FILE_CHECK_SECONDS = 0.05  # rate and schedule files are looked at (stat) at most this often


class TokenBucket:
    """Tokens (bits) accumulate at `rate` per second up to `rate * burstiness`; 0 = no limit."""

    def __init__(self, rate: int, burstiness: float) -> None:
        self.lock = threading.Lock()
        self.burstiness = burstiness
        self.rate = rate
        self.capacity = rate * burstiness
        self.level = self.capacity  # buckets start full, as nbdkit's
        self.stamp = time.monotonic()

    def set_rate(self, rate: int) -> None:
        with self.lock:
            if rate != self.rate:
                self.rate = rate
                self.capacity = rate * self.burstiness
                self.level = min(self.level, self.capacity)

    def take(self, bits: float) -> tuple[float, float]:
        """Take up to `bits` tokens; return (bits still owed, seconds until they accumulate)."""
        with self.lock:
            if self.rate == 0:
                return 0.0, 0.0
            now = time.monotonic()
            self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
            self.stamp = now
            taken = min(bits, self.level)
            self.level -= taken
            owed = bits - taken
            return owed, owed / self.rate


T = TypeVar("T")


class WatchedFile(Generic[T]):
    """The parsed content of a file that may change while the server runs.

    The file is looked at (stat) at most every FILE_CHECK_SECONDS and re-read when its inode,
    size or modification time changed.  A missing or unparseable file keeps the last good value.
    """

    def __init__(self, path: str, parse: Callable[[str], T]) -> None:
        self.path = path
        self.parse = parse
        self.lock = threading.Lock()
        self.value: T | None = None
        self.error = ""  # why the file could not be used, the last time it was looked at
        self.signature: tuple[int, int, int] | None = None
        self.checked = 0.0
        self.refresh()

    def current(self) -> T | None:
        if time.monotonic() - self.checked >= FILE_CHECK_SECONDS and self.lock.acquire(blocking=False):
            try:
                self.refresh()
            finally:
                self.lock.release()
        return self.value

    def refresh(self) -> None:
        self.checked = time.monotonic()
        try:
            st = os.stat(self.path)
            signature = (st.st_ino, st.st_size, st.st_mtime_ns)
            if signature == self.signature:
                return
            with open(self.path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError as e:
            self.error = e.strerror or str(e)
            return  # missing (being replaced, or deleted): keep the last value
        try:
            self.value = self.parse(text)
            self.error = ""
        except ValueError as e:
            self.error = str(e)
            log.warning("rate: %s: %s (keeping the previous value)", self.path, e)
        self.signature = signature


def parse_rate_file(text: str) -> int:
    """A rate file holds one rate on its first line, as rate= takes it (0 = no limit)."""
    line = text.split("\n", 1)[0].strip()
    return parse_size(line)


@dataclass(frozen=True)
class Schedule:
    """Rates over time: `daily` entries are seconds since local midnight, else since start."""

    daily: bool
    entries: tuple[tuple[float, int], ...]  # (when, rate), sorted by when

    def rate_at(self, since_start: float, since_midnight: float) -> int | None:
        """The rate in force, or None before the first entry of a since-start schedule."""
        now = since_midnight if self.daily else since_start
        current = self.entries[-1][1] if self.daily else None  # daily: yesterday's last entry
        for when, rate in self.entries:
            if when > now:
                break
            current = rate
        return current


def _parse_when(text: str) -> tuple[bool, float]:
    """`HH:MM[:SS]` (daily) or `+DURATION` (since start; seconds, or with an s/m/h suffix)."""
    if text.startswith("+"):
        body, scale = text[1:], 1.0
        if body[-1:] in ("s", "m", "h"):
            body, scale = body[:-1], {"s": 1.0, "m": 60.0, "h": 3600.0}[body[-1]]
        try:
            seconds = float(body) * scale
        except ValueError:
            raise ValueError(f"bad time {text!r} (examples: +0, +90, +1.5m, +2h)") from None
        if not seconds >= 0 or seconds == float("inf"):
            raise ValueError(f"bad time {text!r}")
        return False, seconds
    parts = text.split(":")
    if len(parts) not in (2, 3) or not all(p.isdigit() for p in parts):
        raise ValueError(f"bad time {text!r} (examples: 08:00, 17:30:15, +60)")
    hours, minutes, seconds = (int(p) for p in (*parts, "0")[:3])
    if hours > 23 or minutes > 59 or seconds > 59:
        raise ValueError(f"bad time of day {text!r}")
    return True, hours * 3600.0 + minutes * 60.0 + seconds


def parse_schedule(text: str) -> Schedule:
    """Parse a schedule file: one `WHEN RATE` per line; `#` starts a comment.

    WHEN is `HH:MM[:SS]` (local time, every day) or `+DURATION` (since the server started);
    one file uses one kind.  RATE is as rate= (bits per second, 0 = no limit).
    """
    entries: list[tuple[float, int]] = []
    kinds: set[bool] = set()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) != 2:
            raise ValueError(f"line {number}: expected 'WHEN RATE', got {line!r}")
        try:
            daily, when = _parse_when(fields[0])
            rate = parse_size(fields[1])
        except ValueError as e:
            raise ValueError(f"line {number}: {e}") from None
        kinds.add(daily)
        entries.append((when, rate))
    if not entries:
        raise ValueError("no entries")
    if len(kinds) > 1:
        raise ValueError("mixes times of day (HH:MM) with times since start (+N)")
    return Schedule(daily=kinds.pop(), entries=tuple(sorted(entries, key=lambda e: e[0])))


class RateSource:
    """Where one limit's rate comes from: a fixed rate, overridden by a rate file or a schedule."""

    def __init__(self, fixed: int, file: str | None = None, schedule: str | None = None) -> None:
        self.fixed = fixed
        self.file = WatchedFile(file, parse_rate_file) if file else None
        self.schedule = WatchedFile(schedule, parse_schedule) if schedule else None
        self.started = time.time()
        if self.schedule is not None and self.schedule.value is None:
            raise ConfigError(f"rate: rate-schedule={schedule}: {self.schedule.error}")

    def current(self) -> int:
        if self.file is not None:
            rate = self.file.current()
            if rate is not None:
                return rate
        if self.schedule is not None:
            schedule = self.schedule.current()
            if schedule is not None:
                now = time.time()
                local = time.localtime(now)
                since_midnight = local.tm_hour * 3600 + local.tm_min * 60 + local.tm_sec + now % 1
                rate = schedule.rate_at(now - self.started, since_midnight)
                if rate is not None:
                    return rate
        return self.fixed


class Limit:
    """A limit's read and write buckets, following its rate source."""

    def __init__(self, source: RateSource, burstiness: float) -> None:
        self.source = source
        rate = source.current()
        self.read = TokenBucket(rate, burstiness)
        self.write = TokenBucket(rate, burstiness)

    def bucket(self, write: bool) -> TokenBucket:
        bucket = self.write if write else self.read
        bucket.set_rate(self.source.current())
        return bucket


def client_key(sock: Any) -> str | None:
    """What identifies a client: its IP address, or for Unix sockets its process ID."""
    if sock is None:
        return None
    try:
        if sock.family == socket.AF_UNIX:
            raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            return f"pid {struct.unpack('3i', raw)[0]}"
        return str(sock.getpeername()[0])
    except OSError:
        return None


class BitRate(ParamType):
    """A positive rate in bits per second with nbdkit's size suffixes."""

    metavar = "BITSPERSEC"

    def parse(self, text: str) -> int:
        value = parse_size(text)
        if value == 0:
            raise ValueError("must be positive (leave it out for no limit)")
        return value


class RateFilter(Filter):
    """Limit bandwidth per connection, per client and in total, as nbdkit's rate filter."""

    name = "rate"
    resize_passthrough = True  # its size is the size of the layer below
    rate = Param(BitRate(), help="total bandwidth limit of the server (bits per second)")
    connection_rate = Param(BitRate(), help="bandwidth limit of each connection")
    client_rate = Param(BitRate(),
                        help="bandwidth limit of each client (IP address; process for Unix sockets), "
                             "shared by its connections")
    read_rate = Param(BitRate(), help="total limit on reads only (in addition to rate=)")
    write_rate = Param(BitRate(), help="total limit on writes only (in addition to rate=)")
    rate_file = Param(Path(kind=None), help="file whose first line sets rate= while running")
    connection_rate_file = Param(Path(kind=None), help="file whose first line sets connection-rate=")
    client_rate_file = Param(Path(kind=None), help="file whose first line sets client-rate=")
    rate_schedule = Param(Path(), help="schedule file: rate= over time (see the docs for its format)")
    burstiness = Param(Float(minimum=0.001), default=2.0,
                       help="bucket capacity in seconds of the rate (burst after idle time)")

    def config_complete(self) -> None:
        if self.rate_file and self.rate_schedule:
            raise ConfigError("rate: rate-file= and rate-schedule= both set the total rate; use one")

    def get_ready(self) -> None:
        self.stopping = threading.Event()
        burst = self.burstiness
        self.total = self._limit(self.rate, self.rate_file, self.rate_schedule)
        self.reads = Limit(RateSource(self.read_rate), burst) if self.read_rate else None
        self.writes = Limit(RateSource(self.write_rate), burst) if self.write_rate else None
        self.connection_source = self._source(self.connection_rate, self.connection_rate_file)
        self.client_source = self._source(self.client_rate, self.client_rate_file)
        self.clients: dict[str | None, tuple[Limit, int]] = {}  # key -> (limit, connections)
        self.clients_lock = threading.Lock()

    def _source(self, fixed: int | None, file: str | None, schedule: str | None = None) -> RateSource | None:
        if not (fixed or file or schedule):
            return None
        return RateSource(fixed or 0, file, schedule)

    def _limit(self, fixed: int | None, file: str | None, schedule: str | None) -> Limit | None:
        source = self._source(fixed, file, schedule)
        return Limit(source, self.burstiness) if source else None

    def cleanup(self) -> None:
        self.stopping.set()  # wake sleeping requests so the server can exit

    def acquire_client(self, key: str | None) -> Limit | None:
        if self.client_source is None:
            return None
        with self.clients_lock:
            limit, count = self.clients.get(key, (None, 0))
            if limit is None:
                limit = Limit(self.client_source, self.burstiness)
            self.clients[key] = (limit, count + 1)
            return limit

    def release_client(self, key: str | None) -> None:
        with self.clients_lock:
            limit, count = self.clients[key]
            if count == 1:
                del self.clients[key]
            else:
                self.clients[key] = (limit, count - 1)

    def pay(self, limits: list[Limit], nbytes: int, write: bool) -> None:
        """Sleep until every limit has let `nbytes` through."""
        for limit in limits:
            owed = nbytes * 8.0
            while owed > 0:
                owed, wait = limit.bucket(write).take(owed)
                if owed > 0 and self.stopping.wait(min(wait, SLICE_SECONDS)):
                    raise NBDError(errno.ESHUTDOWN, "server is shutting down")

    class Handle(FilterHandle):
        filter: "RateFilter"

        def __init__(self, filter: "RateFilter", next: Layer, readonly: bool, export_name: str) -> None:
            super().__init__(filter, next, readonly, export_name)
            self.client = client_key(current_client())
            client_limit = filter.acquire_client(self.client)
            own = Limit(filter.connection_source, filter.burstiness) if filter.connection_source else None
            self.read_limits = [x for x in (own, client_limit, filter.reads, filter.total) if x is not None]
            self.write_limits = [x for x in (own, client_limit, filter.writes, filter.total) if x is not None]

        def pread(self, buf: memoryview, offset: int, flags: int) -> None:
            self.filter.pay(self.read_limits, len(buf), write=False)
            self.next.pread(buf, offset, flags)

        def pread_sparse(self, buf: memoryview, offset: int, flags: int) -> Holes:
            self.filter.pay(self.read_limits, len(buf), write=False)
            return self.next.pread_sparse(buf, offset, flags)

        def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
            self.filter.pay(self.write_limits, len(buf), write=True)
            self.next.pwrite(buf, offset, flags)

        def close(self) -> None:
            if self.filter.client_source is not None:
                self.filter.release_client(self.client)


FILTER = RateFilter

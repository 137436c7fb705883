"""--stats-json=PATH: per-operation counts, bytes and latency percentiles over time, as JSON lines.

Each connection's `Transmission.check` and `.process` are wrapped (`StatsRecorder.instrument`)
to count and time every request, whichever thread runs it; a lock keeps the counts of
concurrent requests right.  Every `interval` seconds with activity, the event loop appends
one line::

    {"event": "interval", "time": 1718000000.25, "elapsed": 3.0, "seconds": 1.0, "connections": 2,
     "ops": {"read": {"count": 512, "bytes": 2097152, "errors": 0, "refused": 0,
                      "latency_us": {"p50": 14.2, "p90": 21.0, "p99": 40.1, "max": 65.3}}}}

`time` is the wall clock at the end of the interval, `elapsed` the seconds since the server
started, `seconds` the interval's length.  The first line is {"event": "start", ...} and the
last {"event": "stop", ...}; idle intervals write nothing (a plot shows them as zero).

`count` and `bytes` cover every request, `errors` those answered with an error, of which
`refused` never reached the plugin (out of range, a write to a read-only export...).  Latency
is over the others: the time from the moment a request starts running until its reply is
ready, i.e. the work of the filters and the plugin; waiting for a worker thread and sending
the reply are not included.  `latency_us` is absent when every request was refused.
Percentiles come from a log-linear histogram (16 buckets per power of two), so they are
within 3 % of the exact value and the memory per interval stays bounded whatever the
request rate.
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
import threading
import time
from typing import IO, Any, Callable, Sequence

from ..api.status import current_status
from ..protocol import wire as P

# NBD command -> the operation names nbdkit's stats filter uses.
OPERATION_NAMES = {P.CMD_READ: "read", P.CMD_WRITE: "write", P.CMD_FLUSH: "flush", P.CMD_TRIM: "trim",
                   P.CMD_CACHE: "cache", P.CMD_WRITE_ZEROES: "zero", P.CMD_BLOCK_STATUS: "extents",
                   P.CMD_RESIZE: "resize"}
PERCENTILES = (50, 90, 99)
SUB_BITS = 4  # 2**SUB_BITS histogram buckets per power of two of nanoseconds
_EXACT_BELOW = 1 << (SUB_BITS + 1)
_HEADER = struct.Struct(">IHH")  # magic, then (simple reply) error high half / (chunks) flags, type


def bucket_of(ns: int) -> int:
    """The histogram bucket of a latency: exact below 32 ns, then 16 buckets per power of two."""
    if ns < _EXACT_BELOW:
        return max(ns, 0)
    shift = ns.bit_length() - SUB_BITS - 1
    return (shift << SUB_BITS) + (ns >> shift)


def bucket_bounds(bucket: int) -> tuple[int, int]:
    """[low, high] nanoseconds of a bucket (the inverse of bucket_of)."""
    if bucket < _EXACT_BELOW:
        return bucket, bucket
    shift = (bucket >> SUB_BITS) - 1
    mantissa = bucket - (shift << SUB_BITS)
    return mantissa << shift, ((mantissa + 1) << shift) - 1


def percentile(histogram: dict[int, int], count: int, percent: float) -> float:
    """The `percent` percentile (nearest rank) of the latencies in a histogram, in nanoseconds."""
    rank = max(1, -(-count * percent // 100))  # ceil(count * percent / 100)
    seen = 0
    for bucket in sorted(histogram):
        seen += histogram[bucket]
        if seen >= rank:
            low, high = bucket_bounds(bucket)
            return (low + high) / 2
    raise ValueError("percentile of an empty histogram")


def reply_failed(buffers: Sequence[Any]) -> bool:
    """Whether the reply buffers of one request end in an error.

    Every buffer the transmission code produces starts with a reply header, and an error is
    always the last chunk: a simple reply has a nonzero error field, a structured or extended
    chunk a type with bit 15 set (NBD_REPLY_TYPE_ERROR*).
    """
    if not buffers:
        return False
    magic, high, low = _HEADER.unpack_from(buffers[-1], 0)
    if magic == P.SIMPLE_REPLY_MAGIC:
        return bool(high or low)
    return bool(low & 0x8000)


class OperationStats:
    """One operation's numbers in the current interval."""

    __slots__ = ("count", "bytes", "errors", "refused", "timed", "max_ns", "histogram")

    def __init__(self) -> None:
        self.count = self.bytes = self.errors = self.refused = self.timed = self.max_ns = 0
        self.histogram: dict[int, int] = {}

    def summary(self) -> dict[str, Any]:
        line: dict[str, Any] = {"count": self.count, "bytes": self.bytes, "errors": self.errors,
                                "refused": self.refused}
        if self.timed:
            # A bucket's middle may lie above the largest latency it holds.
            latency = {f"p{p}": round(min(percentile(self.histogram, self.timed, p), self.max_ns) / 1000, 3)
                       for p in PERCENTILES}
            latency["max"] = round(self.max_ns / 1000, 3)
            line["latency_us"] = latency
        return line


class StatsRecorder:
    """Collects what the connections report and writes a JSON line per interval."""

    def __init__(self, output: IO[str], interval: float = 1.0, *,
                 connections: Callable[[], int] = lambda: 0, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        if not interval > 0:
            raise ValueError("the stats interval must be positive")
        self.output = output
        self.interval = interval
        self.connections = connections
        self.clock, self.wall_clock = clock, wall_clock
        self.started = self.interval_start = clock()
        self.ops: dict[int, OperationStats] = {}
        self._lock = threading.Lock()
        self._timer: asyncio.TimerHandle | None = None

    @classmethod
    def open(cls, path: str, interval: float = 1.0, **kw: Any) -> "StatsRecorder":
        """Truncate or create PATH (raises OSError); lines are written as they are complete."""
        return cls(open(path, "w", buffering=1, encoding="utf-8"), interval, **kw)

    def record(self, command: int, length: int, ns: int, failed: bool) -> None:
        """One finished request: its NBD command, length in bytes, latency and outcome."""
        bucket = bucket_of(ns)
        with self._lock:
            op = self.ops.get(command)
            if op is None:
                op = self.ops[command] = OperationStats()
            op.count += 1
            op.timed += 1
            op.bytes += length
            if failed:
                op.errors += 1
            if ns > op.max_ns:
                op.max_ns = ns
            histogram = op.histogram
            histogram[bucket] = histogram.get(bucket, 0) + 1

    def record_refused(self, command: int, length: int) -> None:
        """A request refused before it reached the chain: counted as an error, not timed."""
        if command not in OPERATION_NAMES:
            return
        with self._lock:
            op = self.ops.get(command)
            if op is None:
                op = self.ops[command] = OperationStats()
            op.count += 1
            op.bytes += length
            op.errors += 1
            op.refused += 1

    def _write(self, line: dict[str, Any]) -> None:
        self.output.write(json.dumps(line, separators=(",", ":")) + "\n")

    def start(self, loop: asyncio.AbstractEventLoop | None = None, **details: Any) -> None:
        """Write the start line and, with a running loop, schedule the periodic lines."""
        self.started = self.interval_start = self.clock()
        self._write({"event": "start", "time": round(self.wall_clock(), 3), "interval": self.interval,
                     "pid": os.getpid(), **details})
        if loop is not None:
            self._timer = loop.call_later(self.interval, self._tick, loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        self.flush_interval()
        # Aligned to the start, so lines do not drift however long writing takes.
        due = self.interval_start + self.interval - self.clock()
        self._timer = loop.call_later(max(due, 0.0), self._tick, loop)

    def flush_interval(self) -> None:
        """End the current interval: write its line if anything happened, start the next."""
        now = self.clock()
        with self._lock:
            finished, self.ops = self.ops, {}
        status = current_status()
        if finished or status:
            ops = {OPERATION_NAMES.get(command, str(command)): op.summary()
                   for command, op in sorted(finished.items())}
            line = {"event": "interval", "time": round(self.wall_clock(), 3),
                    "elapsed": round(now - self.started, 3), "seconds": round(now - self.interval_start, 3),
                    "connections": self.connections(), "ops": ops}
            if status:
                line["status"] = status
            self._write(line)
        self.interval_start = now

    def close(self) -> None:
        """Write what the last, partial interval saw and the stop line; close the file."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.output.closed:
            return
        try:
            self.flush_interval()
            self._write({"event": "stop", "time": round(self.wall_clock(), 3),
                         "elapsed": round(self.clock() - self.started, 3)})
        finally:
            self.output.close()

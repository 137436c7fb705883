"""stats filter: count requests, bytes and time per operation and write them to a file when the
server exits, in nbdkit-stats-filter's format (nbdkit 1.32)::

    total: 19 ops, 0.021266 s, 110.50 KiB, 5.07 MiB/s
    read: 5 ops, 0.000002 s, 2.50 KiB, 1.19 GiB/s op, 117.56 KiB/s total
      Request size and alignment breakdown:
         9 bits: 100.0% (5 reqs, 2.50 KiB total)
              0 bit aligned: 100.0% (5)

The breakdown groups requests by size (N bits: sizes from 2^N to 2^(N+1)-1) and, within a
size, by offset alignment (N bit aligned: the offset is a multiple of 2^N), until
statsthreshold percent of the requests are shown.  Unlike nbdkit, sizes with the same number
of requests are all shown (nbdkit keeps only one of them).
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

from ..api.chain import Extents, Filter, FilterHandle, Holes
from ..api.errors import ConfigError
from ..api.params import Bool, Int, Param, Path

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
OPERATIONS = ("read", "write", "trim", "zero", "extents", "cache", "flush")
ANY_ALIGNMENT = -1  # offset 0 is aligned to everything


def human_size(count: float) -> str:
    count = int(count)
    if count < KIB:
        return f"{count} bytes"
    if count < MIB:
        return f"{count / KIB:.2f} KiB"
    if count < GIB:
        return f"{count / MIB:.2f} MiB"
    return f"{count / GIB:.2f} GiB"


def human_rate(count: int, usecs: int) -> str:
    return human_size(count / (usecs / 1e6)) if usecs else "(n/a)"


def alignment(offset: int) -> int:
    return (offset & -offset).bit_length() - 1 if offset else ANY_ALIGNMENT


@dataclass
class OpStats:
    ops: int = 0
    bytes: int = 0
    usecs: int = 0
    # size bits -> alignment bits -> requests, and size bits -> bytes
    requests: dict[int, dict[int, int]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    size_bytes: dict[int, int] = field(default_factory=lambda: defaultdict(int))


def alignment_lines(aligned: dict[int, int], threshold: float) -> list[str]:
    """'N bit aligned' lines: requests whose offset is a multiple of 2^N (offset 0 counts for all)."""
    total = sum(aligned.values())
    cutoff = int((1 - threshold) * total)
    at_least: dict[int, int] = {}
    running = aligned.get(ANY_ALIGNMENT, 0)
    for bits in sorted((b for b in aligned if b != ANY_ALIGNMENT), reverse=True):
        running += aligned[bits]
        at_least[bits] = running
    keys = sorted(at_least)
    lines = []
    for index, bits in enumerate(keys):
        count = at_least[bits]
        if count < cutoff:
            lines.append(f"         {bits:2d}+ bit-aligned: {count / total * 100:4.1f}% ({count})")
            break
        if index + 1 == len(keys) or at_least[keys[index + 1]] != count:  # skip steps that change nothing
            lines.append(f"         {bits:2d} bit aligned: {count * 100 / total:5.1f}% ({count})")
    return lines


def breakdown(stats: OpStats, threshold: float) -> list[str]:
    """The size and alignment histogram, until `threshold` of the requests are shown."""
    counts = {bits: sum(aligned.values()) for bits, aligned in stats.requests.items()}
    total = sum(counts.values())
    to_print = int(threshold * total)
    lines = ["  Request size and alignment breakdown:"]
    printed = printed_bytes = 0
    for bits in sorted(counts, key=lambda b: (-counts[b], b)):
        if printed >= to_print:
            rest = total - printed
            rest_bytes = sum(stats.size_bytes.values()) - printed_bytes
            lines.append(f"    other sizes: {rest / total * 100:4.1f}% ({rest} reqs, {human_size(rest_bytes)} total)")
            break
        lines.append(f"    {bits:2d} bits: {counts[bits] / total * 100:4.1f}% ({counts[bits]} reqs, "
                     f"{human_size(stats.size_bytes[bits])} total)")
        printed += counts[bits]
        printed_bytes += stats.size_bytes[bits]
        lines += alignment_lines(stats.requests[bits], threshold)
    return lines + [""]


class StatsFilter(Filter):
    """Write per-operation counts, bytes, times and size histograms to a file at exit."""

    name = "stats"
    resize_passthrough = True
    statsfile = Param(Path(kind=None), required=True, help="File the statistics are written to at exit")
    statsappend = Param(Bool(), default=False, help="Append to statsfile instead of replacing it")
    statsthreshold = Param(Int(minimum=0, maximum=100), default=95,
                           help="Percent of requests shown in the size and alignment breakdown (0: none)")

    def get_ready(self) -> None:
        try:
            self.file = open(self.statsfile, "a" if self.statsappend else "w", encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"stats: cannot open {self.statsfile}: {e.strerror}") from None
        self.lock = threading.Lock()
        self.stats = {op: OpStats() for op in OPERATIONS}
        self.started = time.monotonic()

    def record(self, op: str, count: int, offset: int | None, started: int | None) -> None:
        """Count a request: its size and offset always, its bytes and time when it succeeded."""
        with self.lock:
            stats = self.stats[op]
            if offset is not None and self.statsthreshold:
                bits = count.bit_length() - 1
                stats.requests[bits][alignment(offset)] += 1
                stats.size_bytes[bits] += count
            if started is not None:
                stats.ops += 1
                stats.bytes += count
                stats.usecs += (time.monotonic_ns() - started) // 1000

    def report(self, elapsed_usecs: int) -> str:
        stats = self.stats
        ops = sum(stats[op].ops for op in OPERATIONS if op != "cache")
        total = sum(stats[op].bytes for op in ("read", "write", "trim", "zero"))
        lines = [f"total: {ops} ops, {elapsed_usecs / 1e6:.6f} s, {human_size(total)}, "
                 f"{human_rate(total, elapsed_usecs)}/s"]
        for op in OPERATIONS:
            s = stats[op]
            if not s.ops:
                continue
            lines.append(f"{op}: {s.ops} ops, {s.usecs / 1e6:.6f} s, {human_size(s.bytes)}, "
                         f"{human_rate(s.bytes, s.usecs)}/s op, {human_rate(s.bytes, elapsed_usecs)}/s total")
            if s.requests and self.statsthreshold:
                lines += breakdown(s, self.statsthreshold / 100)
        return "\n".join(lines) + "\n"

    def cleanup(self) -> None:
        elapsed = int((time.monotonic() - self.started) * 1e6)
        with self.lock:
            self.file.write(self.report(max(elapsed, 1)))
        self.file.close()

    class Handle(FilterHandle):
        filter: "StatsFilter"

        def _timed(self, op: str, count: int, offset: int | None, call: Callable[..., Any], *args: Any) -> Any:
            record = self.filter.record
            started = time.monotonic_ns()
            try:
                result = call(*args)
            except Exception:
                record(op, count, offset, None)
                raise
            record(op, count, offset, started)
            return result

        def pread(self, buf: memoryview, offset: int, flags: int) -> None:
            self._timed("read", len(buf), offset, self.next.pread, buf, offset, flags)

        def pread_sparse(self, buf: memoryview, offset: int, flags: int) -> Holes:
            return self._timed("read", len(buf), offset, self.next.pread_sparse, buf, offset, flags)

        def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
            self._timed("write", len(buf), offset, self.next.pwrite, buf, offset, flags)

        def trim(self, count: int, offset: int, flags: int) -> None:
            self._timed("trim", count, offset, self.next.trim, count, offset, flags)

        def zero(self, count: int, offset: int, flags: int) -> None:
            self._timed("zero", count, offset, self.next.zero, count, offset, flags)

        def extents(self, count: int, offset: int, flags: int, extents: Extents) -> None:
            self._timed("extents", count, offset, self.next.extents, count, offset, flags, extents)

        def cache(self, count: int, offset: int, flags: int) -> None:
            self._timed("cache", count, offset, self.next.cache, count, offset, flags)

        def flush(self, flags: int) -> None:
            self._timed("flush", 0, None, self.next.flush, flags)


FILTER = StatsFilter

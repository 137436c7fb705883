"""protect filter: write-protect byte ranges of the disk (nbdkit-protect-filter compatible).

protect=START-END protects bytes START to END inclusive (decimal, 0x hex or 0 octal; either
end may be omitted: the start or the end of the disk), ~START-END everything else; the
parameter may be repeated.  Reads are unaffected.  A write, zero or trim that touches a
protected range is allowed only if it leaves the range's content unchanged (compared with
what the plugin holds), else it fails with EPERM and nothing is written.
"""

from __future__ import annotations

import bisect
import errno

from ..api.chain import Filter, FilterHandle
from ..api.errors import NBDError
from ..api.params import Param, ParamType
from ..api.zeroes import is_zero

END_OF_DISK = (1 << 63) - 1


def parse_offset(text: str) -> int:
    """An offset as strtoull(base 0) reads it: decimal, 0x hexadecimal, 0 octal."""
    body = text.strip()
    try:
        if body[:2].lower() == "0x":
            return int(body[2:], 16)
        if len(body) > 1 and body.startswith("0"):
            return int(body[1:], 8)
        return int(body, 10)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None


def parse_range(text: str) -> list[tuple[int, int]]:
    """`START-END` as one inclusive (start, end) range, `~START-END` as the (up to two) others."""
    negate = text.startswith("~")
    body = text[1:] if negate else text
    start_text, dash, end_text = body.partition("-")
    if not dash:
        raise ValueError(f"cannot parse range {text!r}: missing '-' (e.g. 0-511, 0x1be-, ~1M-2M)")
    start = parse_offset(start_text) if start_text.strip() else 0
    end = parse_offset(end_text) if end_text.strip() else END_OF_DISK
    if end < start:
        raise ValueError(f"invalid range {text!r}: end < start")
    if not negate:
        return [(start, end)]
    ranges = []
    if start > 0:
        ranges.append((0, start - 1))
    if end < END_OF_DISK:
        ranges.append((end + 1, END_OF_DISK))
    return ranges


class ProtectRange(ParamType):
    metavar = "[~]START-END"

    def parse(self, text: str) -> list[tuple[int, int]]:
        return parse_range(text)


def merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, with overlapping and adjacent ranges combined."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


class ProtectFilter(Filter):
    """Refuse writes that would change protected byte ranges: protect=START-END or ~START-END."""

    name = "protect"
    resize_passthrough = True  # ranges are absolute offsets, independent of the size
    protect = Param(ProtectRange(), repeat=True, help="Protect bytes START-END (inclusive); ~ protects the rest")

    def config_complete(self) -> None:
        self.ranges = merge([r for ranges in self.protect for r in ranges])
        self.starts = [start for start, _ in self.ranges]

    def protected_parts(self, offset: int, count: int) -> list[tuple[int, int]]:
        """The (start, end) exclusive parts of [offset, offset+count) that are protected."""
        end = offset + count
        index = max(0, bisect.bisect_right(self.starts, offset) - 1)
        parts = []
        for start, last in self.ranges[index:]:
            if start >= end:
                break
            lo, hi = max(start, offset), min(last + 1, end)
            if lo < hi:
                parts.append((lo, hi))
        return parts

    class Handle(FilterHandle):
        filter: "ProtectFilter"

        def _check(self, offset: int, count: int, data: memoryview | None) -> None:
            """EPERM unless every protected byte in the range keeps its value (`data`, or zeroes)."""
            for lo, hi in self.filter.protected_parts(offset, count):
                current = bytearray(hi - lo)
                self.next.pread(memoryview(current), lo, 0)
                unchanged = (memoryview(current) == data[lo - offset:hi - offset]) if data is not None \
                    else is_zero(memoryview(current))
                if not unchanged:
                    raise NBDError(errno.EPERM, f"protect: write to protected range [{lo}, {hi - 1}] refused")

        def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
            self._check(offset, len(buf), buf)
            self.next.pwrite(buf, offset, flags)

        def zero(self, count: int, offset: int, flags: int) -> None:
            self._check(offset, count, None)
            self.next.zero(count, offset, flags)

        def trim(self, count: int, offset: int, flags: int) -> None:
            self._check(offset, count, None)
            self.next.trim(count, offset, flags)


FILTER = ProtectFilter

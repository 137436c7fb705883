"""extentlist filter: block status from a static list in a file (nbdkit-extentlist-filter compatible).

For plugins that cannot tell holes from data themselves (curl, ssh) when the source's map is
known from elsewhere (`xfs_bmap`, `filefrag`).  The file has one extent a line,
`OFFSET LENGTH [TYPE]`: sizes with nbdkit's suffixes; TYPE an integer (nbdkit's extent type bits,
default 0 = data) or words containing `hole` and/or `zero` (`hole,zero`).  Lines may come in any
order but must not overlap; zero-length extents are skipped; every gap reads as a hole of zeroes.
The list is static: writes pass through but do not change it (use it read-only, `-r`).
"""

from __future__ import annotations

import bisect
import logging
import re

from ..api.chain import EXTENT_HOLE, EXTENT_ZERO, Extents, Filter, FilterHandle
from ..api.errors import ConfigError
from ..api.params import Param, Path, parse_size

log = logging.getLogger(__name__)

HOLE = EXTENT_HOLE | EXTENT_ZERO
LIMIT = (1 << 63) - 1  # NBD offsets are signed 64-bit for every client we know


def parse_type(field: str) -> int:
    if re.fullmatch(r"[0-9]+", field):
        value = int(field)
        if value > 0xFFFFFFFF:
            raise ValueError(f"type {field} does not fit in 32 bits")
        return value
    if field[:1].isdigit() or field[:1] in "+-":
        raise ValueError(f"cannot parse type {field!r} (an integer, or words hole and zero)")
    return (EXTENT_HOLE if "hole" in field else 0) | (EXTENT_ZERO if "zero" in field else 0)


def parse_extent_list(path: str) -> tuple[list[int], list[tuple[int, int]]]:
    """The extents of `path`, sorted, with the gaps filled by holes up to 2^63-1: their starts,
    and (end, type) for each.  Raises ConfigError naming the file and line of a bad entry."""
    found: list[tuple[int, int, int, int]] = []  # offset, end, type, line number
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise ConfigError(f"extentlist: open: {path}: {e.strerror}") from None
    for number, line in enumerate(lines, 1):
        fields = line.split()
        if not fields:
            continue  # nbdkit refuses blank lines; they mean nothing
        where = f"extentlist: {path}:{number}"
        if len(fields) < 2:
            raise ConfigError(f"{where}: cannot parse {line!r} (expected: OFFSET LENGTH [TYPE])")
        try:
            offset, length = parse_size(fields[0]), parse_size(fields[1])
            kind = parse_type(fields[2]) if len(fields) > 2 else 0
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
        if length == 0:
            continue
        if offset + length > LIMIT:
            raise ConfigError(f"{where}: the extent {offset}+{length} ends beyond 2^63-1")
        found.append((offset, offset + length, kind, number))
    found.sort()
    starts: list[int] = []
    runs: list[tuple[int, int]] = []
    end = 0
    for offset, extent_end, kind, number in found:
        if offset < end:
            raise ConfigError(f"extentlist: {path}:{number}: extents in the extent list are overlapping "
                              f"({offset} is before {end}, the end of another)")
        if offset > end:
            starts.append(end)
            runs.append((offset, HOLE))
        starts.append(offset)
        runs.append((extent_end, kind))
        end = extent_end
    if end < LIMIT:
        starts.append(end)
        runs.append((LIMIT, HOLE))
    return starts, runs


class ExtentlistFilter(Filter):
    """Block status (extents) from a static list in a file: extentlist=FILE."""

    name = "extentlist"
    resize_passthrough = True
    debug_flag_help = {"lookup": "log each step of an extents lookup"}
    extentlist = Param(Path("file"), required=True,
                       help="File of extents, one a line: OFFSET LENGTH [TYPE] (gaps are holes)")

    def get_ready(self) -> None:
        self.starts, self.runs = parse_extent_list(self.extentlist)
        for index, (start, (end, kind)) in enumerate(zip(self.starts, self.runs)):
            log.debug("extentlist: extent[%d] = %d-%d (length %d) type %d", index, start, end - 1, end - start, kind)

    class Handle(FilterHandle):
        filter: "ExtentlistFilter"

        def can_extents(self) -> bool:
            return True

        def extents(self, count: int, offset: int, flags: int, extents: Extents) -> None:
            f = self.filter
            debug = f.debug_flags.get("lookup", 0)
            index = bisect.bisect_right(f.starts, offset) - 1
            end_wanted = offset + count
            while offset < end_wanted and index < len(f.runs):
                if debug:
                    log.debug("extentlist lookup: loop i=%d count=%d offset=%d", index, end_wanted - offset, offset)
                end, kind = f.runs[index]
                extents.add(offset, end - offset, kind)
                offset = end
                index += 1


FILTER = ExtentlistFilter

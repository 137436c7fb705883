"""ddrescue filter: serve a disk rescued by GNU ddrescue, failing reads of the areas its mapfile
does not mark as rescued (nbdkit-ddrescue-filter compatible).

For checking what a rescued image lost: which files or filesystem structures a bad area hits, or
whether fsck copes.  A read succeeds only when every byte of it lies in blocks the mapfile marks
finished (`+`); any other read fails with EIO rather than returning the zeroes ddrescue left
there.  The filter is read-only.

The mapfile format (ddrescue's manual, "Mapfile structure"): `#` comment lines, then a status line
(`current_pos current_status [current_pass]`), then one block a line, `POS SIZE STATUS`, the
numbers in C notation (`0x...` hex as ddrescue writes them, decimal, `0...` octal) and STATUS one
of `?` (non-tried), `*` (non-trimmed), `/` (non-scraped), `-` (bad sector), `+` (finished).
"""

from __future__ import annotations

import bisect
import errno
import itertools
import logging
import re

from ..api.chain import NONE, Filter, FilterHandle, Layer
from ..api.errors import ConfigError, NBDError
from ..api.params import Param, Path

log = logging.getLogger(__name__)

LIMIT = (1 << 63) - 1
_C_INTEGER = re.compile(r"[+-]?(?:0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")
STATUSES = "?*/-+"


def parse_c_integer(text: str) -> int:
    """An integer as sscanf's %i reads it (decimal, 0x hex, 0 octal)."""
    if not _C_INTEGER.fullmatch(text):
        raise ValueError(f"{text!r} is not a number")
    sign = -1 if text[0] == "-" else 1
    digits = text.lstrip("+-")
    if digits[:2].lower() == "0x":
        return sign * int(digits[2:], 16)
    return sign * int(digits, 8 if len(digits) > 1 and digits[0] == "0" else 10)


def parse_mapfile(path: str) -> list[tuple[int, int, str]]:
    """The blocks of a ddrescue mapfile, sorted: (start, end, status).  Raises ConfigError naming the
    file and line of a block that is not `POS SIZE STATUS` with POS, SIZE >= 0 and POS+SIZE <= 2^63-1,
    or that overlaps another."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise ConfigError(f"ddrescue: {path}: {e.strerror}") from None
    blocks: list[tuple[int, int, str, int]] = []
    status_seen = False
    for number, line in enumerate(lines, 1):
        if line.startswith("#") or not line.strip():
            continue
        if not status_seen:  # current_pos current_status [current_pass]
            status_seen = True
            log.debug("%s: skipping status line: %r", path, line)
            continue
        where = f"ddrescue: {path}:{number}"
        fields = line.split()
        if len(fields) < 3 or len(fields[2]) != 1 or fields[2] not in STATUSES:
            raise ConfigError(f"{where}: cannot parse {line!r} (expected: POS SIZE STATUS, STATUS one of "
                              f"{' '.join(STATUSES)})")
        try:
            offset, length = parse_c_integer(fields[0]), parse_c_integer(fields[1])
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
        if offset < 0:
            raise ConfigError(f"{where}: block offset must not be negative")
        if length < 0:
            raise ConfigError(f"{where}: block length must not be negative")
        if offset + length > LIMIT:
            raise ConfigError(f"{where}: the block {offset:#x}+{length:#x} ends beyond 2^63-1")
        log.debug("%s: range: %#x %#x %r", path, offset, length, fields[2])
        if length:
            blocks.append((offset, offset + length, fields[2], number))
    blocks.sort()
    for (_, end, _, _), (start, _, _, number) in itertools.pairwise(blocks):
        if start < end:
            raise ConfigError(f"ddrescue: {path}:{number}: the block at {start:#x} overlaps the one before it "
                              f"(which ends at {end:#x})")
    return [(start, end, status) for start, end, status, _ in blocks]


class DdrescueFilter(Filter):
    """Fail reads of the areas a GNU ddrescue mapfile does not mark rescued (EIO); read-only."""

    name = "ddrescue"
    ddrescue_mapfile = Param(Path("file"), repeat=True, default=[],
                             help="The ddrescue mapfile (blocks marked + are readable; the others fail with EIO)")

    def config_complete(self) -> None:
        # The rescued ('+') blocks of every mapfile given, adjacent ones merged: a read fails unless
        # it lies in one of these.
        rescued: list[list[int]] = []
        for path in self.ddrescue_mapfile:
            rescued += [[start, end] for start, end, status in parse_mapfile(path) if status == "+"]
        rescued.sort()
        merged: list[list[int]] = []
        for start, end in rescued:
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        self.starts = [start for start, _ in merged]
        self.ends = [end for _, end in merged]
        self.warned = False

    class Handle(FilterHandle):
        filter: "DdrescueFilter"

        def __init__(self, filter: "DdrescueFilter", next: Layer, readonly: bool, export_name: str) -> None:
            super().__init__(filter, next, readonly, export_name)
            if filter.ends and filter.ends[-1] > next.get_size() and not filter.warned:
                filter.warned = True  # ddrescue's output stops at its last write: legitimate, but worth a word
                log.warning("ddrescue: the mapfile marks bytes up to %d rescued, beyond the end of the disk (%d)",
                            filter.ends[-1], next.get_size())

        def can_write(self) -> bool:
            return False

        def can_cache(self) -> int:
            return NONE

        def pread(self, buf: memoryview, offset: int, flags: int) -> None:
            f = self.filter
            index = bisect.bisect_right(f.starts, offset) - 1
            if index < 0 or offset + len(buf) > f.ends[index]:
                log.debug("ddrescue: pread: range: %#x %#x failing with EIO", offset, len(buf))
                raise NBDError(errno.EIO, f"ddrescue: bytes {offset}-{offset + len(buf) - 1} were not all rescued")
            self.next.pread(buf, offset, flags)


FILTER = DdrescueFilter

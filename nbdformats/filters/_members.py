"""What the tar, zip and archive filters share: the members of an archive as exports.

With `NAME-entry=MEMBER` the filter serves that member and passes the client's export name
down, as nbdkit's tar filter does.  Without it every regular member is an export: the export
list names them, the client's export name picks one, and the empty name means the first.

`SegmentHandle` serves a member whose bytes lie uncompressed in the layer below, as one
segment (tar, stored zip) or several with holes between them (GNU sparse tar).
"""

from __future__ import annotations

import bisect
import errno
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from ..api.chain import (EXTENT_DATA, EXTENT_HOLE, EXTENT_ZERO, FLAG_REQ_ONE, NONE, Export, Extents, Filter,
                         FilterHandle, Layer, OpenNext)
from ..api.errors import ConfigError, NBDError
from ..api.zeroes import fill_zero
from ..formats.errors import FormatError
from ._layer_bytes import read_bytes

log = logging.getLogger(__name__)

LISTED_NAMES = 20  # how many member names an error message shows


class ArchiveError(FormatError):
    """The archive is truncated or libarchive cannot read it (the message says why); the format
    parsers raise their own FormatError subclasses, handled alike."""


def read_archive(layer: Layer, offset: int, length: int) -> bytes:
    """`length` bytes at `offset` of the archive in the layer below; ArchiveError past its end."""
    if offset < 0 or offset + length > layer.get_size():
        raise ArchiveError(f"truncated archive: need bytes {offset}..{offset + length} "
                           f"but there are only {layer.get_size()}")
    return read_bytes(layer, offset, length)


@dataclass(frozen=True)
class Segment:
    """`length` bytes at `offset` in the member are stored at `source` in the layer below."""

    offset: int
    length: int
    source: int


@dataclass(frozen=True)
class Member:
    name: str
    size: int
    # Where the bytes lie uncompressed in the layer below (None for a compressed member);
    # parts of the member no segment covers read as zeroes.
    segments: tuple[Segment, ...] | None
    detail: Any = None  # the format's own record of the member


def normalize(name: str) -> str:
    """Names as users type them: without leading "./" or "/"."""
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/")


def describe_names(names: list[str]) -> str:
    if not names:
        return "no regular files"
    shown = ", ".join(repr(n) for n in names[:LISTED_NAMES])
    more = len(names) - LISTED_NAMES
    return shown + (f" and {more} more" if more > 0 else "")


class MemberFilter(Filter):
    """Base of filters serving one member of an archive.  Subclasses declare
    `entry = Param(String(), key="NAME-entry")`, `read_members` and `open_member`."""

    entry: str | None

    def read_members(self, below: Layer) -> Iterator[Member]:
        """The regular-file members in archive order; raises a FormatError."""
        raise NotImplementedError

    def open_member(self, below: Layer, member: Member, readonly: bool, below_export: str) -> FilterHandle:
        """The handle serving `member`; `below` was opened with export name `below_export`."""
        raise NotImplementedError

    def find_member(self, below: Layer, wanted: str) -> Member:
        """The first member called `wanted` (or `./wanted`, `/wanted`); "" means the first member."""
        names: list[str] = []
        loose_match = None
        for member in self.read_members(below):
            if member.name == wanted or (not wanted):
                return member
            if loose_match is None and normalize(member.name) == normalize(wanted):
                loose_match = member
            names.append(member.name)
        if loose_match is not None:
            return loose_match
        if not wanted:
            raise NBDError(errno.ENOENT, f"{self.name}: the archive has no regular files to serve")
        raise NBDError(errno.ENOENT, f"{self.name}: no member {wanted!r} in the archive; it has "
                                     f"{describe_names(names)}")

    def _with_below(self, action: Callable[[Layer], Any]) -> Any:
        below = self.open_below(True, "")
        try:
            return action(below)
        finally:
            below.close()

    def get_ready(self) -> None:
        # Open tar-entry= now, so a typo or a corrupt member is a start-up error (listing the members).
        if self.entry is None:
            return
        try:
            below = self.open_below(True, "")
        except (NBDError, OSError) as e:
            log.debug("%s: cannot open the layer below at start-up (%s); checking at connection", self.name, e)
            return
        try:
            self.open_export(below, "", self.entry, True).close()
        except (FormatError, NBDError) as e:
            raise ConfigError(str(e) if isinstance(e, NBDError) else f"{self.name}: {e}") from None
        finally:
            below.close()

    def list_exports(self, next_list: Callable[[bool, bool], list[Export]], readonly: bool,
                     is_tls: bool) -> list[Export]:
        if self.entry is not None:
            return next_list(readonly, is_tls)
        try:
            names = self._with_below(lambda below: [m.name for m in self.read_members(below)])
        except FormatError as e:
            raise NBDError(errno.EIO, f"{self.name}: {e}") from None
        return [Export(name) for name in dict.fromkeys(names)]

    def default_export(self, next_default: Callable[[bool, bool], str], readonly: bool,
                       is_tls: bool) -> str:
        if self.entry is not None:
            return next_default(readonly, is_tls)
        try:
            return self._with_below(lambda below: self.find_member(below, "").name)
        except (FormatError, NBDError):
            return ""

    def open(self, next_open: OpenNext, readonly: bool, export_name: str) -> FilterHandle:
        if self.entry is not None:
            below_export, wanted = export_name, self.entry
        else:
            below_export, wanted = "", export_name
        below = next_open(readonly, below_export)
        try:
            try:
                return self.open_export(below, below_export, wanted, readonly)
            except FormatError as e:
                raise NBDError(errno.EIO, f"{self.name}: {e}") from None
        except BaseException:
            below.close()
            raise

    def open_export(self, below: Layer, below_export: str, wanted: str, readonly: bool) -> FilterHandle:
        """Find the member `wanted` ("" for the first) and open it; `below` was opened as `below_export`."""
        return self.open_member(below, self.find_member(below, wanted), readonly, below_export)


class SegmentHandle(FilterHandle):
    """A member stored uncompressed in the layer below; `writable` allows writes to its bytes
    (only for a member stored in one piece: writes must never change what the archive holds
    outside the member)."""

    def __init__(self, filter: Filter, next: Layer, member: Member, writable: bool) -> None:
        self.filter = filter
        self.next = next
        self.size = member.size
        assert member.segments is not None
        self.segments = member.segments
        self.starts = [s.offset for s in self.segments]
        # The common case, one segment covering the member: a constant shift.
        whole = len(self.segments) == 1 and self.segments[0].offset == 0 and self.segments[0].length == member.size
        self.shift = self.segments[0].source if whole else None
        self.writable = writable and self.shift is not None

    def get_size(self) -> int:
        return self.size

    def block_size(self) -> tuple[int, int, int] | None:
        constraints = self.next.block_size()
        if constraints and all(s.source % constraints[0] == 0 for s in self.segments):
            return constraints
        return None  # the member is not aligned as the layer below wants; let its emulation cope

    def can_write(self) -> bool:
        return self.writable and self.next.can_write()

    def can_trim(self) -> bool:
        return self.writable and self.next.can_trim()

    def can_zero(self) -> int:
        return self.next.can_zero() if self.writable else NONE

    def can_fast_zero(self) -> bool:
        return self.writable and self.next.can_fast_zero()

    def can_fua(self) -> int:
        return self.next.can_fua() if self.writable else NONE

    def can_extents(self) -> bool:
        return True

    def _pieces(self, offset: int, count: int) -> Iterator[tuple[int, int, Segment | None]]:
        """(offset, length, segment or None for a hole) covering [offset, offset + count)."""
        end = offset + count
        index = max(bisect.bisect_right(self.starts, offset) - 1, 0)
        while offset < end:
            segment = self.segments[index] if index < len(self.segments) else None
            if segment is None or offset < segment.offset:  # a hole before the next segment
                hole_end = min(end, segment.offset if segment else end)
                yield offset, hole_end - offset, None
                offset = hole_end
            elif offset >= segment.offset + segment.length:
                index += 1
            else:
                n = min(end, segment.offset + segment.length) - offset
                yield offset, n, segment
                offset += n
                index += 1

    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        if self.shift is not None:
            self.next.pread(buf, offset + self.shift, flags)
            return
        for start, n, segment in self._pieces(offset, len(buf)):
            piece = buf[start - offset:start - offset + n]
            if segment is None:
                fill_zero(piece)
            else:
                self.next.pread(piece, segment.source + start - segment.offset, flags)

    def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        self.next.pwrite(buf, offset + self._write_shift(), flags)

    def zero(self, count: int, offset: int, flags: int) -> None:
        self.next.zero(count, offset + self._write_shift(), flags)

    def trim(self, count: int, offset: int, flags: int) -> None:
        self.next.trim(count, offset + self._write_shift(), flags)

    def _write_shift(self) -> int:
        if self.shift is None or not self.writable:
            raise NBDError(errno.EROFS, f"{self.filter.name}: this member is read-only")
        return self.shift

    def cache(self, count: int, offset: int, flags: int) -> None:
        for start, n, segment in self._pieces(offset, count):
            if segment is not None:
                self.next.cache(n, segment.source + start - segment.offset, flags)

    def extents(self, count: int, offset: int, flags: int, extents: Extents) -> None:
        for start, n, segment in self._pieces(offset, count):
            if segment is None:
                extents.add(start, n, EXTENT_HOLE | EXTENT_ZERO)
            elif not self.next.can_extents():
                extents.add(start, n, EXTENT_DATA)
            else:
                delta = segment.source - segment.offset
                below = Extents(start + delta, start + delta + n)
                self.next.extents(n, start + delta, flags, below)
                for below_offset, length, kind in below:
                    extents.add(below_offset - delta, length, kind)
                if below.covered < start + delta + n:
                    return  # the layer below answered only part (as it may): so do we
            if flags & FLAG_REQ_ONE and len(extents):
                return

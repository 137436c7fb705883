"""tar filter: serve a member of a tar archive straight from the archive's bytes.

Reads the headers itself (v7, ustar, GNU long names and sparse, pax), so unlike nbdkit's
filter it needs no GNU tar, finds long-named members at the right offset and serves GNU
sparse members correctly (read-only, holes reported as such).  Writes go to the member's
bytes in the archive and never change its size.
"""

from __future__ import annotations

import logging
from typing import Iterator

from ..api.chain import FilterHandle, Layer
from ..api.params import Param, String
from ..formats.tar import TarEntry, walk
from ._members import Member, MemberFilter, Segment, SegmentHandle, normalize, read_archive

log = logging.getLogger(__name__)


def tar_member(entry: TarEntry, name: str | None = None) -> Member:
    if entry.sparse_map is None:
        segments: tuple[Segment, ...] = (Segment(0, entry.size, entry.data_offset),)
    else:
        pieces, source = [], entry.data_offset
        for offset, length in entry.sparse_map:
            pieces.append(Segment(offset, length, source))
            source += length
        segments = tuple(pieces)
    return Member(name if name is not None else entry.name, entry.size, segments, entry)


class TarFilter(MemberFilter):
    """Serve a member of a tar archive (every member as an export when tar-entry= is not given)."""

    name = "tar"
    entry = Param(String(), key="tar-entry",
                  help="The member to serve, as `tar tf` lists it (a leading ./ may be left out). "
                       "Without it every regular file is an export selected by the client's export name")
    tar = Param(String(), help="Accepted for nbdkit compatibility and ignored: no tar program is needed")

    def read_members(self, below: Layer) -> Iterator[Member]:
        files: dict[str, TarEntry] = {}
        for entry in walk(lambda offset, n: read_archive(below, offset, n), below.get_size()):
            if entry.kind == "file":
                files.setdefault(normalize(entry.name), entry)
                yield tar_member(entry)
            elif entry.kind == "hardlink":
                # A hard link stores no data: it shares the bytes of an earlier member.
                target = files.get(normalize(entry.linkname))
                if target is not None:
                    yield tar_member(target, entry.name)

    def open_member(self, below: Layer, member: Member, readonly: bool, below_export: str) -> FilterHandle:
        entry: TarEntry = member.detail
        if entry.sparse_map is not None and not readonly:
            log.debug("tar: %s is a sparse member: served read-only (its holes are not stored)", member.name)
        return SegmentHandle(self, below, member, writable=entry.sparse_map is None)


FILTER = TarFilter

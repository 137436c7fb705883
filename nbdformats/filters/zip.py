"""zip filter: serve a member of a zip archive.

Stored members are served straight from their bytes in the archive (writable with
zip-write=true); deflated members are read-only, with random access through checkpoints
(deflate_index: a read far into the member decodes from the nearest checkpoint, not from
the start).  Sizes come from the central directory, zip64 included.  nbdkit has no zip filter.
"""

from __future__ import annotations

import errno
import logging
import threading
import zlib
from dataclasses import replace
from typing import Iterator

from ..api.chain import EMULATE, FilterHandle, Layer
from ..api.errors import NBDError
from ..api.params import Bool, Param, String
from ..formats.deflate_index import DeflateIndex
from ..formats.errors import FormatError
from ..formats.zip import (DEFLATED, LOCAL, STORED, ZipEntry, check_extent, data_offset, find_overlap,
                           parse_central_directory, read_central_directory)
from ._decompress import SourceHandle
from ._members import Member, MemberFilter, Segment, SegmentHandle, read_archive

log = logging.getLogger(__name__)


class SequentialCrc:
    """The CRC-32 of a stored member, computed while it is read from its start in order (a
    whole-disk copy over one connection: qemu-img convert, nbdcopy -C 1) and checked at its end.
    Reads out of order are not counted: random access cannot check a whole-member checksum."""

    def __init__(self, name: str, expected: int, size: int) -> None:
        self.name, self.expected, self.size = name, expected, size
        self.cursor = 0  # the member is checked up to here
        self.crc = 0
        self.corrupt: str | None = None  # why every read fails once the CRC did not match
        self.lock = threading.Lock()

    def read(self, data: memoryview, offset: int) -> None:
        """Count bytes just read at `offset`; EIO when they end the member and the CRC is wrong."""
        with self.lock:
            if self.corrupt is None and offset == self.cursor < self.size:
                self.crc = zlib.crc32(data, self.crc)
                self.cursor += len(data)
                if self.cursor >= self.size and self.crc != self.expected:
                    self.corrupt = (f"zip member {self.name!r} is corrupt: its data has CRC-32 {self.crc:08x}, "
                                    f"not the recorded {self.expected:08x}")
                    log.error("%s", self.corrupt)
        if self.corrupt is not None:
            raise NBDError(errno.EIO, self.corrupt)


class CheckedStoredHandle(SegmentHandle):
    """A read-only stored member whose CRC-32 is checked by reading it in order (SequentialCrc)."""

    def __init__(self, filter: "ZipFilter", next: Layer, member: Member, check: SequentialCrc) -> None:
        super().__init__(filter, next, member, writable=False)
        self.check = check

    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        super().pread(buf, offset, flags)
        self.check.read(buf, offset)


class ZipFilter(MemberFilter):
    """Serve a member of a zip archive (every member as an export when zip-entry= is not given)."""

    name = "zip"
    entry = Param(String(), key="zip-entry",
                  help="The member to serve, as `unzip -l` lists it. Without it every file is an export "
                       "selected by the client's export name")
    zip_write = Param(Bool(), default=False,
                      help="Allow writes to stored (uncompressed) members; their CRC-32 in the archive goes stale")

    def config_complete(self) -> None:
        if self.zip_write:
            log.warning("zip: zip-write=true: writes change members without updating their CRC-32, "
                        "so unzip will report the written members as corrupt")

    def get_ready(self) -> None:
        # Deflate checkpoints are shared by all connections; each reads through its own layer.
        self.indexes: dict[tuple[str, int], DeflateIndex] = {}
        self.stored_checks: dict[tuple[str, int], SequentialCrc] = {}
        self.lock = threading.Lock()
        super().get_ready()

    def cleanup(self) -> None:
        for index in self.indexes.values():
            index.close()

    def read_members(self, below: Layer) -> Iterator[Member]:
        directory, raw = read_central_directory(lambda offset, n: read_archive(below, offset, n), below.get_size())
        for entry in parse_central_directory(raw, directory):
            if not entry.is_dir:
                yield Member(entry.name, entry.size, None, entry)

    def check_writable(self, below: Layer, entry: ZipEntry, start: int) -> None:
        """Refuse writes to a member whose recorded extent overlaps the central directory or
        another member: they would destroy what the archive holds outside the member."""

        def read(offset: int, length: int) -> bytes:
            return read_archive(below, offset, length)

        try:
            directory, raw = read_central_directory(read, below.get_size())
            overlap = find_overlap(entry, start, read, parse_central_directory(raw, directory))
        except FormatError as e:
            raise NBDError(errno.EIO, f"zip: {e}") from None
        if overlap is not None:
            raise NBDError(errno.EIO, f"zip: the archive is corrupt: stored member {entry.name!r} (bytes {start} to "
                                      f"{start + entry.size}) overlaps {overlap}; refusing to open it writable "
                                      "(serve with -r to read it)")

    def open_member(self, below: Layer, member: Member, readonly: bool, below_export: str) -> FilterHandle:
        entry: ZipEntry = member.detail
        if entry.encrypted:
            raise NBDError(errno.ENOTSUP, f"zip: {entry.name!r} is encrypted: encrypted members are not supported")
        if entry.method not in (STORED, DEFLATED):
            raise NBDError(errno.ENOTSUP, f"zip: {entry.name!r} is compressed with {entry.method_name}, which this "
                                          "filter cannot read (--filter=archive reads more methods)")
        try:
            start = data_offset(read_archive(below, entry.header_offset, LOCAL.size), entry)
            check_extent(entry, start, below.get_size())
        except FormatError as e:
            raise NBDError(errno.EIO, f"zip: {e}") from None
        if entry.method == STORED:
            stored = replace(member, segments=(Segment(0, entry.size, start),))
            if self.zip_write:  # writes make the recorded CRC stale: nothing to check
                if not readonly:
                    self.check_writable(below, entry, start)
                return SegmentHandle(self, below, stored, writable=True)
            with self.lock:
                check = self.stored_checks.setdefault(
                    (below_export, start), SequentialCrc(entry.name, entry.crc, entry.size))
            return CheckedStoredHandle(self, below, stored, check)

        def read_compressed(offset: int, length: int) -> bytes:
            return read_archive(below, offset, max(0, min(length, start + entry.compressed_size - offset)))

        with self.lock:
            index = self.indexes.get((below_export, start))
            if index is None:
                index = DeflateIndex(read_compressed, start, entry.compressed_size, uncompressed_size=entry.size,
                                     expected_crc=entry.crc, name=f"zip member {entry.name!r}")
                self.indexes[(below_export, start)] = index
        # Deflated members are read-only; reading ahead records checkpoints.
        return SourceHandle(self, below, index, read_compressed, cache_mode=EMULATE)


FILTER = ZipFilter

"""Zip archives: the end of central directory record (zip64 too), the central directory, local headers.

Sans-IO: functions over bytes, plus `read_central_directory(read, size)` that asks `read(offset, n)`
for the few ranges it needs.  Sizes and offsets come from the central directory: local headers
may hold zeroes (bsdtar, streaming writers put the real values in a data descriptor).
Reference: PKWARE APPNOTE.TXT 6.3.x, sections 4.3.6 (local header), 4.3.12 (central directory),
4.3.14-4.3.16 (zip64 end records), 4.5.3 (zip64 extra field), 4.6.9 (Info-ZIP Unicode Path).
"""

from __future__ import annotations

import bisect
import struct
import zlib
from dataclasses import dataclass, replace
from typing import Iterator

from .deflate_index import DEFLATE_MAX_RATIO
from .errors import FormatError, check_size
from .readers import Reader

EOCD = struct.Struct("<4sHHHHIIH")  # signature, disk, cd disk, entries here, entries, cd size, cd offset, comment
EOCD_SIGNATURE = b"PK\x05\x06"
ZIP64_LOCATOR = struct.Struct("<4sIQI")  # signature, disk of zip64 record, its offset, disks
ZIP64_LOCATOR_SIGNATURE = b"PK\x06\x07"
ZIP64_EOCD = struct.Struct("<4sQHHIIQQQQ")  # ..., disk, cd disk, entries here, entries, cd size, cd offset
ZIP64_EOCD_SIGNATURE = b"PK\x06\x06"
CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")
CENTRAL_SIGNATURE = b"PK\x01\x02"
LOCAL = struct.Struct("<4sHHHHHIIIHH")
LOCAL_SIGNATURE = b"PK\x03\x04"
MAX_COMMENT = 0xFFFF

FLAG_ENCRYPTED = 1 << 0
FLAG_STRONG_ENCRYPTION = 1 << 6  # APPNOTE 4.4.4: PKWARE's strong encryption (bit 0 must be set too)
FLAG_UTF8 = 1 << 11
STORED, DEFLATED = 0, 8
METHOD_NAMES = {1: "shrink", 6: "implode", 9: "deflate64", 12: "bzip2", 14: "LZMA", 93: "zstd",
                95: "xz", 96: "JPEG", 97: "WavPack", 98: "PPMd", 99: "AES encryption"}
EXTRA_ZIP64 = 0x0001
EXTRA_UNICODE_PATH = 0x7075


class ZipError(FormatError):
    """Not a zip archive, or a corrupt or unsupported one."""


@dataclass(frozen=True)
class ZipEntry:
    name: str
    flags: int
    method: int
    crc: int
    compressed_size: int
    size: int
    header_offset: int  # absolute offset of the local header in the data we were given
    # Where the next local header (by offset) or the central directory starts: the member's
    # data must end by then, or it overlaps them (as CPython's zipfile checks: "possible zip bomb").
    limit: int = 0

    @property
    def is_dir(self) -> bool:
        return self.name.endswith("/")

    @property
    def encrypted(self) -> bool:
        return bool(self.flags & (FLAG_ENCRYPTED | FLAG_STRONG_ENCRYPTION)) or self.method == 99

    @property
    def method_name(self) -> str:
        return {STORED: "stored", DEFLATED: "deflate"}.get(self.method) or METHOD_NAMES.get(
            self.method, f"method {self.method}")


@dataclass(frozen=True)
class CentralDirectory:
    offset: int  # absolute, after correcting for data prepended to the archive
    size: int
    entries: int
    prefix: int  # bytes before the archive proper (self-extracting stubs): added to every offset


def find_end_record(tail: bytes, tail_offset: int) -> tuple[int, tuple]:
    """The end of central directory record in the last bytes of the file: (its offset, fields).

    The last record whose comment fits in the file; failing that, the last whole record, its
    comment cut short (unzip warns "zipfile comment truncated" and reads on, as do bsdtar and
    zipfile): the central directory it points to is checked all the same."""
    position, cut_short = len(tail), None
    while (position := tail.rfind(EOCD_SIGNATURE, 0, position)) >= 0:
        if position + EOCD.size <= len(tail):
            fields = EOCD.unpack_from(tail, position)
            if position + EOCD.size + fields[7] <= len(tail):
                return tail_offset + position, fields
            if cut_short is None:
                cut_short = tail_offset + position, fields
    if cut_short is not None:
        return cut_short
    raise ZipError("not a zip archive (no end of central directory record)")


def read_central_directory(read: Reader, archive_size: int) -> tuple[CentralDirectory, bytes]:
    """Locate and read the central directory; returns it and its raw bytes."""
    tail_length = min(archive_size, EOCD.size + MAX_COMMENT + ZIP64_LOCATOR.size)
    tail_offset = archive_size - tail_length
    tail = read(tail_offset, tail_length)
    eocd_offset, (_, disk, cd_disk, _, entries, cd_size, cd_offset, _) = find_end_record(tail, tail_offset)
    cd_end = eocd_offset  # where the central directory (or the zip64 record) should end
    locator_at = eocd_offset - ZIP64_LOCATOR.size - tail_offset
    if locator_at >= 0 and tail[locator_at:locator_at + 4] == ZIP64_LOCATOR_SIGNATURE:
        _, _, record_offset, disks = ZIP64_LOCATOR.unpack_from(tail, locator_at)
        if disks > 1:
            raise ZipError("multi-volume (split) zip archives are not supported")
        # The record normally sits right before the locator; its stored offset ignores any prefix.
        expected = eocd_offset - ZIP64_LOCATOR.size - ZIP64_EOCD.size
        for candidate in dict.fromkeys((record_offset, expected)):
            if 0 <= candidate <= archive_size - ZIP64_EOCD.size:
                record = read(candidate, ZIP64_EOCD.size)
                if record[:4] == ZIP64_EOCD_SIGNATURE:
                    (_, _, _, _, disk, cd_disk, _, entries, cd_size, cd_offset) = ZIP64_EOCD.unpack(record)
                    cd_end = candidate
                    break
        else:
            raise ZipError("zip64 end of central directory record not found")
    if disk != 0 or cd_disk != 0:
        raise ZipError("multi-volume (split) zip archives are not supported")
    prefix = cd_end - cd_size - cd_offset
    if prefix < 0:
        raise ZipError("corrupt zip archive: the central directory does not fit before its end record")
    directory = CentralDirectory(cd_offset + prefix, cd_size, entries, prefix)
    return directory, read(directory.offset, cd_size)


def _extra_fields(extra: bytes) -> Iterator[tuple[int, bytes]]:
    """(tag, body) of each field of an extra area: a 2-byte tag, a 2-byte length, the body."""
    position = 0
    while position + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, position)
        yield tag, extra[position + 4:position + 4 + length]
        position += 4 + length


def _zip64_extra(extra: bytes, size: int, compressed: int, offset: int) -> tuple[int, int, int]:
    """Replace the 0xFFFFFFFF fields by the zip64 extra field's values (present in this order)."""
    for tag, body in _extra_fields(extra):
        if tag == EXTRA_ZIP64:
            values = [v for (v,) in struct.iter_unpack("<Q", body[:len(body) // 8 * 8])]
            wanted = [size == 0xFFFFFFFF, compressed == 0xFFFFFFFF, offset == 0xFFFFFFFF]
            if len(values) < sum(wanted):
                raise ZipError("corrupt zip64 extra field")
            it = iter(values)
            size = next(it) if wanted[0] else size
            compressed = next(it) if wanted[1] else compressed
            offset = next(it) if wanted[2] else offset
            return size, compressed, offset
    if 0xFFFFFFFF in (size, compressed, offset):
        raise ZipError("a size or offset is 0xFFFFFFFF but the zip64 extra field is missing")
    return size, compressed, offset


def _unicode_path(extra: bytes, raw_name: bytes) -> str | None:
    """Info-ZIP Unicode Path: a UTF-8 name, valid while the CRC of the header name matches."""
    for tag, body in _extra_fields(extra):
        if tag == EXTRA_UNICODE_PATH and len(body) >= 5 and body[0] == 1:
            if struct.unpack_from("<I", body, 1)[0] == zlib.crc32(raw_name):
                return body[5:].decode("utf-8", "replace")
    return None


def decode_name(raw: bytes, flags: int) -> str:
    """UTF-8 when flagged (APPNOTE 4.4.4 bit 11) and, in practice, whenever the name is valid
    UTF-8 (Info-ZIP stores UTF-8 names unflagged); CP437 otherwise."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("utf-8" if flags & FLAG_UTF8 else "cp437", "replace")


def parse_central_directory(data: bytes, directory: CentralDirectory) -> list[ZipEntry]:
    entries = []
    position = 0
    while position + CENTRAL.size <= len(data):
        fields = CENTRAL.unpack_from(data, position)
        if fields[0] != CENTRAL_SIGNATURE:
            raise ZipError(f"corrupt central directory at offset {directory.offset + position}")
        (_, _, _, flags, method, _, _, crc, compressed, size, name_length, extra_length,
         comment_length, disk, _, _, offset) = fields
        name_start = position + CENTRAL.size
        extra_start = name_start + name_length
        end = extra_start + extra_length + comment_length
        if end > len(data):
            raise ZipError(f"corrupt central directory: entry at offset {directory.offset + position} "
                           "runs past its end")
        raw_name = data[name_start:extra_start]
        extra = data[extra_start:extra_start + extra_length]
        size, compressed, offset = _zip64_extra(extra, size, compressed, offset)
        name = _unicode_path(extra, raw_name) or decode_name(raw_name, flags)
        entries.append(ZipEntry(name, flags, method, crc, compressed, size, offset + directory.prefix))
        position = end
    if position != len(data):
        raise ZipError(f"corrupt central directory: {len(data) - position} stray bytes at its end")
    following = sorted({entry.header_offset for entry in entries} | {directory.offset})
    return [replace(entry, limit=following[bisect.bisect_right(following, entry.header_offset)])
            if entry.header_offset < directory.offset else replace(entry, limit=directory.offset)
            for entry in entries]


def data_offset(local_header: bytes, entry: ZipEntry) -> int:
    """Where the member's data starts, from the first LOCAL.size bytes of its local header."""
    if len(local_header) < LOCAL.size or local_header[:4] != LOCAL_SIGNATURE:
        raise ZipError(f"{entry.name}: no local header at offset {entry.header_offset}")
    name_length, extra_length = LOCAL.unpack_from(local_header)[9:11]
    return entry.header_offset + LOCAL.size + name_length + extra_length


def check_extent(entry: ZipEntry, start: int, archive_size: int) -> None:
    """ZipError unless the member's sizes are possible: its data (from `start`) inside the
    archive and before what follows it, a stored member as long as its data, a deflated one no
    more than deflate can expand it, and no size beyond 2^63-1 (zip64 fields go to 2^64-1)."""
    if start + entry.compressed_size > archive_size:
        raise ZipError(f"truncated archive: {entry.name!r} ends at {start + entry.compressed_size}, "
                       f"the archive at {archive_size}")
    if start + entry.compressed_size > entry.limit:
        raise ZipError(f"corrupt archive: the data of {entry.name!r} (bytes {start} to {start + entry.compressed_size}) "
                       f"runs past byte {entry.limit}, where the next member or the central directory starts "
                       "(overlapping members: a possible zip bomb)")
    check_size(entry.size, f"{entry.name!r}: the uncompressed size", error=ZipError)
    if entry.method == STORED and entry.compressed_size != entry.size:
        raise ZipError(f"corrupt archive: stored member {entry.name!r} has {entry.compressed_size} bytes "
                       f"stored for {entry.size}")
    if entry.method == DEFLATED and entry.size > entry.compressed_size * DEFLATE_MAX_RATIO:
        raise ZipError(f"corrupt archive: {entry.name!r} claims {entry.size} bytes, more than its "
                       f"{entry.compressed_size} deflated bytes can hold (deflate expands at most 1032 times)")


def find_overlap(target: ZipEntry, start: int, read: Reader, entries: list[ZipEntry]) -> str | None:
    """Which other member's local header or data (their headers read through `read`) a member's
    extent, `start` to `start + size`, overlaps (check_extent has kept it before the next
    header and the central directory).  None when none: only then may writes to the member
    leave the archive otherwise intact."""
    end = start + target.compressed_size
    for other in entries:
        if other == target:
            continue
        other_end = data_offset(read(other.header_offset, LOCAL.size), other) + other.compressed_size
        if other.header_offset < end and start < other_end:
            return f"member {other.name!r} (bytes {other.header_offset} to {other_end})"
    return None

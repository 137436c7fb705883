"""Tar archive headers: v7, ustar, GNU (long names, old sparse) and pax (incl. GNU sparse 0.0/0.1/1.0).

Sans-IO: `walk(read, archive_size)` yields one `TarEntry` per member, asking `read(offset, n)`
for exactly the header and metadata bytes it needs (never member data, except the map that
opens a GNU sparse 1.0 member).  Anything malformed raises `TarError` with the offset.

References: POSIX pax (IEEE 1003.1-2017, "pax - Interchange Format"), GNU tar manual
"Basic Tar Format" and "Storing Sparse Files".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

from .errors import FormatError, check_size
from .readers import Reader

BLOCK = 512
# Long names, pax headers and sparse maps are metadata: refuse absurd sizes instead of reading them.
METADATA_LIMIT = 16 << 20

# Header field positions (name, start, end) common to all formats.
NAME = (0, 100)
SIZE = (124, 136)
CHECKSUM = (148, 156)
TYPEFLAG = 156
LINKNAME = (157, 257)
MAGIC = (257, 265)
PREFIX = (345, 500)  # POSIX ustar only
# Old GNU header: 4 sparse entries of (offset[12], numbytes[12]) at 386, isextended at 482,
# realsize at 483.  Extension blocks hold 21 entries and their isextended flag at 504.
GNU_SPARSE = 386
GNU_IS_EXTENDED = 482
GNU_REALSIZE = (483, 495)

USTAR_MAGIC = b"ustar\x0000"
GNU_MAGIC = b"ustar  \x00"

REGULAR_TYPES = {b"0", b"\x00", b"7"}  # file, old v7 file, contiguous file
# Types whose size field does not announce data (as GNU tar and Python's tarfile read them).
NO_DATA_TYPES = {b"1", b"2", b"3", b"4", b"5", b"6"}


class TarError(FormatError):
    """The archive is not a tar archive, or is corrupt or truncated."""


@dataclass(frozen=True)
class TarEntry:
    name: str
    kind: str  # "file", "hardlink", "symlink", "dir", "other"
    header_offset: int
    data_offset: int  # first byte of the member's stored data
    stored_size: int  # bytes of data stored in the archive (without a sparse 1.0 map)
    size: int  # logical size (the real size of a sparse file)
    linkname: str = ""
    # Sparse files: the (offset, length) data regions in file order; their bytes are stored
    # back to back from data_offset.  None for an ordinary member (one region, stored as is).
    sparse_map: tuple[tuple[int, int], ...] | None = None
    typeflag: str = "0"

    @property
    def next_header(self) -> int:
        return _round_up(self.data_offset + self.stored_size)


def _round_up(n: int) -> int:
    return (n + BLOCK - 1) // BLOCK * BLOCK


def decode_name(raw: bytes) -> str:
    """Names are UTF-8 in pax and in practice; a name that is not valid UTF-8 is read as Latin-1."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _cstring(field: bytes) -> bytes:
    end = field.find(b"\x00")
    return field if end < 0 else field[:end]


def parse_number(field: bytes, where: str = "") -> int:
    """An octal number (NUL/space terminated) or GNU base-256 (first byte 0x80: big-endian binary)."""
    if field and field[0] & 0x80:
        if field[0] == 0xFF:
            raise TarError(f"negative number in {where or 'header'}")
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = _cstring(field).strip(b" \x00")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise TarError(f"bad octal number {text[:20]!r} in {where or 'header'}") from None


def _checksum_ok(block: bytes) -> bool:
    try:
        stored = parse_number(block[CHECKSUM[0]:CHECKSUM[1]], "checksum")
    except TarError:
        return False
    unsigned = sum(block[:148]) + 8 * 0x20 + sum(block[156:])
    # Some old tars summed signed chars.
    signed = unsigned - 256 * sum(1 for b in block[:148] + block[156:] if b & 0x80)
    return stored in (unsigned, signed)


def parse_pax(data: bytes, offset: int = 0) -> list[tuple[str, bytes]]:
    """pax extended header records "%d %s=%s\\n" (the length counts the whole record), in order;
    repeated keywords are kept (GNU sparse 0.0 repeats offset/numbytes)."""
    records: list[tuple[str, bytes]] = []
    position = 0
    while position < len(data):
        if data[position] == 0:  # padding after the last record
            break
        space = data.find(b" ", position, position + 24)
        try:
            length = int(data[position:space]) if space > position else 0
        except ValueError:
            length = 0
        end = position + length
        if length <= 0 or end > len(data) or data[end - 1:end] != b"\n" or b"=" not in data[space:end]:
            raise TarError(f"malformed pax record at offset {offset + position}")
        keyword, _, value = data[space + 1:end - 1].partition(b"=")
        records.append((keyword.decode("utf-8", "replace"), value))
        position = end
    return records


def _sparse_entries(area: bytes, count: int, where: str) -> list[tuple[int, int]]:
    """Up to `count` (offset[12], numbytes[12]) pairs; an empty offset field ends the list."""
    entries = []
    for i in range(count):
        field = area[24 * i:24 * i + 24]
        if not field[:12].strip(b"\x00"):
            break
        entries.append((parse_number(field[:12], where), parse_number(field[12:], where)))
    return entries


def parse_sparse_1_0_map(data: bytes) -> tuple[list[tuple[int, int]], int] | None:
    """The map that opens a GNU sparse 1.0 member's data: decimal numbers one per line (count,
    then offset and size of each region), padded to a block.  Returns the regions and the map's
    size in bytes (whole blocks), or None if `data` ends before the map does."""
    numbers: list[int] = []
    position = 0
    while not numbers or len(numbers) < 1 + 2 * numbers[0]:
        newline = data.find(b"\n", position)
        text = data[position:] if newline < 0 else data[position:newline]
        if text and not text.isdigit():
            raise TarError("malformed GNU sparse 1.0 map")
        if newline < 0:
            return None
        numbers.append(int(text))
        position = newline + 1
    return list(zip(numbers[1::2], numbers[2::2])), _round_up(position)


def _check_sparse_map(regions: list[tuple[int, int]], real_size: int, stored: int, name: str) -> tuple[tuple[int, int], ...]:
    check_size(real_size, f"{name}: the GNU sparse real size", error=TarError)
    regions = [(o, n) for o, n in regions if n > 0]
    end = 0
    for region_offset, length in regions:
        if region_offset < end or region_offset + length > real_size:
            raise TarError(f"{name}: sparse map regions overlap, are out of order, or pass the file size")
        end = region_offset + length
    if sum(n for _, n in regions) != stored:
        raise TarError(f"{name}: sparse map describes {sum(n for _, n in regions)} bytes but the member "
                       f"stores {stored}")
    return tuple(regions)


def walk(read: Reader, archive_size: int) -> Iterator[TarEntry]:
    """Every member of the archive in order.  `read(offset, n)` must return exactly n bytes.

    Stops at the end-of-archive zero block, or at the end of the data if that marker is missing.
    """

    def read_metadata(offset: int, length: int, what: str) -> bytes:
        if length > METADATA_LIMIT:
            raise TarError(f"{what} at offset {offset} is {length} bytes: too large")
        if offset + length > archive_size:
            raise TarError(f"truncated archive: {what} at offset {offset} runs past the end ({archive_size} bytes)")
        return read(offset, length)

    offset = 0
    long_name: bytes | None = None
    long_link: bytes | None = None
    pax: list[tuple[str, bytes]] = []
    while offset + BLOCK <= archive_size:
        block = read(offset, BLOCK)
        if block.count(0) == BLOCK:
            return
        if not _checksum_ok(block):
            raise TarError(f"bad header checksum at offset {offset}: not a tar archive, or corrupt")
        header_offset = offset
        typeflag = block[TYPEFLAG:TYPEFLAG + 1]
        size = parse_number(block[SIZE[0]:SIZE[1]], f"size field at offset {offset}")
        data_offset = offset + BLOCK

        # Metadata entries describe the next member.
        if typeflag in (b"L", b"K"):
            value = _cstring(read_metadata(data_offset, size, "GNU long name"))
            if typeflag == b"L":
                long_name = value
            else:
                long_link = value
            offset = _round_up(data_offset + size)
            continue
        if typeflag == b"x":
            pax = parse_pax(read_metadata(data_offset, size, "pax header"), data_offset)
            offset = _round_up(data_offset + size)
            continue
        if typeflag in (b"g", b"V"):  # pax global header, GNU volume label: nothing to serve
            offset = _round_up(data_offset + size)
            continue

        magic = block[MAGIC[0]:MAGIC[1]]
        raw_name = _cstring(block[NAME[0]:NAME[1]])
        if magic == USTAR_MAGIC and block[PREFIX[0]] != 0:
            raw_name = _cstring(block[PREFIX[0]:PREFIX[1]]) + b"/" + raw_name
        raw_link = _cstring(block[LINKNAME[0]:LINKNAME[1]])
        if long_name is not None:
            raw_name = long_name
        if long_link is not None:
            raw_link = long_link
        values = dict(pax)  # last value of each keyword wins
        raw_name = values.get("GNU.sparse.name", values.get("path", raw_name))
        raw_link = values.get("linkpath", raw_link)
        if "size" in values:
            try:
                size = int(values["size"])
            except ValueError:
                size = -1
            if size < 0:
                raise TarError(f"bad pax size {values['size'][:20]!r} at offset {offset}")
        name = decode_name(raw_name)

        sparse_map = None
        real_size = size
        if typeflag == b"S" and magic == GNU_MAGIC:
            # Old GNU sparse: map in the header, continued in extension blocks before the data.
            regions = _sparse_entries(block[GNU_SPARSE:GNU_IS_EXTENDED], 4, f"sparse map at {offset}")
            extended = block[GNU_IS_EXTENDED] != 0
            while extended:
                ext = read_metadata(data_offset, BLOCK, "GNU sparse extension block")
                regions += _sparse_entries(ext[:504], 21, f"sparse map at {data_offset}")
                extended = ext[504] != 0
                data_offset += BLOCK
            real_size = parse_number(block[GNU_REALSIZE[0]:GNU_REALSIZE[1]], f"realsize at {offset}")
            sparse_map = _check_sparse_map(regions, real_size, size, name)
        elif "GNU.sparse.major" in values or "GNU.sparse.map" in values or "GNU.sparse.offset" in values:
            sparse_map, real_size, map_bytes = _pax_sparse(pax, values, read_metadata, data_offset, size, name)
            data_offset += map_bytes
            size -= map_bytes

        if data_offset + size > archive_size and typeflag not in NO_DATA_TYPES:
            raise TarError(f"truncated archive: member {name!r} needs {data_offset + size} bytes, "
                           f"the archive has {archive_size}")
        kind = ("file" if typeflag in REGULAR_TYPES or sparse_map is not None else
                "hardlink" if typeflag == b"1" else "symlink" if typeflag == b"2" else
                "dir" if typeflag in (b"5", b"D") else "other")
        stored = 0 if typeflag in NO_DATA_TYPES else size
        entry = TarEntry(name=name, kind=kind, header_offset=header_offset, data_offset=data_offset,
                         stored_size=stored, size=real_size if kind == "file" else stored,
                         linkname=decode_name(raw_link), sparse_map=sparse_map,
                         typeflag=typeflag.decode("latin-1") or "0")
        yield entry
        offset = entry.next_header
        long_name = long_link = None
        pax = []
    if offset < archive_size:
        raise TarError(f"truncated archive: partial header at offset {offset}")


def _pax_sparse(pax: list[tuple[str, bytes]], values: dict[str, bytes],
                read_metadata: Callable[[int, int, str], bytes], data_offset: int, size: int,
                name: str) -> tuple[tuple[tuple[int, int], ...], int, int]:
    """GNU sparse in pax: 0.0 (repeated offset/numbytes), 0.1 (GNU.sparse.map), 1.0 (map in the data).
    Returns (regions, real size, bytes of map before the stored regions)."""
    try:
        real_size = int(values.get("GNU.sparse.realsize", values.get("GNU.sparse.size", b"-1")))
        if values.get("GNU.sparse.major") == b"1":
            if values.get("GNU.sparse.minor", b"0") != b"0":
                raise TarError(f"{name}: GNU sparse format 1.{values['GNU.sparse.minor'].decode(errors='replace')} "
                               "is not supported")
            length = BLOCK
            while (parsed := parse_sparse_1_0_map(read_metadata(data_offset, min(length, size), "GNU sparse map"))) is None:
                if length >= size:
                    raise TarError(f"{name}: GNU sparse map runs past the member's data")
                length *= 2
            regions, map_bytes = parsed
        elif "GNU.sparse.map" in values:
            numbers = [int(n) for n in values["GNU.sparse.map"].split(b",")] if values["GNU.sparse.map"] else []
            if len(numbers) % 2:
                raise TarError(f"{name}: GNU.sparse.map has an odd number of values")
            regions, map_bytes = list(zip(numbers[::2], numbers[1::2])), 0
        else:
            offsets = [int(v) for k, v in pax if k == "GNU.sparse.offset"]
            lengths = [int(v) for k, v in pax if k == "GNU.sparse.numbytes"]
            if len(offsets) != len(lengths):
                raise TarError(f"{name}: GNU sparse 0.0 offsets and sizes do not pair up")
            regions, map_bytes = list(zip(offsets, lengths)), 0
    except ValueError as e:
        if isinstance(e, TarError):
            raise
        raise TarError(f"{name}: malformed GNU sparse header") from None
    if real_size < 0:
        raise TarError(f"{name}: GNU sparse member without a real size")
    if map_bytes > size:
        raise TarError(f"{name}: GNU sparse map is larger than the member")
    return _check_sparse_map(regions, real_size, size - map_bytes, name), real_size, map_bytes

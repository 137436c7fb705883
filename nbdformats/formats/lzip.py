"""The lzip format (lzip manual, "File format"): members located from the end of the file.

    +--+--+--+--+----+----+=============+--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+
    | ID string | VN | DS | LZMA stream | CRC32 |   Data size   |  Member size  |
    +--+--+--+--+----+----+=============+--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+

"ID string (the 'magic' bytes): "LZIP"", "VN (version number): 1", "DS (coded dictionary size)";
the trailer's "Member size ... of the complete member", so the members are found walking back from
the end, without decoding anything.  "The LZMA stream ... is an 'LZMA-302eos' stream": raw LZMA
with lc=3, lp=0, pb=2 ending with an end-of-stream marker, which Python's lzma decodes with
FORMAT_RAW and FILTER_LZMA1.  Trailing data after the last member is allowed ("lzip ... ignores
trailing data"); it is found by searching back for a trailer whose member is valid.
"""

from __future__ import annotations

import lzma
import struct
import zlib
from dataclasses import dataclass

from .errors import FormatError, check_size
from .readers import Reader

MAGIC = b"LZIP"
HEADER = struct.Struct("<4sBB")
TRAILER = struct.Struct("<IQQ")  # CRC32 of the uncompressed data, its size, the member's size
MIN_MEMBER = HEADER.size + 1 + TRAILER.size  # an empty member still has an LZMA stream's bytes
MAX_TRAILING = 64 << 10  # how far back from the end to look for the last member
# "DS ... Bits 4-0 contain the base 2 logarithm of the base size (12 to 29)" and "bits 7-5 contain
# the numerator of the fraction (0 to 7) to subtract from the base size".
MIN_DICTIONARY, MAX_DICTIONARY = 1 << 12, 1 << 29
# The LZMA range coder cannot emit much more than ~7000 bytes per input byte: an honest member's
# data size is below this multiple of its member size.
MAX_RATIO = 1 << 13


class LzipError(FormatError):
    """A corrupt, truncated or unsupported lzip file: the message says which member and field."""


@dataclass(frozen=True)
class LzipMember:
    number: int
    offset: int  # of its header in the file
    length: int  # the member size
    out: int  # uncompressed offset
    size: int  # its data size
    dictionary: int
    crc: int


def dictionary_size(coded: int, where: str) -> int:
    base = 1 << (coded & 0x1F)
    size = base - (base // 16) * (coded >> 5)
    if not MIN_DICTIONARY <= size <= MAX_DICTIONARY:
        raise LzipError(f"{where}: invalid dictionary size {size} (coded {coded:#x})")
    return size


def locate_members(read: Reader, file_size: int) -> list[LzipMember]:
    """Every member, in file order, found from the trailers."""
    end = _last_member_end(read, file_size)
    found: list[tuple[int, int, int, int, int]] = []  # (offset, length, size, dictionary, crc)
    while end > 0:
        crc, size, length = TRAILER.unpack(_read(read, end - TRAILER.size, TRAILER.size, "a member trailer"))
        where = f"the member ending at {end}"
        if not MIN_MEMBER <= length <= end:
            raise LzipError(f"{where}: its member size {length} does not fit before it (the file is corrupt)")
        magic, version, coded = HEADER.unpack(_read(read, end - length, HEADER.size, "a member header"))
        if magic != MAGIC or version != 1:
            raise LzipError(f"{where}: no lzip version 1 header at offset {end - length}, where its member size "
                            f"{length} says it starts (the file is corrupt)")
        check_size(size, f"{where}: the data size", length * MAX_RATIO, LzipError,
                   f"what {length} compressed bytes can hold")
        found.append((end - length, length, size, dictionary_size(coded, where), crc))
        end -= length
    members, out = [], 0
    for number, (offset, length, size, dictionary, crc) in enumerate(reversed(found)):
        members.append(LzipMember(number, offset, length, out, size, dictionary, crc))
        out += size
    check_size(out, "the uncompressed size", error=LzipError)
    if not members:
        raise LzipError("the file holds no lzip member")
    return members


def _read(read: Reader, offset: int, length: int, what: str) -> bytes:
    data = read(offset, length)
    if len(data) != length:
        raise LzipError(f"truncated file: {what} at offset {offset} needs {length} bytes")
    return data


def _last_member_end(read: Reader, file_size: int) -> int:
    """Where the last member ends: the end of the file, or before trailing data."""
    if file_size < MIN_MEMBER:
        raise LzipError(f"the file has {file_size} bytes, too few for an lzip member")
    window = min(file_size, MAX_TRAILING + TRAILER.size)
    tail = _read(read, file_size - window, window, "the end of the file")
    for end in range(file_size, file_size - window + TRAILER.size - 1, -1):
        length = struct.unpack_from("<Q", tail, end - 8 - (file_size - window))[0]
        if MIN_MEMBER <= length <= end and read(end - length, 5) == MAGIC + b"\x01":
            return end
    raise LzipError("no lzip member ends in the last 64 KiB of the file (not an lzip file, or one whose trailing "
                    "data is too long)")


def member_decoder(member: LzipMember) -> lzma.LZMADecompressor:
    return lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA1, "dict_size": member.dictionary,
                                                            "lc": 3, "lp": 0, "pb": 2}])


def check_member(member: LzipMember, produced: int, crc: int, eof: bool) -> None:
    """The member's data against its trailer: "Data size" and "CRC32 of the original uncompressed data"."""
    if not eof or produced != member.size:
        raise LzipError(f"member {member.number} (offset {member.offset}) decodes to "
                        f"{produced} bytes{'' if eof else ' and is cut short'}, not the {member.size} its trailer says")
    if crc != member.crc:
        raise LzipError(f"member {member.number} (offset {member.offset}): CRC32 {crc:#010x} does not match its "
                        f"trailer's {member.crc:#010x}: the data is corrupt")


def decode_member(member: LzipMember, read: Reader) -> bytes:
    """A whole member's data, checked."""
    stream = _read(read, member.offset + HEADER.size, member.length - HEADER.size - TRAILER.size,
                   f"member {member.number}")
    decoder = member_decoder(member)
    try:
        data = decoder.decompress(stream, member.size + 1)  # a lying stream cannot make us allocate more
    except lzma.LZMAError as e:
        raise LzipError(f"member {member.number} (offset {member.offset}) is corrupt: {e}") from None
    check_member(member, len(data), zlib.crc32(data), decoder.eof)
    return data

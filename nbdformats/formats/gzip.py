"""gzip member headers and BGZF blocks (RFC 1952; SAM/BAM specification section 4.1), sans-IO.

BGZF (bgzip, htslib) is a series of gzip members of at most 64 KiB uncompressed, each with
an extra subfield `BC` holding BSIZE, "total block size minus 1".  Every member starts a new
deflate stream, so each member start is a restart point needing no 32 KiB window, and the
uncompressed offsets follow from each member's ISIZE: the index comes from headers alone.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .deflate_index import DEFLATE_MAX_RATIO
from .errors import FormatError

MAGIC = b"\x1f\x8b"
CM_DEFLATE = 8
FEXTRA = 4
MEMBER_HEADER = 10  # ID1 ID2 CM FLG MTIME(4) XFL OS
BGZF_HEADER = 18  # the fixed header plus XLEN and the 6-byte BC subfield
BGZF_MAX_ISIZE = 65536


class GzipFormatError(FormatError):
    pass


def declared_size(trailer: bytes, compressed_size: int) -> int:
    """ISIZE, the last member's "size of the original input data modulo 2^32", from the last 8
    bytes of a file; GzipFormatError if more than `compressed_size` bytes of deflate could hold."""
    (isize,) = struct.unpack_from("<I", trailer, 4)
    if isize > compressed_size * DEFLATE_MAX_RATIO:
        raise GzipFormatError(f"the gzip trailer's ISIZE {isize} is more than {compressed_size} compressed bytes "
                              "can hold (deflate expands at most 1032 times)")
    return isize


def check_magic(head: bytes) -> None:
    if len(head) < MEMBER_HEADER or head[:2] != MAGIC:
        raise GzipFormatError("not a gzip file (it does not start with 1f 8b)")
    if head[2] != CM_DEFLATE:
        raise GzipFormatError(f"unsupported gzip compression method {head[2]} (only 8, deflate)")


def bgzf_block_size(header: bytes) -> int | None:
    """Total size of the BGZF block starting with `header` (>= 18 bytes), None if not BGZF."""
    if len(header) < 12 or header[:3] != MAGIC + bytes([CM_DEFLATE]) or not header[3] & FEXTRA:
        return None
    (xlen,) = struct.unpack_from("<H", header, 10)
    pos, end = 12, min(12 + xlen, len(header))
    while pos + 4 <= end:
        si1, si2, slen = header[pos], header[pos + 1], struct.unpack_from("<H", header, pos + 2)[0]
        if (si1, si2) == (ord("B"), ord("C")) and slen == 2 and pos + 6 <= end:
            return struct.unpack_from("<H", header, pos + 4)[0] + 1
        pos += 4 + slen
    return None


@dataclass(frozen=True)
class BgzfBlock:
    offset: int  # compressed offset of the member header
    out: int  # uncompressed offset of its first byte
    size: int  # compressed size of the whole member
    isize: int  # uncompressed size


def parse_bgzf(data: bytes, offset: int, out: int) -> tuple[list[BgzfBlock], int, int]:
    """The whole BGZF blocks in `data` (which starts at compressed `offset`, uncompressed `out`).

    Returns (blocks, next offset, next out); parsing stops at a partial block, which the caller
    reads again with the following data.  GzipFormatError if a member is not a BGZF block.
    """
    blocks = []
    pos = 0
    while len(data) - pos >= BGZF_HEADER:
        size = bgzf_block_size(data[pos:pos + BGZF_HEADER + 64])
        if size is None:
            raise GzipFormatError(f"the gzip member at offset {offset + pos} is not a BGZF block")
        if size < BGZF_HEADER + 8:
            raise GzipFormatError(f"BGZF block at offset {offset + pos} has an impossible size {size}")
        if len(data) - pos < size:
            break
        (isize,) = struct.unpack_from("<I", data, pos + size - 4)
        if isize > BGZF_MAX_ISIZE:
            raise GzipFormatError(f"BGZF block at offset {offset + pos} claims {isize} bytes (at most 65536)")
        blocks.append(BgzfBlock(offset + pos, out, size, isize))
        out += isize
        pos += size
    return blocks, offset + pos, out

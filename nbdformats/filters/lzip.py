"""lzip filter: serve the uncompressed contents of an .lz file, read-only, member by member.

As nbdkit's lzip filter (same parameters): the members are found through their trailers from
the end of the file, a read decodes only the members it touches, and the last lzip-max-depth
decoded members are cached.  Files made with `lzip -b 16MiB` or plzip (several members) give
random access; a plain `lzip` file is one member.  Unlike nbdkit, a member larger than
lzip-max-block is not refused: it is decoded on demand into a spill file.  Every member's CRC32
and data size are checked.
"""

from __future__ import annotations

import errno
import logging
import lzma
import zlib

from ..api.chain import Layer
from ..api.errors import NBDError
from ..api.params import Int, Param, Size
from ..formats.lzip import (HEADER, TRAILER, LzipError, LzipMember, check_member, decode_member, locate_members,
                             member_decoder)
from ._decompress import BlockSource, DecompressFilter, Reader, Unit, read_exact

log = logging.getLogger(__name__)

STREAM_CHUNK = 4 << 20  # spill decoding: output per step, compressed bytes read per step


class MemberStream:
    """A ChunkDecoder for one (large) member: decodes it a few MiB at a time, checked at the end."""

    def __init__(self, member: LzipMember) -> None:
        self.member = member
        self.decoder = member_decoder(member)
        self.position = member.offset + HEADER.size
        self.end = member.offset + member.length - TRAILER.size
        self.produced = 0
        self.crc = 0

    def read(self, reader: Reader) -> bytes:
        while not self.decoder.eof:
            data = b""
            if self.decoder.needs_input and self.position < self.end:
                n = min(STREAM_CHUNK, self.end - self.position)
                data = read_exact(reader, self.position, n, f"lzip member {self.member.number}")
                self.position += n
            elif self.decoder.needs_input:
                break  # the stream ends before its end-of-stream marker: check_member says so
            try:
                out = self.decoder.decompress(data, STREAM_CHUNK)
            except lzma.LZMAError as e:
                raise NBDError(errno.EIO, f"lzip member {self.member.number} is corrupt: {e}") from None
            if out:
                self.produced += len(out)
                self.crc = zlib.crc32(out, self.crc)
                if self.produced > self.member.size:
                    break
                return out
        try:
            check_member(self.member, self.produced, self.crc, self.decoder.eof)
        except LzipError as e:
            raise NBDError(errno.EIO, f"lzip: {e}") from None
        return b""


class LzipFilter(DecompressFilter):
    """Serve an lzip-compressed disk image read-only, with random access by lzip member."""

    name = "lzip"
    lzip_max_block = Param(Size(minimum=1), key="lzip-max-block", default=512 << 20,
                           help="Members up to this size are decoded whole and cached; larger ones are "
                                "decoded on demand into a spill file (nbdkit refuses them)")
    lzip_max_depth = Param(Int(minimum=1), key="lzip-max-depth", default=8,
                           help="How many decoded members to keep in the cache")

    def load(self, below: Layer, reader: Reader) -> BlockSource:
        members = locate_members(reader, below.get_size())
        log.info("lzip: %d members, %d bytes, largest member %d bytes", len(members), sum(m.size for m in members),
                 max(m.size for m in members))
        if len(members) == 1 and members[0].size > 64 << 20:
            log.info("lzip: a single member: a read needs everything before it decoded (make random access "
                     "files with lzip -b 16MiB or plzip)")
        by_number = {m.number: m for m in members}
        units = [Unit(m.out, m.size, m.offset, m.length, m.number) for m in members]
        return BlockSource(self.name, units, lambda unit, read: decode_member(by_number[unit.number], read),
                           lambda unit: MemberStream(by_number[unit.number]), self.lzip_max_block,
                           self.lzip_max_depth, "member")


FILTER = LzipFilter

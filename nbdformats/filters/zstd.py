"""zstd filter: serve the uncompressed contents of a Zstandard file, read-only.

Random access comes from frames, each decodable on its own: the seek table of the seekable
format (zstd contrib/seekable_format; written by t2sz, zstd_seekable, python seekable-zstd)
or, without one, a walk over the frames' block headers (pzstd writes one frame per chunk).
The last zstd-max-depth decoded frames are cached.  A single-frame file (plain `zstd`) has no
random access: it is decoded on demand into a spill file, so the start answers at once and
later reads of decoded ranges come from the spill.  nbdkit has no zstd filter.
"""

from __future__ import annotations

import errno
import io
import logging
from typing import IO, cast

import zstandard

from ..api.chain import Layer
from ..api.errors import NBDError
from ..api.params import Int, Param, Size
from ..formats.zstd import (SEEK_FOOTER, Frame, ZstdFormatError, check_frames, parse_seek_table,
                            parse_seek_table_footer, seek_table_size, walk_frames)
from ..formats.readers import WindowedReader
from ._decompress import BlockSource, DecompressFilter, Reader, Source, Unit, read_exact
from ._spill import InOrder, Spill

import xxhash

log = logging.getLogger(__name__)

CHUNK = 4 << 20


class _FrameInput(io.RawIOBase):
    """The compressed bytes of one frame as a file for zstandard's stream_reader."""

    def __init__(self, offset: int, length: int) -> None:
        self.position, self.end = offset, offset + length
        self.reader: Reader | None = None

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        assert self.reader is not None
        n = self.end - self.position if size < 0 else min(size, self.end - self.position)
        if n <= 0:
            return b""
        data = self.reader(self.position, n)
        if not data:
            raise NBDError(errno.EIO, f"zstd data truncated at offset {self.position}")
        self.position += len(data)
        return data


class FrameStream:
    """A ChunkDecoder over one frame (or all frames from `offset` when they are one unit)."""

    def __init__(self, offset: int, length: int) -> None:
        self.input = _FrameInput(offset, length)
        # _FrameInput has the one method stream_reader calls: read(n).
        self.stream = zstandard.ZstdDecompressor().stream_reader(cast(IO[bytes], self.input), read_size=1 << 20,
                                                                 read_across_frames=True)

    def read(self, reader: Reader) -> bytes:
        self.input.reader = reader
        try:
            return self.stream.read(CHUNK)
        except zstandard.ZstdError as e:
            raise NBDError(errno.EIO, f"corrupt zstd data: {e}") from None
        finally:
            self.input.reader = None


def decode_frame(unit: Unit, reader: Reader, checksum: int | None = None) -> bytes:
    data = read_exact(reader, unit.offset, unit.length, f"zstd frame {unit.number}")
    try:
        # The whole frame or an error ("did not decompress full frame": a stream reader would
        # return a cut frame's output as if complete); at most one byte more than declared, so
        # a lying frame cannot make us allocate more.
        out = zstandard.ZstdDecompressor().decompress(data, max_output_size=unit.size + 1)
    except zstandard.ZstdError as e:
        raise NBDError(errno.EIO, f"zstd frame {unit.number} (compressed offset {unit.offset}) "
                                  f"is corrupt: {e}") from None
    if checksum is not None and xxhash.xxh64_intdigest(out) & 0xFFFFFFFF != checksum:
        raise NBDError(errno.EIO, f"zstd frame {unit.number}: checksum mismatch with the seek table")
    return out


def count_output(stream: FrameStream, reader: Reader, limit: int | None) -> int:
    """Decode to the end, counting bytes (frames that do not declare their size)."""
    total = 0
    while chunk := stream.read(reader):
        total += len(chunk)
        if limit is not None and total > limit:
            raise NBDError(errno.EFBIG, f"zstd data decompresses to more than max-size={limit}")
    return total


class ZstdFilter(DecompressFilter):
    """Serve a zstd-compressed disk image read-only (random access by frame: seekable, multi-frame)."""

    name = "zstd"
    zstd_max_frame = Param(Size(minimum=1), key="zstd-max-frame", default=512 << 20,
                           help="Frames up to this size are decoded whole and cached; larger ones "
                                "are decoded on demand into a spill file")
    zstd_max_depth = Param(Int(minimum=1), key="zstd-max-depth", default=8,
                           help="How many decoded frames to keep in the cache")

    def load(self, below: Layer, reader: Reader) -> Source:
        size = below.get_size()
        checksums: dict[int, int | None] = {}
        units = self._seek_table(reader, size, checksums)
        if units is None:
            units = self._walk(WindowedReader(reader, size, 1 << 20), size, reader)  # headers
        if len(units) == 1:
            return self._single_frame(units[0], reader)
        log.info("zstd: %d frames, %d bytes", len(units), sum(u.size for u in units))
        return BlockSource(self.name, units,
                           lambda unit, read: decode_frame(unit, read, checksums.get(unit.number)),
                           lambda unit: FrameStream(unit.offset, unit.length),
                           self.zstd_max_frame, self.zstd_max_depth, "frame")

    def _seek_table(self, reader: Reader, size: int, checksums: dict[int, int | None]) -> list[Unit] | None:
        if size < SEEK_FOOTER + 8:
            return None
        found = parse_seek_table_footer(reader(size - SEEK_FOOTER, SEEK_FOOTER))
        if found is None:
            return None
        count, has_checksums = found
        table_size = seek_table_size(count, has_checksums)
        if table_size > size:
            raise ZstdFormatError("the zstd seek table is larger than the file")
        entries = parse_seek_table(reader(size - table_size, table_size), count, has_checksums)
        units, offset, out = [], 0, 0
        for number, entry in enumerate(entries):
            units.append(Unit(out, entry.decompressed, offset, entry.compressed, number))
            offset += entry.compressed
            out += entry.decompressed
        if offset != size - table_size:
            raise ZstdFormatError(f"the zstd seek table covers {offset} compressed bytes, "
                                  f"the frames take {size - table_size}")
        declared = check_frames(reader, entries)
        for unit, sized in zip(units, declared):
            # An empty entry is left out of the disk: unless its frame says so, make sure it is empty.
            if not unit.size and not sized and FrameStream(unit.offset, unit.length).read(reader):
                raise ZstdFormatError(f"zstd seek table entry {unit.number} says 0 bytes, its frame holds more")
        checksums.update((number, entry.checksum) for number, entry in enumerate(entries))
        units = [u for u in units if u.size]
        log.info("zstd: seekable format: %d frames", len(units))
        return units

    def _walk(self, read: Reader, size: int, reader: Reader) -> list[Unit]:
        frames: list[Frame] = walk_frames(read, size)
        if not frames:
            raise ZstdFormatError("no zstd frame in the file")
        undeclared = sum(frame.content_size is None for frame in frames)
        if undeclared and len(frames) > 1:
            log.info("zstd: %d of %d frames do not declare their size (pzstd, streams): decoding "
                     "them now to count", undeclared, len(frames))
        units, out = [], 0
        for number, frame in enumerate(frames):
            frame_size = frame.content_size
            if frame_size is None and len(frames) > 1:
                limit = None if self.max_size is None else self.max_size - out
                frame_size = count_output(FrameStream(frame.offset, frame.length), reader, limit)
            units.append(Unit(out, frame_size if frame_size is not None else -1, frame.offset,
                              frame.length, number))
            out += frame_size or 0
        return [u for u in units if u.size]

    def _single_frame(self, unit: Unit, reader: Reader) -> Spill:
        log.info("zstd: a single frame: no random access; decoding it into a spill file as reads "
                 "need it (compress with pzstd or in the seekable format for random access)")
        spill = Spill(InOrder(FrameStream(unit.offset, unit.length)), unit.size if unit.size >= 0 else None,
                      "zstd", max_size=self.max_size)
        if unit.size < 0:
            log.info("zstd: the frame does not declare its size: decoding it all now")
            spill.produce_all(reader)
        return spill


FILTER = ZstdFilter

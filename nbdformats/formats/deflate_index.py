"""Random access into a deflate stream (raw, as in zip members, or gzip with several members).

This is zlib's zran.c (examples/zran.c) over ctypes, made lazy and thread-safe.  Python's
zlib module cannot stop at deflate block boundaries nor resume mid-byte, so we call inflate
directly: inflate(Z_BLOCK) stops after each block, `data_type` says how many bits of the last
byte are unused, and inflatePrime + inflateSetDictionary restart there.  The inflate is
zlib-ng's where python-zlib-ng is installed (a dependency: its extension module exports
zlib-ng's zng_* functions), the system zlib's otherwise: three to four times as fast, for the
index pass and for reads (benchmarks/inflaters.py; it was also faster than ISA-L's inflate,
used here before for reads).  Both make the same checkpoints: they stop at the same blocks.

A *checkpoint* is a block boundary every `span` bytes of output with the 32 KiB of output
before it (deflate back-references reach at most 32 KiB back, RFC 1951 section 3.2.5).
Checkpoints are recorded by the *frontier*, one inflate stream that only goes forward: reads
beyond it advance it (recording checkpoints as it goes), reads behind it restart from the
nearest checkpoint, or continue a recently used stream parked where the last read ended, so a
sequential reader pays for each byte once.

API (the module is a helper, not a filter: it defines no FILTER)::

    index = DeflateIndex(read_compressed, start, compressed_size,
                         uncompressed_size=None, raw=True, span=4 << 20, max_size=None,
                         expected_crc=None, name="deflate stream")
    index.read_into(buf, offset)     # fill memoryview buf with output bytes [offset, offset+len)
    index.build(progress)            # decode to the end; returns the total size
    index.read_into(buf, offset, read_compressed=other)   # this call reads through `other`
    index.size                       # the total size, or None until known
    index.to_bytes() / DeflateIndex.from_bytes(blob, read_compressed, ...)  # persistence

`read_compressed(offset, length) -> bytes` reads the compressed bytes at absolute `offset`
(a short read means end of data).  An index shared by several connections should be given
each connection's own reader per call (read_into/build's `read_compressed=`), as a connection's
layer is closed when it ends.  `raw=True` is a bare deflate stream (zip "deflated",
method 8); `raw=False` is gzip (RFC 1952): members follow each other, each one's CRC-32 and
ISIZE are checked while the frontier decodes it, zero padding after the last member is ignored.
For a raw stream, `expected_crc` (a zip member's CRC-32) is checked the same way: when the
frontier reaches the end, and from then on every read fails if it did not match.
Corrupt or truncated data raises DeflateError, output beyond `uncompressed_size` or
`max_size` OutputLimitError, each with a message naming the offset; every method is thread-safe.
"""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import logging
import struct
import threading
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import FormatError, OutputLimitError
from .readers import Reader

log = logging.getLogger(__name__)

WINDOW = 32 * 1024  # deflate's maximum back-reference distance
RING = 256 * 1024  # output ring: the last WINDOW bytes are the next checkpoint's window
IN_CHUNK = 256 * 1024  # compressed bytes fed to inflate at a time
DEFAULT_SPAN = 4 * 1024 * 1024
# zlib's "technical details": deflate expands at most 1032 times (a 258-byte match in 2 bits),
# so a declared size beyond 1032 times the compressed size is a lie.
DEFLATE_MAX_RATIO = 1032
PARKED_STREAMS = 4  # streams kept where a read ended, for the next sequential read
# A connection served by two threads takes its sequential requests out of order now and then: the
# later one continues the parked stream over the earlier one's range.  That range (up to GAP_KEPT
# bytes) is kept for the earlier request, which otherwise restarted from a checkpoint: measured,
# one nbdcopy in three re-decoded up to half the image that way.  The last KEPT_GAPS are kept.
GAP_KEPT = 1 << 20
KEPT_GAPS = 8

Z_OK, Z_STREAM_END, Z_NEED_DICT, Z_BUF_ERROR = 0, 1, 2, -5
Z_BLOCK = 5
RAW_BITS = -15  # windowBits for a bare deflate stream
GZIP_BITS = 15 + 16  # windowBits for a gzip member (header and trailer checked by zlib)
GZIP_MAGIC = b"\x1f\x8b"


class DeflateError(FormatError):
    """The compressed data is corrupt or truncated, or its CRC-32 does not match."""


class _ZStream(ctypes.Structure):
    """zlib's z_stream."""
    _fields_ = [
        ("next_in", ctypes.c_void_p), ("avail_in", ctypes.c_uint), ("total_in", ctypes.c_ulong),
        ("next_out", ctypes.c_void_p), ("avail_out", ctypes.c_uint), ("total_out", ctypes.c_ulong),
        ("msg", ctypes.c_char_p), ("state", ctypes.c_void_p),
        ("zalloc", ctypes.c_void_p), ("zfree", ctypes.c_void_p), ("opaque", ctypes.c_void_p),
        ("data_type", ctypes.c_int), ("adler", ctypes.c_ulong), ("reserved", ctypes.c_ulong),
    ]


class _ZngStream(ctypes.Structure):
    """zlib-ng's native zng_stream (zlib-ng.h): 32-bit counts, size_t totals, a 32-bit adler."""
    _fields_ = [
        ("next_in", ctypes.c_void_p), ("avail_in", ctypes.c_uint32), ("total_in", ctypes.c_size_t),
        ("next_out", ctypes.c_void_p), ("avail_out", ctypes.c_uint32), ("total_out", ctypes.c_size_t),
        ("msg", ctypes.c_char_p), ("state", ctypes.c_void_p),
        ("zalloc", ctypes.c_void_p), ("zfree", ctypes.c_void_p), ("opaque", ctypes.c_void_p),
        ("data_type", ctypes.c_int), ("adler", ctypes.c_uint32), ("reserved", ctypes.c_ulong),
    ]


class _Inflater:
    """One library's inflate functions, its stream type and version string."""

    def __init__(self, name: str, lib: ctypes.CDLL, prefix: str, stream_type: type[ctypes.Structure],
                 version: bytes) -> None:
        self.name = name
        self.stream_type = stream_type
        self.version = version
        stream_p = ctypes.POINTER(stream_type)
        signatures: dict[str, list[Any]] = {
            "inflateInit2_": [stream_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int],
            "inflateReset2": [stream_p, ctypes.c_int],
            "inflate": [stream_p, ctypes.c_int],
            "inflateEnd": [stream_p],
            "inflatePrime": [stream_p, ctypes.c_int, ctypes.c_int],
            "inflateSetDictionary": [stream_p, ctypes.c_char_p, ctypes.c_uint],
        }
        for function, argtypes in signatures.items():
            f = getattr(lib, prefix + function)
            f.argtypes = argtypes
            setattr(self, function, f)

    inflateInit2_: Any
    inflateReset2: Any
    inflate: Any
    inflateEnd: Any
    inflatePrime: Any
    inflateSetDictionary: Any


def _system_zlib() -> _Inflater:
    lib = ctypes.CDLL(ctypes.util.find_library("z") or "libz.so.1")
    lib.zlibVersion.restype = ctypes.c_char_p
    return _Inflater("zlib", lib, "", _ZStream, lib.zlibVersion())


def _zlib_ng() -> _Inflater | None:
    """zlib-ng's inflate from python-zlib-ng's extension module, if it is installed, exports the
    zng_* functions and inflates a known sample right; None otherwise."""
    try:
        from zlib_ng import zlib_ng
        lib = ctypes.CDLL(zlib_ng.__file__)
        lib.zlibng_version.restype = ctypes.c_char_p
        inflater = _Inflater("zlib-ng", lib, "zng_", _ZngStream, lib.zlibng_version())
    except (ImportError, OSError, AttributeError):
        return None
    sample = b"nbdformats checks zlib-ng's stream layout " * 50
    packed = zlib.compress(sample)
    strm = _ZngStream()
    if inflater.inflateInit2_(ctypes.byref(strm), 15, inflater.version, ctypes.sizeof(_ZngStream)) != Z_OK:
        return None
    source = ctypes.create_string_buffer(packed, len(packed))
    target = ctypes.create_string_buffer(len(sample))
    strm.next_in, strm.avail_in = ctypes.addressof(source), len(packed)
    strm.next_out, strm.avail_out = ctypes.addressof(target), len(sample)
    ended = inflater.inflate(ctypes.byref(strm), 0) == Z_STREAM_END
    inflater.inflateEnd(ctypes.byref(strm))
    return inflater if ended and target.raw == sample else None


SYSTEM_ZLIB = _system_zlib()
ZLIB_NG = _zlib_ng()
INFLATER = ZLIB_NG or SYSTEM_ZLIB  # what new streams use (tests switch it)
try:
    from zlib_ng.zlib_ng import crc32 as _crc32  # carry-less multiply: several times zlib's speed
except ImportError:
    _crc32 = zlib.crc32


@dataclass(frozen=True)
class Checkpoint:
    """Where decoding can restart: output offset `out`, next compressed byte `in_`.

    `header=True`: a gzip member header starts at `in_` (no window needed).  Otherwise a
    deflate block starts `bits` bits before `in_` (the high bits of byte `in_ - 1`, whose
    value shifted down is `prime`), with `window` the output just before `out`.
    """

    out: int
    in_: int
    bits: int = 0
    prime: int = 0
    header: bool = False
    window: bytes = b""


class _Stream:
    """One inflate stream: output offset `out`, next compressed byte at `in_pos - avail_in`."""

    def __init__(self, index: "DeflateIndex", point: Checkpoint) -> None:
        self.index = index
        self.reader = index.read_compressed  # replaced per call by the caller's reader
        self.z = z = INFLATER  # a stream stays with the library that made it
        self.strm = z.stream_type()
        self.ring = bytearray(RING)
        self.ring_view = memoryview(self.ring)
        self.ring_addr = ctypes.addressof((ctypes.c_char * RING).from_buffer(self.ring))
        self.ring_pos = 0
        self.ring_filled = 0  # valid bytes in the ring (up to RING)
        self.out = point.out
        self.in_pos = point.in_
        self.in_buf: bytes | None = None
        self.finished = False
        self.raw_member = not point.header  # inside a member entered mid-stream (raw inflate)
        # CRC-32 of everything decoded, when it covers the whole stream and one is expected.
        self.crc: int | None = 0 if index.expected_crc is not None and point.out == 0 else None
        bits = GZIP_BITS if point.header else RAW_BITS
        if z.inflateInit2_(ctypes.byref(self.strm), bits, z.version, ctypes.sizeof(z.stream_type)) != Z_OK:
            raise MemoryError(f"{z.name} inflateInit2 failed")
        self.alive = True
        if point.bits:
            z.inflatePrime(ctypes.byref(self.strm), point.bits, point.prime)
        if point.window:
            z.inflateSetDictionary(ctypes.byref(self.strm), point.window, len(point.window))
            # Keep the window in the ring so a checkpoint recorded soon after has its 32 KiB.
            self.ring[:len(point.window)] = point.window
            self.ring_pos = self.ring_filled = len(point.window)

    def close(self) -> None:
        if self.alive:
            self.z.inflateEnd(ctypes.byref(self.strm))
            self.alive = False

    def __del__(self) -> None:
        self.close()

    @property
    def next_in_offset(self) -> int:
        return self.in_pos - self.strm.avail_in

    def _feed(self, offset: int) -> bool:
        """Point the stream's input at compressed `offset`; False at the end of the data."""
        index = self.index
        length = min(IN_CHUNK, index.start + index.compressed_size - offset)
        data = self.reader(offset, length) if length > 0 else b""
        if not data:
            return False
        if not isinstance(data, bytes):
            data = bytes(data)
        self.in_buf = data  # kept alive while inflate reads it: next_in points into it (no copy)
        self.strm.next_in = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value
        self.strm.avail_in = len(data)
        self.in_pos = offset + len(data)
        return True

    def _skip_input(self, count: int) -> None:
        """Consume `count` input bytes without inflating them (a gzip member trailer)."""
        target = self.next_in_offset + count
        if count <= self.strm.avail_in:
            self.strm.next_in += count
            self.strm.avail_in -= count
        else:
            self.strm.avail_in = 0
            self.in_pos = target

    def _peek(self, count: int) -> bytes:
        offset = self.next_in_offset
        limit = self.index.start + self.index.compressed_size
        return self.reader(offset, min(count, limit - offset)) if offset < limit else b""

    def _member_ended(self) -> None:
        """After Z_STREAM_END: finish, or go on with the next gzip member."""
        if self.index.raw:
            self.finished = True
            return
        if self.raw_member:
            self._skip_input(8)  # CRC32 and ISIZE, checked only by the frontier (gzip mode)
        following = self._peek(2)
        if following == GZIP_MAGIC:
            self.z.inflateReset2(ctypes.byref(self.strm), GZIP_BITS)
            self.raw_member = False
            return
        self.finished = True
        if following.strip(b"\0"):
            log.warning("ignoring trailing garbage after the last gzip member at offset %d",
                        self.next_in_offset)

    def window(self) -> bytes:
        """The last WINDOW output bytes (fewer at the very start)."""
        n = min(WINDOW, self.ring_filled)
        start = self.ring_pos - n
        if start >= 0:
            return bytes(self.ring_view[start:self.ring_pos])
        return bytes(self.ring_view[start:]) + bytes(self.ring_view[:self.ring_pos])

    def run(self, end: int, buf: memoryview | None, buf_offset: int,
            record: Callable[["_Stream"], None] | None) -> None:
        """Inflate until output offset `end` (or the end of the stream when `end` is None-like:
        pass a huge value).  Output in [buf_offset, buf_offset + len(buf)) is copied into buf;
        `record` is called at each block boundary (the frontier records checkpoints)."""
        strm = self.strm
        strm_ref = ctypes.byref(strm)
        inflate = self.z.inflate
        index = self.index
        buf_end = buf_offset + len(buf) if buf is not None else buf_offset
        stalled = 0  # inflate calls in a row without input left and without output
        while self.out < end and not self.finished:
            # The last bytes may already sit in zlib's bit buffer: inflate once more before
            # calling the data truncated.
            if strm.avail_in == 0 and not self._feed(self.in_pos) and stalled > 1:
                raise DeflateError(f"compressed data truncated at offset {self.in_pos} "
                                   f"(output offset {self.out})")
            if self.ring_pos == RING:
                self.ring_pos = 0
            want = min(RING - self.ring_pos, end - self.out)
            strm.next_out = self.ring_addr + self.ring_pos
            strm.avail_out = want
            ret = inflate(strm_ref, Z_BLOCK)
            produced = want - strm.avail_out
            stalled = 0 if produced or strm.avail_in else stalled + 1
            if produced:
                start, self.out = self.out, self.out + produced
                if buf is not None and self.out > buf_offset and start < buf_end:
                    lo, hi = max(start, buf_offset), min(self.out, buf_end)
                    ring_lo = self.ring_pos + (lo - start)
                    buf[lo - buf_offset:hi - buf_offset] = self.ring_view[ring_lo:ring_lo + hi - lo]
                if record is not None and self.crc is not None:  # only the frontier checks
                    self.crc = _crc32(self.ring_view[self.ring_pos:self.ring_pos + produced], self.crc)
                self.ring_pos += produced
                self.ring_filled = min(RING, self.ring_filled + produced)
                if index.size_limit is not None and self.out > index.size_limit:
                    raise OutputLimitError(f"decompressed data exceeds {index.size_limit} bytes "
                                       f"({index.limit_reason}): refusing a decompression bomb")
            if ret == Z_STREAM_END:
                self._member_ended()
            elif ret == Z_BUF_ERROR:
                if strm.avail_in:  # no progress although input and output were available
                    raise DeflateError(f"inflate made no progress at offset {self.next_in_offset}")
                stalled += 1
            elif ret != Z_OK:
                message = (strm.msg or b"error %d" % ret).decode(errors="replace")
                raise DeflateError(f"corrupt compressed data near offset {self.next_in_offset} "
                                   f"(output offset {self.out}): {message}")
            elif record is not None and strm.data_type & 0xC0 == 0x80:
                record(self)  # at a block boundary that is not after the last block


class DeflateIndex:
    """Checkpointed random access into one deflate or gzip stream (see the module docstring)."""

    def __init__(self, read_compressed: Reader, start: int, compressed_size: int,
                 uncompressed_size: int | None = None, raw: bool = True, span: int = DEFAULT_SPAN,
                 max_size: int | None = None, expected_crc: int | None = None,
                 name: str = "deflate stream") -> None:
        self.read_compressed = read_compressed
        self.expected_crc = expected_crc
        self.name = name  # for messages
        self.corrupt: str | None = None  # why every read fails: the CRC-32 did not match
        self.start = start
        self.compressed_size = compressed_size
        self.raw = raw
        self.span = span
        self.size = uncompressed_size
        self.max_size = max_size
        self.size_limit, self.limit_reason = None, ""
        if uncompressed_size is not None:
            self.size_limit, self.limit_reason = uncompressed_size, "the declared size"
        if max_size is not None and (self.size_limit is None or max_size < self.size_limit):
            self.size_limit, self.limit_reason = max_size, "max-size"
        self.checkpoints = [Checkpoint(0, start, header=not raw)]
        self._outs = [0]  # checkpoint output offsets, for bisect
        self._lock = threading.Lock()  # checkpoints, the frontier's progress
        self._idle = threading.Condition(threading.Lock())  # parked and busy streams
        # Streams in use -> (the gap [from, to) it will keep, empty if none; where it will stop).
        self._busy: dict[_Stream, tuple[int, int, int]] = {}
        self._gaps: OrderedDict[int, bytearray] = OrderedDict()  # output offset -> bytes a stream jumped over
        self._frontier_lock = threading.Lock()  # the frontier stream (decoding forward)
        self._frontier: _Stream | None = None
        self._frontier_done = False
        self._parked: list[_Stream] = []

    # --- reading ---------------------------------------------------------------------------

    def read_into(self, buf: memoryview, offset: int, read_compressed: Reader | None = None) -> None:
        """Fill `buf` with the uncompressed bytes at `offset`; EIO if the stream ends first."""
        reader = read_compressed or self.read_compressed
        end = offset + len(buf)
        if not len(buf):
            return
        if self.corrupt is not None:
            raise DeflateError(self.corrupt)
        if self.size is not None and end > self.size:
            raise DeflateError(f"read beyond the end of the uncompressed data ({self.size} bytes)")
        with self._lock:
            frontier_out = self._frontier.out if self._frontier else 0
            behind = self._frontier_done or offset < frontier_out
        if not behind:
            with self._frontier_lock:
                if not self._frontier_done:
                    frontier = self._frontier_stream()
                    if offset >= frontier.out:
                        self._run(frontier, reader, end, buf, offset, frontier=True)
                        return
        taken = self._take_stream(buf, offset, end)
        if taken is None:  # copied from a gap another read jumped over
            return
        stream, keep_gap = taken
        try:
            if keep_gap:
                gap_start = stream.out
                gap = bytearray(offset - gap_start)
                self._run(stream, reader, offset, memoryview(gap), gap_start, frontier=False)
                with self._idle:
                    self._gaps[gap_start] = gap
                    if len(self._gaps) > KEPT_GAPS:
                        self._gaps.popitem(last=False)
                    self._idle.notify_all()
            self._run(stream, reader, end, buf, offset, frontier=False)
        except BaseException:
            self._release(stream, park=False)
            raise
        self._release(stream, park=True)

    def build(self, progress: Callable[[int, int], None] | None = None,
              read_compressed: Reader | None = None) -> int:
        """Decode the rest of the stream, recording checkpoints; returns the total size.
        `progress(compressed_done, compressed_total)` is called every few MiB."""
        reader = read_compressed or self.read_compressed
        with self._frontier_lock:
            if self._frontier_done:
                assert self.size is not None
                return self.size
            stream = self._frontier_stream()
            step = max(self.span, 16 << 20)
            while not stream.finished:
                self._run(stream, reader, stream.out + step, None, 0, frontier=True)
                if progress is not None:
                    progress(stream.next_in_offset - self.start, self.compressed_size)
            assert self.size is not None
            return self.size

    def _frontier_stream(self) -> _Stream:
        """The frontier (call with _frontier_lock held): created at the last checkpoint."""
        if self._frontier is None:
            self._frontier = _Stream(self, self.checkpoints[-1])
        return self._frontier

    def _run(self, stream: _Stream, reader: Reader, end: int, buf: memoryview | None, offset: int,
             frontier: bool) -> None:
        stream.reader = reader
        try:
            stream.run(end, buf, offset, self._record if frontier else None)
        finally:
            stream.reader = self.read_compressed  # do not keep a connection's layer alive
        if stream.finished:
            self._stream_ended(stream, frontier)
        if frontier and stream.crc is not None and stream.out == self.size:
            self._check_crc(stream.crc)
            stream.crc = None  # checked
        if stream.out < end and buf is not None:
            raise DeflateError(f"the compressed data ends at output offset {stream.out}, "
                               f"before offset {end}")

    def _stream_ended(self, stream: _Stream, frontier: bool) -> None:
        if self.size is None:
            with self._lock:
                self.size = stream.out
        elif stream.out != self.size and (frontier or stream.out < self.size):
            raise DeflateError(f"the compressed data decodes to {stream.out} bytes, "
                               f"not the declared {self.size}")
        if frontier:
            with self._lock:
                self._frontier_done = True
            stream.close()
            self._frontier = None

    def _check_crc(self, crc: int) -> None:
        """The frontier decoded everything: compare its CRC-32 with the recorded one."""
        if crc != self.expected_crc:
            self.corrupt = (f"{self.name} is corrupt: its data decodes to CRC-32 {crc:08x}, "
                            f"not the recorded {self.expected_crc:08x}")
            log.error("%s", self.corrupt)
            raise DeflateError(self.corrupt)

    def _record(self, stream: _Stream) -> None:
        if stream.out - self.checkpoints[-1].out < self.span:
            return
        offset = stream.next_in_offset
        bits = stream.strm.data_type & 7
        prime = 0
        if bits:  # the block starts in the high `bits` bits of the byte before `offset`
            assert stream.in_buf is not None
            at = offset - 1 - (stream.in_pos - len(stream.in_buf))
            byte = stream.in_buf[at] if at >= 0 else stream.reader(offset - 1, 1)[0]
            prime = byte >> (8 - bits)
        point = Checkpoint(stream.out, offset, bits, prime, False, stream.window())
        with self._lock:
            self.checkpoints.append(point)
            self._outs.append(point.out)

    def _take_stream(self, buf: memoryview, offset: int, end: int) -> tuple[_Stream, bool] | None:
        """The closest parked stream at or before `offset`, else a new one at a checkpoint, and
        whether to keep the gap up to `offset` (a parked stream's, up to GAP_KEPT: a random read
        from a checkpoint keeps nothing); None when the bytes were copied into `buf` from a gap
        another read jumped over.

        A sequential reader with many requests in flight (nbdcopy) would otherwise start a
        stream from a checkpoint for each request: when a busy stream will stop closer to `offset`
        than the best parked stream (or the checkpoint), continuing it decodes less, and when it
        is decoding a gap that holds [offset, end), its bytes will be kept: wait for it.
        """
        with self._idle:
            while True:
                for gap_start, gap in self._gaps.items():
                    if gap_start <= offset and end <= gap_start + len(gap):
                        buf[:] = memoryview(gap)[offset - gap_start:end - gap_start]
                        self._gaps.move_to_end(gap_start)
                        return None
                point = self.checkpoints[bisect.bisect_right(self._outs, offset) - 1]
                best = None
                for stream in self._parked:
                    if point.out <= stream.out <= offset and (best is None or stream.out > best.out):
                        best = stream
                # Wait for a busy stream that will stop closer to `offset` than where we would
                # start, or that is decoding a gap holding [offset, end).
                closest = best.out if best is not None else point.out - 1
                if closest == offset or not any(closest < stop <= offset or (kept_from <= offset and end <= kept_to)
                                                for kept_from, kept_to, stop in self._busy.values()):
                    if best is None:
                        break
                    self._parked.remove(best)
                    keep_gap = 0 < offset - best.out <= GAP_KEPT
                    self._busy[best] = (best.out, offset, end) if keep_gap else (offset, offset, end)
                    return best, keep_gap
                self._idle.wait()
        new = _Stream(self, point)
        with self._idle:
            self._busy[new] = (offset, offset, end)
        return new, False

    def _release(self, stream: _Stream, park: bool) -> None:
        evicted = None
        with self._idle:
            self._busy.pop(stream, None)
            if park and not stream.finished:
                self._parked.append(stream)
                if len(self._parked) > PARKED_STREAMS:
                    evicted = self._parked.pop(0)
            else:
                evicted = stream
            self._idle.notify_all()
        if evicted is not None:
            evicted.close()

    def close(self) -> None:
        """Free the zlib streams (also done by the garbage collector)."""
        with self._idle:
            parked, self._parked = self._parked, []
        for stream in parked:
            stream.close()
        with self._frontier_lock:
            if self._frontier is not None:
                self._frontier.close()
                self._frontier = None

    # --- persistence -----------------------------------------------------------------------

    _MAGIC = b"NBDFDFLX"
    _HEADER = struct.Struct("<8sQQQQBI")  # magic, start, compressed, size, span, raw, count
    _POINT = struct.Struct("<QQBBBI")  # out, in, bits, prime, header, compressed window length

    def is_complete(self) -> bool:
        with self._lock:
            return self._frontier_done

    def to_bytes(self) -> bytes:
        """Serialise a complete index (after build()); windows are stored zlib-compressed."""
        if not self.is_complete() or self.size is None:
            raise DeflateError("the index is not complete: call build() first")
        with self._lock:
            points = list(self.checkpoints)
        parts = [self._HEADER.pack(self._MAGIC, self.start, self.compressed_size, self.size,
                                   self.span, self.raw, len(points))]
        for p in points:
            window = zlib.compress(p.window, 1)
            parts.append(self._POINT.pack(p.out, p.in_, p.bits, p.prime, p.header, len(window)))
            parts.append(window)
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, blob: bytes, read_compressed: Reader, start: int,
                   compressed_size: int, raw: bool) -> "DeflateIndex":
        """Load an index saved by to_bytes(); DeflateError if it does not match this stream."""
        try:
            magic, i_start, i_compressed, size, span, i_raw, count = cls._HEADER.unpack_from(blob, 0)
        except struct.error:
            raise DeflateError("not an nbdformats deflate index (too short)") from None
        if magic != cls._MAGIC:
            raise DeflateError("not an nbdformats deflate index")
        if (i_start, i_compressed, bool(i_raw)) != (start, compressed_size, raw):
            raise DeflateError(f"the index is for another file (compressed size {i_compressed}, "
                               f"not {compressed_size})")
        points = []
        pos = cls._HEADER.size
        try:
            for _ in range(count):
                out, in_, bits, prime, header, length = cls._POINT.unpack_from(blob, pos)
                pos += cls._POINT.size
                window = zlib.decompress(blob[pos:pos + length])
                pos += length
                if not (start <= in_ <= start + compressed_size and out <= size and bits < 8
                        and len(window) <= WINDOW):
                    raise DeflateError("a checkpoint is out of range")
                points.append(Checkpoint(out, in_, bits, prime, bool(header), window))
        except (struct.error, zlib.error) as e:
            raise DeflateError(f"the index is damaged: {e}") from None
        return cls.from_checkpoints(points, read_compressed, start, compressed_size, size, raw, span)

    @classmethod
    def from_checkpoints(cls, points: list[Checkpoint], read_compressed: Reader, start: int,
                         compressed_size: int, size: int, raw: bool,
                         span: int = DEFAULT_SPAN) -> "DeflateIndex":
        """A complete index from checkpoints found otherwise (e.g. BGZF member starts)."""
        if not points or points[0].out != 0 or any(a.out > b.out for a, b in zip(points, points[1:])):
            raise DeflateError("the index is damaged: checkpoints out of order")
        index = cls(read_compressed, start, compressed_size, size, raw, span)
        index.checkpoints = list(points)
        index._outs = [p.out for p in points]
        index._frontier_done = True
        return index

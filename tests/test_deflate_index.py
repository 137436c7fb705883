"""DeflateIndex: checkpointed random access into raw deflate and gzip streams (no server)."""

from __future__ import annotations

import errno
import gzip
import io
import random
import struct
import threading
import time
import zipfile
import zlib

import pytest

from nbdformats.filters._format_errors import nbd_error
from nbdformats.formats import deflate_index
from nbdformats.formats.deflate_index import DeflateError, DeflateIndex
from nbdformats.formats.errors import OutputLimitError

SPAN = 128 * 1024


@pytest.fixture(autouse=True, params=["zlib-ng", "zlib"])
def inflater(request, monkeypatch) -> str:
    """Every test twice: decoded by zlib-ng's inflate (python-zlib-ng, a dependency) and by the
    system zlib's (its fallback)."""
    if request.param == "zlib-ng":
        assert deflate_index.ZLIB_NG is not None, "python-zlib-ng is a dependency"
        monkeypatch.setattr(deflate_index, "INFLATER", deflate_index.ZLIB_NG)
    else:
        monkeypatch.setattr(deflate_index, "INFLATER", deflate_index.SYSTEM_ZLIB)
    return request.param


def sample_data(size: int, seed: int = 1) -> bytes:
    """Mixed compressible and random content, so deflate makes blocks of every kind."""
    rng = random.Random(seed)
    parts, total = [], 0
    while total < size:
        kind = rng.randrange(3)
        if kind == 0:
            piece = rng.randbytes(rng.randint(1, 3000))
        elif kind == 1:
            piece = bytes([rng.randrange(256)]) * rng.randint(1, 20000)
        else:
            piece = b"block %d of text " % rng.randrange(1000) * rng.randint(1, 200)
        parts.append(piece)
        total += len(piece)
    return b"".join(parts)[:size]


def raw_deflate(data: bytes, level: int = 6) -> bytes:
    c = zlib.compressobj(level, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush()


def reader(blob: bytes):
    return lambda offset, length: blob[offset:offset + length]


def read(index: DeflateIndex, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    index.read_into(memoryview(buf), offset)
    return bytes(buf)


DATA = sample_data(3 << 20)


@pytest.mark.parametrize("level", [1, 6, 9])
def test_raw_random_reads(level: int) -> None:
    blob = raw_deflate(DATA, level)
    index = DeflateIndex(reader(blob), 0, len(blob), len(DATA), raw=True, span=SPAN)
    rng = random.Random(level)
    for _ in range(60):
        offset = rng.randrange(len(DATA))
        length = min(rng.randint(1, 200_000), len(DATA) - offset)
        assert read(index, offset, length) == DATA[offset:offset + length]
    assert read(index, len(DATA) - 1, 1) == DATA[-1:]
    assert len(index.checkpoints) > 5  # the frontier recorded checkpoints on its way
    # Now backwards from the end, through checkpoints only.
    for offset in range(len(DATA) - 4096, 0, -300_000):
        assert read(index, offset, 4096) == DATA[offset:offset + 4096]


def test_raw_member_inside_zip() -> None:
    """The zip filter's use: a deflated member at an offset inside a larger file."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("pad.bin", random.Random(2).randbytes(5000))
        z.writestr("disk.img", DATA)
    blob = out.getvalue()
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        info = z.getinfo("disk.img")
    name_len, extra_len = struct.unpack_from("<HH", blob, info.header_offset + 26)
    start = info.header_offset + 30 + name_len + extra_len
    index = DeflateIndex(reader(blob), start, info.compress_size, info.file_size, raw=True, span=SPAN)
    assert read(index, 2_000_000, 70_000) == DATA[2_000_000:2_070_000]
    assert read(index, 0, 4096) == DATA[:4096]
    assert index.build() == len(DATA)


def test_gzip_multi_member_sequential_and_persisted() -> None:
    cut = 1_234_567
    blob = gzip.compress(DATA[:cut]) + gzip.compress(b"") + gzip.compress(DATA[cut:], 1) + bytes(512)
    index = DeflateIndex(reader(blob), 0, len(blob), None, raw=False, span=SPAN)
    assert index.size is None
    progress: list[int] = []
    assert index.build(lambda done, total: progress.append(done)) == len(DATA)
    assert progress[-1] <= len(blob)
    got = bytearray(len(DATA))
    for offset in range(0, len(DATA), 65536):  # sequential, as nbdcopy reads
        n = min(65536, len(DATA) - offset)
        index.read_into(memoryview(got)[offset:offset + n], offset)
    assert got == DATA
    # Reads across the member boundary, from a checkpoint inside the first member.
    assert read(index, cut - 10_000, 20_000) == DATA[cut - 10_000:cut + 10_000]

    saved = index.to_bytes()
    loaded = DeflateIndex.from_bytes(saved, reader(blob), 0, len(blob), raw=False)
    assert loaded.size == len(DATA) and loaded.is_complete()
    assert read(loaded, len(DATA) - 5000, 5000) == DATA[-5000:]
    assert read(loaded, cut - 3, 6) == DATA[cut - 3:cut + 3]
    with pytest.raises(ValueError, match="another file"):
        DeflateIndex.from_bytes(saved, reader(blob), 0, len(blob) + 1, raw=False)
    with pytest.raises(ValueError, match="damaged"):
        DeflateIndex.from_bytes(saved[:len(saved) // 2], reader(blob), 0, len(blob), raw=False)
    with pytest.raises(ValueError, match="not an nbdformats"):
        DeflateIndex.from_bytes(b"garbage" * 10, reader(blob), 0, len(blob), raw=False)


def test_concurrent_readers_agree() -> None:
    blob = raw_deflate(DATA)
    index = DeflateIndex(reader(blob), 0, len(blob), len(DATA), raw=True, span=SPAN)
    failures: list[BaseException] = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(25):
                offset = rng.randrange(len(DATA) - 70_000)
                assert read(index, offset, 70_000) == DATA[offset:offset + 70_000]
        except BaseException as e:  # collected for the main thread
            failures.append(e)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures


def test_bad_streams_fail_cleanly() -> None:
    blob = raw_deflate(DATA)
    truncated = blob[:len(blob) // 2]
    index = DeflateIndex(reader(truncated), 0, len(truncated), len(DATA), raw=True)
    assert read(index, 0, 1000) == DATA[:1000]  # the part that is there still reads
    with pytest.raises(DeflateError, match="truncated") as e:
        read(index, len(DATA) - 10, 10)
    assert nbd_error(e.value).errno == errno.EIO

    corrupt = blob[:2000] + b"\xff" * 64 + blob[2064:]
    index = DeflateIndex(reader(corrupt), 0, len(corrupt), len(DATA), raw=True)
    with pytest.raises(DeflateError, match="corrupt compressed data"):
        read(index, 100_000, 10)

    declared_too_big = DeflateIndex(reader(blob), 0, len(blob), len(DATA) + 10, raw=True)
    with pytest.raises(DeflateError, match="not the declared"):
        read(declared_too_big, len(DATA), 10)

    bomb = raw_deflate(bytes(50 << 20), 9)  # 50 MiB of zeroes in ~50 KiB
    index = DeflateIndex(reader(bomb), 0, len(bomb), None, raw=True, max_size=1 << 20)
    with pytest.raises(OutputLimitError, match="decompression bomb") as e:
        index.build()
    assert nbd_error(e.value).errno == errno.EFBIG

    bad_crc = bytearray(gzip.compress(DATA[:100_000]))
    bad_crc[-8] ^= 1
    index = DeflateIndex(reader(bytes(bad_crc)), 0, len(bad_crc), None, raw=False)
    with pytest.raises(DeflateError, match="incorrect data check"):
        index.build()


def test_concurrent_sequential_requests() -> None:
    """nbdcopy's pattern: many requests in flight for consecutive ranges, served by threads
    (requests wait for the stream that is about to reach them)."""
    blob = gzip.compress(DATA)
    index = DeflateIndex(reader(blob), 0, len(blob), None, raw=False, span=SPAN)
    index.build()
    got = bytearray(len(DATA))
    offsets = iter(range(0, len(DATA), 65536))
    lock = threading.Lock()
    failures: list[BaseException] = []

    def work() -> None:
        try:
            while True:
                with lock:
                    offset = next(offsets, None)
                if offset is None:
                    return
                n = min(65536, len(DATA) - offset)
                index.read_into(memoryview(got)[offset:offset + n], offset)
        except BaseException as e:  # collected for the main thread
            failures.append(e)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures and got == DATA
    assert not index._busy and len(index._parked) <= 4


def test_streams_agree_with_python_gzip(inflater) -> None:
    """A multi-member gzip file (an empty member, stored blocks from level 0, trailing zeroes)
    read sequentially and at random behind the frontier, compared with Python's gzip module;
    checkpoints start mid-byte and on bytes, and member ends are crossed in both."""
    rng = random.Random(9)
    pieces = [DATA[:900_000], b"", rng.randbytes(300_000), DATA[900_000:]]
    members = b"".join(gzip.compress(piece, level) for piece, level in zip(pieces, (6, 9, 0, 1)))
    expected = gzip.decompress(members)
    blob = members + bytes(64)
    index = DeflateIndex(reader(blob), 0, len(blob), None, raw=False, span=64 * 1024)
    assert index.build() == len(expected)
    assert any(p.bits for p in index.checkpoints) and any(not p.bits and not p.header for p in index.checkpoints)
    got = bytearray(len(expected))
    for offset in range(0, len(expected), 256 * 1024):
        n = min(256 * 1024, len(expected) - offset)
        index.read_into(memoryview(got)[offset:offset + n], offset)
    assert got == expected
    for _ in range(80):
        offset = rng.randrange(len(expected))
        n = min(rng.randint(1, 400_000), len(expected) - offset)
        assert read(index, offset, n) == expected[offset:offset + n]
    assert {s.z.name for s in index._parked} == {inflater}
    # The same through a saved and loaded index (the format did not change).
    loaded = DeflateIndex.from_bytes(index.to_bytes(), reader(blob), 0, len(blob), raw=False)
    assert read(loaded, 1_199_000, 200_000) == expected[1_199_000:1_399_000]


def test_stream_reports_truncation_behind_the_frontier(inflater) -> None:
    """A file cut short after its index was made (a saved index, a file replaced): a read
    behind the frontier that runs out of data is a DeflateError naming the offset."""
    blob = gzip.compress(DATA, 6)
    index = DeflateIndex(reader(blob), 0, len(blob), None, raw=False, span=SPAN)
    index.build()
    cut = reader(blob[:len(blob) // 2])
    damaged = DeflateIndex.from_checkpoints(index.checkpoints, cut, 0, len(blob), len(DATA), raw=False)
    assert read(damaged, 0, 100_000) == DATA[:100_000]
    with pytest.raises(DeflateError, match="truncated at offset"):
        read(damaged, 0, len(DATA))


def indexed_random_gzip(seed: int, size: int) -> tuple[bytes, bytes, DeflateIndex]:
    """A gzip file of random bytes (stored blocks: input ~ output), its contents, and a built index
    with one checkpoint."""
    blob = gzip.compress(random.Random(seed).randbytes(size), 6)
    index = DeflateIndex(reader(blob), 0, len(blob), None, raw=False, span=16 << 20)
    index.build()
    return blob, gzip.decompress(blob), index


def held_up_read(index: DeflateIndex, blob: bytes, buf: bytearray, offset: int) -> tuple[threading.Thread, threading.Event]:
    """A read on a thread of its own whose stream waits, inside its first input read, until the
    returned event is set (the read has begun when this returns)."""
    entered, go = threading.Event(), threading.Event()

    def held_up(offset: int, length: int) -> bytes:
        entered.set()
        go.wait(10)
        return blob[offset:offset + length]

    thread = threading.Thread(target=index.read_into, args=(memoryview(buf), offset, held_up))
    thread.start()
    assert entered.wait(10)
    return thread, go


def test_a_gap_jumped_by_a_later_read_is_kept_for_the_earlier_one(inflater, monkeypatch) -> None:
    """Two threads of one connection take its sequential reads out of order: the later read
    continues the parked stream over the earlier one's range, which is kept for it instead of
    being decoded again from a checkpoint (it was, for up to half an image per nbdcopy).  The
    earlier read, arriving while the gap is being decoded, waits for it."""
    blob, expected, index = indexed_random_gzip(5, 4 << 20)
    created = []

    class Counted(deflate_index._Stream):
        def __init__(self, *args) -> None:
            created.append(args[1].out)
            super().__init__(*args)

    monkeypatch.setattr(deflate_index, "_Stream", Counted)
    KiB = 1024
    assert read(index, 0, 256 * KiB) == expected[:256 * KiB]  # parks a stream at 256 KiB
    # In order: 768 KiB-1 MiB first (jumping 256-768 KiB), then 512-768 KiB from the kept gap.
    assert read(index, 768 * KiB, 256 * KiB) == expected[768 * KiB:1024 * KiB]
    assert read(index, 512 * KiB, 256 * KiB) == expected[512 * KiB:768 * KiB]
    assert created == [0]
    # Concurrently: the later read's stream is held up inside the gap; the earlier read waits for it.
    later, earlier = bytearray(256 * KiB), bytearray(256 * KiB)
    jumper, go = held_up_read(index, blob, later, 2048 * KiB)
    waiter = threading.Thread(target=index.read_into, args=(memoryview(earlier), 1536 * KiB))
    waiter.start()
    time.sleep(0.2)
    assert waiter.is_alive(), "the earlier read should wait for the gap, not start a stream"
    go.set()
    jumper.join(10)
    waiter.join(10)
    assert later == expected[2048 * KiB:2304 * KiB] and earlier == expected[1536 * KiB:1792 * KiB]
    assert created == [0]


def test_a_read_waits_for_a_busy_stream_that_stops_at_its_offset(inflater) -> None:
    """A parked stream lies behind a read and a busy one will stop right where the read starts:
    the read waits for the busy one rather than decoding the distance from the parked one."""
    blob, expected, index = indexed_random_gzip(6, 2 << 20)
    KiB = 1024
    read(index, 0, 256 * KiB)  # a stream parked at 256 KiB
    first, second = bytearray(256 * KiB), bytearray(256 * KiB)
    busy, go = held_up_read(index, blob, first, 256 * KiB)
    assert read(index, 0, 128 * KiB) == expected[:128 * KiB]  # a second stream, parked at 128 KiB
    waiter = threading.Thread(target=index.read_into, args=(memoryview(second), 512 * KiB))
    waiter.start()
    time.sleep(0.2)
    assert waiter.is_alive(), "the read should wait for the stream that stops at its offset"
    go.set()
    busy.join(10)
    waiter.join(10)
    assert first == expected[256 * KiB:512 * KiB] and second == expected[512 * KiB:768 * KiB]
    assert sorted(s.out for s in index._parked) == [128 * KiB, 768 * KiB]

"""gzip, xz and zstd filters: files made with the real tools, read back byte for byte through the
chain and through the server (nbdcopy, qemu-img compare, nbdsh), agreement with nbdkit's gzip
and xz filters, composition with tar, and bad input (truncated, corrupt, bombs)."""

from __future__ import annotations

import errno
import hashlib
import logging
import signal
import subprocess
import tarfile
import threading
import time
from pathlib import Path

import pytest

from conftest import NBDFORMATS, nbdinfo_json, nbdsh, run, serve, serve_nbdkit, sha256_file
from fixtures.compressed import gzip_members, make_image, seekable_zstd, tool
from fixtures.reads import check_random_reads, filter_over_file, read_range
from nbdformats.api.chain import Layer
from nbdformats.api.errors import ConfigError, NBDError
from nbdformats.formats.xz import locate_blocks
from nbdformats.formats.zstd import walk_frames

SIZE = 3 * 1024 * 1024 + 12345  # not a multiple of any block size


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("compress")
    image = d / "disk.img"
    data = make_image(image, SIZE)
    f = {"dir": d, "image": image, "data": data}
    f["gz"] = tool(["gzip", "-6", "-c", image], d / "disk.img.gz")
    f["pigz"] = tool(["pigz", "-c", "-b", "128", image], d / "disk.pigz.gz")
    f["bgzf"] = tool(["bgzip", "-c", image], d / "disk.bgzf.gz")
    f["gz_multi"] = gzip_members([data[:1_000_000], b"", data[1_000_000:2_500_000], data[2_500_000:]],
                                 d / "disk.multi.gz")
    f["xz_blocks"] = tool(["xz", "-T1", "-c", "--block-size=512KiB", image], d / "disk.blocks.xz")
    f["xz_one"] = tool(["xz", "-c", "-1", image], d / "disk.one.xz")
    first, second = run(["xz", "-c", "-0", "--block-size=1MiB", "-"], input=data[:2_000_000]).stdout, \
        run(["xz", "-c", "-0", "--check=sha256", "-"], input=data[2_000_000:]).stdout
    f["xz_streams"] = d / "disk.streams.xz"
    f["xz_streams"].write_bytes(first + bytes(8) + second)  # stream padding between streams
    f["zst_one"] = tool(["zstd", "-q", "-c", image], d / "disk.one.zst")
    f["zst_pipe"] = d / "disk.pipe.zst"  # from a pipe: the frame does not declare its size
    f["zst_pipe"].write_bytes(run(["zstd", "-q", "-c", "-"], input=data).stdout)
    f["zst_pzstd"] = tool(["pzstd", "-q", "-1", "-c", "-p", "2", image], d / "disk.pzstd.zst")
    f["zst_seekable"] = seekable_zstd(data, d / "disk.seekable.zst")
    f["zst_frames"] = d / "disk.frames.zst"  # plain multi-frame: `cat a.zst b.zst`
    f["zst_frames"].write_bytes(b"".join(run(["zstd", "-q", "-c", "-"], input=data[i:i + 700_000]).stdout
                                         for i in range(0, len(data), 700_000)))
    return f


def open_filter(name: str, path: Path, *params: tuple[str, str]) -> Layer:
    return filter_over_file(name, path, *params).open(readonly=True, export_name="")


def check_reads(layer: Layer, data: bytes, seed: int = 0, count: int = 40) -> None:
    """Random reads, the last byte, then a sequential pass in 256 KiB requests (as nbdcopy)."""
    assert layer.get_size() == len(data)
    check_random_reads(layer, data, seed, count)
    assert read_range(layer, len(data) - 1, 1) == data[-1:]
    whole = bytearray(len(data))
    for offset in range(0, len(data), 256 * 1024):
        n = min(256 * 1024, len(data) - offset)
        layer.pread(memoryview(whole)[offset:offset + n], offset, 0)
    assert whole == data


CASES = [
    ("gzip", "gz", ()), ("gzip", "pigz", ()), ("gzip", "bgzf", ()), ("gzip", "gz_multi", ()),
    ("gzip", "gz", (("gzip-lazy", "true"),)), ("gzip", "gz", (("gzip-span", "64K"),)),
    ("xz", "xz_blocks", ()), ("xz", "xz_one", ()), ("xz", "xz_streams", ()),
    ("xz", "xz_blocks", (("xz-max-depth", "1"),)), ("xz", "xz_one", (("xz-max-block", "1M"),)),
    ("zstd", "zst_one", ()), ("zstd", "zst_pipe", ()), ("zstd", "zst_pzstd", ()),
    ("zstd", "zst_seekable", ()), ("zstd", "zst_frames", ()), ("zstd", "zst_seekable", (("zstd-max-frame", "64K"),)),
]


@pytest.mark.parametrize("name,key,params", CASES, ids=[f"{n}-{k}-{len(p)}" for n, k, p in CASES])
def test_reads_match_source(files, name: str, key: str, params) -> None:
    layer = open_filter(name, files[key], *params)
    assert not layer.can_write() and not layer.can_trim() and layer.can_multi_conn()
    check_reads(layer, files["data"], seed=len(key))
    with pytest.raises(NBDError) as e:
        read_range(layer, SIZE - 10, 20)
    assert e.value.errno == errno.EIO


def test_formats_seen_as_expected(files) -> None:
    """The fixtures exercise what they claim: several xz blocks and streams, several zstd frames."""
    def reader(path: Path):
        blob = path.read_bytes()
        return lambda offset, length: blob[offset:offset + length], len(blob)

    assert len(locate_blocks(*reader(files["xz_blocks"]))) == 7
    assert len(locate_blocks(*reader(files["xz_one"]))) == 1
    assert len(locate_blocks(*reader(files["xz_streams"]))) == 3
    assert len(walk_frames(*reader(files["zst_frames"]))) == 5
    assert len(walk_frames(*reader(files["zst_pzstd"]))) >= 2


def test_gzip_bgzf_indexed_from_headers(files, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="nbdformats"):
        layer = open_filter("gzip", files["bgzf"])
    assert "BGZF file" in caplog.text and "indexing" not in caplog.text
    assert read_range(layer, 2_000_000, 100_000) == files["data"][2_000_000:2_100_000]


def test_gzip_index_saved_and_loaded(files, tmp_path, caplog) -> None:
    index = tmp_path / "disk.gzi"
    layer = open_filter("gzip", files["gz"], ("gzip-index", str(index)), ("gzip-span", "256K"))
    assert index.stat().st_size > 1000
    assert read_range(layer, 3_000_000, 4096) == files["data"][3_000_000:3_004_096]
    with caplog.at_level(logging.INFO, logger="nbdformats"):
        layer = open_filter("gzip", files["gz"], ("gzip-index", str(index)))
    assert "loaded the index" in caplog.text and "indexing" not in caplog.text
    check_reads(layer, files["data"], count=10)
    # The same index against another file is noticed and rebuilt, never used.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="nbdformats"):
        layer = open_filter("gzip", files["pigz"], ("gzip-index", str(index)))
    assert "not an index of this file" in caplog.text
    check_reads(layer, files["data"], count=5)


def test_gzip_lazy_is_wrong_only_where_documented(files) -> None:
    """gzip-lazy trusts the last trailer: on a multi-member file the size is that of the last member."""
    layer = open_filter("gzip", files["gz_multi"], ("gzip-lazy", "true"))
    assert layer.get_size() == len(files["data"]) - 2_500_000
    assert open_filter("gzip", files["gz_multi"]).get_size() == len(files["data"])


def copy_truncated(path: Path, out: Path, keep: int) -> Path:
    out.write_bytes(path.read_bytes()[:keep])
    return out


def copy_corrupted(path: Path, out: Path, offset: int) -> Path:
    blob = bytearray(path.read_bytes())
    for i in range(offset, offset + 64):
        blob[i] ^= 0x55
    out.write_bytes(bytes(blob))
    return out


@pytest.mark.parametrize("name,key,message", [
    ("gzip", "gz", "truncated"), ("xz", "xz_blocks", "xz"), ("zstd", "zst_seekable", "zstd"),
    ("zstd", "zst_frames", "truncated"),
])
def test_truncated_file_is_a_startup_error(files, tmp_path, name, key, message) -> None:
    bad = copy_truncated(files[key], tmp_path / "bad", files[key].stat().st_size * 2 // 3)
    with pytest.raises(ConfigError, match=message):
        open_filter(name, bad)


@pytest.mark.parametrize("name,key", [("gzip", "gz"), ("gzip", "gz_multi"), ("gzip", "bgzf"), ("xz", "xz_blocks"),
                                      ("xz", "xz_one"), ("zstd", "zst_seekable"), ("zstd", "zst_one")])
def test_corrupt_data_is_an_error_not_wrong_bytes(files, tmp_path, name, key) -> None:
    """Damage in the middle: a start-up error (gzip decodes all at start) or EIO for the reads
    that need the damaged part; never silently different bytes."""
    bad = copy_corrupted(files[key], tmp_path / "bad", files[key].stat().st_size // 2)
    data = files["data"]
    try:
        layer = open_filter(name, bad)
    except ConfigError as e:
        assert name in str(e)
        return
    failed = False
    for offset in range(0, len(data), 512 * 1024):
        n = min(512 * 1024, len(data) - offset)
        try:
            assert read_range(layer, offset, n) == data[offset:offset + n]
        except NBDError as e:
            assert e.errno == errno.EIO, e
            failed = True
    assert failed


def test_not_compressed_is_a_clear_error(files) -> None:
    for name, message in (("gzip", "not a gzip file"), ("xz", "xz"), ("zstd", "zstd")):
        with pytest.raises(ConfigError, match=message):
            open_filter(name, files["image"])


def test_max_size_refuses_bombs(files, tmp_path) -> None:
    zeros = tmp_path / "zeros.img"
    with open(zeros, "wb") as f:
        f.truncate(64 << 20)
    gz = tool(["gzip", "-9", "-c", zeros], tmp_path / "zeros.gz")
    with pytest.raises(ConfigError, match="decompression bomb|max-size"):
        open_filter("gzip", gz, ("max-size", "8M"))
    with pytest.raises(ConfigError, match="max-size"):
        open_filter("gzip", files["bgzf"], ("max-size", "1M"))
    zst = tmp_path / "zeros.zst"
    zst.write_bytes(run(["zstd", "-q", "-c", "-"], input=bytes(64 << 20)).stdout)  # no declared size
    with pytest.raises(ConfigError, match="max-size"):
        open_filter("zstd", zst, ("max-size", "8M"))
    for name, key in (("xz", "xz_blocks"), ("zstd", "zst_seekable"), ("zstd", "zst_one")):
        with pytest.raises(ConfigError, match="max-size"):
            open_filter(name, files[key], ("max-size", "1M"))
    assert open_filter("xz", files["xz_blocks"], ("max-size", "4M")).get_size() == SIZE


def test_zstd_seek_table_checksum_is_checked(files, tmp_path) -> None:
    blob = bytearray(files["zst_seekable"].read_bytes())
    blob[-9 - 12 * 3 + 8] ^= 1  # the checksum of the fourth frame from the end
    bad = tmp_path / "bad.zst"
    bad.write_bytes(bytes(blob))
    layer = open_filter("zstd", bad)
    assert read_range(layer, 0, 4096) == files["data"][:4096]
    frames = -(-SIZE // (256 * 1024))
    with pytest.raises(NBDError, match="checksum"):
        read_range(layer, (frames - 3) * 256 * 1024, 10)


# --- through the server, with real clients --------------------------------------------------

SERVED = [("gzip", "gz"), ("gzip", "gz_multi"), ("xz", "xz_blocks"), ("xz", "xz_one"), ("zstd", "zst_seekable"),
          ("zstd", "zst_one")]


@pytest.mark.parametrize("name,key", SERVED)
def test_served_image_equals_source(files, tmp_path, name, key) -> None:
    with serve(f"--filter={name}", "file", str(files[key])) as srv:
        info = nbdinfo_json(srv.uri)["exports"][0]
        assert info["export-size"] == SIZE and info["is_read_only"] and info["can_multi_conn"]
        out = tmp_path / "copy.img"
        run(["nbdcopy", srv.uri, out], timeout=60)
        assert sha256_file(out) == sha256_file(files["image"])
        run(["qemu-img", "compare", "-f", "raw", "-F", "raw", files["image"], srv.uri], timeout=60)
        script = (f"data = open({str(files['image'])!r}, 'rb').read()\n"
                  "import random\nr = random.Random(5)\n"
                  "for _ in range(30):\n"
                  "    o = r.randrange(len(data) - 70000); n = r.randint(1, 70000)\n"
                  "    assert h.pread(n, o) == data[o:o + n], (o, n)\n"
                  "try:\n    h.pwrite(b'x' * 512, 0)\n    raise SystemExit('write accepted')\n"
                  "except nbd.Error as e:\n    assert 'EPERM' in str(e) or 'EROFS' in str(e), e\n"
                  "print('ok')\n")
        assert nbdsh(srv.uri, script, timeout=60).stdout.strip() == b"ok"


@pytest.mark.parametrize("name,key", [("gzip", "gz"), ("xz", "xz_blocks"), ("xz", "xz_one")])
def test_agrees_with_nbdkit(files, tmp_path, name, key) -> None:
    with serve(f"--filter={name}", "file", str(files[key])) as ours, \
            serve_nbdkit(f"--filter={name}", "file", str(files[key])) as theirs:
        assert nbdinfo_json(ours.uri)["exports"][0]["export-size"] == \
            nbdinfo_json(theirs.uri)["exports"][0]["export-size"]
        run(["qemu-img", "compare", "-f", "raw", "-F", "raw", ours.uri, theirs.uri], timeout=60)


def test_multi_member_gzip_nbdkit_serves_only_the_first_member(files) -> None:
    """Where we deliberately differ: nbdkit 1.32 stops after the first member."""
    with serve("--filter=gzip", "file", str(files["gz_multi"])) as ours, \
            serve_nbdkit("--filter=gzip", "file", str(files["gz_multi"])) as theirs:
        assert nbdinfo_json(ours.uri)["exports"][0]["export-size"] == SIZE
        assert nbdinfo_json(theirs.uri)["exports"][0]["export-size"] == 1_000_000


def test_tar_over_gzip_and_zstd(files, tmp_path) -> None:
    """--filter=tar --filter=gzip file disk.tar.gz: the member of a compressed tar."""
    tar = tmp_path / "disk.tar"
    with tarfile.open(tar, "w", format=tarfile.GNU_FORMAT) as t:
        t.add(files["image"], arcname="images/disk.img")
    tgz = tool(["gzip", "-c", tar], tmp_path / "disk.tar.gz")
    tzst = seekable_zstd(tar.read_bytes(), tmp_path / "disk.tar.zst")
    for archive, name in ((tgz, "gzip"), (tzst, "zstd")):
        with serve("--filter=tar", f"--filter={name}", "file", str(archive), "tar-entry=images/disk.img") as srv:
            out = tmp_path / f"copy-{name}.img"
            run(["nbdcopy", srv.uri, out], timeout=60)
            assert sha256_file(out) == sha256_file(files["image"])


def test_gzip_index_second_start(files, tmp_path) -> None:
    index = tmp_path / "disk.gzi"
    for _ in range(2):
        with serve("--filter=gzip", "file", str(files["gz"]), f"gzip-index={index}") as srv:
            run(["qemu-img", "compare", "-f", "raw", "-F", "raw", files["image"], srv.uri], timeout=60)
            log = srv.stderr()
    assert "loaded the index" in log


def test_startup_error_is_clear(files, tmp_path) -> None:
    bad = copy_truncated(files["gz"], tmp_path / "bad.gz", 100_000)
    proc = run(["timeout", "60", *NBDFORMATS, "-f", "-U", tmp_path / "sock",
                "--filter=gzip", "file", bad], check=False, timeout=60)
    assert proc.returncode != 0
    assert b"truncated" in proc.stderr and b"Traceback" not in proc.stderr


# --- parallel read-ahead of xz blocks and zstd frames ------------------------------------------

BIG = 24 * 1024 * 1024 + 4321  # 25 units of 1 MiB: enough for the read-ahead threads to run ahead


@pytest.fixture(scope="module")
def units(tmp_path_factory) -> dict:
    """A multi-block xz and a multi-frame zstd (independent frames, `cat a.zst b.zst ...`), with
    the bytes xz -dc and zstd -dc (independent decoders) give back."""
    d = tmp_path_factory.mktemp("units")
    image = d / "big.img"
    make_image(image, BIG, seed=11)
    xz = tool(["xz", "-T1", "-0", "-c", "--block-size=1MiB", image], d / "big.xz")
    zst = d / "big.zst"
    with open(image, "rb") as f, open(zst, "wb") as out:
        while piece := f.read(1 << 20):
            out.write(run(["zstd", "-q", "-1", "-c", f"--stream-size={len(piece)}", "-"], input=piece, timeout=60).stdout)
    f = {"dir": d, "xz": xz, "zst": zst,
         "xz_data": run(["xz", "-dc", xz], timeout=60).stdout, "zst_data": run(["zstd", "-dc", zst], timeout=60).stdout}
    assert f["xz_data"] == f["zst_data"] == image.read_bytes()
    return f


def corrupt_unit(path: Path, out: Path, name: str, number: int) -> Path:
    """A copy with the compressed bytes of block/frame `number` damaged (found by our index walkers)."""
    blob = bytearray(path.read_bytes())
    if name == "xz":
        unit = locate_blocks(lambda o, n: bytes(blob[o:o + n]), len(blob))[number]
        start, length = unit.offset, unit.padded
    else:
        frame = walk_frames(lambda o, n: bytes(blob[o:o + n]), len(blob))[number]
        start, length = frame.offset, frame.length
    for i in range(start + length // 3, start + length // 3 + 64):
        blob[i] ^= 0x55
    out.write_bytes(bytes(blob))
    return out


@pytest.mark.parametrize("name", ["xz", "zstd"])
def test_read_ahead_bounded_in_process(units, monkeypatch, name) -> None:
    """Cached plus decoded-ahead units stay within the depth, several units are decoded ahead at
    once, and a sequential pass equals the reference decoder's output."""
    from nbdformats.filters import _decompress
    monkeypatch.setattr(_decompress, "MIN_CACHE_BYTES", 0)  # the unit count alone limits the cache
    monkeypatch.setattr(_decompress.READ_AHEAD, "workers", 2)
    key, depth = ("xz", "xz-max-depth") if name == "xz" else ("zst", "zstd-max-depth")
    layer = open_filter(name, units[key], (depth, "4"))
    source = next(h for h in _layer_handles(layer) if isinstance(getattr(h, "source", None),
                                                                    _decompress.BlockSource)).source
    assert source.ahead == 2
    decoding, most = [0], [0]
    lock = threading.Lock()
    decode = source.decode

    def counting(unit, reader):
        with lock:
            decoding[0] += 1
            most[0] = max(most[0], decoding[0])
        try:
            time.sleep(0.01)  # so the threads overlap on a busy machine too
            return decode(unit, reader)
        finally:
            with lock:
                decoding[0] -= 1

    source.decode = counting
    data = units[key + "_data"]
    whole = bytearray(len(data))
    for offset in range(0, len(data), 256 * 1024):
        n = min(256 * 1024, len(data) - offset)
        layer.pread(memoryview(whole)[offset:offset + n], offset, 0)
        with source.lock:
            assert len(source.cache) + len(source.reserved) <= 4
    assert whole == data
    assert most[0] >= 2, "no two units were decoded at once"
    layer.close()  # waits for the jobs reading through this connection
    with source.lock:
        assert not source.reserved
    _decompress.READ_AHEAD.stop()
    assert not [t for t in threading.enumerate() if t.name == "decompress-read-ahead"]


def test_no_read_ahead_while_connections_keep_the_cores_busy(units, monkeypatch) -> None:
    """With as many connections reading as there are read-ahead threads, nothing is decoded ahead:
    each connection's own decoding keeps the cores busy (nbdcopy's four connections, each copying
    its own region, made the read-ahead decode the next region's first units again).  When one
    connection closes, a sequential reader gets its read-ahead back."""
    from nbdformats.filters import _decompress
    monkeypatch.setattr(_decompress.READ_AHEAD, "workers", 2)
    layer = open_filter("xz", units["xz"])
    handle = next(h for h in _layer_handles(layer) if isinstance(getattr(h, "source", None), _decompress.BlockSource))
    source, first = handle.source, handle.reader
    second = lambda offset, length: first(offset, length)  # noqa: E731  (another connection's reader)
    ahead = []
    monkeypatch.setattr(source, "prefetch", lambda unit, reader: (ahead.append(unit.number), source.withdraw(unit)))
    data, buf = units["xz_data"], bytearray(256 * 1024)
    source.read_into(memoryview(buf), 0, second)
    for offset in range(0, 4 << 20, len(buf)):
        source.read_into(memoryview(buf), offset, first)
        assert buf == data[offset:offset + len(buf)]
    assert ahead == []
    source.release(second)
    for offset in range(4 << 20, 8 << 20, len(buf)):
        source.read_into(memoryview(buf), offset, first)
    _decompress.READ_AHEAD.stop()
    assert ahead, "one connection reading sequentially: the next units are decoded ahead"
    layer.close()


def _layer_handles(layer: Layer):
    """The handles of a chain opened in process, top first."""
    while layer is not None:
        handle = getattr(layer, "handle", None)
        yield handle
        layer = getattr(handle, "next", None)


@pytest.mark.parametrize("name,key", [("xz", "xz"), ("zstd", "zst")])
def test_parallel_decode_served_to_four_connections(units, tmp_path, name, key) -> None:
    """nbdcopy (4 connections each) and four nbdcopy processes at once read the same bytes as the
    reference decoder; the read-ahead threads end when the server stops."""
    expected = hashlib.sha256(units[key + "_data"]).hexdigest()
    with serve(f"--filter={name}", "file", str(units[key]), options=("-v",)) as srv:
        out = tmp_path / "one.img"
        run(["nbdcopy", "--connections=4", srv.uri, out], timeout=120)
        assert sha256_file(out) == expected
        procs = [subprocess.Popen(["nbdcopy", "--connections=4", srv.uri, tmp_path / f"copy{i}.img"],
                                  stderr=subprocess.PIPE) for i in range(4)]
        for proc in procs:
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
        for i in range(4):
            assert sha256_file(tmp_path / f"copy{i}.img") == expected
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(30) == 0
        log = srv.stderr()
    assert "read-ahead threads stopped" in log and "Traceback" not in log


@pytest.mark.parametrize("name,key", [("xz", "xz"), ("zstd", "zst")])
def test_corrupt_later_unit_is_eio_for_its_reads(units, tmp_path, name, key) -> None:
    """A corrupt block/frame that the read-ahead threads meet first: reads before it succeed, the
    reads that need it fail with EIO, reads after it succeed, and the server keeps serving."""
    bad = corrupt_unit(units[key], tmp_path / f"bad.{key}", name, 10)
    data = units[key + "_data"]
    mib = 1 << 20
    with serve(f"--filter={name}", "file", str(bad), options=("-v",)) as srv:
        script = (f"data = open({str(tmp_path / 'ref')!r}, 'rb').read()\n"
                  "failed = []\n"
                  f"for o in range(0, {len(data)}, 256 * 1024):\n"
                  f"    n = min(256 * 1024, {len(data)} - o)\n"
                  "    try:\n"
                  "        assert h.pread(n, o) == data[o:o + n], o\n"
                  "    except nbd.Error as e:\n"
                  "        assert 'EIO' in str(e), e\n"
                  "        failed.append(o)\n"
                  f"assert failed == list(range({10 * mib}, {11 * mib}, 256 * 1024)), failed\n"
                  "print('ok')\n")
        (tmp_path / "ref").write_bytes(data)
        assert nbdsh(srv.uri, script, timeout=120).stdout.strip() == b"ok"
        proc = run(["nbdcopy", srv.uri, tmp_path / "copy.img"], check=False, timeout=120)
        assert proc.returncode != 0
        assert nbdsh(srv.uri, f"assert h.pread(4096, {20 * mib}) == open({str(tmp_path / 'ref')!r}, 'rb')"
                              f".read()[{20 * mib}:{20 * mib + 4096}]\nprint('ok')", timeout=60).stdout.strip() == b"ok"
        log = srv.stderr()
    assert "Traceback" not in log and f"read-ahead of {'block' if name == 'xz' else 'frame'} 10 failed" in log, log

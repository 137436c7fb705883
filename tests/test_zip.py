"""zip filter: central directory parsing (zip64, prefixed archives, bsdtar's zeroed local
headers), stored members read and written, deflated members with random access, refusals,
and interop through the server."""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path

import pytest

from conftest import nbdsh, run, serve, sha256_file
from fixtures.archives import bsdtar, make_tree, py_zip, truncated_copy, zip64_sparse_archive
from fixtures.reads import check_random_reads, filter_over_file, read_export
from nbdformats.client import NBDClient
from nbdformats.api.errors import ConfigError, NBDError
from nbdformats.filters._members import normalize
from nbdformats.formats.zip import ZipError, find_end_record


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    root = tmp_path_factory.mktemp("zip")
    return root, make_tree(root / "src")


def chain_for(path: Path, *params: tuple[str, str]):
    return filter_over_file("zip", path, *params)


def info_zip(root: Path, out: Path) -> Path:
    run(["sh", "-c", f"cd '{root}' && zip -q -r '{out}' ."])
    return out


MAKERS = [
    ("python-stored", lambda root, files, out: py_zip(out, files, zipfile.ZIP_STORED)),
    ("python-deflated", lambda root, files, out: py_zip(out, files, zipfile.ZIP_DEFLATED)),
    ("python-zip64", lambda root, files, out: py_zip(out, files, zipfile.ZIP_DEFLATED, force_zip64=True)),
    ("infozip", lambda root, files, out: info_zip(root, out)),
    ("bsdtar", lambda root, files, out: bsdtar(root, out, "zip")),  # sizes only in the central directory
]


@pytest.mark.parametrize("maker", [m[1] for m in MAKERS], ids=[m[0] for m in MAKERS])
def test_every_member_reads_back(tree, maker, request):
    root, files = tree
    out = root / f"{request.node.callspec.id}.zip"
    out.unlink(missing_ok=True)
    archive = maker(root / "src", files, out)
    chain = chain_for(archive)
    exports = [e.name for e in chain.list_exports(True, False)]
    assert sorted(normalize(n) for n in exports) == sorted(files)
    for export in exports:
        assert read_export(chain, export) == files[normalize(export)], export
    top = chain.open(readonly=True, export_name=next(e for e in exports if e.endswith("disk.img")))
    check_random_reads(top, files["disk.img"], request.node.callspec.id, count=60)
    top.close()


def test_deflated_random_access_shares_checkpoints_between_connections(tmp_path):
    content = b"".join(hashlib.sha256(str(i).encode()).hexdigest().encode() for i in range(250000))  # 16 MiB: 4 checkpoints
    archive = py_zip(tmp_path / "big.zip", {"big.img": content})
    chain = chain_for(archive, ("zip-entry", "big.img"))
    first = chain.open(readonly=True, export_name="")
    buf = bytearray(4096)
    first.pread(memoryview(buf), len(content) - 4096, 0)  # decodes forward, recording checkpoints
    assert buf == content[-4096:]
    first.close()
    second = chain.open(readonly=True, export_name="")
    assert not second.can_write()
    [index] = chain.filters[0].indexes.values()
    assert len(index.checkpoints) >= 3  # recorded by the first connection, used by the second
    check_random_reads(second, content, "shared", count=30)
    second.close()


def test_zip64_member_over_4_gib(tmp_path):
    size = (5 << 30) + 4321
    tail = hashlib.sha256(b"tail").digest() * 200
    archive = zip64_sparse_archive(tmp_path / "big64.zip", size, tail)
    info = zipfile.ZipFile(archive).infolist()[0]  # an independent parser agrees
    assert (info.file_size, info.compress_size) == (size, size)
    top = chain_for(archive).open(readonly=True, export_name="big.img")
    assert top.get_size() == size
    buf = bytearray(len(tail) + 100)
    top.pread(memoryview(buf), size - len(buf), 0)
    assert buf == bytes(100) + tail
    top.close()


def test_prefixed_archive_self_extracting_stub(tree, tmp_path):
    root, files = tree
    inner = py_zip(tmp_path / "inner.zip", {"disk.img": files["disk.img"]}, zipfile.ZIP_STORED)
    prefixed = tmp_path / "sfx.zip"
    prefixed.write_bytes(b"#!/bin/sh\necho stub\n" + bytes(5000) + inner.read_bytes())
    assert zipfile.ZipFile(prefixed).read("disk.img") == files["disk.img"]
    assert read_export(chain_for(prefixed, ("zip-entry", "disk.img"))) == files["disk.img"]


def test_comment_after_end_record():
    record = b"PK\x05\x06" + bytes(16) + (5).to_bytes(2, "little") + b"hello"
    offset, fields = find_end_record(b"junk" + record, 1000)
    assert offset == 1004 and fields[7] == 5
    with pytest.raises(ZipError, match="not a zip archive"):
        find_end_record(b"no record here" * 10, 0)


def test_end_record_comment_cut_short(tree, tmp_path):
    """An end record whose comment length runs past the end of the file (the comment cut
    short, fuzz seed 1001): zipfile, bsdtar and unzip (with a warning) read the archive, and so
    do we; the central directory it points to is checked as always."""
    root, files = tree
    data = bytearray(py_zip(tmp_path / "good.zip", {"disk.img": files["disk.img"]}).read_bytes())
    data[-2:] = (1000).to_bytes(2, "little")  # no comment follows
    (tmp_path / "cut-comment.zip").write_bytes(data)
    assert zipfile.ZipFile(tmp_path / "cut-comment.zip").read("disk.img") == files["disk.img"]
    assert read_export(chain_for(tmp_path / "cut-comment.zip", ("zip-entry", "disk.img"))) == files["disk.img"]
    offset, fields = find_end_record(b"junk" + bytes(data[-22:]), 1000)
    assert offset == 1004 and fields[7] == 1000
    # A whole record preferred to one cut short; a cut record still points to a checked directory.
    assert find_end_record(b"PK\x05\x06" + bytes(18) + b"PK\x05\x06" + bytes(16) + b"\xff\xff", 0)[0] == 0
    data[-6:-2] = (len(data) - 10).to_bytes(4, "little")  # the directory's offset now wrong
    (tmp_path / "cut-bad.zip").write_bytes(data)
    with pytest.raises(ConfigError, match="central directory"):
        chain_for(tmp_path / "cut-bad.zip", ("zip-entry", "disk.img"))


def test_stored_writes_need_zip_write(tree, tmp_path):
    root, files = tree
    archive = py_zip(tmp_path / "rw.zip", {"a.txt": b"a" * 1000, "disk.img": files["disk.img"]}, zipfile.ZIP_STORED)
    top = chain_for(archive, ("zip-entry", "disk.img")).open(readonly=False, export_name="")
    assert not top.can_write()
    top.close()
    chain = chain_for(archive, ("zip-entry", "disk.img"), ("zip-write", "true"))
    top = chain.open(readonly=False, export_name="")
    assert top.can_write()
    top.pwrite(memoryview(b"Z" * 3000), 777, 0)
    top.flush(0)
    top.close()
    info = zipfile.ZipFile(archive).getinfo("disk.img")
    start = info.header_offset + 30 + len("disk.img") + len(info.extra)
    data = archive.read_bytes()
    expected = bytearray(files["disk.img"])
    expected[777:3777] = b"Z" * 3000
    assert data[start:start + len(expected)] == expected
    assert zipfile.ZipFile(archive).read("a.txt") == b"a" * 1000  # the neighbour is intact
    test = run(["unzip", "-t", archive], check=False)  # the stale CRC-32 is what zip-write warns about
    assert test.returncode != 0 and b"disk.img" in test.stdout


def claim_stored_size(archive: Path, name: str, size: int) -> None:
    """Make the central directory record of stored member `name` claim `size` bytes (both sizes)."""
    data = bytearray(archive.read_bytes())
    raw = name.encode()
    record = data.index(b"PK\x01\x02")
    while data[record + 46:record + 46 + len(raw)] != raw:
        record = data.index(b"PK\x01\x02", record + 4)
    data[record + 20:record + 28] = size.to_bytes(4, "little") * 2  # compressed size, uncompressed size
    archive.write_bytes(bytes(data))


@pytest.mark.parametrize("names, liar", [(["a.img", "b.img", "c.img"], "a.img"), (["a.img", "b.img"], "b.img")])
def test_members_overlapping_the_archive_are_refused(tmp_path, names, liar):
    """A member whose recorded size runs into the next member or the central directory is
    refused, as CPython's zipfile does ("possible zip bomb"); with zip-write=true a member that
    such a member's data overlaps is not opened writable either (issue 20, item 7: one 4 KiB
    write used to destroy the central directory)."""
    archive = py_zip(tmp_path / "overlap.zip", {name: name[0].encode() * 65536 for name in names}, zipfile.ZIP_STORED)
    claim_stored_size(archive, liar, 65536 + 64)
    before = archive.read_bytes()
    chain = chain_for(archive, ("zip-write", "true"))
    for readonly in (False, True):
        with pytest.raises(NBDError, match=f"the data of '{liar}' .* runs past byte \\d+, where the next member or "
                                           "the central directory starts"):
            chain.open(readonly=readonly, export_name=liar)
    if liar == "a.img":  # b.img is fine itself, but a.img's claimed data covers it
        with pytest.raises(NBDError, match="stored member 'b.img' .* overlaps member 'a.img'.*refusing to open it "
                                           r"writable \(serve with -r to read it\)"):
            chain.open(readonly=False, export_name="b.img")
        top = chain.open(readonly=True, export_name="b.img")
        assert read_range_bytes(top, 0, 4096) == b"b" * 4096
        top.close()
    honest = "c.img" if liar == "a.img" else "a.img"
    with serve("--filter=zip", "file", str(archive), "zip-write=true") as srv:
        proc = nbdsh(srv.uri_for(liar), "h.pwrite(b'X' * 4096, 65536)\n", check=False)
        assert proc.returncode != 0
        nbdsh(srv.uri_for(honest), "h.pwrite(b'Y' * 10, 0)\nh.flush()\n")
        assert "Traceback" not in srv.stderr()
    after = archive.read_bytes()
    assert after.replace(b"Y" * 10, honest[0].encode() * 10, 1) == before  # only the honest member changed
    assert run(["unzip", "-l", archive]).returncode == 0


def read_range_bytes(top, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    top.pread(memoryview(buf), offset, 0)
    return bytes(buf)


def test_refusals_are_clear(tree, tmp_path):
    root, files = tree
    (tmp_path / "secret.img").write_bytes(b"s" * 10000)
    run(["sh", "-c", f"cd '{tmp_path}' && zip -q -P hunter2 enc.zip secret.img"])
    with pytest.raises(NBDError, match="'secret.img' is encrypted"):
        chain_for(tmp_path / "enc.zip").open(readonly=True, export_name="secret.img")
    bz = py_zip(tmp_path / "bz.zip", {"x.img": b"x" * 10000}, zipfile.ZIP_BZIP2)
    with pytest.raises(NBDError, match="compressed with bzip2.*--filter=archive"):
        chain_for(bz).open(readonly=True, export_name="x.img")
    with pytest.raises(ConfigError, match="no member 'nope'.*'x.img'"):
        chain_for(bz, ("zip-entry", "nope"))
    junk = tmp_path / "junk.zip"
    junk.write_bytes(bytes(100000))
    with pytest.raises(ConfigError, match="not a zip archive"):
        chain_for(junk, ("zip-entry", "x"))


def test_corrupt_and_truncated_archives(tree, tmp_path):
    root, files = tree
    archive = py_zip(tmp_path / "good.zip", {"disk.img": files["disk.img"]})
    size = archive.stat().st_size
    # Cut in the middle: the end record is gone.
    with pytest.raises(ConfigError, match="not a zip archive"):
        chain_for(truncated_copy(archive, tmp_path / "cut.zip", size // 2), ("zip-entry", "disk.img"))
    # The local header overwritten.
    data = bytearray(archive.read_bytes())
    data[0:4] = b"XXXX"
    (tmp_path / "badlocal.zip").write_bytes(data)
    with pytest.raises(NBDError, match="no local header"):
        chain_for(tmp_path / "badlocal.zip").open(readonly=True, export_name="disk.img")
    # The deflate stream cut short (the central directory says half its size): reads before
    # the cut work, reads past it fail with EIO.
    text = b"".join(hashlib.sha256(str(i).encode()).hexdigest().encode() for i in range(60000))
    data = bytearray(py_zip(tmp_path / "text.zip", {"disk.img": text}).read_bytes())
    with zipfile.ZipFile(tmp_path / "text.zip") as z:
        central, compressed = z.start_dir, z.getinfo("disk.img").compress_size
    data[central + 20:central + 24] = (compressed // 2).to_bytes(4, "little")
    (tmp_path / "short.zip").write_bytes(data)
    top = chain_for(tmp_path / "short.zip").open(readonly=True, export_name="disk.img")
    head = bytearray(4096)
    top.pread(memoryview(head), 0, 0)
    assert head == text[:4096]
    with pytest.raises(NBDError) as failure:
        tail = bytearray(4096)
        top.pread(memoryview(tail), len(text) - 4096, 0)
    assert failure.value.errno == 5
    top.close()


def test_deflated_member_whose_crc_does_not_match_fails_once_fully_decoded(tmp_path):
    """Bytes changed inside a deflate stream usually still decode; the CRC-32 tells.  Here the
    recorded CRC is changed instead (the same mismatch, deterministically)."""
    text = b"".join(hashlib.sha256(str(i).encode()).hexdigest().encode() for i in range(60000))
    good = py_zip(tmp_path / "good.zip", {"disk.img": text})
    with zipfile.ZipFile(good) as z:
        central, crc = z.start_dir, z.getinfo("disk.img").CRC
    data = bytearray(good.read_bytes())
    data[central + 16:central + 20] = (crc ^ 1).to_bytes(4, "little")  # central directory: CRC-32
    (tmp_path / "badcrc.zip").write_bytes(data)
    top = chain_for(tmp_path / "badcrc.zip").open(readonly=True, export_name="disk.img")
    head = bytearray(65536)
    top.pread(memoryview(head), 0, 0)  # the CRC is not known to be wrong before the end
    assert head == text[:65536]
    tail = bytearray(4096)
    with pytest.raises(NBDError, match=f"zip member 'disk.img' is corrupt: its data decodes to CRC-32 {crc:08x}, "
                                       f"not the recorded {crc ^ 1:08x}") as failure:
        top.pread(memoryview(tail), len(text) - 4096, 0)
    assert failure.value.errno == 5
    with pytest.raises(NBDError, match="is corrupt"):
        top.pread(memoryview(head), 0, 0)  # and from then on every read fails
    top.close()
    # Through the server, a full copy fails instead of producing a silently wrong image, and the
    # server's log says why.
    with serve("file", str(tmp_path / "badcrc.zip"), "--filter=zip", "zip-entry=disk.img") as srv:
        copy = run(["nbdcopy", srv.uri, str(tmp_path / "copy.img")], check=False)
        assert copy.returncode != 0 and b"Input/output error" in copy.stderr
        assert "zip member 'disk.img' is corrupt: its data decodes to CRC-32" in srv.stderr()
    with serve("file", str(good), "--filter=zip", "zip-entry=disk.img") as srv:
        run(["nbdcopy", srv.uri, str(tmp_path / "copy.img")])
    assert (tmp_path / "copy.img").read_bytes() == text


def test_stored_member_crc_is_checked_when_read_in_order(tmp_path):
    """A stored member is served straight from the archive; read from its start in order (one
    connection copying it), its CRC-32 is checked at the end.  Random reads are not checked."""
    data = os.urandom(3 << 20)
    good = py_zip(tmp_path / "good.zip", {"disk.img": data}, zipfile.ZIP_STORED)
    with zipfile.ZipFile(good) as z:
        info = z.getinfo("disk.img")
        start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    damaged = bytearray(good.read_bytes())
    damaged[start + (2 << 20)] ^= 0xFF  # one byte inside the member's data
    (tmp_path / "bad.zip").write_bytes(damaged)
    with serve("file", str(tmp_path / "bad.zip"), "--filter=zip", "zip-entry=disk.img") as srv:
        with NBDClient.connect(srv.uri) as client:  # a random read: served as stored, nothing known
            assert bytes(client.pread(4096, 2 << 20))[0] == data[2 << 20] ^ 0xFF
        copy = run(["nbdcopy", "-C", "1", srv.uri, str(tmp_path / "copy.img")], check=False)
        assert copy.returncode != 0 and b"Input/output error" in copy.stderr
        assert "zip member 'disk.img' is corrupt: its data has CRC-32" in srv.stderr()
        with NBDClient.connect(srv.uri) as client, pytest.raises(NBDError, match="is corrupt"):
            client.pread(4096, 0)  # from then on every read fails
    with serve("file", str(good), "--filter=zip", "zip-entry=disk.img") as srv:
        run(["nbdcopy", "-C", "1", srv.uri, str(tmp_path / "copy.img")])
    assert (tmp_path / "copy.img").read_bytes() == data


# --- through the server ---------------------------------------------------------------------


def test_server_lists_and_serves_members(tree):
    root, files = tree
    archive = py_zip(root / "served.zip", {"disk.img": files["disk.img"], "sparse.img": files["sparse.img"],
                                           "ünïcödé.txt": files["ünïcödé.txt"]})
    with serve("--filter=zip", "file", str(archive)) as srv:
        listing = json.loads(run(["nbdinfo", "--json", "--list", srv.uri]).stdout)
        assert sorted(e["export-name"] for e in listing["exports"]) == sorted(["disk.img", "sparse.img", "ünïcödé.txt"])
        for name in ("disk.img", "sparse.img"):
            out = root / "copy.img"
            run(["nbdcopy", srv.uri_for(name), str(out)])
            assert sha256_file(out) == hashlib.sha256(files[name]).hexdigest()
        run(["qemu-img", "compare", "-f", "raw", "-F", "raw", srv.uri_for("disk.img"),
             str(root / "src" / "disk.img")], timeout=60)
        script = (f"import random\nrng = random.Random(9)\ndata = open({str(root / 'src' / 'disk.img')!r}, 'rb').read()\n"
                  "for _ in range(200):\n"
                  "    o = rng.randrange(len(data)); n = min(rng.randrange(1, 65536), len(data) - o)\n"
                  "    assert h.pread(n, o) == data[o:o + n], (o, n)\n"
                  "assert h.is_read_only()\nprint('ok')\n")
        assert nbdsh(srv.uri_for("disk.img"), script).stdout.strip() == b"ok"

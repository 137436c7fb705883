"""tar filter: header parsing (GNU, ustar, pax, v7, long names, sparse), members as exports,
writes into the archive, bad archives, and interop with nbdinfo/nbdcopy/qemu-img/nbdkit."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest

from conftest import nbdinfo_json, nbdsh, run, serve, serve_nbdkit, sha256_file
from fixtures.archives import LONG_DIR, bsdtar, compress, corrupt, gnu_tar, make_tree, truncated_copy
from fixtures.reads import check_random_reads, filter_over_file, read_export
from nbdformats.api.chain import EXTENT_DATA, EXTENT_HOLE, EXTENT_ZERO, Extents
from nbdformats.api.errors import ConfigError, NBDError
from nbdformats.formats.tar import BLOCK, TarError, parse_number, parse_pax, parse_sparse_1_0_map, walk
from nbdformats.filters._members import normalize

HOLE = EXTENT_HOLE | EXTENT_ZERO
SHORT_NAMES = ["disk.img", "sparse.img", "ünïcödé.txt", "empty"]  # fit ustar and v7 headers


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    root = tmp_path_factory.mktemp("tar")
    return root, make_tree(root / "src")


def chain_for(path: Path, *params: tuple[str, str]):
    return filter_over_file("tar", path, *params)


# (id, maker, sparse stored as sparse, all names fit)
FORMATS = [
    ("gnu", lambda r, o: gnu_tar(r, o, "gnu"), False, True),
    ("gnu-sparse", lambda r, o: gnu_tar(r, o, "gnu", "--sparse"), True, True),
    ("oldgnu", lambda r, o: gnu_tar(r, o, "oldgnu"), False, True),
    ("pax", lambda r, o: gnu_tar(r, o, "pax"), False, True),
    ("pax-sparse-0.0", lambda r, o: gnu_tar(r, o, "pax", "--sparse", "--sparse-version=0.0"), True, True),
    ("pax-sparse-0.1", lambda r, o: gnu_tar(r, o, "pax", "--sparse", "--sparse-version=0.1"), True, True),
    ("pax-sparse-1.0", lambda r, o: gnu_tar(r, o, "pax", "--sparse", "--sparse-version=1.0"), True, True),
    ("ustar", lambda r, o: gnu_tar(r, o, "ustar", names=SHORT_NAMES), False, False),
    ("v7", lambda r, o: gnu_tar(r, o, "v7", names=SHORT_NAMES), False, False),
    ("bsdtar-pax", lambda r, o: bsdtar(r, o, "pax"), True, True),  # bsdtar stores holes itself
    ("bsdtar-ustar", lambda r, o: bsdtar(r, o, "ustar", names=SHORT_NAMES), False, False),
    ("bsdtar-gnutar", lambda r, o: bsdtar(r, o, "gnutar"), False, True),
]


@pytest.mark.parametrize("fmt, make, sparse, all_names", FORMATS, ids=[f[0] for f in FORMATS])
def test_every_member_reads_back(tree, fmt, make, sparse, all_names):
    root, files = tree
    archive = make(root / "src", root / f"{fmt}.tar")
    expected = files if all_names else {n: files[n] for n in SHORT_NAMES}
    chain = chain_for(archive)
    exports = [e.name for e in chain.list_exports(True, False)]
    assert sorted(normalize(n) for n in exports) == sorted(expected)
    for export in exports:
        assert read_export(chain, export) == expected[normalize(export)], export
    # Holes of a sparse member are reported as holes; the data regions as data.
    top = chain.open(readonly=False, export_name=next(e for e in exports if e.endswith("sparse.img")))
    extents = Extents(0, 256 * 1024)
    top.extents(256 * 1024, 0, 0, extents)
    if sparse:
        assert list(extents)[:3] == [(0, 4096, HOLE), (4096, 4096, EXTENT_DATA), (8192, 128 * 1024 - 4096, HOLE)]
        assert not top.can_write()
    else:
        assert top.can_write()
    # Random reads across the sparse member's holes and regions.
    check_random_reads(top, files["sparse.img"], fmt, 50)
    top.close()


def test_walk_matches_python_tarfile(tree):
    """An independent reader agrees on every member's name, data offset and size."""
    root, _ = tree
    archive = gnu_tar(root / "src", root / "walk.tar", "gnu")
    data = archive.read_bytes()
    ours = {e.name: (e.data_offset, e.size) for e in walk(lambda o, n: data[o:o + n], len(data)) if e.kind == "file"}
    with tarfile.open(archive) as t:
        theirs = {m.name if not m.name.startswith(".") else m.name: (m.offset_data, m.size)
                  for m in t.getmembers() if m.isfile()}
    assert {normalize(k): v for k, v in ours.items()} == {normalize(k): v for k, v in theirs.items()}


def test_tar_entry_exact_and_without_dot_slash(tree):
    root, files = tree
    archive = gnu_tar(root / "src", root / "entry.tar", "gnu")
    assert read_export(chain_for(archive, ("tar-entry", "./disk.img"))) == files["disk.img"]
    assert read_export(chain_for(archive, ("tar-entry", "disk.img"))) == files["disk.img"]
    long_name = next(n for n in files if n.startswith(LONG_DIR))
    assert read_export(chain_for(archive, ("tar-entry", long_name))) == files[long_name]
    # Without tar-entry, the empty export name is the first member.
    first = chain_for(archive).default_export(True, False)
    assert read_export(chain_for(archive), "") == files[normalize(first)]


def test_missing_entry_is_a_startup_error_listing_members(tree):
    root, _ = tree
    archive = gnu_tar(root / "src", root / "missing.tar", "gnu", names=["disk.img", "empty"])
    with pytest.raises(ConfigError, match=r"no member 'nothere'.*'disk.img', 'empty'"):
        chain_for(archive, ("tar-entry", "nothere"))
    chain = chain_for(archive)
    with pytest.raises(NBDError, match=r"no member 'nothere'.*'disk.img', 'empty'"):
        chain.open(readonly=True, export_name="nothere")


def test_hardlink_serves_its_target(tmp_path):
    (tmp_path / "a.img").write_bytes(b"x" * 5000)
    (tmp_path / "b.img").hardlink_to(tmp_path / "a.img")
    archive = gnu_tar(tmp_path, tmp_path / "links.tar", "gnu", names=["a.img", "b.img"])
    assert read_export(chain_for(archive, ("tar-entry", "b.img"))) == b"x" * 5000


def test_writes_land_in_the_member(tree, tmp_path):
    root, files = tree
    archive = gnu_tar(root / "src", tmp_path / "rw.tar", "gnu")
    size_before = archive.stat().st_size
    chain = chain_for(archive, ("tar-entry", "disk.img"))
    top = chain.open(readonly=False, export_name="")
    assert top.can_write()
    expected = bytearray(files["disk.img"])
    pattern = bytes(range(256)) * 40
    for offset in (0, 1000, len(expected) - len(pattern)):
        top.pwrite(memoryview(pattern), offset, 0)
        expected[offset:offset + len(pattern)] = pattern
    top.zero(65536, 100000, 0)
    expected[100000:100000 + 65536] = bytes(65536)
    top.flush(0)
    top.close()
    assert archive.stat().st_size == size_before
    assert run(["tar", "-xOf", archive, "./disk.img"]).stdout == bytes(expected)
    assert run(["tar", "-xOf", archive, "./sparse.img"]).stdout == files["sparse.img"]
    run(["tar", "-tf", archive])  # still a valid archive


def test_base256_and_pax_sizes_over_8_gib(tmp_path):
    """Members over 8 GiB: GNU base-256 size field and pax size record (written sparse)."""
    size = (9 << 30) + 12345
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        info = tarfile.TarInfo("huge.img")
        info.size = size
        header = info.tobuf(format=fmt)
        path = tmp_path / f"huge-{fmt}.tar"
        with open(path, "wb") as f:
            f.write(header)
            f.seek(len(header) + size - 4)
            f.write(b"TAIL")
            f.seek(len(header) + (size + BLOCK - 1) // BLOCK * BLOCK + 2 * BLOCK - 1)
            f.write(b"\0")
        top = chain_for(path, ("tar-entry", "huge.img")).open(readonly=True, export_name="")
        assert top.get_size() == size
        buf = bytearray(8)
        top.pread(memoryview(buf), size - 8, 0)
        assert buf == b"\0\0\0\0TAIL"
        top.close()


def test_number_fields():
    assert parse_number(b"0000644\x00") == 0o644
    assert parse_number(b"   17 \x00") == 0o17
    assert parse_number(b"\x80" + (9 << 30).to_bytes(11, "big")) == 9 << 30
    with pytest.raises(TarError, match="negative"):
        parse_number(b"\xff" * 12)
    with pytest.raises(TarError, match="bad octal"):
        parse_number(b"12x4\x00")


def test_pax_records():
    data = b"30 mtime=1350244992.023960108\n20 path=a/b c=d.img\n"
    assert parse_pax(data) == [("mtime", b"1350244992.023960108"), ("path", b"a/b c=d.img")]
    for bad in (b"99 path=x\n", b"x path=y\n", b"12 pathxxxx\n", b"10 path=y"):
        with pytest.raises(TarError, match="malformed pax record"):
            parse_pax(bad)


def test_negative_pax_size_is_refused_not_looped_on():
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w", format=tarfile.PAX_FORMAT) as t:
        info = tarfile.TarInfo("x")
        info.size = 10
        info.pax_headers = {"size": "-600"}
        t.addfile(info, io.BytesIO(b"a" * 10))
    raw = data.getvalue()
    with pytest.raises(TarError, match="bad pax size"):
        list(walk(lambda offset, n: raw[offset:offset + n], len(raw)))


def test_sparse_1_0_map():
    assert parse_sparse_1_0_map(b"2\n0\n10\n4096\n20\n" + bytes(490)) == ([(0, 10), (4096, 20)], 512)
    assert parse_sparse_1_0_map(b"2\n0\n10\n40") is None  # needs more data
    with pytest.raises(TarError):
        parse_sparse_1_0_map(b"2\nzz\n")


def test_corrupt_truncated_and_foreign_input(tree, tmp_path):
    root, _ = tree
    good = gnu_tar(root / "src", tmp_path / "good.tar", "gnu", names=["disk.img", "empty"])
    bad_checksum = corrupt(Path(shutil.copy(good, tmp_path / "bad.tar")), 5, b"X")
    with pytest.raises(ConfigError, match="bad header checksum at offset 0"):
        chain_for(bad_checksum, ("tar-entry", "disk.img"))
    cut = truncated_copy(good, tmp_path / "cut.tar", 1 << 20)
    with pytest.raises(ConfigError, match="truncated archive: member 'disk.img'"):
        chain_for(cut, ("tar-entry", "disk.img"))
    with pytest.raises(NBDError, match="truncated archive"):
        chain_for(cut).list_exports(True, False)
    junk = tmp_path / "junk.tar"
    junk.write_bytes(hashlib.sha256(b"junk").digest() * 64)
    with pytest.raises(ConfigError, match="not a tar archive"):
        chain_for(junk, ("tar-entry", "x"))
    # A sparse map that claims more data than the member stores.
    sparse = gnu_tar(root / "src", tmp_path / "sparse.tar", "pax", "--sparse", "--sparse-version=0.1",
                     names=["sparse.img"])
    data = sparse.read_bytes()
    assert b"GNU.sparse.map=4096,4096," in data
    (tmp_path / "badmap.tar").write_bytes(data.replace(b"GNU.sparse.map=4096,4096,", b"GNU.sparse.map=4096,9999,", 1))
    with pytest.raises(ConfigError, match="sparse map describes"):
        chain_for(tmp_path / "badmap.tar", ("tar-entry", "sparse.img"))


def test_member_names_with_path_tricks_are_just_names(tmp_path):
    path = tmp_path / "tricks.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as t:
        for name in ("../../etc/passwd", "/abs/disk.img"):
            info = tarfile.TarInfo(name)
            info.size = 1024
            t.addfile(info, fileobj=io.BytesIO(name.encode().ljust(1024, b"!")))
    chain = chain_for(path)
    assert [e.name for e in chain.list_exports(True, False)] == ["../../etc/passwd", "/abs/disk.img"]
    assert read_export(chain, "../../etc/passwd").startswith(b"../../etc/passwd!")
    assert read_export(chain, "abs/disk.img").startswith(b"/abs/disk.img!")


# --- through the server, with real clients --------------------------------------------------


def test_server_lists_and_serves_every_member(tree):
    root, files = tree
    archive = gnu_tar(root / "src", root / "served.tar", "pax", "--sparse")
    with serve("--filter=tar", "file", str(archive)) as srv:
        listing = json.loads(run(["nbdinfo", "--json", "--list", srv.uri]).stdout)
        names = [e["export-name"] for e in listing["exports"]]
        assert sorted(normalize(n) for n in names) == sorted(files)
        for name in ("./disk.img", "./sparse.img", f"./{LONG_DIR}/{'f' * 110}.bin"):
            out = root / "copy.img"
            run(["nbdcopy", srv.uri_for(name), str(out)])
            assert sha256_file(out) == hashlib.sha256(files[normalize(name)]).hexdigest()
        run(["qemu-img", "compare", "-f", "raw", "-F", "raw", srv.uri_for("./disk.img"),
             str(root / "src" / "disk.img")], timeout=60)
        extents = nbdinfo_json(srv.uri_for("./sparse.img"), "--map")
        assert [(e["offset"], e["length"], e["type"]) for e in extents[:2]] == [(0, 4096, 3), (4096, 4096, 0)]
        bad = run(["nbdinfo", srv.uri_for("nothere")], check=False)
        assert bad.returncode != 0
        assert "no member 'nothere'" in srv.stderr()


def test_server_random_reads_and_writes(tree, tmp_path):
    root, files = tree
    archive = gnu_tar(root / "src", tmp_path / "rw.tar", "gnu")
    content = files["disk.img"]
    with serve("--filter=tar", "file", str(archive), "tar-entry=disk.img") as srv:
        script = (f"import random\nrng = random.Random(5)\ndata = open({str(root / 'src' / 'disk.img')!r}, 'rb').read()\n"
                  "for _ in range(200):\n"
                  "    o = rng.randrange(len(data)); n = min(rng.randrange(1, 65536), len(data) - o)\n"
                  "    assert h.pread(n, o) == data[o:o + n], (o, n)\n"
                  "h.pwrite(b'W' * 5000, 123457)\nh.flush()\nprint('ok')\n")
        assert nbdsh(srv.uri, script).stdout.strip() == b"ok"
    expected = bytearray(content)
    expected[123457:128457] = b"W" * 5000
    assert run(["tar", "-xOf", archive, "./disk.img"]).stdout == bytes(expected)


@pytest.mark.parametrize("tool", ["gzip", "xz", "zstd"])
def test_tar_over_decompressing_filters(tree, tool):
    root, files = tree
    archive = compress(gnu_tar(root / "src", root / f"z-{tool}.tar", "gnu"), tool)
    with serve("--filter=tar", f"--filter={tool}", "file", str(archive), "tar-entry=./disk.img") as srv:
        out = root / f"{tool}-copy.img"
        run(["nbdcopy", srv.uri, str(out)])
        assert sha256_file(out) == hashlib.sha256(files["disk.img"]).hexdigest()
        assert nbdinfo_json(srv.uri)["exports"][0]["is_read_only"] is True


@pytest.mark.parametrize("under", ["", "xz"])
def test_agrees_with_nbdkit_where_nbdkit_is_right(tree, under):
    """Short names, no sparse members: nbdkit's tar filter serves the same bytes as ours
    (also over nbdkit's and our xz filters)."""
    root, files = tree
    archive = gnu_tar(root / "src", root / "agree.tar", "gnu", names=["disk.img", "ünïcödé.txt"])
    if under:
        archive = compress(archive, under)
    filters = ["--filter=tar"] + ([f"--filter={under}"] if under else [])
    for member in ("disk.img", "ünïcödé.txt"):
        with serve_nbdkit(*filters, "file", str(archive), f"tar-entry={member}") as ref, \
                serve(*filters, "file", str(archive), f"tar-entry={member}") as srv:
            theirs, ours = root / "nbdkit.img", root / "ours.img"
            run(["nbdcopy", ref.uri, str(theirs)])
            run(["nbdcopy", srv.uri, str(ours)])
            assert sha256_file(ours) == sha256_file(theirs) == hashlib.sha256(files[member]).hexdigest()

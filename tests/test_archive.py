"""archive filter (libarchive): many formats, unpacking on demand into a shared spill,
truncated and hostile archives, passphrases, and interop through the server."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import time
import zipfile
from pathlib import Path

import pytest

from conftest import nbdinfo_json, run, serve, sha256_file
from fixtures.archives import bsdtar, compress, gnu_tar, make_tree, py_zip, truncated_copy
from fixtures.reads import check_random_reads, filter_over_file, read_export, read_range
from nbdformats.api.errors import ConfigError, NBDError
from nbdformats.client import NBDClient
from nbdformats.filters._members import normalize

FLAT_NAMES = ["disk.img", "sparse.img", "empty"]  # for formats with flat, short names (ar)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    root = tmp_path_factory.mktemp("archive")
    return root, make_tree(root / "src")


def chain_for(path: Path, *params: tuple[str, str]):
    return filter_over_file("archive", path, *params)


FORMATS = [
    ("tar.gz", lambda r, o: bsdtar(r, o, "pax", "-z")),
    ("tar.bz2", lambda r, o: bsdtar(r, o, "pax", "-j")),
    ("tar.xz", lambda r, o: bsdtar(r, o, "pax", "-J")),
    ("tar.zst", lambda r, o: bsdtar(r, o, "pax", "--zstd")),
    ("gnu-sparse.tar", lambda r, o: gnu_tar(r, o, "gnu", "--sparse")),
    ("cpio", lambda r, o: bsdtar(r, o, "newc")),
    # disk.img (2 MiB) is first: skipping it trips libarchive < 3.7.5 unless we read through it.
    ("7z", lambda r, o: bsdtar(r, o, "7zip")),
    ("iso", lambda r, o: bsdtar(r, o, "iso9660")),
    ("zip", lambda r, o: bsdtar(r, o, "zip")),
    ("ar", lambda r, o: bsdtar(r, o, "argnu", names=FLAT_NAMES)),
]


@pytest.mark.parametrize("fmt, make", FORMATS, ids=[f[0] for f in FORMATS])
@pytest.mark.parametrize("spill", ["memory", "file"])
def test_every_member_reads_back(tree, fmt, make, spill):
    root, files = tree
    archive = root / f"a-{fmt}"
    if not archive.exists():
        make(root / "src", archive)
    expected = {n: files[n] for n in FLAT_NAMES} if fmt == "ar" else files
    chain = chain_for(archive, ("archive-memory", "64M" if spill == "memory" else "0"))
    exports = [e.name for e in chain.list_exports(True, False)]
    assert sorted(normalize(n) for n in exports) == sorted(expected)
    disk = next(e for e in exports if e.endswith("disk.img"))
    top = chain.open(readonly=True, export_name=disk)
    assert not top.can_write()
    # Random reads first (forcing unpacking on demand), then everything.
    check_random_reads(top, files["disk.img"], fmt, 30, max_length=200000)
    top.close()
    for export in exports:
        assert read_export(chain, export) == expected[normalize(export)], export
    chain.cleanup()


def test_first_read_does_not_wait_for_the_whole_member(tree):
    root, files = tree
    big = root / "big"
    big.mkdir(exist_ok=True)
    content = b"".join(hashlib.sha256(str(i).encode()).hexdigest().encode() for i in range(150000))  # 9.6 MB
    (big / "big.img").write_bytes(content)
    archive = bsdtar(big, root / "big.tar.gz", "pax", "-z", names=["big.img"])
    chain = chain_for(archive, ("archive-entry", "big.img"), ("archive-memory", "0"))
    first = chain.open(readonly=True, export_name="")
    buf = bytearray(4096)
    first.pread(memoryview(buf), 0, 0)
    assert buf == content[:4096]
    [unpacker] = set(chain.filters[0].unpackers.values())
    assert 4096 <= unpacker.done < len(content) // 2  # only what was needed is unpacked
    # A second connection shares the spill: what is unpacked is not unpacked again.
    second = chain.open(readonly=True, export_name="")
    whole = bytearray(len(content))
    second.pread(memoryview(whole), 0, 0)
    assert whole == content and unpacker.done == len(content)
    first.pread(memoryview(buf), len(content) - 4096, 0)
    assert buf == content[-4096:]
    first.close()
    second.close()
    chain.cleanup()


def test_truncated_archive_serves_what_is_there_then_eio(tree, tmp_path):
    root, files = tree
    archive = bsdtar(root / "src", tmp_path / "t.tar.gz", "pax", "-z", names=["disk.img"])
    cut = truncated_copy(archive, tmp_path / "cut.tar.gz", archive.stat().st_size * 6 // 10)
    chain = chain_for(cut, ("archive-entry", "disk.img"))
    top = chain.open(readonly=True, export_name="")
    head = bytearray(65536)
    top.pread(memoryview(head), 0, 0)
    assert head == files["disk.img"][:65536]
    tail = bytearray(4096)
    with pytest.raises(NBDError, match="unpacking 'disk.img' failed") as failure:
        top.pread(memoryview(tail), top.get_size() - 4096, 0)
    assert failure.value.errno == errno.EIO
    top.pread(memoryview(head), 0, 0)  # what was unpacked is still served
    assert head == files["disk.img"][:65536]
    with pytest.raises(NBDError, match="failed"):  # and the failure is remembered, not retried
        top.pread(memoryview(tail), top.get_size() - 4096, 0)
    top.close()
    chain.cleanup()


def test_output_beyond_the_declared_size_is_cut(tmp_path):
    """A member whose header declares 1000 bytes but whose stream inflates to 1 MB."""
    archive = py_zip(tmp_path / "bomb.zip", {"b.img": b"A" * 1000000})
    data = bytearray(archive.read_bytes())
    with zipfile.ZipFile(archive) as z:
        central = z.start_dir
    data[central + 24:central + 28] = (1000).to_bytes(4, "little")  # uncompressed size, central
    data[22:26] = (1000).to_bytes(4, "little")  # and local header
    (tmp_path / "lie.zip").write_bytes(data)
    chain = chain_for(tmp_path / "lie.zip")
    top = chain.open(readonly=True, export_name="b.img")  # the spill lives while a connection uses it
    assert read_range(top, 0, top.get_size()) == b"A" * 1000
    [unpacker] = set(chain.filters[0].unpackers.values())
    assert unpacker.finished and unpacker.done == 1000
    top.close()
    chain.cleanup()


def test_max_size_refuses_large_members(tree):
    root, _ = tree
    archive = bsdtar(root / "src", root / "max.cpio", "newc", names=["disk.img"])
    chain = chain_for(archive, ("archive-max-size", "1M"))
    with pytest.raises(NBDError, match="more than archive-max-size") as failure:
        chain.open(readonly=True, export_name="disk.img")
    assert failure.value.errno == errno.EFBIG


def test_passphrase(tmp_path):
    (tmp_path / "secret.img").write_bytes(b"top secret " * 3000)
    run(["sh", "-c", f"cd '{tmp_path}' && zip -q -P hunter2 enc.zip secret.img"])
    (tmp_path / "pw").write_text("hunter2\n")
    for passphrase in ("hunter2", f"+{tmp_path / 'pw'}"):
        chain = chain_for(tmp_path / "enc.zip", ("archive-passphrase", passphrase))
        assert read_export(chain, "secret.img") == b"top secret " * 3000
        chain.cleanup()
    for params in ([("archive-passphrase", "wrong")], []):
        chain = chain_for(tmp_path / "enc.zip", *params)
        with pytest.raises(NBDError) as failure:
            read_export(chain, "secret.img")
        assert "hunter2" not in str(failure.value) and "wrong" not in str(failure.value)
        chain.cleanup()


def test_bad_input_is_a_clear_startup_error(tree, tmp_path):
    root, _ = tree
    archive = bsdtar(root / "src", tmp_path / "two.7z", "7zip", names=["disk.img", "empty"])
    with pytest.raises(ConfigError, match=r"no member 'nope'.*'disk.img', 'empty'"):
        chain_for(archive, ("archive-entry", "nope"))
    junk = tmp_path / "junk.bin"
    junk.write_bytes(hashlib.sha256(b"junk").digest() * 1000)
    with pytest.raises(ConfigError, match="archive: .*[Uu]nrecognized archive format"):
        chain_for(junk, ("archive-entry", "x"))


# --- through the server ---------------------------------------------------------------------


def test_server_lists_and_serves_members(tree):
    root, files = tree
    archive = bsdtar(root / "src", root / "served.tar.xz", "pax", "-J")
    with serve("--filter=archive", "file", str(archive)) as srv:
        listing = json.loads(run(["nbdinfo", "--json", "--list", srv.uri]).stdout)
        names = [e["export-name"] for e in listing["exports"]]
        assert sorted(normalize(n) for n in names) == sorted(files)
        for name in ("./disk.img", "./sparse.img"):
            out = root / "copy.img"
            run(["nbdcopy", srv.uri_for(name), str(out)])
            assert sha256_file(out) == hashlib.sha256(files[normalize(name)]).hexdigest()
        run(["qemu-img", "compare", "-f", "raw", "-F", "raw", srv.uri_for("./disk.img"),
             str(root / "src" / "disk.img")], timeout=60)


def test_archive_over_gzip_filter(tree):
    root, files = tree
    archive = compress(bsdtar(root / "src", root / "c.cpio", "newc", names=["disk.img"]), "gzip")
    with serve("--filter=archive", "--filter=gzip", "file", str(archive), "archive-entry=disk.img") as srv:
        out = root / "cpio-copy.img"
        run(["nbdcopy", srv.uri, str(out)])
        assert sha256_file(out) == hashlib.sha256(files["disk.img"]).hexdigest()
        assert nbdinfo_json(srv.uri)["exports"][0]["is_read_only"] is True


def rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def zeroes_zip(path: Path, members: int, size: int) -> Path:
    """A small zip of `members` deflated members of `size` zero bytes each."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for index in range(members):
            with z.open(f"m{index}.img", "w") as f:
                for _ in range(size >> 20):
                    f.write(bytes(1 << 20))
    return path


def test_memory_budget_bounds_rss_and_members_are_freed_when_unused(tmp_path, monkeypatch):
    """Issue 20, item 1: 8 members of 64 MiB zeroes (a 500 KB zip), all opened at once and read
    at their end.  Before, every member stayed in RAM until exit (RSS +512 MiB, never freed).
    Now at most archive-memory-total= of members is in memory, the others go to $TMPDIR, and
    every member is freed when its last connection closes."""
    archive = zeroes_zip(tmp_path / "zeroes.zip", 8, 64 << 20)
    assert archive.stat().st_size < 1 << 20
    spill_dir = tmp_path / "spill"
    spill_dir.mkdir()
    monkeypatch.setenv("TMPDIR", str(spill_dir))
    with serve("--filter=archive", "file", str(archive), "archive-memory-total=128M") as srv:
        before = rss_mib(srv.proc.pid)
        clients = [NBDClient.connect(srv.uri_for(f"m{index}.img")) for index in range(8)]
        try:
            for client in clients:
                assert bytes(client.pread(4096, (64 << 20) - 4096)) == bytes(4096)
            peak = rss_mib(srv.proc.pid)
            spilled = sum("nbdformats-spill" in os.readlink(fd) for fd in Path(f"/proc/{srv.proc.pid}/fd").iterdir())
        finally:
            for client in clients:
                client.close()
        time.sleep(1)  # the server closes the handles after the disconnects
        after = rss_mib(srv.proc.pid)
        log = srv.stderr()
    assert peak - before < 128 + 64, (before, peak)  # the budget, and room for libarchive and buffers
    assert spilled == 6  # two members in memory, six in temporary files
    assert after - before < 48, (before, peak, after)
    assert "Traceback" not in log


def test_members_beyond_both_budgets_are_refused_until_others_close(tmp_path, monkeypatch):
    archive = zeroes_zip(tmp_path / "three.zip", 3, 4 << 20)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    chain = chain_for(archive, ("archive-memory-total", "4M"), ("archive-disk-total", "4M"))
    first = chain.open(readonly=True, export_name="m0.img")  # in memory
    second = chain.open(readonly=True, export_name="m1.img")  # in a temporary file
    with pytest.raises(NBDError, match=r"no room to unpack 'm2.img' \(4194304 bytes\) while other connections use "
                                       r"members: archive-memory-total=4194304 has 0 bytes left") as refused:
        chain.open(readonly=True, export_name="m2.img")
    assert refused.value.errno == errno.ENOMEM
    again = chain.open(readonly=True, export_name="m0.img")  # a member in use is shared, not unpacked again
    first.close()
    again.close()  # m0 is freed: its memory serves m2
    third = chain.open(readonly=True, export_name="m2.img")
    assert read_range(third, (4 << 20) - 10, 10) == bytes(10)
    assert set(chain.filters[0].unpackers) == {("", "m1.img"), ("", "m2.img")}
    second.close()
    third.close()
    assert not chain.filters[0].unpackers
    chain.cleanup()

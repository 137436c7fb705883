"""floppy plugin: FAT disks built from directories, checked with dosfstools, mtools, qemu and nbdkit.

Tools: dosfstools (fsck.fat, mkfs.fat), mtools, syslinux + syslinux-common, qemu-system-x86,
libnbd-bin (nbdcopy, nbdinfo), python3-libnbd, nbdkit (reference).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import struct
import time
from pathlib import Path

import pytest

from conftest import nbdcopy_to_file, nbdinfo_json, nbdsh, run, serve, serve_nbdkit
from fixtures.floppy import (BOOT_MESSAGE, MIB, MTOOLS_ENV, PARTITION_OFFSET, extract_all, fsck, host_tree,
                             make_boot_sector, make_tree, mdir_paths, qemu_boot)
from fixtures.reads import read_range
from fixtures.serving import copy_out, fails
from nbdformats.api.chain import EXTENT_DATA, EXTENT_HOLE, EXTENT_ZERO, Chain
from nbdformats.api.errors import ConfigError
from nbdformats.formats.fat import layout, names
from nbdformats.plugins.floppy import syslinux
from nbdformats.formats.fat.dirents import Times, fat_timestamp, file_entry, short_entry
from nbdformats.formats.fat.layout import FatTable, Needs, plan
from nbdformats.registry import load_plugin


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes | None]]:
    root = tmp_path_factory.mktemp("floppy") / "src"
    return root, make_tree(root)


def open_chain(*pairs: tuple[str, str]):
    """The plugin configured and ready, without a server; returns (plugin, top layer)."""
    chain = Chain([], load_plugin("floppy")())
    chain.configure({0: list(pairs)})
    chain.get_ready()
    return chain.plugin, chain.open(readonly=True, export_name="")


def image_of(tmp: Path, *pairs: tuple[str, str], name: str = "disk.img") -> Path:
    """The whole disk read through the chain into a file."""
    _, top = open_chain(*pairs)
    path = tmp / name
    path.write_bytes(read_range(top, 0, top.get_size()))
    return path


def check_contents(image: Path, tmp: Path, expected: dict[str, bytes | None], offset: int) -> None:
    out = tmp / "extracted"
    shutil.rmtree(out, ignore_errors=True)
    extract_all(image, out, offset)
    found = host_tree(out)
    assert sorted(found) == sorted(expected)
    for path, data in expected.items():
        assert found[path] == data, path


# -- names (sans-IO) ----------------------------------------------------------------------


def test_short_names_follow_the_basis_name_algorithm() -> None:
    assert names.exact_short_name("README.TXT") == b"README  TXT"
    assert names.exact_short_name("KERNEL") == b"KERNEL     "
    for not_exact in ("readme.txt", "LONGFILENAME.TXT", "A.B.C", "A B", ".X", "X.", "A+B", "ABC.TOOL"):
        assert names.exact_short_name(not_exact) is None, not_exact
    assert names.basis_name("readme.txt") == ("README", "TXT", False)
    assert names.basis_name("archive.tar.gz") == ("ARCHIVE", "GZ", True)
    assert names.basis_name(".bashrc") == ("BASHRC", "", True)
    assert names.basis_name("a+b,c;d=e[f]g.dat") == ("A_B_C_D_", "DAT", True)
    assert names.basis_name("my file.html") == ("MYFILE", "HTM", True)
    assert names.basis_name("café") == ("CAF_", "", True)
    assert names.basis_name("...") == ("_", "", True)

    allocator = names.ShortNameAllocator()
    allocator.reserve(b"LONGFI~1TXT")  # an exact 8.3 name already in the directory
    assert allocator.allocate("readme.txt") == b"README  TXT"
    assert allocator.allocate("ReadMe.txt") == b"README~1TXT"
    shorts = [allocator.allocate(f"long file {i}.txt") for i in range(11)]
    assert shorts[:2] == [b"LONGFI~2TXT", b"LONGFI~3TXT"]
    assert shorts[8:] == [b"LONGF~10TXT", b"LONGF~11TXT", b"LONGF~12TXT"]
    assert len(set(shorts)) == len(shorts)


def test_long_name_entries_and_checksum() -> None:
    # ChkSum() over "README  TXT", computed by hand from the spec's rotate-and-add.
    total = 0
    for byte in b"README  TXT":
        total = ((total >> 1) | ((total & 1) << 7)) + byte & 0xFF
    assert names.short_name_checksum(b"README  TXT") == total
    entries = names.long_name_entries("Mixed Case Name.Text", 0x5A)
    assert len(entries) == 64  # 20 units: two entries
    first, second = entries[:32], entries[32:]
    assert first[0] == 0x42 and second[0] == 0x01  # last entry first, with 0x40
    assert first[11] == 0x0F and first[13] == 0x5A and first[26:28] == b"\0\0"
    units = b"".join(e[1:11] + e[14:26] + e[28:32] for e in (second, first))
    assert units[:40].decode("utf-16-le") == "Mixed Case Name.Text"
    assert units[40:42] == b"\0\0" and set(units[42:]) == {0xFF}
    # 13 units fill one entry exactly: no terminator.
    assert names.long_name_entries("abcdefghijklm", 0)[1:11].decode("utf-16-le") == "abcde"
    assert set(names.long_name_entries("abcdefghijklm", 0)[28:32]) != {0xFF}
    # A character outside the BMP takes two UTF-16 units (a surrogate pair).
    assert names.long_name_slots("x" * 12 + "😀") == 2


def test_windows_name_mapping_and_labels() -> None:
    assert names.windows_name("a:b?c*.txt") == "a\uf03ab\uf03fc\uf02a.txt"
    assert names.windows_name("trailing. ") == "trailing\uf02e\uf020"
    assert names.windows_name("plain name.txt") == "plain name.txt"
    assert names.decode_host_name(os.fsdecode(b"caf\xe9")) == "café"
    assert names.fold("straße.TXT") == "STRAßE.TXT" and names.fold("Abc") == "ABC"
    assert names.volume_label("my disk") == b"MY DISK    "
    assert names.volume_label("") is None
    with pytest.raises(ValueError, match="at most 11"):
        names.volume_label("TWELVE CHARS")
    with pytest.raises(ValueError, match="cannot be stored"):
        names.volume_label("DISK*")
    with pytest.raises(ValueError, match="cannot be stored"):
        names.volume_label("DISQUÉ")


def test_whole_directory_name_check_agrees_with_the_mapping() -> None:
    """kept_as_they_are (one check of a directory's names joined by "/") is true only when
    every name is kept as it is by decode_host_name and windows_name."""
    tricky = ["plain.txt", "a b", "a.", "a ", ".a", " a", "a:b", "a\\b", "a|b", 'a"b', "a*b", "a?b", "a<b",
              "a>b", "a\x01b", "a\nb", "a\x7fb", "café", os.fsdecode(b"\xff"), "a..b", "x" * 255, "dot. x"]
    for first in tricky:
        for second in tricky:
            group = [first, second]
            if names.kept_as_they_are("/".join(group)):
                assert all(names.windows_name(names.decode_host_name(n)) == n for n in group), group
            elif all(n.isascii() and n.isprintable() for n in group):
                assert any(names.windows_name(n) != n for n in group), group
    assert names.kept_as_they_are("a file with a long name 000001.txt/README")
    assert names.kept_as_they_are("")


def test_fat_timestamps() -> None:
    t = time.mktime((2021, 6, 15, 13, 45, 31, 0, 0, -1)) + 0.25
    date, clock, tenths = fat_timestamp(t)
    assert date == (2021 - 1980) << 9 | 6 << 5 | 15
    assert clock == 13 << 11 | 45 << 5 | 15
    assert tenths == 125  # the odd second and 25 hundredths
    assert fat_timestamp(0)[:2] == (1 << 5 | 1, 0)  # before 1980: clamped
    assert fat_timestamp(2 ** 40)[0] == 127 << 9 | 12 << 5 | 31
    # A file's entry (file_entry, the fast path) holds the same times as short_entry's.
    for moment in (t, 0.0, -5.5, 315532801.25, 2.0 ** 40, float("inf"), float("-inf"), float("nan")):
        assert file_entry(b"NAME    TXT", 0x20, 7, moment, t, moment) == \
            short_entry(b"NAME    TXT", 0x20, 0, 7, Times(moment, t, moment))
    assert file_entry(b"NAME    TXT", 0x20, 7, t, t, t, 0x12345678) == \
        short_entry(b"NAME    TXT", 0x20, 0x12345678, 7, Times(t, t, t))


# -- layout (sans-IO) ---------------------------------------------------------------------


def fat_type_of(geometry: layout.Geometry) -> int:
    """What every FAT driver concludes from the cluster count (spec section 3.5)."""
    data_sectors = geometry.total_sectors - geometry.data_start
    clusters = data_sectors // geometry.sectors_per_cluster
    return 12 if clusters < 4085 else 16 if clusters < 65525 else 32


@pytest.mark.parametrize("fat,partition,size,bits,partitioned", [
    ("32", None, None, 32, True), ("32", None, 64 * MIB, 32, True), ("32", "none", 3 << 30, 32, False),
    ("16", None, None, 16, True), ("16", None, 200 * MIB, 16, True), ("12", None, None, 12, False),
    ("12", None, 1440 * 1024, 12, False), ("12", "mbr", 8 * MIB, 12, True),
    ("auto", None, None, 12, False), ("auto", None, 100 * MIB, 16, True), ("auto", None, 600 * MIB, 32, True),
    ("auto", "mbr", 5 * MIB, 12, True),
])
def test_plan_gives_cluster_counts_that_match_the_fat_type(fat, partition, size, bits, partitioned) -> None:
    needs = Needs([32 * 40] * 3, [1000, 70000, 0, 5], 32 * 10)
    g = plan(fat, partition, size, needs)
    assert g.fat_bits == bits == fat_type_of(g)
    assert g.partitioned == partitioned
    if size is not None:
        assert size - g.disk_size < 64 * 1024  # only a partial cluster may be left over
    assert g.fat_sectors * 512 * 8 >= (g.clusters + 2) * bits
    assert needs.clusters(g.cluster_size, bits == 32) <= g.clusters
    if bits == 32:
        assert g.data_start % g.sectors_per_cluster == 0


@pytest.mark.parametrize("kib", [360, 720, 1200, 1440, 2880])
def test_plan_floppy_matches_mkfs_fat(tmp: Path, kib: int) -> None:
    """The PC floppy formats: the BPB mkfs.fat writes, field by field."""
    run(["mkfs.fat", "-C", str(tmp / "ref.img"), str(kib)])
    reference = (tmp / "ref.img").read_bytes()[:512]
    ours = layout.boot_sector(plan("12", None, kib * 1024, Needs([], [], 0)), b"NO NAME    ", 0)
    fields = "<HBHBHHBHHHII"  # bytes per sector .. total sectors 32
    assert struct.unpack_from(fields, ours, 11) == struct.unpack_from(fields, reference, 11)
    assert ours[0x26] == reference[0x26] == 0x29 and ours[0x36:0x3E] == reference[0x36:0x3E] == b"FAT12   "


def test_plan_errors() -> None:
    needs = Needs([], [3 * MIB], 64)
    with pytest.raises(layout.LayoutError, match="at least 65525 clusters"):
        plan("32", None, 20 * MIB, needs)
    with pytest.raises(layout.LayoutError, match="do not fit in a 1440 KiB floppy"):
        plan("12", None, 1440 * 1024, needs)
    with pytest.raises(layout.LayoutError, match="need"):
        plan("16", None, 3 * MIB, needs)
    with pytest.raises(layout.LayoutError, match="too big for FAT12"):
        plan("12", "mbr", None, Needs([], [200 * MIB], 64))


def test_fat_table_chains() -> None:
    g = plan("32", None, None, Needs([], [], 0))
    fat = FatTable(g, chain_ends=[2, 5, 6], allocated_end=7)  # runs 2, 3-5, 6
    expected = [0x0FFFFFF8, 0x0FFFFFFF, 0x0FFFFFFF, 4, 5, 0x0FFFFFFF, 0x0FFFFFFF, 0, 0]
    assert list(fat.entries(0, 9)) == expected
    assert fat.read(10, 19) == struct.pack("<9I", *expected)[10:29]  # unaligned, past the used part
    floppy = FatTable(plan("12", None, 1440 * 1024, Needs([], [], 0)), chain_ends=[3], allocated_end=4)
    assert floppy.read(0, 7) == bytes.fromhex("f0ffff") + bytes.fromhex("03f0ff") + b"\0"  # 12-bit pairs


# -- SYSLINUX patching agrees with the installer --------------------------------------------


def test_syslinux_patch_reproduces_the_installer(tmp: Path) -> None:
    image = tmp / "ref.img"
    run(["mkfs.fat", "-C", str(image), "1440"])
    run(["syslinux", "--install", str(image)], env={"MTOOLS_SKIP_CHECK": "1"})
    run(["mcopy", "-i", str(image), "::ldlinux.sys", str(tmp / "ldlinux.sys")])
    installed = (tmp / "ldlinux.sys").read_bytes()
    boot = image.read_bytes()[:512]
    chain = run(["mshowfat", "-i", str(image), "::ldlinux.sys"]).stdout.decode()
    first, last = map(int, re.search(r"<(\d+)-(\d+)>", chain).groups())
    sectors = [33 + cluster - 2 for cluster in range(first, last + 1)]  # 1.44M: data at sector 33
    assert syslinux.patch(installed, boot, sectors) == (installed, boot)
    moved, moved_boot = syslinux.patch(installed, boot, [s + 1000 for s in sectors])
    assert moved != installed and moved_boot != boot
    assert syslinux.patch(moved, moved_boot, sectors) == (installed, boot)
    # Fragmented: one extent per run of consecutive sectors.
    assert syslinux.generate_extents([10, 11, 12, 40, 41, 7], 10) == [(10, 3), (40, 2), (7, 1)]


# -- served disks, checked with real tools --------------------------------------------------


def test_served_fat32_disk(source, tmp: Path) -> None:
    root, expected = source
    image, info, _ = copy_out(tmp, "floppy", str(root))
    assert info["is_read_only"] is True and info["export-size"] == image.stat().st_size
    mbr = image.read_bytes()[:512]
    assert mbr[446 + 4] == 0x0C and struct.unpack_from("<I", mbr, 446 + 8)[0] == 2048
    report = fsck(image, PARTITION_OFFSET)
    assert "65525 clusters" in report or re.search(r"/\d{5,} clusters", report)
    check_contents(image, tmp, expected, PARTITION_OFFSET)
    header = run(["mdir", "-i", f"{image}@@{PARTITION_OFFSET}", "::"], env=MTOOLS_ENV).stdout.decode()
    assert "Volume in drive : is NBDKITFLOPY" in header
    # Timestamps: mcopy -m gave the extracted files the FAT modification times.
    for relative in ("README.TXT", "sub/two clusters.bin"):
        assert abs(os.stat(tmp / "extracted" / relative).st_mtime - os.stat(root / relative).st_mtime) <= 2


@pytest.mark.parametrize("args,bits,offset", [
    (("fat=16",), 16, PARTITION_OFFSET),
    (("fat=12",), 12, 0),
    (("fat=auto", "label=small"), 12, 0),
    (("fat=12", "size=1440K"), 12, 0),
    (("fat=32", "partition=none", "size=40M"), 32, 0),
    (("fat=16", "partition=none"), 16, 0),
])
def test_served_fat_variants(source, tmp: Path, args, bits, offset) -> None:
    root, expected = source
    image, info, _ = copy_out(tmp, "floppy", str(root), *args)
    fsck(image, offset)
    boot = image.read_bytes()[offset:offset + 512]
    assert boot[0x52 if bits == 32 else 0x36:][:8] == f"FAT{bits}".ljust(8).encode()
    spc, reserved, fats, root_entries, total16, _, fat16 = struct.unpack_from("<BHBHHBH", boot, 13)
    total = total16 or struct.unpack_from("<I", boot, 32)[0]
    fat_sectors = fat16 or struct.unpack_from("<I", boot, 36)[0]
    clusters = (total - reserved - fats * fat_sectors - root_entries * 32 // 512) // spc
    assert (12 if clusters < 4085 else 16 if clusters < 65525 else 32) == bits
    if "size=1440K" in args:
        assert info["export-size"] == 1440 * 1024
    check_contents(image, tmp, expected, offset)


def test_agrees_with_nbdkit_floppy(source, tmp: Path) -> None:
    """What mdir lists: nbdkit's image (made big enough for mtools to read it as FAT32) and ours."""
    root, _ = source
    ours, _, _ = copy_out(tmp, "floppy", str(root))
    reference = tmp / "nbdkit.img"
    with serve_nbdkit("floppy", str(root), "size=1200M") as srv:
        nbdcopy_to_file(srv.uri, reference)
    env = dict(MTOOLS_ENV, MTOOLS_SKIP_CHECK="1")  # nbdkit writes 0 heads and sectors/track
    assert mdir_paths(ours, PARTITION_OFFSET) == mdir_paths(reference, PARTITION_OFFSET, env=env)


def test_big_file_read_live(tmp: Path) -> None:
    src = tmp / "src"
    src.mkdir()
    with open(src / "big.bin", "wb") as f:
        for i in range(100):
            f.write(os.urandom(1024) * 1024)
    (src / "changing.txt").write_bytes(b"before\n")
    with serve("floppy", str(src)) as srv:
        (src / "changing.txt").write_bytes(b"after!\n")  # same size: the disk shows it as it is now
        image = tmp / "disk.img"
        nbdcopy_to_file(srv.uri, image)
        (src / "changing.txt").write_bytes(b"cut")  # shorter: reads of it now fail
        out = tmp / "out"
        extract_all(image, out, PARTITION_OFFSET)
        assert (out / "big.bin").read_bytes() == (src / "big.bin").read_bytes()
        assert (out / "changing.txt").read_bytes() == b"after!\n"
        cluster = int(re.search(r"<(\d+)", run(["mshowfat", "-i", f"{image}@@{PARTITION_OFFSET}",
                                                 "::changing.txt"]).stdout.decode()).group(1))
        boot = image.read_bytes()[PARTITION_OFFSET:PARTITION_OFFSET + 512]
        spc, reserved, fat_sectors = boot[13], struct.unpack_from("<H", boot, 14)[0], struct.unpack_from("<I", boot, 36)[0]
        offset = PARTITION_OFFSET + (reserved + 2 * fat_sectors + (cluster - 2) * spc) * 512
        proc = nbdsh(srv.uri, f"try:\n    h.pread(512, {offset})\n    print('no error')\n"
                              f"except nbd.Error as e:\n    print('error', e.errno)\n")
        assert proc.stdout.decode().split() == ["error", errno.errorcode[errno.EIO]]


def test_directories_are_encoded_at_first_read_from_what_the_scan_saw(tmp: Path) -> None:
    """Directory entries are encoded when a client first reads their clusters, but from the
    metadata of start-up: a file deleted, added or touched later changes only the data read
    (a vanished file's reads fail, as a shrunk file's do)."""
    from nbdformats.api.errors import NBDError
    from nbdformats.plugins.floppy.plugin import read_host
    src = tmp / "src"
    (src / "sub").mkdir(parents=True)
    for name in ("kept.txt", "touched.txt", "deleted.txt", "LATER.TXT"):
        (src / "sub" / name).write_bytes(name.encode())
    os.utime(src / "sub" / "touched.txt", (1_000_000_000, 1_000_000_000))
    plugin, top = open_chain(("dir", str(src)))
    image = plugin.image
    assert [d.data is None for d in image._directories] == [True, True]  # the root (FAT32) and sub
    (src / "sub" / "deleted.txt").unlink()
    (src / "sub" / "added.txt").write_bytes(b"new")
    (src / "sub" / "LATER.TXT").write_bytes(b"later.txt")  # same size, new data
    os.utime(src / "sub" / "touched.txt", (1_500_000_000, 1_500_000_000))
    with pytest.raises(NBDError) as raised:
        read_range(top, 0, top.get_size())  # reaches deleted.txt's clusters
    assert raised.value.errno == errno.ENOENT
    vanished: list[str] = []

    def tolerant(reads: list[tuple[str, int, memoryview]]) -> None:
        for path, offset, view in reads:
            if os.path.exists(path):
                read_host(path, offset, view)
            else:
                vanished.append(os.path.basename(path))
                view[:] = bytes(len(view))

    buf = bytearray(image.size)
    image.read(memoryview(buf), 0, tolerant)
    assert vanished == ["deleted.txt"]
    assert all(d.data is not None for d in image._directories)
    disk = tmp / "disk.img"
    disk.write_bytes(buf)
    fsck(disk, PARTITION_OFFSET)
    assert mdir_paths(disk, PARTITION_OFFSET) == ["sub", "sub/LATER.TXT", "sub/deleted.txt", "sub/kept.txt",
                                                  "sub/touched.txt"]
    out = tmp / "out"
    extract_all(disk, out, PARTITION_OFFSET)
    assert (out / "sub" / "LATER.TXT").read_bytes() == b"later.txt"  # data as it is now
    assert abs(os.stat(out / "sub" / "touched.txt").st_mtime - 1_000_000_000) <= 2  # times of start-up
    # Encoded once, then kept: a second read gives the same bytes.
    again = bytearray(image.size)
    image.read(memoryview(again), 0, tolerant)
    assert again == buf


def test_extents_report_free_space_as_holes(source) -> None:
    root, _ = source
    with serve("floppy", str(root), "size=256M") as srv:
        info = nbdinfo_json(srv.uri, "--map")
    extents = info if isinstance(info, list) else info.get("map", info)
    holes = [e for e in extents if e["type"] & 1]
    assert sum(e["length"] for e in holes) > 200 * MIB  # free clusters and free FAT entries
    assert extents[0]["offset"] == 0 and extents[0]["type"] == 0  # the MBR is data


def test_holes_of_sparse_host_files(tmp: Path) -> None:
    """A sparse host file's holes are holes of the disk: copies skip them, reads give zeros."""
    src = tmp / "src"
    src.mkdir()
    data = os.urandom(MIB)
    with open(src / "sparse.img", "wb") as f:
        f.truncate(64 * MIB)
        f.seek(20 * MIB)
        f.write(data)
    (src / "small.txt").write_text("small\n")
    with serve("floppy", str(src)) as srv:
        extents = nbdinfo_json(srv.uri, "--map")
        nbdcopy_to_file(srv.uri, tmp / "disk.img")
    holes = [e["length"] for e in extents if e["type"] & 1]
    assert max(holes) >= 20 * MIB - 4096 and sum(holes) >= 63 * MIB - 4096
    out = tmp / "out"
    extract_all(tmp / "disk.img", out, PARTITION_OFFSET)
    assert (out / "sparse.img").read_bytes() == bytes(20 * MIB) + data + bytes(43 * MIB)
    assert (out / "small.txt").read_text() == "small\n"


def test_extents_in_chain(source) -> None:
    root, _ = source
    _, top = open_chain(("dir", str(root)))
    from nbdformats.api.chain import Extents
    size = top.get_size()
    extents = Extents(0, size)
    top.extents(size, 0, 0, extents)
    items = list(extents)
    assert items[0] == (0, 512, EXTENT_DATA)
    assert items[1] == (512, PARTITION_OFFSET - 512, EXTENT_HOLE | EXTENT_ZERO)
    assert sum(length for _, length, _ in items) == size
    # Everything reported as a hole reads as zeros.
    for offset, length, kind in items:
        if kind & EXTENT_ZERO and length < 64 * MIB:
            buf = bytearray(length)
            top.pread(memoryview(buf), offset, 0)
            assert not any(buf), (offset, length)


# -- merging, names and what FAT cannot hold ------------------------------------------------


def test_merged_directories(tmp: Path) -> None:
    a, b = tmp / "a", tmp / "b"
    for path, data in {a / "same.txt": b"from a\n", a / "only-a.txt": b"a\n", a / "common/x": b"ax\n",
                       a / "common/from-a": b"1\n", a / "readme.TXT": b"a readme\n",
                       b / "same.txt": b"from b\n", b / "only-b.txt": b"b\n", b / "common/x": b"bx\n",
                       b / "common/from-b": b"2\n", b / "README.txt": b"b readme\n"}.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    image, _, _ = copy_out(tmp, "floppy", f"dir={a}", f"dir={b}", "fat=12")
    fsck(image)
    check_contents(image, tmp, {"same.txt": b"from b\n", "only-a.txt": b"a\n", "only-b.txt": b"b\n",
                                "common": None, "common/x": b"bx\n", "common/from-a": b"1\n",
                                "common/from-b": b"2\n", "README.txt": b"b readme\n"}, 0)


def test_scan_completes_each_directory_once_with_its_children_final(tmp: Path) -> None:
    """What encoding during the scan relies on: on_complete sees the root first, every directory
    once, parents before children, and only after every directory merged into it was read."""
    from nbdformats.plugins.floppy import tree
    a, b = tmp / "a", tmp / "b"
    for path in (a / "x/deep/1", a / "x/2", b / "x/3", b / "x/deep/4", b / "y/5", a / "6"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    seen: list[tuple[str, list[str]]] = []
    root = tree.scan([str(a), str(b)], print,
                     lambda node: seen.append((node.name, sorted(child.name for child in node.children))))
    assert seen == [("", ["6", "x", "y"]), ("x", ["2", "3", "deep"]), ("y", ["5"]), ("deep", ["1", "4"])]
    assert root.name == ""


def test_scan_takes_plain_directories_in_bulk_as_entry_by_entry(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A directory of one's own readable regular files is taken in one go; what it gives is
    what the entry-by-entry scan gives (forced here by a uid that owns nothing), with the
    directories read by the C extension ahead of the scan or by os.listdir and os.lstat."""
    from nbdformats.plugins.floppy import tree
    src = tmp / "src"
    (src / "sub").mkdir(parents=True)
    # Not UTF-8: b"\xc0x" sorts before "\xe9x" as bytes, after it as Python strings.
    for i, name in enumerate(["plain.txt", "UPPER.TXT", "a b c", "x" * 200, "a:b", "café", "trailing.",
                              os.fsdecode(b"\xc0x"), "\xe9x"]):
        (src / "sub" / name).write_bytes(b"x" * i)
    (src / "leaf").mkdir()
    for i in range(50):
        (src / "leaf" / f"file {i}").write_bytes(b"y" * i)

    def scanned() -> list[tuple]:
        root = tree.scan([str(src)], print)
        return [(d.name, c.name, c.source, c.size, c.ctime, c.atime, c.mtime,  # type: ignore[union-attr]
                 c.attributes, c.directory) for d in root.children for c in d.children]  # type: ignore[union-attr]

    results = [scanned()]
    monkeypatch.setattr(tree, "_list_and_stat", None)
    results.append(scanned())
    monkeypatch.setattr(tree.os, "getuid", lambda: -1)
    results.append(scanned())
    assert results[0] == results[1] == results[2]
    bulk = results[0]
    assert len(bulk) == 59 and ("sub", "a\uf03ab", "a:b", 4) == bulk[[c[1] for c in bulk].index("a\uf03ab")][:4]


def test_c_extension_lists_and_stats_as_os_does(source) -> None:
    """_hostio.list_and_stat: os.listdir's names (sorted) and os.lstat's fields, times to the bit."""
    scandir = pytest.importorskip("nbdformats.plugins.floppy._hostio")
    root, expected = source
    for directory in [root, *(root / path for path, data in expected.items() if data is None)]:
        names, *columns = scandir.list_and_stat(str(directory))
        assert sorted(names) == sorted(os.listdir(directory))
        for i, name in enumerate(names):
            st = os.lstat(directory / name)
            assert [column[i] for column in columns] == [st.st_mode, st.st_uid, st.st_size, st.st_ctime,
                                                         st.st_atime, st.st_mtime, 0], name
    with pytest.raises(FileNotFoundError):
        scandir.list_and_stat(str(root / "no such directory"))


@pytest.mark.parametrize("with_extension", [True, False])
def test_host_files_of_a_request_are_read_as_os_preadv_reads_them(tmp: Path, monkeypatch, with_extension) -> None:
    """read_hosts, with the C extension (every file of a request read with the GIL released
    once) and without it: the same bytes, and the same errors for a file gone, shorter than
    at start-up, or replaced by a symlink (never followed)."""
    from nbdformats.api.errors import NBDError
    from nbdformats.plugins.floppy import plugin
    if with_extension:
        pytest.importorskip("nbdformats.plugins.floppy._hostio")
    else:
        monkeypatch.setattr(plugin, "_read_files", None)
    contents = {f"f{i}": os.urandom(i * 300) for i in range(1, 8)}
    for name, data in contents.items():
        (tmp / name).write_bytes(data)
    buf = bytearray(sum(len(d) - 100 for d in contents.values()))
    reads, at = [], 0
    for name, data in contents.items():
        reads.append((str(tmp / name), 100, memoryview(buf)[at:at + len(data) - 100]))
        at += len(data) - 100
    plugin.read_hosts(reads)
    assert bytes(buf) == b"".join(data[100:] for data in contents.values())
    (tmp / "link").symlink_to(tmp / "f1")
    for path, error, message in ((tmp / "gone", errno.ENOENT, os.strerror(errno.ENOENT)),
                                 (tmp / "f3", errno.EIO, "shorter than when the server started"),
                                 (tmp / "link", errno.ELOOP, os.strerror(errno.ELOOP))):
        view = memoryview(bytearray(2000))
        with pytest.raises(NBDError) as raised:
            plugin.read_hosts([(str(tmp / "f2"), 0, view[:600]), (str(path), 0, view[600:])])
        assert raised.value.errno == error and str(path) in str(raised.value) and message in str(raised.value)
        assert bytes(view[:600]) == contents["f2"]  # the other reads of the request were made


def test_scan_reports_entries_that_cannot_be_stat_ed(tmp: Path) -> None:
    """An entry whose lstat failed (it went between listing and lstat) is skipped with a warning."""
    from nbdformats.plugins.floppy import tree
    node = tree.DirNode("", str(tmp), 0, 0, 0)
    warnings: list[str] = []
    listing = (["gone.txt", "here.txt"], [0, 0o100644], [0, os.getuid()], [0, 5], [0.0, 1.5], [0.0, 2.5],
               [0.0, 3.5], [errno.ENOENT, 0])
    count = tree._merge_entries(node, str(tmp), "/shown", (str(tmp),), False, [str(tmp)], warnings.append,
                                tree.deque(), listing)  # type: ignore[arg-type]
    assert count == 2 and [c.name for c in node.children] == ["here.txt"]
    assert warnings == [f"skipping /shown/gone.txt: {os.strerror(errno.ENOENT)}"]


def test_merge_file_against_directory_is_an_error(tmp: Path) -> None:
    (tmp / "a").mkdir()
    (tmp / "a" / "thing").write_text("file")
    (tmp / "b" / "Thing").mkdir(parents=True)
    message = fails("floppy", f"dir={tmp / 'a'}", f"dir={tmp / 'b'}")
    assert f"{tmp / 'a' / 'thing'} is a file but {tmp / 'b' / 'Thing'} is a directory" in message


def test_names_fat_cannot_hold(tmp: Path) -> None:
    src = tmp / "src"
    src.mkdir()
    (src / "a:b?c.txt").write_text("1")
    (src / "ends with dot.").write_text("2")
    (src / os.fsdecode(b"caf\xe9 latin1.txt")).write_text("3")
    (src / "Clash.txt").write_text("4")
    (src / "clash.TXT").write_text("5")
    image, _, log = copy_out(tmp, "floppy", str(src), "fat=12")
    fsck(image)
    out = tmp / "out"
    extract_all(image, out)
    assert sorted(os.listdir(out)) == sorted(["a\uf03ab\uf03fc.txt", "ends with dot\uf02e",
                                              "café latin1.txt", "Clash.txt"])
    assert (out / "Clash.txt").read_text() == "4"
    # Host names that are not ASCII are kept apart from the others: each file is still its own.
    assert [(out / name).read_text() for name in ("a\uf03ab\uf03fc.txt", "ends with dot\uf02e",
                                                  "café latin1.txt")] == ["1", "2", "3"]
    assert "FAT names ignore case" in log and "clash.TXT" in log


def test_symlinks_and_special_files(tmp: Path) -> None:
    src, outside = tmp / "src", tmp / "outside"
    (src / "real dir").mkdir(parents=True)
    outside.mkdir()
    (src / "real dir" / "f.txt").write_text("inside")
    (outside / "secret.txt").write_text("never served")
    (src / "link to file").symlink_to("real dir/f.txt")
    (src / "link to dir").symlink_to("real dir")
    (src / "link outside").symlink_to(outside / "secret.txt")
    (src / "dir outside").symlink_to(outside)
    (src / "real dir" / "loop").symlink_to("..")
    (src / "dangling").symlink_to("nowhere")
    os.mkfifo(src / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(src / "socket"))
    try:
        image, _, log = copy_out(tmp, "floppy", str(src), "fat=12")
    finally:
        sock.close()
    fsck(image)
    assert mdir_paths(image) == ["link to dir", "link to dir/f.txt", "link to file", "real dir",
                                 "real dir/f.txt"]
    assert b"never served" not in image.read_bytes()
    for fragment in ("link outside: it points outside", "dir outside: it points outside", "loops back",
                     "fifo: a FIFO cannot", "socket: a socket cannot", "dangling"):
        assert fragment in log, fragment


def test_links_that_multiply_the_tree_are_bounded(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nbdformats.plugins.floppy import tree
    monkeypatch.setattr(tree, "MAX_ENTRIES_THROUGH_LINKS", 5000)
    level = tmp / "src" / "level0"
    level.mkdir(parents=True)
    (level / "file").write_text("x")
    for i in range(1, 16):  # two links to the level below in each: 2**15 copies of "file"
        above = tmp / "src" / f"level{i}"
        above.mkdir()
        (above / "a").symlink_to(level)
        (above / "b").symlink_to(level)
        level = above
    with pytest.raises(tree.TreeError, match="bring more than 5000 entries"):
        tree.scan([str(tmp / "src")], lambda message: None)


def test_file_over_4_gib_is_refused(tmp: Path) -> None:
    src = tmp / "src"
    src.mkdir()
    with open(src / "huge.img", "wb") as f:
        f.truncate(4 << 30)  # sparse: 4 GiB, one byte too many
    message = fails("floppy", str(src))
    assert f"{src / 'huge.img'} is 4294967296 bytes" in message


@pytest.mark.parametrize("pairs,message", [
    ((("label", "TWELVE CHARS"),), "label=TWELVE CHARS: a FAT volume label holds at most 11"),
    ((("label", "bad/label"),), "'/' cannot be stored in a FAT volume label"),
    ((("size", "10M"),), "size=10485760: FAT32 needs at least 65525 clusters"),
    ((("size", "10M"),), "these files need a disk of 35138048 bytes or more"),
    ((("size", "2M"), ("fat", "16")), "FAT16 needs at least 4085 clusters"),
    ((("boot", "syslinux"), ("boot-sector", __file__)), "cannot be used together"),
    ((("fat", "16"), ("size", "5G")), "too big for FAT16"),
])
def test_parameter_errors(source, pairs, message) -> None:
    root, _ = source
    with pytest.raises(ConfigError, match=re.escape(message)):
        open_chain(("dir", str(root)), *pairs)


def test_boot_sector_errors(source, tmp: Path) -> None:
    root, _ = source
    short = tmp / "short.bin"
    short.write_bytes(bytes(100))
    assert "a boot sector is 512 bytes, this file is 100 bytes" in fails("floppy", str(root),
                                                                         f"boot-sector={short}")
    into_bpb = tmp / "bpb.bin"
    into_bpb.write_bytes(b"\xeb\x3c\x90" + bytes(509))  # jumps to 0x3E: inside the FAT32 BPB
    assert "must start with a jump past the FAT32 BPB (to offset 0x5a or later)" in \
        fails("floppy", str(root), f"boot-sector={into_bpb}")


def test_floppy_root_directory_overflow(tmp: Path) -> None:
    src = tmp / "src"
    src.mkdir()
    for i in range(120):
        (src / f"file number {i}.txt").write_text("x")
    with pytest.raises(ConfigError, match="do not fit in a 1440 KiB floppy .* root directory entries of 224"):
        open_chain(("dir", str(src)), ("fat", "12"), ("size", "1440K"))


def test_empty_label_and_empty_tree(tmp: Path) -> None:
    (tmp / "empty").mkdir()
    image = image_of(tmp, ("dir", str(tmp / "empty")), ("label", ""), ("fat", "12"))
    fsck(image)
    header = run(["mdir", "-i", str(image), "::"], env=MTOOLS_ENV, check=False).stdout.decode()
    assert "has no label" in header
    assert mdir_paths(image) == []


def test_thousands_of_files(tmp: Path) -> None:
    src = tmp / "src"
    for d in range(3):
        (src / f"dir {d}").mkdir(parents=True)
        for i in range(1500):
            (src / f"dir {d}" / f"some long file name {i:05d}.txt").write_bytes(b"%d\n" % i)
    started = time.monotonic()
    image = image_of(tmp, ("dir", str(src)))
    assert time.monotonic() - started < 10
    fsck(image, PARTITION_OFFSET)
    listed = mdir_paths(image, PARTITION_OFFSET)
    assert len(listed) == 3 + 4500
    assert "dir 2/some long file name 01499.txt" in listed
    out = tmp / "out"  # every file's data is its own (host names are kept in one buffer)
    extract_all(image, out, PARTITION_OFFSET)
    for d in range(3):
        for i in range(1500):
            assert (out / f"dir {d}" / f"some long file name {i:05d}.txt").read_bytes() == b"%d\n" % i


def test_directory_entry_limit(tmp: Path) -> None:
    src = tmp / "src"
    src.mkdir()
    for i in range(3300):  # 250-character names: 20 long-name entries + 1 each, 69300 in all
        (src / (f"{i:05d}" + "n" * 245)).touch()
    with pytest.raises(ConfigError, match="a FAT directory holds at most 65536"):
        open_chain(("dir", str(src)))


# -- booting with qemu (TCG) ------------------------------------------------------------------


SYSLINUX_MODULES = Path("/usr/lib/syslinux/modules/bios")  # syslinux-common


@pytest.fixture(scope="module")
def boot_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """syslinux.cfg makes SYSLINUX load a COM32 module (reboot.c32 and its library, read
    from the disk through SYSLINUX's FAT driver) that reboots: qemu -no-reboot exits."""
    root = tmp_path_factory.mktemp("boot") / "src"
    (root / "boot" / "syslinux").mkdir(parents=True)
    (root / "boot" / "syslinux" / "syslinux.cfg").write_text(
        "SERIAL 0 115200\nDEFAULT reboot\nLABEL reboot\n  COM32 reboot.c32\n")
    for module in ("reboot.c32", "libcom32.c32"):
        shutil.copy(SYSLINUX_MODULES / module, root / "boot" / "syslinux" / module)
    (root / "other file.txt").write_text("not needed to boot\n")
    return root


@pytest.mark.parametrize("args,interface", [((), "virtio"), (("fat=12",), "floppy"), (("fat=16",), "virtio")])
def test_boot_syslinux(boot_tree: Path, tmp: Path, args, interface) -> None:
    with serve("floppy", str(boot_tree), "boot=syslinux", *args) as srv:
        status, output = qemu_boot(srv.uri, interface)
        nbdcopy_to_file(srv.uri, tmp / "disk.img")
    assert b"SYSLINUX 6" in output
    assert status == 0  # the configured reboot.c32 ran: qemu -no-reboot exits cleanly
    offset = 0 if "fat=12" in args else PARTITION_OFFSET
    fsck(tmp / "disk.img", offset)
    assert "ldlinux.sys" in mdir_paths(tmp / "disk.img", offset)


@pytest.mark.parametrize("args,interface", [(("fat=12",), "floppy"), ((), "virtio")])
def test_boot_sector_parameter(boot_tree: Path, tmp: Path, args, interface) -> None:
    code = tmp / "boot.bin"
    code.write_bytes(make_boot_sector())
    with serve("floppy", str(boot_tree), f"boot-sector={code}", *args) as srv:
        status, output = qemu_boot(srv.uri, interface)
        nbdcopy_to_file(srv.uri, tmp / "disk.img")
    assert BOOT_MESSAGE in output
    assert status == 1  # isa-debug-exit with 0: (0 << 1) | 1
    offset = 0 if args else PARTITION_OFFSET
    vbr = (tmp / "disk.img").read_bytes()[offset:offset + 512]
    assert vbr[0x5A:0x60] == make_boot_sector()[0x5A:0x60]  # the code, with our BPB
    fsck(tmp / "disk.img", offset)

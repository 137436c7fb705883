"""linuxdisk plugin: ext2/3/4 disks built from directories, checked with e2fsprogs and sfdisk.

Tools: e2fsprogs (mke2fs, debugfs, e2fsck), fdisk (sfdisk), libnbd-bin (nbdcopy, nbdinfo),
nbdkit (reference), util-linux (setpriv).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
import uuid
import zlib
from pathlib import Path

import pytest

from conftest import nbdcopy_to_file, nbdinfo_json, nbdsh, run, serve, serve_nbdkit
from fixtures.linuxdisk import (IS_ROOT, LONG_TARGET, SPARSE_SIZE, Expected, debugfs, listing, make_tree,
                                quote, sparse_content, stat_field)
from fixtures.serving import copy_out, fails
from nbdformats.api.errors import ConfigError
from nbdformats.plugins import linuxdisk
from nbdformats.formats import ext2dir, gpt
from nbdformats.plugins.linuxdisk import tree

PARTITION = 1 << 20  # the filesystem starts at LBA 2048


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Expected]:
    root = tmp_path_factory.mktemp("linuxdisk") / "src"
    return root, make_tree(root)


def symlink_target(image: str, path: str) -> str:
    text = debugfs(image, f"stat {quote(path)}").decode(errors="replace")
    if "Fast link dest: " in text:
        return stat_field(image, path, "Fast link dest").strip('"')
    return debugfs(image, f"cat {quote(path)}").decode()  # a slow symlink keeps its target in a block


def check_tree(image: str, exp: Expected) -> None:
    """Every file byte for byte, modes, owners, symlinks, hard links, xattrs and the sparse file."""
    entries = listing(image)
    for path, data in exp.files.items():
        if path != exp.sparse:
            assert debugfs(image, f"cat {quote(path)}") == data, path
    for path, mode in exp.modes.items():
        assert entries[path][1] == mode, (path, oct(entries[path][1]), oct(mode))
    for path, (uid, gid) in exp.owners.items():
        assert entries[path][2:4] == (uid, gid), path
    for path, target in exp.symlinks.items():
        assert stat.S_ISLNK(entries[path][1]), path
        assert symlink_target(image, path) == target, path
    for first, second in exp.hard_links:
        assert entries[first][0] == entries[second][0]
        assert stat_field(image, first, "Links") == "2"
    for path, (name, value) in exp.xattrs.items():
        assert b'"' + value + b'"' in debugfs(image, f"ea_get {quote(path)} {name}")
    assert entries[exp.sparse][4] == SPARSE_SIZE
    blocks = int(stat_field(image, exp.sparse, "Blockcount"))  # 512-byte units, including metadata
    assert blocks * 512 < 256 * 1024, "the sparse file was filled in"
    assert debugfs(image, f"cat {exp.sparse}") == sparse_content()


# -- GPT (sans-IO) ------------------------------------------------------------------------


def test_gpt_structures() -> None:
    total = 2048 + 1000 + gpt.BACKUP_SECTORS
    disk_guid, part_guid = uuid.uuid4(), uuid.uuid4()
    partition = gpt.Partition(2048, 3047, gpt.LINUX_FILESYSTEM, part_guid, "root", gpt.ATTR_LEGACY_BIOS_BOOTABLE)
    primary, backup = gpt.build(total, disk_guid, [partition])
    assert len(primary) == 34 * 512 and len(backup) == 33 * 512
    mbr = primary[:512]
    assert mbr[510:] == b"\x55\xaa" and mbr[446 + 4] == 0xEE
    assert struct.unpack_from("<II", mbr, 446 + 8) == (1, total - 1)

    for header, my_lba, other_lba, array_lba, array in ((primary[512:1024], 1, total - 1, 2, primary[1024:]),
                                                        (backup[-512:], total - 1, 1, total - 33, backup[:-512])):
        fields = struct.unpack_from("<8sIIIIQQQQ16sQIII", header)
        assert fields[0] == b"EFI PART" and fields[1] == 0x00010000 and fields[2] == 92
        zeroed = header[:16] + b"\0\0\0\0" + header[20:92]
        assert fields[3] == zlib.crc32(zeroed)
        assert fields[5:9] == (my_lba, other_lba, 34, total - 34)
        assert uuid.UUID(bytes_le=fields[9]) == disk_guid
        assert fields[10:13] == (array_lba, 128, 128)
        assert fields[13] == zlib.crc32(array)
        assert header[92:] == bytes(420)
    entry = primary[1024:1024 + 128]
    type_guid, unique, first, last, attributes, name = struct.unpack("<16s16sQQQ72s", entry)
    # The real GUID in mixed-endian form, not nbdkit 1.32's ASCII "0FC63DAF-8483-47".
    assert type_guid == bytes.fromhex("AF3DC60F838472478E793D69D8477DE4")
    assert uuid.UUID(bytes_le=unique) == part_guid
    assert (first, last, attributes) == (2048, 3047, 4)
    assert name.decode("utf-16-le").rstrip("\0") == "root"
    assert primary[1024 + 128:] == bytes(127 * 128)


def test_gpt_rejects_partition_outside_usable_area() -> None:
    with pytest.raises(ValueError, match="outside the usable area"):
        gpt.build(3000, uuid.uuid4(), [gpt.Partition(2048, 2990, gpt.LINUX_FILESYSTEM, uuid.uuid4())])


# -- served disks, checked with real tools ------------------------------------------------


@pytest.mark.parametrize("fs_type", ["ext2", "ext3", "ext4"])
def test_served_disk(source: tuple[Path, Expected], tmp: Path, fs_type: str) -> None:
    root, exp = source
    image, info, _ = copy_out(tmp, "linuxdisk", str(root), f"type={fs_type}", "label=rootfs")
    assert info["is_read_only"] and image.stat().st_size == info["export-size"]

    table = json.loads(run(["sfdisk", "-J", image]).stdout)["partitiontable"]
    assert "No errors detected" in run(["sfdisk", "-V", image]).stdout.decode()
    (part,) = table["partitions"]
    assert part["type"] == "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
    assert part["start"] == 2048 and part["name"] == "rootfs"
    assert table["lastlba"] == info["export-size"] // 512 - 34

    fs = f"{image}?offset={PARTITION}"
    run(["e2fsck", "-fn", fs])
    stats = debugfs(fs, "stats").decode()
    features = stats.split("Filesystem features:")[1].split("\n")[0].split()
    assert ("has_journal" in features) == (fs_type != "ext2")
    assert ("extent" in features) == (fs_type == "ext4")
    assert "Filesystem volume name:   rootfs" in stats
    check_tree(fs, exp)


def test_extents_show_free_space_as_holes(source: tuple[Path, Expected]) -> None:
    root, _ = source
    with serve("linuxdisk", str(root), "size=+32M") as srv:
        size = nbdinfo_json(srv.uri)["exports"][0]["export-size"]
        extents = json.loads(run(["nbdinfo", "--map", "--json", srv.uri]).stdout)
    assert sum(e["length"] for e in extents) == size
    assert extents[0] == {"offset": 0, "length": 34 * 512, "type": 0, "description": "data"}
    holes_in_fs = [e for e in extents if e["type"] == 3 and PARTITION <= e["offset"] < size - 33 * 512]
    assert sum(e["length"] for e in holes_in_fs) > 16 << 20  # most of the free space


def test_agrees_with_nbdkit(source: tuple[Path, Expected], tmp: Path) -> None:
    root, _ = source
    ours, _, _ = copy_out(tmp, "linuxdisk", str(root), "type=ext4", name="ours.img")
    with serve_nbdkit("linuxdisk", str(root), "type=ext4") as srv:
        nbdcopy_to_file(srv.uri, tmp / "nbdkit.img")

    def comparable(image: Path) -> dict:
        # Inode numbers may differ; directory sizes depend on the block size, i.e. the fs size.
        return {path: (mode, uid, gid, None if stat.S_ISDIR(mode) else size)
                for path, (_, mode, uid, gid, size) in listing(f"{image}?offset={PARTITION}").items()}

    theirs = comparable(tmp / "nbdkit.img")
    assert len(theirs) > 20
    assert comparable(ours) == theirs


def test_merged_directories(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = tmp / "a", tmp / "b"
    (a / "shared" / "from-a").mkdir(parents=True)
    (b / "shared" / "from-b").mkdir(parents=True)
    (a / "shared" / "file").write_bytes(b"A wins? no\n")
    (b / "shared" / "file").write_bytes(b"B wins\n")
    (a / "only-a").write_bytes(b"only in a\n")
    os.link(a / "only-a", a / "shared" / "from-a" / "same-inode")
    os.symlink("only-a", b / "link")
    (b / "shared").chmod(0o750)
    temp = tmp / "tmpdir"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))
    image = tmp / "merged.img"
    with serve("linuxdisk", str(a), f"dir={b}", "partition=none") as srv:
        # No named image; the staging tree is removed by a thread while the server already serves.
        deadline = time.monotonic() + 30
        while os.listdir(temp) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert os.listdir(temp) == []
        nbdcopy_to_file(srv.uri, image)
    run(["e2fsck", "-fn", image])
    entries = listing(str(image))
    assert set(entries) == {"/lost+found", "/shared", "/shared/from-a", "/shared/from-b", "/shared/file",
                            "/only-a", "/shared/from-a/same-inode", "/link"}
    assert debugfs(str(image), "cat /shared/file") == b"B wins\n"
    assert entries["/shared"][1] == 0o40750  # the later directory's metadata
    assert entries["/only-a"][0] == entries["/shared/from-a/same-inode"][0]
    assert symlink_target(str(image), "/link") == "only-a"


def test_merge_type_clash_names_both_paths(tmp: Path) -> None:
    (tmp / "a" / "x").mkdir(parents=True)
    (tmp / "b").mkdir()
    (tmp / "b" / "x").write_bytes(b"file\n")
    message = fails("linuxdisk", str(tmp / "a"), str(tmp / "b"))
    assert f"{tmp / 'a' / 'x'} (a directory)" in message and f"{tmp / 'b' / 'x'} (a file)" in message


def test_stage_copies_across_filesystems(source: tuple[Path, Expected], tmp: Path) -> None:
    """Sources on /dev/shm (tmpfs), staging on the test's disk: links fail with EXDEV, copies follow."""
    shm = Path(tempfile.mkdtemp(prefix="linuxdisk-test-", dir="/dev/shm"))
    try:
        if os.stat(shm).st_dev == os.stat(tmp).st_dev:
            pytest.skip("/dev/shm is on the same filesystem as the test directory")
        src, staging = shm / "src", tmp / "staging"
        exp = make_tree(src)
        staging.mkdir()
        stats = tree.stage([str(src)], str(staging))
        assert stats.linked == 0 and stats.copied > 10
        assert os.stat(staging / "hard1").st_ino == os.stat(staging / "dir" / "hard2").st_ino
        assert os.stat(staging / "sparse.img").st_blocks * 512 < 1 << 20
        assert (staging / "sparse.img").read_bytes() == sparse_content()
        assert (staging / "random.bin").read_bytes() == exp.files["/random.bin"]
        assert os.readlink(staging / "long-link") == LONG_TARGET
        assert stat.S_ISFIFO(os.stat(staging / "fifo").st_mode)
        assert os.stat(staging / "setuid").st_mode == 0o104755
        assert os.stat(staging / "sticky").st_mode == 0o41777
        assert os.getxattr(staging / "hello.txt", "user.test") == b"xattr value"
        assert os.lstat(staging / "dir" / "link-abs").st_mtime_ns == os.lstat(src / "dir" / "link-abs").st_mtime_ns
        if IS_ROOT:
            assert os.stat(staging / "null-dev").st_rdev == os.makedev(1, 3)
            assert (os.stat(staging / "random.bin").st_uid, os.stat(staging / "dir" / "sub").st_gid) == (4321, 5678)
    finally:
        shutil.rmtree(shm, ignore_errors=True)


def test_ext2dir_blocks_round_trip() -> None:
    """Packed directory blocks (sans-IO): entries in order, none across a block, each block's last
    entry reaching its end (or its checksum tail), empty blocks up to min_blocks, 64 KiB blocks'
    rec_len encoding; CRC-32C as e2fsprogs continues it (no final inversion)."""
    assert ext2dir.crc32c_le(0xFFFFFFFF, b"123456789") ^ 0xFFFFFFFF == 0xE3069283  # the check value
    items = [(2, 2, b"."), (2, 2, b"..")] + [(100 + i, 1 + i % 7, b"n%d" % i * (1 + i % 40)) for i in range(700)]
    for block_size, csum in ((1024, False), (4096, True), (65536, False)):
        sb = ext2dir.Superblock(block_size, True, csum, False, 0x1234567)
        data = ext2dir.pack(items, sb, 2, 7, min_blocks=len(items) * 140 // block_size + 3)
        assert len(data) % block_size == 0
        blocks = [data[k:k + block_size] for k in range(0, len(data), block_size)]
        assert [item for block in blocks for item in ext2dir.entries(block, block_size)] == items
        assert list(ext2dir.entries(blocks[-1], block_size)) == []  # padding blocks hold nothing
        for block in (blocks[0], blocks[-1]):  # (the CRC in Python is slow)
            if csum:
                tail = block[-12:]
                assert tail[:8] == struct.pack("<IHBB", 0, 12, 0, 0xDE)
                seed = ext2dir.crc32c_le(ext2dir.crc32c_le(sb.csum_seed, struct.pack("<I", 2)), struct.pack("<I", 7))
                assert struct.unpack("<I", tail[8:])[0] == ext2dir.crc32c_le(seed, block[:-12])


# -- parameters beyond nbdkit -------------------------------------------------------------


def test_partition_none_with_free_space(source: tuple[Path, Expected], tmp: Path) -> None:
    root, exp = source
    image, info, _ = copy_out(tmp, "linuxdisk", str(root), "partition=none", "size=+20M", "type=ext4")
    run(["e2fsck", "-fn", image])
    stats = debugfs(str(image), "stats").decode()
    free = int(stats.split("Free blocks:")[1].split()[0]) * int(stats.split("Block size:")[1].split()[0])
    assert free >= 20 << 20
    assert debugfs(str(image), "cat /hello.txt") == exp.files["/hello.txt"]


def test_exact_size_uuid_and_label(source: tuple[Path, Expected], tmp: Path) -> None:
    root, _ = source
    fs_uuid = uuid.UUID("2a7f33c4-3b2c-4d0e-9a1b-6f3c5d2e1f00")
    image, info, _ = copy_out(tmp, "linuxdisk", str(root), "size=40M", f"uuid={fs_uuid}", "label=data")
    assert info["export-size"] == PARTITION + (40 << 20) + 33 * 512
    table = json.loads(run(["sfdisk", "-J", image]).stdout)["partitiontable"]
    assert table["partitions"][0]["size"] == (40 << 20) // 512
    # The GPT GUIDs are derived from uuid=, so the same parameters give the same table.
    assert uuid.UUID(table["id"]) == uuid.uuid5(fs_uuid, "linuxdisk disk")
    assert uuid.UUID(table["partitions"][0]["uuid"]) == uuid.uuid5(fs_uuid, "linuxdisk partition")
    stats = debugfs(f"{image}?offset={PARTITION}", "stats").decode()
    assert f"Filesystem UUID:          {fs_uuid}" in stats
    assert "Filesystem volume name:   data" in stats


def test_writable(source: tuple[Path, Expected]) -> None:
    root, _ = source
    with serve("linuxdisk", str(root)) as srv:  # read-only by default
        result = nbdsh(srv.uri, "try:\n  h.pwrite(b'x', 0)\nexcept nbd.Error:\n  print('refused')\n")
        assert "refused" in result.stdout.decode()
    with serve("linuxdisk", str(root), "writable=true") as srv:
        assert "LOST" in srv.stderr()
        script = (
            "size = h.get_size()\n"
            "spots = [0, 40000, (1 << 20) - 3, (1 << 20) + 4096, size - 33 * 512 - 2, size - 100]\n"
            "for i, spot in enumerate(spots):\n"
            "    h.pwrite(bytes([i + 1]) * 5 if spot + 5 <= size else bytes([i + 1]) * (size - spot), spot)\n"
            "h2 = nbd.NBD()\n"
            "h2.connect_uri(" + repr(srv.uri) + ")\n"
            "for i, spot in enumerate(spots):\n"
            "    n = min(5, size - spot)\n"
            "    assert h2.pread(n, spot) == bytes([i + 1]) * n, (spot, h2.pread(n, spot))\n"
            "print('ok')\n")
        assert nbdsh(srv.uri, script).stdout.decode().strip() == "ok"


# -- errors: a clear message and no listening ---------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["/nonexistent/dir"], "/nonexistent/dir: no such file or directory"),
    (["SRC", "type=ext5"], "'ext5' is not one of ext2, ext3, ext4"),
    (["SRC", "label=" + "x" * 17], "at most 16 bytes"),
    (["SRC", "uuid=nope"], "is not a UUID"),
    (["SRC", "mke2fs=/nonexistent/mke2fs"], "install e2fsprogs"),
])
def test_bad_parameters(source: tuple[Path, Expected], args: list[str], message: str) -> None:
    root, _ = source
    assert message in fails("linuxdisk", *[str(root) if a == "SRC" else a for a in args])


def test_missing_temporary_directory(source: tuple[Path, Expected]) -> None:
    root, _ = source
    assert "/nonexistent/tmp does not exist (set TMPDIR)" in fails("linuxdisk", str(root),
                                                                   env={"TMPDIR": "/nonexistent/tmp"})


def test_many_empty_files_get_enough_inodes(tmp: Path) -> None:
    """du counts nothing for empty files; mke2fs's default inode count would not hold them (nbdkit
    1.32 fails here with "Could not allocate inode")."""
    root = tmp / "many"
    for d in range(3):
        (root / f"d{d}").mkdir(parents=True)
        for i in range(1000):
            (root / f"d{d}" / f"file{i:04d}").touch()
    image, _, _ = copy_out(tmp, "linuxdisk", str(root), "partition=none")
    run(["e2fsck", "-fn", image])
    names = listing(str(image))
    assert len([p for p in names if "/file" in p]) == 3000


def dumped(image: Path, tmp: Path) -> dict[str, bytes | str]:
    """Every file (its bytes), symlink (-> target) and directory ("dir") of the image, from debugfs rdump."""
    dump = tmp / "dump"
    shutil.rmtree(dump, ignore_errors=True)
    dump.mkdir()
    run(["debugfs", "-R", f"rdump / {dump}", image])
    found: dict[str, bytes | str] = {}
    for directory, dirs, files in os.walk(dump):
        for name in dirs + files:
            path = os.path.join(directory, name)
            key = os.path.relpath(path, dump)
            found[key] = "-> " + os.readlink(path) if os.path.islink(path) else \
                "dir" if os.path.isdir(path) else Path(path).read_bytes()
    found.pop("lost+found", None)
    return found


def host_tree(root: Path) -> dict[str, bytes | str]:
    found: dict[str, bytes | str] = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(directory, name)
            found[os.path.relpath(path, root)] = "-> " + os.readlink(path) if os.path.islink(path) else \
                "dir" if os.path.isdir(path) else Path(path).read_bytes()
    return found


@pytest.mark.parametrize("fs_type", ["ext2", "ext4"])
def test_flat_directory(tmp: Path, fs_type: str) -> None:
    """One directory of thousands of entries (mke2fs -d alone is quadratic in it: such a directory is
    staged in shards and its blocks written anew from theirs) comes out whole and e2fsck-clean: every
    file with its contents, names with quotes, backslashes, a line break or bytes that are not UTF-8
    (moved as bytes), subdirectories, symlinks and hard links."""
    root = tmp / "flat"
    root.mkdir()
    contents = {f"file {i:05d} \u00e9t\u00e9": (b"%d\n" % i if i % 7 == 0 else b"") for i in range(4500)}
    contents.update({'a "quoted" name': b"q", "back\\slash": b"b", os.fsdecode(b"latin1 \xe9"): b"l",
                     "line\nbreak": b"n"})
    for name, data in contents.items():
        (root / name).write_bytes(data)
    (root / "sub").mkdir()
    (root / "sub" / "inner").write_bytes(b"inner")
    (root / "link").symlink_to("file 00007 \u00e9t\u00e9")
    os.link(root / "file 00014 \u00e9t\u00e9", root / "hard")
    image, _, log = copy_out(tmp, "linuxdisk", str(root), "partition=none", f"type={fs_type}")
    run(["e2fsck", "-fn", image])
    assert dumped(image, tmp) == host_tree(root)
    hard, original = (debugfs(str(image), f"stat {quote(path)}") for path in ("/hard", "/file 00014 \u00e9t\u00e9"))
    assert hard.split(b"Type")[0] == original.split(b"Type")[0] and b"Links: 2" in hard  # still one inode
    # The shards are gone: what may be left of their entries is free space (inode 0).
    shards = re.findall(rb"(\d+)\s+\(\d+\)\s+\.linuxdisk-shard", debugfs(str(image), "ls /"))
    assert set(shards) <= {b"0"}
    assert "square" not in log


def test_large_directory_without_dir_index(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a hashed index debugfs could not add the entries back: mke2fs builds it alone."""
    root = tmp / "flat"
    root.mkdir()
    for i in range(4000):
        (root / f"f{i}").touch()
    config = tmp / "mke2fs.conf"
    config.write_text(Path("/etc/mke2fs.conf").read_text().replace("dir_index,", ""))
    monkeypatch.setenv("MKE2FS_CONFIG", str(config))
    with serve("linuxdisk", str(root), "partition=none") as srv:
        nbdcopy_to_file(srv.uri, tmp / "fs.img")
        log = srv.stderr()
    run(["e2fsck", "-fn", tmp / "fs.img"])
    assert f"{root} holds 4000 entries" in log and "square" in log  # built by mke2fs alone
    assert len([p for p in listing(str(tmp / "fs.img")) if p.startswith("/f")]) == 4000


def test_large_directory_all_staged_where_inodes_cannot_be_written(tmp: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """ext4 with uninit_bg instead of metadata_csum (CRC-16 group descriptor checksums, which
    formats/ext2inodes.py does not write): every entry goes through the shards, so the empty files
    carry the ctime of their staging link rather than the source's; the result is whole and clean."""
    root = tmp / "flat"
    root.mkdir()
    for i in range(4000):
        (root / f"f{i}").touch()
    source_ctime = int(os.lstat(root / "f7").st_ctime)
    time.sleep(1.1)  # a staging link's ctime is later
    config = tmp / "mke2fs.conf"
    config.write_text(Path("/etc/mke2fs.conf").read_text().replace("metadata_csum,", "uninit_bg,"))
    monkeypatch.setenv("MKE2FS_CONFIG", str(config))
    image, _, log = copy_out(tmp, "linuxdisk", str(root), "partition=none", "type=ext4")
    run(["e2fsck", "-fn", image])
    assert "square" not in log
    assert b"uninit_bg" in debugfs(str(image), "features")
    assert {p for p in listing(str(image)) if p.startswith("/f")} == {f"/f{i}" for i in range(4000)}
    assert int(re.search(rb" ctime: 0x([0-9a-f]+)", debugfs(str(image), "stat /f7")).group(1), 16) > source_ctime


def unpartitioned(dirs: list[Path], fs_type: str, size: tuple[bool, int] | None = None) -> linuxdisk.LinuxDiskPlugin:
    """The plugin configured in-process: these dirs, partition=none, read-only, no label or uuid."""
    plugin = linuxdisk.LinuxDiskPlugin()
    plugin.dirs, plugin.fs_type, plugin.label, plugin.uuid, plugin.size = [str(d) for d in dirs], fs_type, None, None, size
    plugin.partition, plugin.writable, plugin.mke2fs = "none", False, "mke2fs"
    return plugin


def build_image(plugin: linuxdisk.LinuxDiskPlugin, image: Path) -> None:
    """Build the filesystem (get_ready), copy it to `image`, and check it with e2fsck -fn."""
    plugin.get_ready()
    try:
        assert plugin.fd is not None
        image.write_bytes(os.pread(plugin.fd, plugin.fs_size, 0))
    finally:
        plugin.cleanup()
    run(["e2fsck", "-fn", image])


def test_large_directories_in_shards_merged(tmp: Path, monkeypatch: pytest.MonkeyPatch,
                                           caplog: pytest.LogCaptureFixture) -> None:
    """Shards at every depth and in merged trees (with a low threshold, in process): a directory
    whose own path debugfs cannot quote is built by mke2fs alone, with a warning."""
    monkeypatch.setattr(linuxdisk, "LARGE_DIRECTORY", 40)
    base, site = tmp / "base", tmp / "site"
    for top, count in ((base, 30), (site, 30)):  # 60 entries once merged
        (top / "a" / "b" / "deeper").mkdir(parents=True)
        for i in range(count):
            (top / "a" / "b" / f"{top.name}{i}").write_bytes(top.name.encode() * i)
        (top / 'a' / 'q"d').mkdir()
        for i in range(count):
            (top / "a" / 'q"d' / f"{top.name}{i}").write_bytes(b"x")
    (site / "a" / "b" / "base3").write_bytes(b"site wins")
    image = tmp / "fs.img"
    with caplog.at_level("WARNING"):
        build_image(unpartitioned([base, site], "ext4"), image)
    expected = host_tree(base)
    expected.update(host_tree(site))
    assert dumped(image, tmp) == expected and expected["a/b/base3"] == b"site wins"
    assert f"{site}/a/q\"d holds 60 entries" in caplog.text and "square" in caplog.text
    assert "a/b" not in caplog.text


def source_inventory(root: Path) -> dict[str, tuple[tuple[int, int], int, int, int, int]]:
    """An independent walk of the source: relative path -> (its inode, mode, uid, gid, mtime in seconds)."""
    found = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(directory, name)
            st = os.lstat(path)
            found["/" + os.path.relpath(path, root)] = ((st.st_dev, st.st_ino), st.st_mode, st.st_uid, st.st_gid,
                                                        int(st.st_mtime))
    return found


@pytest.mark.parametrize("fs_type, size", [("ext2", None), ("ext4", "size=+600M")])
def test_flat_directory_inodes_and_metadata(tmp: Path, fs_type: str, size: str | None) -> None:
    """The directory written anew from its shards (formats/ext2dir.py; 1 KiB blocks on a small ext2,
    4 KiB with metadata_csum on the larger ext4): debugfs lists every name of the source, each on the
    inode mke2fs made for it (hard links share one, nothing else does), with the source's type, mode,
    owner and mtime; the directory is indexed, has the right link count, and e2fsck finds it clean."""
    root = tmp / "flat"
    root.mkdir()
    for i in range(5000):
        (root / f"e{i:04d}").touch()
        if i % 97 == 0:
            os.chmod(root / f"e{i:04d}", 0o4711 if i % 2 else 0o600)
        os.utime(root / f"e{i:04d}", (1_000_000_000 + i, 1_500_000_000 + i * 7))
    os.mkfifo(root / "fifo", 0o640)
    os.symlink("e0001", root / "symlink")
    (root / "sub").mkdir()
    (root / "other").mkdir()
    os.link(root / "e0002", root / "sub" / "same-as-e0002")
    os.link(root / "e0003", root / "e0003-again")
    if IS_ROOT:
        os.mknod(root / "zero-dev", 0o20600, os.makedev(1, 5))
        os.chown(root / "e0004", 2345, 6789)
        os.lchown(root / "symlink", 3456, 7890)
    image, _, _ = copy_out(tmp, "linuxdisk", str(root), "partition=none", f"type={fs_type}",
                           *([size] if size else []))
    run(["e2fsck", "-fn", image])
    block_size = int(re.search(rb"Block size:\s+(\d+)", debugfs(str(image), "stats")).group(1))
    assert block_size == (4096 if size else 1024)
    entries = listing(str(image))
    expected = source_inventory(root)
    assert set(entries) == set(expected) | {"/lost+found"}
    by_source: dict[tuple[int, int], set[int]] = {}
    for path, (source_inode, mode, uid, gid, _) in expected.items():
        inode, image_mode, image_uid, image_gid, _ = entries[path]
        assert (image_mode, image_uid, image_gid) == (mode, uid, gid), path
        by_source.setdefault(source_inode, set()).add(inode)
    assert all(len(inodes) == 1 for inodes in by_source.values())  # one image inode per source inode
    assert len({next(iter(inodes)) for inodes in by_source.values()}) == len(by_source)  # and only one
    script = "".join(f"stat {quote(path)}\n" for path in ("/e0000", "/e0097", "/e4999", "/e0003-again"))
    stats = subprocess_stdout(["debugfs", "-f", "-", str(image)], script)
    mtimes = [int(m, 16) for m in re.findall(rb" mtime: 0x([0-9a-f]+)", stats)]
    assert mtimes == [1_500_000_000, 1_500_000_000 + 97 * 7, 1_500_000_000 + 4999 * 7, 1_500_000_000 + 3 * 7]
    assert b"Links: 2" in stats.split(b"debugfs: stat")[-1]  # e0003 and e0003-again
    root_stat = debugfs(str(image), "stat /").decode()
    assert "Links: 5" in root_stat  # ., .. (itself), lost+found, sub, other: no shard left
    assert int(re.search(r"Flags: 0x([0-9a-f]+)", root_stat).group(1), 16) & 0x1000  # indexed (htree)


@pytest.mark.parametrize("fs_type, grow", [("ext2", True), ("ext3", True), ("ext4", True), ("ext4", False)])
def test_direct_inodes_are_those_mke2fs_writes(tmp: Path, fs_type: str, grow: bool,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """On ext2/ext3 a large directory's metadata-only entries are not staged: their inodes are
    written by formats/ext2inodes.py.  Each must be the inode mke2fs -d writes for the same source
    (debugfs stat alike but for the inode number and the creation time), spread over several block
    groups with size=+64M (the other case: 128-byte inodes, no room for the creation time or the
    checksum's high half); entries with data, symlinks and hard links still come through the shards."""
    monkeypatch.setattr(linuxdisk, "LARGE_DIRECTORY", 40)
    if not grow:
        config = tmp / "mke2fs.conf"
        config.write_text(re.sub(r"inode_size = \d+", "inode_size = 128", Path("/etc/mke2fs.conf").read_text()))
        monkeypatch.setenv("MKE2FS_CONFIG", str(config))
    root = tmp / "src"
    root.mkdir()
    kinds = ["empty", "setuid", "fifo", "socket-like", "data", "symlink"]
    for i in range(3000):
        path = root / f"n{i:04d}"
        kind = kinds[i % len(kinds)]
        if kind == "fifo":
            os.mkfifo(path, 0o620)
        elif kind == "symlink":
            os.symlink(f"target{i}", path)
        else:
            path.write_bytes(b"data %d" % i if kind == "data" else b"")
            os.chmod(path, {"setuid": 0o4750, "socket-like": 0o444}.get(kind, 0o640))
        os.utime(path, ns=(1_100_000_000_123_456_789 + i, 1_200_000_000_987_654_321 + i), follow_symlinks=False)
    os.link(root / "n0000", root / "n0000-link")  # a hard link: through a shard
    if IS_ROOT:
        os.mknod(root / "chr", 0o20640, os.makedev(4, 300))  # minor > 255: the new encoding
        os.mknod(root / "blk", 0o60600, os.makedev(7, 1))
        os.chown(root / "n0001", 70000, 80000)  # ids beyond 16 bits
    plugin = unpartitioned([root], fs_type, (True, 64 << 20) if grow else None)  # size=+64M: several block groups
    image = tmp / "fs.img"
    build_image(plugin, image)
    reference = tmp / "reference.img"  # the same files by mke2fs -d alone (the tree is small enough)
    with open(reference, "wb") as f:
        f.truncate(plugin.fs_size)
    run(["mke2fs", "-q", "-F", "-t", fs_type, "-N", "4000", "-d", root, reference])
    def metadata_only(name: str) -> bool:
        return name in ("chr", "blk") or name.startswith("n") and name != "n0000" and len(name) == 5 and \
            kinds[int(name[1:]) % len(kinds)] not in ("data", "symlink")
    names = sorted(name for name in os.listdir(root) if metadata_only(name))  # staged ones have the ctime
    assert len(names) >= 1999                                                # of their staging link
    script = "".join(f"stat {quote('/' + name)}\n" for name in names)
    ours, theirs = (re.split(rb"^debugfs: [^\n]*\n", subprocess_stdout(["debugfs", "-f", "-", str(path)], script),
                             flags=re.M)[1:] for path in (image, reference))
    def comparable(text: bytes) -> bytes:
        text = re.sub(rb"Inode: \d+", b"Inode: N", text)
        text = re.sub(rb"crtime: .*\n", b"", text)
        return re.sub(rb"Inode checksum: .*\n", b"", text)
    differing = [name for name, a, b in zip(names, ours, theirs) if comparable(a) != comparable(b)]
    assert len(ours) == len(names) and not differing, (differing[:3], ours[names.index(differing[0])]
                                                       if differing else b"")
    inodes = {name: entry[0] for name, entry in ((p[1:], e) for p, e in listing(str(image)).items())}
    per_group = int(re.search(rb"Inodes per group:\s+(\d+)", debugfs(str(image), "stats")).group(1))
    inode_size = int(re.search(rb"Inode size:\s+(\d+)", debugfs(str(image), "stats")).group(1))
    if grow:
        assert len({(inodes[name] - 1) // per_group for name in names}) >= 2  # spread over block groups
    else:
        assert inode_size == 128
    assert inodes["n0000"] == inodes["n0000-link"]


def subprocess_stdout(argv: list[str], script: str) -> bytes:
    return subprocess.run(argv, input=script.encode(), capture_output=True, check=True, timeout=60,
                          env=dict(os.environ, PATH="/usr/sbin:/sbin:" + os.environ.get("PATH", ""))).stdout


def test_unexpected_e2fsck_repairs_fail_the_build(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """e2fsck -fyD may only index the rewritten directory: a block it would have to repair (here a
    checksum spoiled on purpose) stops the build with what e2fsck said, rather than being fixed quietly."""
    monkeypatch.setattr(linuxdisk, "LARGE_DIRECTORY", 40)
    root = tmp / "src"
    root.mkdir()
    for i in range(60):
        (root / f"f{i}").touch()
    pack = linuxdisk.ext2dir.pack
    def spoiled(*args: object, **kwargs: object) -> bytes:
        data = bytearray(pack(*args, **kwargs))  # type: ignore[arg-type]
        data[-1] ^= 0xFF  # the last block's checksum
        return bytes(data)
    monkeypatch.setattr(linuxdisk.ext2dir, "pack", spoiled)
    plugin = unpartitioned([root], "ext4")
    with pytest.raises(ConfigError, match="found more to do than indexing.*checksum"):
        plugin.get_ready()
    plugin.cleanup()


def test_scan_stops_at_a_large_directory_before_an_lstat_per_entry(tmp: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(50):
        (tmp / f"f{i}").touch()
    calls = []
    real = os.lstat
    monkeypatch.setattr(tree.os, "lstat", lambda path, *a, **k: calls.append(path) or real(path, *a, **k))
    assert tree.scan(str(tmp), 40) is None and calls == []
    assert tree.scan(str(tmp), 60) is not None and len(calls) == 50


def test_size_too_small_names_the_size_needed(source: tuple[Path, Expected]) -> None:
    root, _ = source
    message = fails("linuxdisk", str(root), "size=300K")
    assert "size=307200 is too small" in message
    needed = int(message.split("use size=")[1].split()[0])
    assert needed > 300 * 1024
    with serve("linuxdisk", str(root), f"size={needed}") as srv:  # the size named does fit
        assert nbdinfo_json(srv.uri)["exports"][0]["export-size"] == PARTITION + needed + 33 * 512


def test_unreadable_file(tmp: Path) -> None:
    """As an unprivileged user (root reads everything), an unreadable file stops the start-up."""
    if not IS_ROOT:
        pytest.skip("needs root to switch to an unprivileged user")
    base = Path(tempfile.mkdtemp(prefix="linuxdisk-test-"))
    try:
        base.chmod(0o777)
        (base / "src").mkdir()
        (base / "src" / "readable").write_bytes(b"ok\n")
        (base / "src" / "secret").write_bytes(b"no\n")
        (base / "src" / "secret").chmod(0o600)
        message = fails("linuxdisk", str(base / "src"), env={"TMPDIR": str(base)},
                        prefix=["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"])
        assert f"cannot read {base / 'src' / 'secret'}: permission denied" in message
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_find_program() -> None:
    assert linuxdisk.find_program("mke2fs").endswith("/mke2fs")
    with pytest.raises(ConfigError, match="was not found in PATH, /usr/sbin or /sbin: install e2fsprogs"):
        linuxdisk.find_program("no-such-mke2fs-program")


def test_progress_bar_on_a_terminal(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    fd = os.open(tmp, os.O_TMPFILE | os.O_RDWR)
    try:
        expected = 64 << 20
        # Stands in for mke2fs: fills the image in steps, slowly enough for the bar to appear.
        writer = (f"import time\nwith open('/proc/self/fd/{fd}', 'r+b') as f:\n"
                  "    for i in range(8):\n        f.write(b'x' * (8 << 20)); f.flush(); time.sleep(0.2)\n")
        status, _ = linuxdisk._run_with_progress([sys.executable, "-c", writer], fd, expected, "linuxdisk: test")
    finally:
        os.close(fd)
    assert status == 0
    assert "linuxdisk: test" in terminal.getvalue() and "64.0M/64.0M" in terminal.getvalue()


def test_estimate_counts_inode_tables() -> None:
    small_files = tree.TreeStats(allocated=0, inodes=100_000)
    assert linuxdisk.estimate_size(small_files, "ext2") >= 100_000 * 256
    assert linuxdisk.estimate_size(tree.TreeStats(), "ext4") == (1 << 20) + (32 << 20)
    assert linuxdisk.inodes_needed(small_files) >= 100_000 + 10

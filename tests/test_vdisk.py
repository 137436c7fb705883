"""The vmdk, vpc (vhd), vhdx and vdi filters against qemu and libvhdi, on images made by qemu-img
(and, for what qemu-img cannot make, written from the specifications: tests/fixtures/vdisks.py).

Served bytes equal `qemu-img convert -O raw` and qemu-nbd serving the same image; `nbdinfo --map`
agrees with `qemu-img map`; parents are found next to the image in a directory or an archive, and
every way of naming a wrong one is a clear error.
"""

from __future__ import annotations

import json
import random
import shutil
import struct
import tarfile
import zipfile
from pathlib import Path

import pytest

from conftest import NBDFORMATS, nbdinfo_json, run, serve, start
from fixtures.vdisks import (MiB, Write, libvhdi_read, make_raw, merge_runs, qemu_convert, qemu_map, qemu_raw,
                             vhd_differencing, vhd_unique_id, vhdx_differencing)

# (filter, qemu format, subformat options, files it makes besides the named one)
IMAGES = {
    "vmdk-monolithicSparse": ("vmdk", "vmdk", ["subformat=monolithicSparse"]),
    "vmdk-streamOptimized": ("vmdk", "vmdk", ["subformat=streamOptimized"]),
    "vmdk-monolithicFlat": ("vmdk", "vmdk", ["subformat=monolithicFlat"]),
    "vmdk-twoGbMaxExtentSparse": ("vmdk", "vmdk", ["subformat=twoGbMaxExtentSparse"]),
    "vmdk-twoGbMaxExtentFlat": ("vmdk", "vmdk", ["subformat=twoGbMaxExtentFlat"]),
    "vpc-fixed": ("vpc", "vpc", ["subformat=fixed"]),
    "vhd-dynamic": ("vhd", "vpc", ["subformat=dynamic"]),
    "vhdx-fixed": ("vhdx", "vhdx", ["subformat=fixed"]),
    "vhdx-dynamic": ("vhdx", "vhdx", ["subformat=dynamic", "block_size=1M"]),
    "vdi-static": ("vdi", "vdi", ["static=on"]),
    "vdi-dynamic": ("vdi", "vdi", []),
}
EXTENSION = {"vmdk": "vmdk", "vpc": "vhd", "vhdx": "vhdx", "vdi": "vdi"}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vdisk")


@pytest.fixture(scope="module")
def raw(work) -> Path:
    return make_raw(work / "raw.img")


def image_dir(work: Path, raw: Path, key: str) -> tuple[Path, str]:
    """A directory holding the image (and its extent files) and the image's name."""
    _filter, fmt, options = IMAGES[key]
    directory = work / key
    if not directory.exists():
        directory.mkdir()
        qemu_convert(raw, fmt, directory / f"disk.{EXTENSION[fmt]}", *options)
    return directory, f"disk.{EXTENSION[fmt]}"


def copy_out(uri: str, out: Path) -> bytes:
    out.unlink(missing_ok=True)
    run(["nbdcopy", uri, out])
    return out.read_bytes()


def served_map(uri: str) -> list[tuple[int, int, bool]]:
    entries = json.loads(run(["nbdinfo", "--map", "--json", uri]).stdout)
    return merge_runs((e["offset"], e["offset"] + e["length"], bool(e["type"] & 2)) for e in entries)


@pytest.mark.parametrize("key", list(IMAGES))
def test_served_as_qemu_decodes_it(work, raw, key):
    name, fmt, _ = IMAGES[key]
    directory, image = image_dir(work, raw, key)
    expected = qemu_raw(directory / image, fmt, work / f"{key}.ref")
    with serve(f"--filter={name}", "file", f"dir={directory}", export=image) as srv:
        assert copy_out(srv.uri, work / "out.raw") == expected
        ours = served_map(srv.uri)
    with start(["timeout", "600", "qemu-nbd", "-f", fmt, "-r", "-t", "-k"], [directory / image],
               export="") as qemu:
        assert copy_out(qemu.uri, work / "qemu.raw") == expected
    # What we report as zero reads as zero in qemu's decode...
    for begin, end, zero in ours:
        if zero:
            assert expected[begin:end].count(0) == end - begin, (begin, end)
    # ...and where qemu maps the image (its vhdx driver reports everything as data), so do we.
    if fmt != "vhdx":
        assert ours == qemu_map(directory / image, fmt)


def test_extents_and_parents_next_to_a_single_file(work, raw, vmdk_chain):
    """Over file=PATH the files next to the image are files of its directory, opened by the same plugin."""
    directory, image = image_dir(work, raw, "vmdk-twoGbMaxExtentFlat")
    expected = qemu_raw(directory / image, "vmdk", work / "split.ref")
    with serve("--filter=vmdk", "file", directory / image) as srv:
        assert copy_out(srv.uri, work / "out.raw") == expected
    expected = qemu_raw(vmdk_chain / "top.vmdk", "vmdk", work / "top.ref")
    with serve("--filter=vmdk", "file", vmdk_chain / "top.vmdk") as srv:
        assert copy_out(srv.uri, work / "out.raw") == expected


def test_a_member_chosen_by_entry_cannot_reach_its_extents(work, raw):
    directory, image = image_dir(work, raw, "vmdk-monolithicFlat")
    run(["tar", "-C", directory, "-cf", work / "flat.tar", image, "disk-flat.vmdk"])
    proc = run([*NBDFORMATS, "-U", "-", "--filter=vmdk", "--filter=tar", "file", work / "flat.tar",
                f"tar-entry={image}", "--run", "true"], check=False)
    err = proc.stderr.decode()
    assert proc.returncode != 0 and "Traceback" not in err
    assert "the extent file 'disk-flat.vmdk' is a file next to the image" in err and "without tar-entry=" in err


@pytest.mark.parametrize("container", ["tar", "zip", "tar.gz", "xz", "zst"])
def test_inside_archives_and_compressed_files(work, raw, container):
    """Each format inside an archive (whose members are the image's files) or a compressed file."""
    key = {"tar": "vmdk-twoGbMaxExtentSparse", "zip": "vhd-dynamic", "tar.gz": "vmdk-monolithicFlat",
           "xz": "vhdx-dynamic", "zst": "vdi-dynamic"}[container]
    name, fmt, _ = IMAGES[key]
    directory, image = image_dir(work, raw, key)
    expected = qemu_raw(directory / image, fmt, work / f"{key}.ref")
    files = sorted(p.name for p in directory.iterdir())
    files.remove(image)
    files.insert(0, image)  # the descriptor first: the archive's first member is its default export
    packed = work / f"{key}.{container}"
    if container in ("tar", "tar.gz"):
        run(["tar", "-C", directory, "-czf" if container == "tar.gz" else "-cf", packed, *files])
        stack = ["--filter=tar", *(["--filter=gzip"] if container == "tar.gz" else [])]
    elif container == "zip":
        run(["zip", "-q", "-j", packed, *[directory / f for f in files]])
        stack = ["--filter=zip"]
    else:
        tool = {"xz": ["xz", "-c", "-T1", "--block-size=4MiB"], "zst": ["zstd", "-c", "-q"]}[container]
        packed.write_bytes(run([*tool, directory / image]).stdout)
        stack = [f"--filter={'zstd' if container == 'zst' else container}"]
    with serve(f"--filter={name}", *stack, "file", packed) as srv:
        assert copy_out(srv.uri, work / "out.raw") == expected



# -- The image filter ------------------------------------------------------------------------------
@pytest.mark.parametrize("key", list(IMAGES))
def test_image_filter_decodes_each_format(work, raw, key):
    """--filter=image recognises every subformat (a fixed VHD by its footer at the end) and serves
    what qemu decodes: from a directory, from a zip whose members are the image's files and, for
    an image of one file, from a multi-block xz."""
    _, fmt, _ = IMAGES[key]
    directory, image = image_dir(work, raw, key)
    expected = qemu_raw(directory / image, fmt, work / f"{key}.ref")
    files = [image, *sorted(p.name for p in directory.iterdir() if p.name != image)]  # the first: the default
    packed = work / f"{key}-image.zip"
    packed.unlink(missing_ok=True)
    run(["zip", "-q", "-j", packed, *[directory / f for f in files]])
    ways: list[tuple[list, str]] = [(["file", f"dir={directory}"], image), (["--filter=zip", "file", packed], image)]
    if files == [image]:
        xz = work / f"{key}.xz"
        xz.write_bytes(run(["xz", "-c", "-T1", "--block-size=4MiB", directory / image]).stdout)
        ways.append((["--filter=xz", "file", xz], ""))
    for args, export in ways:
        with serve("--filter=image", *args, export=export) as srv:
            assert copy_out(srv.uri, work / "out.raw") == expected, args
            assert nbdinfo_json(srv.uri)["exports"][0]["is_read_only"]  # decoded: read-only


def test_image_filter_serves_a_raw_disk_as_it_is(work, tmp_path):
    """No probe matches a format's magic anywhere but at its place: such a disk stays raw and writable."""
    disk = bytearray(make_raw(tmp_path / "disk.raw", size=4 * MiB).read_bytes())
    for at, magic in ((512, b"KDMV"), (1024, b"conectix"), (4096, b"vhdxfile"), (len(disk) - 1024, b"conectix"),
                      (8192 + 64, b"\x7f\x10\xda\xbe")):
        disk[at:at + len(magic)] = magic
    (tmp_path / "disk.raw").write_bytes(disk)
    with serve("--filter=image", "file", tmp_path / "disk.raw") as srv:
        assert copy_out(srv.uri, tmp_path / "out.raw") == disk
        assert not nbdinfo_json(srv.uri)["exports"][0]["is_read_only"]


# -- Parents ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vmdk_chain(work, raw) -> Path:
    """base.vmdk <- middle.vmdk <- top.vmdk, each with writes of its own (qemu-img, qemu-io)."""
    directory = work / "chain"
    directory.mkdir()
    qemu_convert(raw, "vmdk", directory / "base.vmdk")
    for child, parent, pattern, offset in (("middle.vmdk", "base.vmdk", "0x55", "1M"),
                                           ("top.vmdk", "middle.vmdk", "0xaa", "1536K")):
        run(["qemu-img", "create", "-q", "-f", "vmdk", "-b", parent, "-F", "vmdk", directory / child])
        run(["qemu-io", "-f", "vmdk", "-c", f"write -P {pattern} {offset} 1M", "-c", "write -z 20M 64K",
             directory / child])
    return directory


def test_vmdk_delta_chain_in_a_directory_and_a_tar(work, vmdk_chain):
    expected = qemu_raw(vmdk_chain / "top.vmdk", "vmdk", work / "top.ref")
    with serve("--filter=vmdk", "file", f"dir={vmdk_chain}", export="top.vmdk") as srv:
        assert copy_out(srv.uri, work / "out.raw") == expected
        assert served_map(srv.uri) == qemu_map(vmdk_chain / "top.vmdk", "vmdk")
    archive = work / "chain.tar"
    run(["tar", "-C", work, "-cf", archive, "chain/top.vmdk", "chain/middle.vmdk", "chain/base.vmdk"])
    with serve("--filter=vmdk", "--filter=tar", "file", archive) as srv:  # default: the first member
        assert copy_out(srv.uri, work / "out.raw") == expected


@pytest.mark.parametrize("decoder", ["vmdk", "image"])
def test_vmdk_parent_none_reads_only_the_delta(work, vmdk_chain, decoder):
    top = qemu_raw(vmdk_chain / "top.vmdk", "vmdk", work / "top.ref")
    own = [(e["start"], e["start"] + e["length"]) for e in json.loads(run(
        ["qemu-img", "map", "--output=json", vmdk_chain / "top.vmdk"]).stdout) if e["depth"] == 0]
    expected = bytearray(len(top))
    for begin, end in own:
        expected[begin:end] = top[begin:end]
    with serve(f"--filter={decoder}", "file", f"dir={vmdk_chain}", "vmdk-parent=none", export="top.vmdk") as srv:
        assert copy_out(srv.uri, work / "out.raw") == expected


def test_vmdk_parent_by_path(work, vmdk_chain, tmp_path):
    shutil.copy(vmdk_chain / "top.vmdk", tmp_path / "top.vmdk")  # away from its parents
    expected = qemu_raw(vmdk_chain / "top.vmdk", "vmdk", work / "top.ref")
    with serve("--filter=vmdk", "file", tmp_path / "top.vmdk", f"vmdk-parent={vmdk_chain / 'middle.vmdk'}") as srv:
        assert copy_out(srv.uri, work / "out.raw") == expected


DIFFERENCING_WRITES = [Write(3 * 512, random.Random(3).randbytes(5 * 512)),
                       Write(2 * MiB - 1024, random.Random(4).randbytes(4096)),
                       Write(8 * MiB, random.Random(5).randbytes(2 * MiB)),
                       Write(24 * MiB, random.Random(6).randbytes(512))]


@pytest.fixture(scope="module")
def differencing(work, raw) -> dict[str, Path]:
    """VHD and VHDX differencing disks over qemu-img's dynamic images, with whole, partial and
    single-sector writes (the last in the disk's last, partial block)."""
    writes = DIFFERENCING_WRITES
    directory = work / "differencing"
    directory.mkdir()
    qemu_convert(raw, "vpc", directory / "parent.vhd", "subformat=dynamic")
    qemu_convert(raw, "vhdx", directory / "parent.vhdx", "subformat=dynamic")
    vhd_differencing(directory / "parent.vhd", directory / "child.vhd", writes, ".\\parent.vhd",
                     "C:\\vms\\parent.vhd")
    vhdx_differencing(directory / "parent.vhdx", directory / "child.vhdx", writes, "parent.vhdx",
                      "\\\\?\\C:\\vms\\parent.vhdx")
    return {"vhd": directory / "child.vhd", "vhdx": directory / "child.vhdx"}


@pytest.mark.parametrize("fmt", ["vhd", "vhdx"])
def test_differencing_disks_read_as_libvhdi_reads_them(work, differencing, fmt):
    """The expected disk is qemu's decode of the parent with the child's writes over it; libvhdi
    reads the same, except (VHD) the parent's sectors in the disk's last block, which it reads
    as zeroes."""
    child = differencing[fmt]
    parent = child.with_name(f"parent.{fmt}")
    expected = bytearray(qemu_raw(parent, "vpc" if fmt == "vhd" else fmt, work / "parent.ref"))
    for write in DIFFERENCING_WRITES:
        expected[write.offset:write.offset + len(write.data)] = write.data
    by_libvhdi = libvhdi_read(child, [parent])
    last_block = len(expected) // (2 * MiB) * (2 * MiB) if fmt == "vhd" else len(expected)
    assert by_libvhdi[:last_block] == expected[:last_block]
    with serve(f"--filter={fmt}", "file", f"dir={child.parent}", export=child.name) as srv:
        assert copy_out(srv.uri, work / "out.raw") == expected
    packed = work / f"differencing-{fmt}.zip"  # "VHD from a zip": parent and child members
    with zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as z:
        z.write(child, child.name)
        z.write(child.with_name(f"parent.{fmt}"), f"parent.{fmt}")
    for decoder in (fmt, "image"):
        with serve(f"--filter={decoder}", "--filter=zip", "file", packed) as srv:
            assert copy_out(srv.uri, work / "out.raw") == expected, decoder


def refused(*args: str, export: str = "") -> str:
    """The message a client gets (and the server logs) for an export that cannot open."""
    with serve(*args) as srv:
        proc = run(["nbdinfo", srv.uri_for(export)], check=False)
        log = srv.stderr()
    assert proc.returncode != 0, "the export opened"
    assert "Traceback" not in log, log
    return proc.stderr.decode() + log


def test_parent_missing_escaping_looping_or_not_matching(work, differencing, tmp_path):
    vhd = differencing["vhd"].read_bytes()
    parent = differencing["vhd"].with_name("parent.vhd")

    def child(name: str, relative: str, parent_id: bytes | None = None) -> None:
        vhd_differencing(parent, tmp_path / name, [Write(0, bytes(512))], relative, "C:\\x\\y.vhd", parent_id=parent_id)

    (tmp_path / "child.vhd").write_bytes(vhd)
    message = refused("--filter=vhd", "file", f"dir={tmp_path}", export="child.vhd")
    assert "the parent (parent locators) 'parent.vhd' (an export of the layer below) cannot be opened" in message
    child("escape.vhd", "..\\parent.vhd")
    assert "leads outside the archive or directory" in refused("--filter=vhd", "file", f"dir={tmp_path}",
                                                                export="escape.vhd")
    child("wrong.vhd", ".\\other.vhd", parent_id=bytes(16))
    shutil.copy(parent, tmp_path / "other.vhd")
    assert "it is not this image's parent" in refused("--filter=vhd", "file", f"dir={tmp_path}", export="wrong.vhd")
    # a.vhd's parent is b.vhd, whose parent is a.vhd: made from the footers' unique ids.
    child("a.vhd", ".\\b.vhd", parent_id=bytes(16))
    child("b.vhd", ".\\a.vhd", parent_id=vhd_unique_id(tmp_path / "a.vhd"))
    child("a.vhd", ".\\b.vhd", parent_id=vhd_unique_id(tmp_path / "b.vhd"))
    message = refused("--filter=vhd", "file", f"dir={tmp_path}", export="a.vhd")
    assert "loops" in message or "is not this image's parent" in message


def test_vmdk_parent_loop_and_absolute_hint(work, vmdk_chain, tmp_path):
    for name in ("base.vmdk", "middle.vmdk", "top.vmdk"):
        shutil.copy(vmdk_chain / name, tmp_path / name)
    # base.vmdk made a delta of top.vmdk: a loop (its descriptor is inside the sparse file).
    data = bytearray((tmp_path / "base.vmdk").read_bytes())
    descriptor_at = struct.unpack_from("<Q", data, 28)[0] * 512
    text = data[descriptor_at:descriptor_at + 1024].split(b"\0")[0]
    cid = (tmp_path / "top.vmdk").read_bytes().split(b"CID=")[1][:8]
    looped = text.replace(b"parentCID=ffffffff", b'parentCID=' + cid + b'\nparentFileNameHint="top.vmdk"')
    data[descriptor_at:descriptor_at + len(looped)] = looped
    (tmp_path / "base.vmdk").write_bytes(data)
    assert "loops" in refused("--filter=vmdk", "file", f"dir={tmp_path}", export="top.vmdk")
    absolute = (tmp_path / "top.vmdk").read_bytes().replace(b'parentFileNameHint="middle.vmdk"',
                                                              b'parentFileNameHint="/vmfs/a.vmdk"')
    (tmp_path / "abs.vmdk").write_bytes(absolute)
    assert "only by the absolute path '/vmfs/a.vmdk'" in refused("--filter=vmdk", "file", f"dir={tmp_path}",
                                                                 export="abs.vmdk")


def test_writes_through_cow(work, raw):
    directory, image = image_dir(work, raw, "vmdk-streamOptimized")
    with serve("--filter=cow", "--filter=vmdk", "file", f"dir={directory}", export=image) as srv:
        run(["nbdsh", "-u", srv.uri, "-c", "h.pwrite(b'x' * 4096, 8192); assert h.pread(4096, 8192) == b'x' * 4096"])
    with serve("--filter=vmdk", "file", f"dir={directory}", export=image) as srv:
        proc = run(["nbdsh", "-u", srv.uri, "-c", "h.pwrite(b'x' * 512, 0)"], check=False)
        assert proc.returncode != 0


# -- Hostile images --------------------------------------------------------------------------------
def patched(source: Path, out: Path, at: int, data: bytes, truncate: int | None = None) -> Path:
    image = bytearray(source.read_bytes())
    if at < 0:
        at += len(image)
    image[at:at + len(data)] = data
    out.write_bytes(bytes(image[:truncate]))
    return out


def vhd_header_resummed(path: Path, header: int) -> Path:
    """The dynamic disk header's checksum made right again after a patch ("one's complement of the
    sum of all the bytes ... without the checksum field")."""
    image = bytearray(path.read_bytes())
    image[header + 36:header + 40] = bytes(4)
    image[header + 36:header + 40] = struct.pack(">I", ~sum(image[header:header + 1024]) & 0xFFFFFFFF)
    path.write_bytes(bytes(image))
    return path


def test_hostile_images_give_clear_errors(work, raw, tmp_path):
    sparse = image_dir(work, raw, "vmdk-monolithicSparse")[0] / "disk.vmdk"
    stream = image_dir(work, raw, "vmdk-streamOptimized")[0] / "disk.vmdk"
    vhd = image_dir(work, raw, "vhd-dynamic")[0] / "disk.vhd"
    vdi = image_dir(work, raw, "vdi-dynamic")[0] / "disk.vdi"
    vhdx = image_dir(work, raw, "vhdx-dynamic")[0] / "disk.vhdx"
    gd_offset = struct.unpack_from("<Q", sparse.read_bytes(), 56)[0] * 512
    vhd_header = struct.unpack(">Q", vhd.read_bytes()[16:24])[0]
    bat = struct.unpack(">Q", vhd.read_bytes()[vhd_header + 16:vhd_header + 24])[0]
    first_grain = next(i for i in range(0, 4 << 20, 512) if stream.read_bytes()[i + 12:i + 14] == b"\x78\x01"
                       or stream.read_bytes()[i + 12:i + 14] == b"\x78\x9c")
    cases = {
        # (filter, file): what the error says
        ("vmdk", patched(sparse, tmp_path / "gd.vmdk", 56, struct.pack("<Q", 1 << 50))): "grain directory",
        ("vmdk", patched(sparse, tmp_path / "gt.vmdk", gd_offset, struct.pack("<I", 0xFFFFFF00))): "grain table 0",
        ("vmdk", patched(stream, tmp_path / "lying.vmdk", first_grain + 8, struct.pack("<I", 0x7FFFFFF0))):
            "compressed size",
        ("vmdk", patched(sparse, tmp_path / "grain.vmdk", 20, struct.pack("<Q", 3))): "grainSize",
        ("vmdk", patched(sparse, tmp_path / "short.vmdk", 0, b"", truncate=4 << 20)): "more than the file's size",
        ("vpc", patched(vhd, tmp_path / "bat.vhd", bat, struct.pack(">I", 0x7FFFFFF0))): "past the end|file's size",
        ("vpc", vhd_header_resummed(patched(vhd, tmp_path / "entries.vhd", vhd_header + 28,
                                            struct.pack(">I", 0xFFFFFFF)), vhd_header)): "the BAT's end",
        # Both footers (the end and its copy at the start, which qemu reads too) with a wrong checksum.
        ("vpc", patched(patched(vhd, tmp_path / "sum.vhd", -512 + 40, b"\x01"), tmp_path / "sum.vhd", 40, b"\x01")):
            "checksum",
        ("vdi", patched(vdi, tmp_path / "map.vdi", 72 + 268, struct.pack("<I", 1 << 30))): "block map",
        ("vhdx", patched(patched(vhdx, tmp_path / "head.vhdx", 64 << 10, b"xead"), tmp_path / "head.vhdx",
                         128 << 10, b"xead")): "no valid header",
        ("vhdx", patched(patched(vhdx, tmp_path / "crc.vhdx", (192 << 10) + 100, b"\xff"), tmp_path / "crc.vhdx",
                         (256 << 10) + 100, b"\xff")): "CRC-32C",
    }
    for (name, image), expected in cases.items():
        # -v: a request's error message is a debug line (the client gets it, nbdcopy does not show it).
        proc = run([*NBDFORMATS, "-v", "-U", "-", f"--filter={name}", "file", image, "--run",
                    "nbdcopy \"$uri\" null:"], check=False, timeout=60)
        err = proc.stderr.decode()
        assert proc.returncode != 0, f"{image.name} was served"
        assert "Traceback" not in err and "internal error" not in err, err
        assert any(part in err for part in expected.split("|")), f"{image.name}: {err[-3000:]}"


def test_vhdx_whose_log_needs_replay_is_refused(work, raw, tmp_path):
    vhdx = image_dir(work, raw, "vhdx-dynamic")[0] / "disk.vhdx"
    image = bytearray(vhdx.read_bytes())
    for offset in (64 << 10, 128 << 10):  # both headers: a LogGuid, CRC-32C recomputed
        image[offset + 48:offset + 64] = b"\x11" * 16
        image[offset + 4:offset + 8] = bytes(4)
        from fixtures.vdisks import _crc32c
        image[offset + 4:offset + 8] = struct.pack("<I", _crc32c(bytes(image[offset:offset + 4096])))
    (tmp_path / "log.vhdx").write_bytes(image)
    proc = run([*NBDFORMATS, "-U", "-", "--filter=vhdx", "file", tmp_path / "log.vhdx", "--run", "true"],
               check=False)
    assert proc.returncode != 0 and "has entries to replay" in proc.stderr.decode()


def test_a_tar_member_that_is_not_the_format(work, tmp_path):
    (tmp_path / "notes.txt").write_bytes(b"hello\n" * 100)
    with tarfile.open(tmp_path / "x.tar", "w") as tar:
        tar.add(tmp_path / "notes.txt", "notes.txt")
    proc = run([*NBDFORMATS, "-U", "-", "--filter=vmdk", "--filter=tar", "file", tmp_path / "x.tar", "--run", "true"],
               check=False)
    assert proc.returncode != 0 and "not a VMDK" in proc.stderr.decode()

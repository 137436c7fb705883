"""qcow2, qcow2dec and image filters: images made by qemu-img, decoded bytes and allocation
compared with qemu's (qemu-img convert -O raw, qemu-img map, qemu-nbd), plain and inside tar,
zip, tar.gz, multi-block xz, zstd and over HTTP; hostile images give clear errors.
Needs: qemu-utils, libnbd-bin, nginx, xz-utils, zstd, zip.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import struct
import tarfile
import zipfile
from pathlib import Path

import pytest

from conftest import nbdinfo_json, run, serve, served_sha, sha256_file, start
from fixtures.nginx import Nginx
from fixtures.qcow2 import PASSPHRASE, build_images, copy_tree, nbdinfo_map, qemu_img, qemu_map, qemu_raw
from fixtures.reads import filter_over_file, read_range
from fixtures.serving import fails
from nbdformats.api.errors import ConfigError, NBDError
from nbdformats.formats.qcow2.errors import Qcow2Error, Qcow2UnsupportedError
from nbdformats.formats.qcow2.image import ByteCache, open_image
from nbdformats.formats.qcow2.structs import HEADER_V2

NAMES = ["v2", "v2-512", "v3-4k", "v3-2m", "zlib", "zstd", "extl2", "chain", "snapshot", "luks"]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    return build_images(tmp_path_factory.mktemp("qcow2"))


@pytest.fixture(scope="module")
def expected(images, tmp_path_factory) -> dict[str, str]:
    """The SHA-256 of each disk as qemu-img convert -O raw reads it."""
    out = tmp_path_factory.mktemp("qcow2-raw")
    return {name: sha256_file(qemu_raw(image, out / f"{name}.raw")) for name, image in images.items()}


def params_for(name: str) -> list[str]:
    return [f"passphrase={PASSPHRASE}"] if name == "luks" else []


# Plain files: bytes, allocation, and qemu-nbd on the same image ------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_bytes_and_allocation_agree_with_qemu(images, expected, name, tmp_path):
    image = images[name]
    with serve("--filter=qcow2", "file", str(image), *params_for(name)) as srv:
        assert served_sha(srv.uri, tmp_path) == expected[name]
        assert nbdinfo_map(srv.uri) == qemu_map(image)
    if name == "luks":
        return  # qemu-nbd needs --object and --image-opts; the bytes are checked above
    with start(["timeout", "600", "qemu-nbd", "-f", "qcow2", "-r", "-t", "-k"], [str(image)]) as qemu:
        assert served_sha(qemu.uri, tmp_path, "qemu.img") == expected[name]
        assert nbdinfo_map(qemu.uri) == qemu_map(image)


def test_snapshot_by_name_and_id_as_qemu_reads_it(images, tmp_path):
    image = images["snapshot"]
    first = sha256_file(qemu_raw(image, tmp_path / "first.raw", snapshot="first"))
    second = sha256_file(qemu_raw(image, tmp_path / "second.raw", snapshot="second"))
    assert len({first, second, sha256_file(qemu_raw(image, tmp_path / "now.raw"))}) == 3
    for wanted, sha in (("first", first), ("1", first), ("second", second), ("2", second)):
        with serve("--filter=qcow2", "file", str(image), f"snapshot={wanted}") as srv:
            assert served_sha(srv.uri, tmp_path) == sha, wanted
    with start(["timeout", "600", "qemu-nbd", "-f", "qcow2", "-r", "-t", "-l", "first", "-k"], [str(image)]) as qemu:
        assert served_sha(qemu.uri, tmp_path, "qemu.img") == first


def test_unknown_snapshot_lists_them(images):
    message = fails("--filter=qcow2", "file", str(images["snapshot"]), "snapshot=third")
    assert "no snapshot with id or name 'third'" in message and "1 ('first'), 2 ('second')" in message


def test_qcow2dec_reads_unbacked_clusters_as_zeroes(images, tmp_path):
    """nbdkit's qcow2dec reads no backing file: neither do we under its name, nor with backing=none."""
    top = images["chain"]
    alone = tmp_path / "alone.qcow2"
    shutil.copy(top, alone)
    qemu_img("rebase", "-u", "-b", "", alone)  # the same clusters, no backing file: what qemu reads then
    sha = sha256_file(qemu_raw(alone, tmp_path / "alone.raw"))
    for args in (["--filter=qcow2dec", "file", str(top)], ["--filter=qcow2", "file", str(top), "backing=none"]):
        with serve(*args) as srv:
            assert served_sha(srv.uri, tmp_path) == sha


def test_explicit_backing_path(images, expected, tmp_path):
    """backing=PATH names the top's backing file; the files below it are found next to it."""
    chain = images["chain"].parent
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(chain / "top.qcow2", elsewhere / "top.qcow2")
    with serve("--filter=qcow2", "file", str(elsewhere / "top.qcow2"), f"backing={chain / 'mid.qcow2'}") as srv:
        assert served_sha(srv.uri, tmp_path) == expected["chain"]


# Inside archives, compressed files and over HTTP ------------------------------------------

CONTAINERS = ["tar", "zip", "tar.gz", "xz", "zst", "http", "dir"]


def contained(images: dict[str, Path], name: str, container: str, work: Path) -> tuple[list[str], str]:
    """Server arguments serving `name` from `container` and the export name to ask for."""
    files = copy_tree(images, name, work / "files")
    top = images[name].name
    if container == "tar":
        with tarfile.open(work / "a.tar", "w") as tar:
            for f in files:
                tar.add(f, f"disks/{f.name}")
        return ["--filter=tar", "file", str(work / "a.tar")], f"disks/{top}"
    if container == "tar.gz":
        run(["tar", "czf", work / "a.tar.gz", "-C", work / "files", *[f.name for f in files]])
        return ["--filter=tar", "--filter=gzip", "file", str(work / "a.tar.gz")], top
    if container == "zip":
        with zipfile.ZipFile(work / "a.zip", "w", zipfile.ZIP_DEFLATED) as z:
            for f in files:
                z.write(f, f.name)
        return ["--filter=zip", "file", str(work / "a.zip")], top
    if container == "xz":
        run(["xz", "-T1", "--block-size=256KiB", "-k", work / "files" / top])
        return ["--filter=xz", "file", str(work / "files" / f"{top}.xz")], ""
    if container == "zst":
        run(["zstd", "-q", "-k", work / "files" / top])
        return ["--filter=zstd", "file", str(work / "files" / f"{top}.zst")], ""
    if container == "dir":
        return ["file", f"dir={work / 'files'}"], top
    return ["curl", f"url=NGINX/{top}"], ""


@pytest.fixture(scope="module")
def nginx(images, tmp_path_factory):
    root = tmp_path_factory.mktemp("qcow2-www")
    for name in NAMES:
        copy_tree(images, name, root)
    server = Nginx(root, tmp_path_factory.mktemp("qcow2-nginx")).start()
    yield server
    server.stop()


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("name", ["v2", "zstd", "extl2", "chain", "luks"])
def test_served_from_containers(images, expected, nginx, name, container, tmp_path):
    if name == "chain" and container in ("xz", "zst"):
        pytest.skip("a compressed file holds one image: its backing files have no sibling to be")
    args, export = contained(images, name, container, tmp_path)
    args = [a.replace("NGINX", nginx.url) for a in args]
    for decoder in ("qcow2", "image"):
        with serve(f"--filter={decoder}", *args, *params_for(name), export=export) as srv:
            assert served_sha(srv.uri, tmp_path) == expected[name], (decoder, srv.stderr())


def test_image_filter_serves_raw_as_it_is(tmp_path):
    disk = tmp_path / "disk.raw"
    disk.write_bytes(os.urandom(1 << 20))
    with serve("--filter=image", "file", str(disk)) as srv:
        assert served_sha(srv.uri, tmp_path) == sha256_file(disk)
        assert not nbdinfo_json(srv.uri)["exports"][0]["is_read_only"]  # raw stays writable


def test_image_filter_probes_each_member(images, expected, tmp_path):
    """Members of one archive in different formats: each export is probed on its own."""
    raw = tmp_path / "plain.raw"
    raw.write_bytes(os.urandom(1 << 20))
    with tarfile.open(tmp_path / "mixed.tar", "w") as tar:
        tar.add(raw, "plain.raw")
        tar.add(images["zlib"], "zlib.qcow2")
    with serve("--filter=image", "--filter=tar", "file", str(tmp_path / "mixed.tar")) as srv:
        assert served_sha(srv.uri_for("zlib.qcow2"), tmp_path) == expected["zlib"]
        assert served_sha(srv.uri_for("plain.raw"), tmp_path) == sha256_file(raw)


# Backing files that must not be followed --------------------------------------------------

def unsafe_backing(image: Path, backing: str) -> Path:
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", "qcow2", image, "4M")
    return image


def test_backing_loop_is_an_error(tmp_path):
    unsafe_backing(tmp_path / "a.qcow2", "b.qcow2")
    unsafe_backing(tmp_path / "b.qcow2", "a.qcow2")
    assert "backing loop" in fails("--filter=qcow2", "file", str(tmp_path / "a.qcow2"))


@pytest.mark.parametrize("name", ["../outside.qcow2", "/etc/passwd", "sub/../../outside.qcow2"])
def test_backing_outside_the_directory_is_refused(tmp_path, name):
    (tmp_path / "outside.qcow2").write_bytes(b"not opened")
    inner = tmp_path / "inner"
    inner.mkdir()
    unsafe_backing(inner / "top.qcow2", name)
    assert "leads outside the directory" in fails("--filter=qcow2", "file", str(inner / "top.qcow2"))
    with tarfile.open(tmp_path / "a.tar", "w") as tar:
        tar.add(inner / "top.qcow2", "top.qcow2")
    message = fails("--filter=qcow2", "--filter=tar", "file", str(tmp_path / "a.tar"), "tar-entry=top.qcow2")
    assert "leads outside the archive or directory" in message


def test_backing_symlink_out_of_the_directory_is_refused(tmp_path, images):
    inner = tmp_path / "inner"
    inner.mkdir()
    os.symlink(images["v2"], inner / "base.qcow2")
    unsafe_backing(inner / "top.qcow2", "base.qcow2")
    assert "leads outside the directory" in fails("--filter=qcow2", "file", str(inner / "top.qcow2"))


def test_missing_backing_file_is_named(tmp_path):
    unsafe_backing(tmp_path / "top.qcow2", "gone.qcow2")
    assert "gone.qcow2 is not there" in fails("--filter=qcow2", "file", str(tmp_path / "top.qcow2"))
    with tarfile.open(tmp_path / "a.tar", "w") as tar:
        tar.add(tmp_path / "top.qcow2", "top.qcow2")
    message = fails("--filter=qcow2", "--filter=tar", "file", str(tmp_path / "a.tar"))
    assert "backing file 'gone.qcow2'" in message and "no member 'gone.qcow2'" in message


def test_archive_member_chosen_by_entry_cannot_reach_its_siblings(images, tmp_path):
    """With tar-entry= every export name gives the same member: said so, not served wrong."""
    files = copy_tree(images, "chain", tmp_path / "files")
    with tarfile.open(tmp_path / "a.tar", "w") as tar:
        for f in files:
            tar.add(f, f.name)
    message = fails("--filter=qcow2", "--filter=tar", "file", str(tmp_path / "a.tar"), "tar-entry=top.qcow2")
    assert "serves one file whatever the export name" in message and "backing=PATH" in message


# Encryption --------------------------------------------------------------------------------

def test_encrypted_image_needs_the_right_passphrase(images, tmp_path):
    assert "encrypted (LUKS): give passphrase= or keyfile=" in fails("--filter=qcow2", "file", str(images["luks"]))
    assert "no keyslot matches the passphrase" in fails("--filter=qcow2", "file", str(images["luks"]),
                                                        "passphrase=wrong")
    key = tmp_path / "key"
    key.write_text(PASSPHRASE)
    with serve("--filter=qcow2", "file", str(images["luks"]), f"keyfile={key}") as srv:
        assert nbdinfo_json(srv.uri)["exports"][0]["export-size"] == 4 << 20


# Hostile and unsupported images --------------------------------------------------------------

def patched(source: Path, out: Path, offset: int, data: bytes) -> Path:
    raw = bytearray(source.read_bytes())
    raw[offset:offset + len(data)] = data
    out.write_bytes(raw)
    return out


def header_field(image: Path, name: str) -> int:
    fields = ["magic", "version", "backing_file_offset", "backing_file_size", "cluster_bits", "size", "crypt_method",
              "l1_size", "l1_table_offset", "refcount_table_offset", "refcount_table_clusters", "nb_snapshots",
              "snapshots_offset"]
    return dict(zip(fields, HEADER_V2.unpack_from(image.read_bytes())))[name]


def open_bytes(data: bytes):
    return open_image(lambda offset, length: data[offset:offset + length], len(data), ByteCache(1 << 20))


FIELD_OFFSETS = {"cluster_bits": (20, ">I"), "size": (24, ">Q"), "l1_size": (36, ">I"), "l1_table_offset": (40, ">Q"),
                 "nb_snapshots": (60, ">I"), "header_length": (100, ">I"), "version": (4, ">I"),
                 "incompatible": (72, ">Q"), "backing_file_size": (16, ">I"), "backing_file_offset": (8, ">Q")}


@pytest.mark.parametrize("field,value,message", [
    ("cluster_bits", 30, "cluster_bits is 30, not 9 to 21"),
    ("cluster_bits", 8, "cluster_bits is 8"),
    ("size", 1 << 63, "size (the virtual disk size) is 9223372036854775808, more than 2^63-1"),
    ("size", 1 << 50, "l1_size is 1 entries, too small for the 1125899906842624-byte disk"),
    ("l1_size", 0xFFFFFFFF, "l1_size is 4294967295 entries, more than qemu's limit"),
    ("l1_size", 1 << 20, "past the end of the file"),
    ("l1_table_offset", 1 << 40, "the L1 table (1 entries at offset 0x10000000000) ends at"),
    ("l1_table_offset", 12345, "the L1 table offset 0x3039 is not aligned"),
    ("l1_table_offset", (1 << 64) - 65536, "more than 2^63-1"),
    ("nb_snapshots", 1 << 20, "nb_snapshots is 1048576, more than 65536"),
    ("header_length", 1 << 20, "header_length is 1048576"),
    ("header_length", 50, "header_length is 50"),
    ("version", 4, "qcow2 version 4 is not supported"),
    ("incompatible", 1 << 40, "unknown incompatible features: bit 40"),
    ("incompatible", 1 << 2, "external data file"),
    ("backing_file_size", 5000, "backing_file_size is 5000"),
])
def test_hostile_header_fields_are_named(images, field, value, message):
    offset, fmt = FIELD_OFFSETS[field]
    data = bytearray(images["zlib"].read_bytes())
    struct.pack_into(fmt, data, offset, value)
    if field == "backing_file_size":
        struct.pack_into(">Q", data, 8, 512)
    with pytest.raises(Qcow2Error, match=re.escape(message)):
        open_bytes(bytes(data))


def test_external_data_file_is_refused(tmp_path):
    image = tmp_path / "ext.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path / 'data.raw'}", image, "1M")
    with pytest.raises(Qcow2UnsupportedError, match="external data file"):
        open_bytes(image.read_bytes())
    assert "external data file" in fails("--filter=qcow2", "file", str(image))


def first_l2_entry(image: Path) -> tuple[int, int]:
    """(file offset of the first L1 entry, file offset of its L2 table's first entry)."""
    data = image.read_bytes()
    l1 = header_field(image, "l1_table_offset")
    l2 = struct.unpack_from(">Q", data, l1)[0] & 0x00FF_FFFF_FFFF_FE00
    return l1, l2


def test_l2_table_past_the_end_fails_reads_not_the_server(images, tmp_path):
    l1, _ = first_l2_entry(images["v3-4k"])
    bad = patched(images["v3-4k"], tmp_path / "bad.qcow2", l1, struct.pack(">Q", 1 << 45))
    chain = filter_over_file("qcow2", bad)
    top = chain.open(readonly=True, export_name="")
    with pytest.raises(NBDError, match="the L2 table of L1 entry 0 .* past the end of the file"):
        read_range(top, 0, 4096)
    assert read_range(top, 3 << 20, 4096)  # other L2 tables still read
    top.close()


def test_misaligned_data_cluster_fails_its_reads_only(images, expected, tmp_path):
    """An L2 entry pointing between clusters: EIO for that cluster, while the clusters around it,
    in the same L2 table, still read as qemu reads the unpatched image."""
    _, l2 = first_l2_entry(images["v3-4k"])
    bad = patched(images["v3-4k"], tmp_path / "bad.qcow2", l2 + 8, struct.pack(">Q", (1 << 63) | 0x10200))
    good = qemu_raw(images["v3-4k"], tmp_path / "good.raw").read_bytes()
    top = filter_over_file("qcow2", bad).open(readonly=True, export_name="")
    with pytest.raises(NBDError, match="guest offset 4096 points to host offset 0x10200, which is not cluster-aligned"):
        read_range(top, 0, 65536)
    assert read_range(top, 0, 4096) == good[:4096]
    assert read_range(top, 8192, 65536) == good[8192:8192 + 65536]
    top.close()


def test_invalid_extended_l2_subcluster_fails_its_reads_only(images, tmp_path):
    """Spec: a subcluster may not be both allocated and "reads as zeros": EIO for it alone."""
    _, l2 = first_l2_entry(images["extl2"])
    data = images["extl2"].read_bytes()
    bitmap = struct.unpack_from(">Q", data, l2 + 8)[0]
    assert bitmap & (1 << 2), "cluster 0's subcluster 2 is allocated in the fixture (qemu-io's write at 4096)"
    bad = patched(images["extl2"], tmp_path / "bad.qcow2", l2 + 8, struct.pack(">Q", bitmap | (1 << 34)))
    good = qemu_raw(images["extl2"], tmp_path / "good.raw").read_bytes()
    top = filter_over_file("qcow2", bad).open(readonly=True, export_name="")
    with pytest.raises(NBDError, match="extended L2 entry of guest offset 0 is invalid for subcluster 2"):
        read_range(top, 4096, 4096)
    assert read_range(top, 0, 4096) == good[:4096]  # subclusters 0 and 1 (2 KiB each)
    assert read_range(top, 6144, 1 << 20) == good[6144:6144 + (1 << 20)]
    top.close()


def test_compressed_cluster_size_that_lies(images, tmp_path):
    """A compressed descriptor claiming one sector when the data needs more: EIO, not zeroes."""
    _, l2 = first_l2_entry(images["zlib"])
    data = images["zlib"].read_bytes()
    entry = struct.unpack_from(">Q", data, l2)[0]
    assert entry & (1 << 62)
    shift = 62 - (16 - 8)
    short = entry & ~(((1 << 8) - 1) << shift)
    bad = patched(images["zlib"], tmp_path / "bad.qcow2", l2, struct.pack(">Q", short))
    top = filter_over_file("qcow2", bad).open(readonly=True, export_name="")
    with pytest.raises(NBDError, match="compressed cluster at host offset .* (corrupt|decodes to)"):
        read_range(top, 0, 65536)
    top.close()


def test_truncated_image_fails_reads_with_eio(images, tmp_path):
    data = images["v3-4k"].read_bytes()
    cut = tmp_path / "cut.qcow2"
    cut.write_bytes(data[:len(data) // 2])
    with serve("--filter=qcow2", "file", str(cut)) as srv:
        proc = run(["nbdcopy", srv.uri, tmp_path / "out.raw"], check=False)
        assert proc.returncode != 0 and b"Input/output error" in proc.stderr
        assert nbdinfo_json(srv.uri)["exports"][0]["export-size"] == 4 << 20  # the server still serves
    top = filter_over_file("qcow2", cut).open(readonly=True, export_name="")
    with pytest.raises(NBDError, match="past the end of the file"):
        read_range(top, 0, 4 << 20)
    top.close()


def test_not_qcow2_is_a_start_up_error(tmp_path):
    disk = tmp_path / "disk.raw"
    disk.write_bytes(bytes(1 << 20))
    assert "not a qcow2 image" in fails("--filter=qcow2", "file", str(disk))


def test_pure_reader_matches_qemu_on_random_reads(images, tmp_path):
    """In-process random reads through the filter, against qemu's raw bytes."""
    for name in ("v3-4k", "extl2", "zstd"):
        content = qemu_raw(images[name], tmp_path / f"{name}.raw").read_bytes()
        chain = filter_over_file("qcow2", images[name])
        top = chain.open(readonly=True, export_name="")
        rng = random.Random(name)
        for _ in range(50):
            offset = rng.randrange(len(content))
            n = min(rng.randrange(1, 300000), len(content) - offset)
            assert read_range(top, offset, n) == content[offset:offset + n], (name, offset, n)
        top.close()


def test_config_errors_name_the_filter(images):
    with pytest.raises(ConfigError, match="qcow2: give exactly one of passphrase= or keyfile="):
        filter_over_file("qcow2", images["luks"], ("passphrase", "x"), ("keyfile", "/etc/hostname"))

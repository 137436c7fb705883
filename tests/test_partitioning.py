"""The partitioning plugin against nbdkit 1.32's: MBR disks byte for byte, GPT disks partition for
partition (their GUIDs are random), read by sfdisk, qemu-img and the partition filter."""

from __future__ import annotations

import json
import re

import pytest

from conftest import NBDFORMATS, nbdinfo_json, nbdsh, run, serve, serve_nbdkit, served_sha


@pytest.fixture
def parts(tmp) -> list[str]:
    """Six files of 300K, 600K ... 1800K, each starting with its name."""
    paths = []
    for i in range(1, 7):
        path = tmp / f"p{i}"
        with open(path, "wb") as f:
            f.write(f"part{i}".encode())
            f.truncate(i * 300 * 1024 + (i * 7 if i % 2 else 0))  # odd ones end mid-sector
        paths.append(str(path))
    return paths


def sfdisk(image) -> list[str]:
    """The partitions as sfdisk sees them, without the random GUIDs."""
    out = run(["/sbin/sfdisk", "-d", str(image)]).stdout.decode()
    return [re.sub(r", uuid=[0-9A-F-]+", "", line) for line in out.splitlines()
            if line.startswith(str(image)) or line.startswith("label:")]


@pytest.mark.parametrize("layout", [
    ("{0}",),
    ("{0}", "{1}", "{2}"),
    ("{0}", "{1}", "{2}", "{3}", "{4}", "{5}", "partition-type=mbr"),
    ("{0}", "mbr-id=0x82", "{1}", "mbr-id=default", "alignment=4096", "{2}"),
    ("alignment=512", "{0}", "{1}", "{2}", "{3}", "{4}", "partition-type=dos"),
])
def test_mbr_disks_are_nbdkits_byte_for_byte(tmp, parts, layout):
    args = ("partitioning", *(a.format(*parts) for a in layout))
    with serve_nbdkit(*args) as ref, serve(*args) as ours:
        assert served_sha(ours.uri, tmp, "ours") == served_sha(ref.uri, tmp, "ref")
        facts = [{k: v for k, v in nbdinfo_json(s.uri)["exports"][0].items() if k.startswith(("can_", "is_"))}
                 for s in (ours, ref)]
        assert facts[0] == facts[1]


@pytest.mark.parametrize("layout", [
    ("{0}", "partition-type=gpt"),
    ("{0}", "{1}", "{2}", "{3}", "{4}", "{5}"),
    ("{0}", "type-guid=0657FD6D-A4AB-43C4-84E5-0933C84B4F4F", "{1}", "type-guid=default", "alignment=64K", "{2}",
     "partition-type=GPT"),
])
def test_gpt_disks_have_nbdkits_partitions(tmp, parts, layout):
    args = ("partitioning", *(a.format(*parts) for a in layout))
    with serve_nbdkit(*args) as ref, serve(*args) as ours:
        run(["nbdcopy", ours.uri, tmp / "ours.img"])
        run(["nbdcopy", ref.uri, tmp / "ref.img"])
    ours_table = [line.replace("ours.img", "X") for line in sfdisk(tmp / "ours.img")]
    assert ours_table == [line.replace("ref.img", "X") for line in sfdisk(tmp / "ref.img")]
    assert ours_table[0] == "label: gpt" and len(ours_table) == 1 + len([a for a in layout if a.startswith("{")])
    # Every partition holds its file (then zeroes to the end of its last sector).
    for number, path in enumerate(p for p in parts if any(a.format(*parts) == p for a in layout)):
        with serve("--filter=partition", "partitioning", *(a.format(*parts) for a in layout),
                   f"partition={number + 1}") as srv:
            run(["nbdcopy", srv.uri, tmp / "partition.img"])
        served, content = (tmp / "partition.img").read_bytes(), open(path, "rb").read()
        assert served[:len(content)] == content and not served[len(content):].strip(b"\0")


def test_logical_partitions_are_read_by_the_partition_filter_and_qemu(tmp, parts):
    with serve("--filter=partition", "partitioning", *parts, "partition-type=mbr", "partition=7") as srv:  # 4 is the extended one
        assert nbdsh(srv.uri, "print(h.pread(5, 0))").stdout == b"bytearray(b'part6')\n"
    with serve("partitioning", *parts, "partition-type=mbr") as srv:
        info = json.loads(run(["qemu-img", "info", "--output=json", srv.uri]).stdout)
        assert info["virtual-size"] == nbdinfo_json(srv.uri)["exports"][0]["export-size"]
        run(["nbdcopy", srv.uri, tmp / "mbr.img"])
    table = sfdisk(tmp / "mbr.img")
    assert table[0] == "label: dos" and len(table) == 1 + 7  # 3 primary, the extended one, 3 logical
    assert "type=f" in table[4] and all("type=83" in line for line in table[5:])


def test_writes_reach_the_files_and_tables_cannot_change(tmp, parts):
    with serve("partitioning", *parts[:2]) as srv:
        nbdsh(srv.uri, f"""
table = h.pread(512, 0)
h.pwrite(table, 0)  # the same bytes: allowed
h.pwrite(bytes(512), 512)  # zeroes into padding: allowed
for offset, data in ((0x1be, b"x"), (4096, b"y")):
    try:
        h.pwrite(data, offset)
        raise SystemExit("expected EIO")
    except nbd.Error as e:
        assert e.errno == "EIO", e.errno
start = 1024 * 1024
h.pwrite(b"HELLO", start + 100)
h.flush()
""")
    assert open(parts[0], "rb").read()[100:105] == b"HELLO"


def test_sparse_files_stay_sparse(tmp):
    big = tmp / "big"
    with open(big, "wb") as f:
        f.truncate(64 << 20)
        f.seek(32 << 20)
        f.write(b"data")
    with serve("partitioning", str(big)) as srv:
        extents = json.loads(run(["nbdinfo", "--map", "--json", srv.uri]).stdout)
        data = [e for e in extents if e["type"] == 0]
        assert sum(e["length"] for e in data) < 1 << 20  # the table and a few KiB of the file


@pytest.mark.parametrize("extra, message", [
    (("alignment=1000",), "alignment=1000"),
    (("alignment=2M",), "alignment=2M"),
    (("alignment=1536",), "power of 2"),
    (("mbr-id=0x100",), "mbr-id=0x100"),
    (("type-guid=nonsense",), "could not validate GUID"),
    (("partition-type=apm",), "partition-type=apm"),
    (("bogus=1",), "unknown parameter 'bogus'"),
])
def test_bad_parameters_are_clear_errors(parts, extra, message):
    result = run([*NBDFORMATS, "-U", "-", "partitioning", parts[0], *extra, "--run", "true"], check=False)
    err = result.stderr.decode()
    assert result.returncode == 1 and message in err and "Traceback" not in err, err


def test_empty_files_and_too_many_gpt_partitions_are_refused(tmp):
    empty = tmp / "empty"
    empty.touch()
    result = run([*NBDFORMATS, "-U", "-", "partitioning", str(empty), "--run", "true"], check=False)
    assert result.returncode == 1 and b"zero length partitions are not allowed" in result.stderr
    files = []
    for i in range(8193):
        path = tmp / f"f{i}"
        path.write_bytes(b"x")
        files.append(str(path))
    result = run([*NBDFORMATS, "-U", "-", "partitioning", *files, "--run", "true"], check=False)
    assert result.returncode == 1 and b"at most 8192 partitions with GPT" in result.stderr


def test_gpt_of_more_than_128_partitions_is_nbdkits(tmp):
    """130 files: the entry array grows to the next multiple of 128 entries (256), as nbdkit's."""
    files = []
    for i in range(130):
        path = tmp / f"part{i:03}"
        path.write_bytes(f"partition {i}".encode())
        files.append(str(path))
    args = ("partitioning", *files, "alignment=4096")
    with serve_nbdkit(*args) as ref, serve(*args) as ours:
        run(["nbdcopy", ours.uri, tmp / "ours.img"])
        run(["nbdcopy", ref.uri, tmp / "ref.img"])
    ours_table = [line.replace("ours.img", "X") for line in sfdisk(tmp / "ours.img")]
    assert ours_table == [line.replace("ref.img", "X") for line in sfdisk(tmp / "ref.img")]
    assert len(ours_table) == 1 + 130
    with serve("--filter=partition", *args, "partition=130") as srv:
        run(["nbdcopy", srv.uri, tmp / "partition.img"])
    assert (tmp / "partition.img").read_bytes().rstrip(b"\0") == b"partition 129"

"""nbdkit's small test plugins (null, zero, full, pattern, random, sparse-random, info) against nbdkit
1.32 serving the same command line: the same bytes, map, flags and errors, through real clients."""

from __future__ import annotations

import json
import socket

import pytest

from conftest import NBDFORMATS, nbdinfo_json, nbdsh, run, serve, serve_nbdkit, served_sha

# Server-specific: where the socket is, and block sizes the server advertises on its own.
NOT_COMPARED = ("uri", "block_size_minimum", "block_size_preferred", "block_size_maximum")


def export_facts(uri: str) -> dict:
    info = nbdinfo_json(uri)["exports"][0]
    return {k: v for k, v in info.items() if k not in NOT_COMPARED}


def disk_map(uri: str) -> list:
    return json.loads(run(["nbdinfo", "--map", "--json", uri]).stdout)


SAME_AS_NBDKIT = [
    ("null", "1M"),
    ("null",),
    ("zero",),
    ("full", "1M"),
    ("pattern", "1M"),
    ("pattern", "size=100003"),
    ("random", "1M", "seed=42"),
    ("random", "size=65537", "seed=4294967295"),
    ("sparse-random", "256M", "seed=7", "runlength=1048576"),
    ("sparse-random", "64M", "seed=3", "random-content=true", "runlength=262144", "percent=50"),
    ("sparse-random", "1G", "seed=11", "percent=90", "runlength=65536"),
    ("sparse-random", "10000000", "seed=5", "runlength=8192", "percent=30"),
    ("sparse-random", "100M", "percent=100", "seed=1"),
    ("sparse-random", "100M", "percent=0"),
]


@pytest.mark.parametrize("args", SAME_AS_NBDKIT, ids=" ".join)
def test_same_bytes_map_and_flags_as_nbdkit(tmp, args):
    with serve_nbdkit(*args) as ref, serve(*args) as ours:
        assert export_facts(ours.uri) == export_facts(ref.uri)
        if nbdinfo_json(ref.uri)["exports"][0]["export-size"]:
            assert served_sha(ours.uri, tmp, "ours") == served_sha(ref.uri, tmp, "ref")
            assert disk_map(ours.uri) == disk_map(ref.uri)


def test_pattern_largest_size_and_unaligned_reads():
    with serve("pattern", str((1 << 63) - 1)) as srv:
        nbdsh(srv.uri, """
size = h.get_size()
assert size == 2**63 - 1
assert h.pread(8, size - 7 - 8) == (size - 7 - 8).to_bytes(8, "big")
assert h.pread(5, size - 5) == (size - 7).to_bytes(8, "big")[2:7]
assert h.pread(13, 8003) == b"".join(o.to_bytes(8, "big") for o in (8000, 8008, 8016))[3:16]
assert h.is_read_only()
""")


def test_null_discards_writes_and_reports_one_hole():
    with serve("null", "size=1G") as srv:
        nbdsh(srv.uri, """
h.pwrite(b"x" * 4096, 8192, nbd.CMD_FLAG_FUA)
h.zero(1 << 20, 0, nbd.CMD_FLAG_FAST_ZERO)
h.trim(4096, 0)
h.flush()
assert h.pread(4096, 8192) == bytes(4096)
""")
        assert disk_map(srv.uri) == [{"offset": 0, "length": 1 << 30, "type": 3, "description": "hole,zero"}]


def test_example1_is_a_read_only_100m_disk_with_one_linux_partition(tmp_path):
    """sfdisk, not our MBR code, reads the partition table back."""
    with serve("example1") as srv:
        facts = export_facts(srv.uri)
        assert facts["export-size"] == 100 << 20 and facts["is_read_only"] is True
        run(["nbdcopy", srv.uri, tmp_path / "disk.img"])
    table = json.loads(run(["sfdisk", "--json", tmp_path / "disk.img"]).stdout)["partitiontable"]
    assert table["label"] == "dos"
    assert [(p["start"], p["size"], p["type"]) for p in table["partitions"]] == [(128, 204800 - 128, "83")]
    assert (tmp_path / "disk.img").read_bytes()[512:] == bytes((100 << 20) - 512)


def test_full_fails_writes_with_enospc_like_nbdkit():
    script = """
for name, call in [("pwrite", lambda: h.pwrite(b"x" * 512, 0)), ("zero", lambda: h.zero(512, 0)),
                   ("trim", lambda: h.trim(512, 0))]:
    try:
        call()
    except nbd.Error as e:
        print(name, e.errno)
    else:
        print(name, "ok")
print(h.pread(512, 512) == bytes(512))
"""
    with serve_nbdkit("full", "1M") as ref, serve("full", "1M") as ours:
        expected = nbdsh(ref.uri, script).stdout
        assert nbdsh(ours.uri, script).stdout == expected
    assert expected.decode().split("\n")[:4] == ["pwrite ENOSPC", "zero ENOSPC", "trim ENOSPC", "True"]


def test_random_writes_must_match_and_copy_onto_itself():
    with serve("random", "4M", "seed=1") as srv:
        run(["nbdcopy", srv.uri, srv.uri])
        run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", srv.uri, srv.uri])
        nbdsh(srv.uri, """
data = h.pread(4096, 12345)
h.pwrite(data, 12345)
for call in (lambda: h.pwrite(bytes(4096), 12345), lambda: h.zero(4096, 0), lambda: h.trim(4096, 0)):
    try:
        call()
        raise SystemExit("expected EIO")
    except nbd.Error as e:
        assert e.errno == "EIO", e.errno
""")


def test_random_default_seed_is_repeatable_within_a_server():
    with serve("random", "64K") as srv:
        first = nbdsh(srv.uri, "print(h.pread(65536, 0).hex())").stdout
        assert nbdsh(srv.uri, "print(h.pread(65536, 0).hex())").stdout == first


def test_sparse_random_copies_onto_itself_and_refuses_trimming_data():
    with serve("sparse-random", "1G", "seed=9", "runlength=1M") as srv:
        run(["nbdcopy", srv.uri, srv.uri])
        extents = disk_map(srv.uri)
        data = next(e for e in extents if e["type"] == 0)
        hole = next(e for e in extents if e["type"] == 3)
        nbdsh(srv.uri, f"""
h.zero({hole["length"]}, {hole["offset"]})
h.trim({hole["length"]}, {hole["offset"]})
try:
    h.trim(4096, {data["offset"]})
    raise SystemExit("expected EIO")
except nbd.Error as e:
    assert e.errno == "EIO"
""")


def test_sparse_random_unaligned_reads_agree_with_aligned_ones():
    with serve("sparse-random", "64M", "seed=2", "percent=100", "random-content=true") as srv:
        nbdsh(srv.uri, "assert h.pread(100, 4000) == h.pread(8192, 0)[4000:4100]")


@pytest.mark.parametrize("args, message", [
    (("sparse-random", "1M", "percent=101"), "percent=101"),
    (("sparse-random", "1M", "percent=nan"), "percent=nan"),
    (("sparse-random", "1M", "runlength=0"), "runlength=0"),
    (("sparse-random", "17T"), "too large"),
    (("random", "1M", "seed=4294967296"), "seed=4294967296"),
    (("random", "1M", "seed=-1"), "seed=-1"),
    (("pattern",), "missing required parameter size"),
    (("pattern", "8E"), "too large"),
    (("info", "mode=nonsense"), "unknown mode"),
    (("zero", "1M"), "no bare argument"),
])
def test_bad_parameters_are_clear_errors(args, message):
    result = run([*NBDFORMATS, "-U", "-", *args, "--run", "true"], check=False, timeout=60)
    assert result.returncode == 1
    err = result.stderr.decode()
    assert message in err and "Traceback" not in err


INFO_SCRIPT = """
print(h.get_size(), bytes(h.pread(h.get_size(), 0)) if h.get_size() != 12 else "time")
"""


@pytest.mark.parametrize("mode, export", [("exportname", "hello"), ("mode=EXPORT-NAME", "abc"),
                                          ("base64exportname", "aGVsbG8gbmJka2l0IHVzZXI="),
                                          ("mode=address", ""), ("uptime", ""), ("conntime", ""), ("time", "")])
def test_info_modes_match_nbdkit(mode, export):
    with serve_nbdkit("info", mode, export=export) as ref, serve("info", mode, export=export) as ours:
        assert nbdsh(ours.uri, INFO_SCRIPT).stdout == nbdsh(ref.uri, INFO_SCRIPT).stdout
        assert export_facts(ours.uri) == export_facts(ref.uri)


def test_info_time_modes_count_up():
    with serve("info", "uptime") as srv:
        nbdsh(srv.uri, """
import struct, time
def read():
    seconds, micros = struct.unpack(">qI", h.pread(12, 0))
    return seconds + micros / 1e6
first = read()
time.sleep(0.2)
assert 0.15 < read() - first < 5
""")
    with serve("info", "time") as srv:
        nbdsh(srv.uri, "import struct, time; assert abs(struct.unpack('>q', h.pread(8, 0))[0] - time.time()) < 5")


def test_info_address_over_tcp_shows_the_client_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = run([*NBDFORMATS, "-p", str(port), "-i", "127.0.0.1", "info", "address", "--run",
                  "nbdsh -u \"$uri\" -c 'print(h.pread(h.get_size(), 0).decode())'"], timeout=60)
    assert result.stdout.decode().startswith("127.0.0.1:")


def test_info_bad_base64_export_is_refused():
    with serve("info", "base64exportname", export="not*base64") as srv:
        result = nbdsh(srv.uri, "print(h.get_size())", check=False)
        assert result.returncode != 0


def split_files(tmp) -> list[str]:
    """Two files, each half hole and half data (as nbdkit's test-split-extents.sh), and a small third."""
    first, second, third = tmp / "split.1", tmp / "split.2", tmp / "split.3"
    with open(first, "wb") as f:
        f.truncate(512 * 1024)
        f.seek(512 * 1024)
        f.write(b"1" * 512 * 1024)
    with open(second, "wb") as f:
        f.write(b"2" * 512 * 1024)
        f.truncate(1024 * 1024)
    third.write_bytes(b"third")
    return [str(first), str(second), str(third)]


def test_split_reads_map_and_flags_match_nbdkit(tmp):
    files = split_files(tmp)
    read = "import hashlib; print(hashlib.sha256(h.pread(h.get_size(), 0)).hexdigest(), h.pread(9, 1048571))"
    with serve_nbdkit("split", *files) as ref, serve("split", files[0], f"file={files[1]}", files[2]) as ours:
        assert export_facts(ours.uri) == export_facts(ref.uri)
        assert disk_map(ours.uri) == disk_map(ref.uri)
        assert nbdsh(ours.uri, read).stdout == nbdsh(ref.uri, read).stdout


def test_split_req_one_extents_stop_at_a_file_boundary(tmp):
    files = split_files(tmp)
    with serve("split", *files) as srv:
        nbdsh(srv.uri, """
entries = []
def f(context, offset, e, err):
    entries.extend(e)
h.block_status(1024 * 1024, 768 * 1024, f, nbd.CMD_FLAG_REQ_ONE)
assert entries == [256 * 1024, 0], entries
""")


def test_split_writes_land_in_the_right_files(tmp):
    files = split_files(tmp)
    with serve("split", *files) as srv:
        nbdsh(srv.uri, "h.pwrite(b'abcdef', 1048576 - 3); h.pwrite(b'XY', 2097152 + 3); h.flush() if h.can_flush() else None")
    assert open(files[0], "rb").read()[-3:] == b"abc"
    assert open(files[1], "rb").read()[:3] == b"def"
    assert open(files[2], "rb").read() == b"thiXY"


def test_split_needs_existing_files(tmp):
    result = run([*NBDFORMATS, "-U", "-", "split", str(tmp / "missing"), "--run", "true"], check=False)
    assert result.returncode == 1 and b"no such file" in result.stderr

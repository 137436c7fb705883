"""stripe (RAID-0) and mirror (RAID-1) over local NBD servers: nbdformats, nbdkit and qemu-nbd legs."""

from __future__ import annotations

import errno
import json
import random
import re
import subprocess
import time

import pytest

from conftest import NBDFORMATS, nbdinfo_json, nbdsh, random_file, run, serve, serve_nbdkit, serve_qemu_nbd, sha256_file
from fixtures.nbd_servers import kill, serve_many, unix_uri
from nbdformats.client import NBDClient
from nbdformats.api.errors import NBDError
from nbdformats.plugins.stripe import Layout

MIB = 1 << 20


# -- Where striped bytes live ------------------------------------------------------------------
def reference_layout(legs: int, stripe: int, leg_size: int) -> list[tuple[int, int]]:
    """(leg, offset on the leg) of every byte of the disk, built row by row."""
    rows, tail = divmod(leg_size, stripe)
    where = []
    for row in range(rows):
        for leg in range(legs):
            where += [(leg, row * stripe + i) for i in range(stripe)]
    for leg in range(legs):
        where += [(leg, rows * stripe + i) for i in range(tail)]
    return where


@pytest.mark.parametrize("legs,stripe,leg_size", [(1, 4, 12), (2, 4, 12), (3, 4, 10), (4, 8, 5), (2, 3, 3)])
def test_layout_matches_the_reference_for_every_range(legs, stripe, leg_size):
    layout = Layout(legs, stripe, leg_size)
    where = reference_layout(legs, stripe, leg_size)
    assert layout.size == len(where)
    for offset in range(layout.size):
        for count in range(1, layout.size - offset + 1):
            mapped = []
            for leg, leg_offset, start, length in layout.pieces(offset, count):
                assert start == len(mapped) and 0 < length
                mapped += [(leg, leg_offset + i) for i in range(length)]
            assert mapped == where[offset:offset + count]
            for leg, (leg_offset, length) in layout.leg_ranges(offset, count).items():
                assert sorted(o for l, o in mapped if l == leg) == list(range(leg_offset, leg_offset + length))


# -- stripe ------------------------------------------------------------------------------------
def stripe_args(servers, *extra: str) -> list[str]:
    return ["stripe", *(f"server={unix_uri(s)}" for s in servers), *extra]


@pytest.mark.parametrize("legs,stripe_size", [(2, "1M"), (4, "64K")])
def test_stripe_round_trip_and_placement(tmp_path, legs, stripe_size):
    source = random_file(tmp_path / "src.img", legs * 4 * MIB, seed=legs)
    with serve_many(legs, "memory", "4M") as servers, serve(*stripe_args(servers, f"stripe-size={stripe_size}")) as srv:
        info = nbdinfo_json(srv.uri)["exports"][0]
        assert info["export-size"] == legs * 4 * MIB and info["can_multi_conn"] is True
        run(["nbdcopy", "--flush", source, srv.uri])
        run(["nbdcopy", srv.uri, tmp_path / "back.img"])
        assert sha256_file(tmp_path / "back.img") == sha256_file(source)
        # Each server holds its stripes, in order, as RAID-0 lays them out.
        data = source.read_bytes()
        stripe = 1 * MIB if stripe_size == "1M" else 64 * 1024
        for leg, server in enumerate(servers):
            with NBDClient.connect(unix_uri(server)) as nbd:
                held = nbd.pread(4 * MIB, 0)
            expected = b"".join(data[(row * legs + leg) * stripe:(row * legs + leg + 1) * stripe]
                                for row in range(4 * MIB // stripe))
            assert held == expected, f"server {leg}"


def test_stripe_uses_n_times_the_smallest_server_with_a_short_last_row(tmp_path):
    # 3 MiB + 1536 bytes of each server: three rows of 1 MiB stripes, then a row of 1536-byte stripes.
    with serve("memory", str(3 * MIB + 1536)) as a, serve("memory", "5M") as b, \
            serve(*stripe_args([a, b])) as srv:
        size = nbdinfo_json(srv.uri)["exports"][0]["export-size"]
        assert size == 2 * (3 * MIB + 1536)
        source = random_file(tmp_path / "src.img", size, seed=9)
        run(["nbdcopy", source, srv.uri])
        run(["nbdcopy", srv.uri, tmp_path / "back.img"])
        assert sha256_file(tmp_path / "back.img") == sha256_file(source)
        with NBDClient.connect(unix_uri(b)) as nbd:  # the larger server's last row: bytes 3M+1536..3M+3072
            assert nbd.pread(1536, 3 * MIB) == source.read_bytes()[size - 1536:]
            assert nbd.pread(1024, 3 * MIB + 1536) == bytes(1024)  # unused


def test_stripe_over_nbdkit_qemu_nbd_and_nbdformats(tmp_path):
    image = tmp_path / "leg.img"
    image.write_bytes(bytes(4 * MIB))
    source = random_file(tmp_path / "src.img", 12 * MIB, seed=2)
    with serve_nbdkit("memory", "4M") as a, serve_qemu_nbd(str(image)) as b, serve("memory", "4M") as c, \
            serve(*stripe_args([a, b, c], "stripe-size=256K")) as srv:
        run(["nbdcopy", source, srv.uri])
        run(["nbdcopy", srv.uri, tmp_path / "back.img"])
        assert sha256_file(tmp_path / "back.img") == sha256_file(source)


def test_stripe_keeps_holes_and_forwards_zero_and_trim(tmp_path):
    with serve_many(2, "memory", "8M") as servers, serve(*stripe_args(servers, "stripe-size=1M")) as srv:
        nbdsh(srv.uri, "h.pwrite(b'\\x01' * (3 << 20), 0)\n"
                       "h.zero(1 << 20, 1 << 20)\n"  # the second stripe, on server 1
                       "h.trim(512 << 10, 2 << 20)\n"
                       "assert h.pread(1 << 20, 1 << 20) == bytes(1 << 20)\n"
                       "assert h.pread(4096, 0) == b'\\x01' * 4096\n")
        extents = json.loads(run(["nbdinfo", "--json", "--map", srv.uri]).stdout)
        data = [(e["offset"], e["length"]) for e in extents if e["type"] == 0]
        # Stripe 0 is data; stripe 1 was zeroed (a hole on the memory server); the first half of
        # stripe 2 was trimmed; everything after 3 MiB was never written.
        assert data == [(0, MIB), (2 * MIB + 512 * 1024, 512 * 1024)], extents
        with NBDClient.connect(unix_uri(servers[1])) as nbd:
            (length, state), = nbd.block_status(MIB, 0)  # one hole, which may run past the request (spec)
            assert state == 3 and length >= MIB


# -- mirror ------------------------------------------------------------------------------------
def mirror_args(servers, *extra: str) -> list[str]:
    return ["mirror", *(f"server={unix_uri(s)}" for s in servers), *extra]


def leg_sha256(server, size: int, tmp_path) -> str:
    out = tmp_path / f"leg-{random.random()}.img"
    run(["nbdcopy", unix_uri(server), out])
    assert out.stat().st_size == size
    return sha256_file(out)


def test_mirror_writes_every_copy_and_balances_reads(tmp_path):
    source = random_file(tmp_path / "src.img", 8 * MIB, seed=4)
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    with serve_nbdkit("--filter=log", "memory", "8M", f"logfile={logs[0]}") as a, \
            serve_nbdkit("--filter=log", "memory", "8M", f"logfile={logs[1]}") as b, \
            serve("memory", "8M") as c, serve(*mirror_args([a, b, c])) as srv:
        run(["nbdcopy", "--flush", source, srv.uri])
        for leg in (a, b, c):
            assert leg_sha256(leg, 8 * MIB, tmp_path) == sha256_file(source)
        reads_before = [len(re.findall(r"connection=\d+ Read ", log.read_text())) for log in logs]
        run(["nbdcopy", srv.uri, tmp_path / "back.img"])
        assert sha256_file(tmp_path / "back.img") == sha256_file(source)
        reads = [len(re.findall(r"connection=\d+ Read ", log.read_text())) - n for log, n in zip(logs, reads_before)]
        assert all(n > 0 for n in reads), f"reads per server {reads}: not balanced"
        assert "degraded" not in srv.stderr()


def test_mirror_survives_a_leg_killed_mid_copy(tmp_path):
    source = random_file(tmp_path / "src.img", 8 * MIB, seed=5)
    # The surviving copy is slowed down so that the copy is still running when the other one dies.
    with serve_nbdkit("--filter=delay", "memory", "8M", "wdelay=15ms") as keeper, serve("memory", "8M") as victim, \
            serve(*mirror_args([keeper, victim])) as srv:
        copy = subprocess.Popen(["nbdcopy", "--connections=1", "--requests=1", "--flush", str(source), srv.uri],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            time.sleep(0.3)
            assert copy.poll() is None, "the copy finished before the leg was killed"
            kill(victim)
            _, stderr = copy.communicate(timeout=60)
        finally:
            if copy.poll() is None:
                copy.kill()
        assert copy.returncode == 0, stderr.decode()
        log = srv.stderr()
        assert re.search(r"mirror: server 1 \(.*\) is stale and no longer used: .*1 of 2 copies in sync", log), log
        run(["nbdcopy", srv.uri, tmp_path / "back.img"])  # reads now come from the keeper only
        assert sha256_file(tmp_path / "back.img") == sha256_file(source)
        assert leg_sha256(keeper, 8 * MIB, tmp_path) == sha256_file(source)
        assert srv.proc.poll() is None


def test_mirror_reads_fail_over_to_another_copy(tmp_path):
    source = random_file(tmp_path / "src.img", 4 * MIB, seed=6)
    with serve_many(2, "memory", "4M") as (a, b), serve(*mirror_args([a, b])) as srv:
        run(["nbdcopy", source, srv.uri])
        kill(a)
        run(["nbdcopy", srv.uri, tmp_path / "back.img"])
        assert sha256_file(tmp_path / "back.img") == sha256_file(source)
        assert re.search(r"server 0 \(.*\) is stale", srv.stderr())


def test_mirror_write_quorum(tmp_path):
    with serve_many(2, "memory", "1M") as (a, b), serve(*mirror_args([a, b], "write-quorum=2")) as srv, \
            NBDClient.connect(srv.uri) as nbd:
        nbd.pwrite(b"both", 0)
        kill(b)
        # The copy left may or may not get this write (depending on whether the mirror noticed the dead copy
        # before sending it), but it is not acknowledged ...
        with pytest.raises(NBDError, match="fewer than write-quorum=2") as refused:
            nbd.pwrite(b"one!", 0)
        assert refused.value.errno == errno.EIO
        before = nbd.pread(4, 0)
        assert before in (b"both", b"one!")
        # ... and once the copy is known to be gone, writes are refused without touching the other one.
        with pytest.raises(NBDError, match="1 copies in sync can be reached, fewer than write-quorum=2"):
            nbd.pwrite(b"two!", 0)
        assert nbd.pread(4, 0) == before  # reads go on from the copy that is left
        assert re.search(r"server 1 .* is stale", srv.stderr())


def test_mirror_does_not_blame_servers_for_the_requests_fault(tmp_path):
    # Every copy refuses the write (no space): the client gets ENOSPC and no copy is dropped.
    error = ("--filter=error", "memory", "1M", "error=ENOSPC", "error-pwrite-rate=100%")
    with serve_nbdkit(*error) as a, serve_nbdkit(*error) as b, serve(*mirror_args([a, b])) as srv:
        nbdsh(srv.uri, "try:\n    h.pwrite(b'x', 0)\nexcept nbd.Error as e:\n    assert e.errno == 'ENOSPC', e\n"
                       "else:\n    raise AssertionError('the write succeeded')\n"
                       "for i in range(4):\n    assert h.pread(512, 0) == bytes(512)\n")
        assert "degraded" not in srv.stderr()


def test_mirror_of_different_sizes_uses_the_smallest(tmp_path):
    with serve("memory", "1M") as a, serve("memory", "2M") as b, serve(*mirror_args([a, b])) as srv:
        assert nbdinfo_json(srv.uri)["exports"][0]["export-size"] == MIB
        assert "different sizes" in srv.stderr()


@pytest.mark.parametrize("args,message", [
    (["stripe"], "missing required parameter server="),
    (["mirror", "server=nbd+unix:///?socket=/nonexistent", "server=nbd://localhost:1/", "write-quorum=3"],
     "write-quorum=3 but only 2 servers"),
    (["stripe", "server=http://x/"], "not an NBD URI"),
    (["mirror", "server=nbd+unix:///?socket=/nonexistent"],
     "0 copies in sync can be used, fewer than write-quorum=1: server 0 (/nonexistent): cannot connect: "
     "No such file or directory"),
])
def test_bad_parameters_are_refused(tmp_path, args, message):
    proc = run([*NBDFORMATS, "-U", tmp_path / "sock", *args], check=False, timeout=30)
    assert proc.returncode != 0 and message in proc.stderr.decode(), proc.stderr.decode()

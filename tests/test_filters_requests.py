"""cow, blocksize, blocksize-policy, readahead, noextents, nocache, multi-conn, noparallel, error
and delay filters through real clients (qemu-img, qemu-io, nbdcopy, nbdinfo, libnbd), against
the file underneath, the recorder plugin's log of what reached it, and nbdkit."""

from __future__ import annotations

import errno
import hashlib
import time

import pytest

from conftest import NBDFORMATS, nbdinfo_json, nbdsh, random_file, run, serve, serve_nbdkit, \
    served_sha, sha256_file
from fixtures.filterchain import RECORDER, open_chain
from fixtures.nbdkitlog import nbdkit_calls, recorder_calls
from fixtures.nbdops import run_ops
from nbdformats.protocol import wire as P
from nbdformats.client import NBDClient

MIB = 1 << 20


def info(uri: str) -> dict:
    return nbdinfo_json(uri)["exports"][0]


# -- cow ---------------------------------------------------------------------------------------
def test_cow_writes_never_reach_the_file(tmp):
    disk = random_file(tmp / "disk.img", 4 * MIB, seed=20)
    disk.chmod(0o444)  # the plugin must open it read-only
    before = sha256_file(disk)
    new = random_file(tmp / "new.img", 4 * MIB, seed=21)
    with serve("--filter=cow", "file", str(disk)) as srv:
        assert not info(srv.uri)["is_read_only"]
        run(["nbdcopy", str(new), srv.uri])
        run(["qemu-io", "-f", "raw", "-c", "write -P 0x55 1000 70000", "-c", "write -z 1M 200K",
             "-c", "discard 3M 64K", srv.uri])
        expected = bytearray(new.read_bytes())
        expected[1000:71000] = b"\x55" * 70000
        expected[MIB:MIB + 200 * 1024] = bytes(200 * 1024)
        expected[3 * MIB:3 * MIB + 65536] = bytes(65536)  # trimmed blocks read as zeroes
        # A second connection sees the same overlay.
        assert served_sha(srv.uri, tmp) == hashlib.sha256(expected).hexdigest()
    assert sha256_file(disk) == before


def test_cow_diff_with_qemu_img_as_the_manual_describes(tmp):
    disk = random_file(tmp / "disk.img", 2 * MIB, seed=22)
    with serve("--filter=cow", "file", str(disk)) as srv:
        run(["qemu-io", "-f", "raw", "-c", "write -P 0xcc 4096 8192", "-c", "write -P 0xdd 1536K 100", srv.uri])
        served = served_sha(srv.uri, tmp)
        run(["qemu-img", "create", "-q", "-F", "raw", "-b", srv.uri, "-f", "qcow2", str(tmp / "diff.qcow2")])
        run(["qemu-img", "rebase", "-q", "-F", "raw", "-b", str(disk), "-f", "qcow2", str(tmp / "diff.qcow2")])
    run(["qemu-img", "convert", "-O", "raw", str(tmp / "diff.qcow2"), str(tmp / "merged.img")])
    assert sha256_file(tmp / "merged.img") == served != sha256_file(disk)


def test_cow_makes_a_read_only_filter_writable(tmp):
    plain = random_file(tmp / "disk.img", MIB, seed=23)
    run(["xz", "-k", "-0", "--block-size=256KiB", str(plain)])
    with serve("--filter=cow", "--filter=xz", "file", str(plain) + ".xz") as srv:
        run(["qemu-io", "-f", "raw", "-c", "write -P 0x11 300K 5000", srv.uri])
        expected = bytearray(plain.read_bytes())
        expected[300 * 1024:300 * 1024 + 5000] = b"\x11" * 5000
        assert served_sha(srv.uri, tmp) == hashlib.sha256(expected).hexdigest()


@pytest.mark.parametrize("setting", ["true", "false", "path"])
def test_cow_on_read_keeps_what_was_read(tmp, setting):
    disk = random_file(tmp / "disk.img", MIB, seed=24)
    switch = tmp / "switch"
    switch.touch()
    value = str(switch) if setting == "path" else setting
    with serve("--filter=cow", "file", str(disk), f"cow-on-read={value}") as srv:
        first = run_ops(srv.uri, [("pread", 0, 256 * 1024)])
        # Change the file behind the server's back: only what the overlay kept stays as it was.
        with open(disk, "r+b") as f:
            f.write(b"\xee" * (512 * 1024))
        switch.unlink()
        again = run_ops(srv.uri, [("pread", 0, 256 * 1024), ("pread", 256 * 1024, 64 * 1024)])
    assert (again[0] == first[0]) is (setting != "false")
    assert again[1] == hashlib.sha256(b"\xee" * 65536).hexdigest()[:16]  # never read before: not kept


def test_cow_extents_and_reads_match_nbdkit(tmp):
    disk = tmp / "sparse.img"
    with open(disk, "wb") as f:
        f.truncate(2 * MIB)
        f.seek(MIB)
        f.write(random_file(tmp / "chunk", 256 * 1024, seed=25).read_bytes())
    ops = [("pwrite", 70000, 100, 0x42), ("pwrite", 1600000, 65536, 3), ("trim", 1200000, 200000),
           ("pread", 0, 2 * MIB), ("pread", 69999, 102)]
    theirs = run_ops_on(serve_nbdkit, ("--filter=cow", "file", str(disk)), ops)
    # nbdkit 1.32's cow filter cannot zero; ours zeroes whole blocks by dropping them.
    ours = run_ops_on(serve, ("--filter=cow", "file", str(disk)),
                      ops + [("zero", 1 << 20, 131072), ("pread", MIB, 131072), ("extents", 0, 2 * MIB)])
    assert ours[:len(ops)] == theirs
    assert ours[len(ops) + 1] == hashlib.sha256(bytes(131072)).hexdigest()[:16]
    extents = ours[-1]
    assert sum(length for length, _ in extents) == 2 * MIB
    assert extents[0] == [65536, 3] and extents[1] == [65536, 0]  # the hole before the written block
    starts = [sum(length for length, _ in extents[:i]) for i in range(len(extents))]
    holes = [(start, start + length) for start, (length, kind) in zip(starts, extents) if kind == 3]
    assert any(lo <= MIB and MIB + 131072 <= hi for lo, hi in holes)  # zeroed whole blocks are holes


def run_ops_on(start, args: tuple, ops: list) -> list:
    with start(*args) as srv:
        return run_ops(srv.uri, ops)


def test_cow_in_process_random_operations():
    chain, top = open_chain([("cow", [("cow-block-size", "4096")])], plugin="memory",
                            plugin_params=[("size", "300001")])
    import random
    rng = random.Random(5)
    model = bytearray(300001)
    for _ in range(800):
        offset = rng.randrange(len(model))
        count = rng.randrange(1, min(20000, len(model) - offset) + 1)
        op = rng.choice("wzt")
        if op == "w":
            data = rng.randbytes(count)
            top.pwrite(memoryview(data), offset, 0)
            model[offset:offset + count] = data
        else:
            (top.zero if op == "z" else top.trim)(count, offset, 0)
            model[offset:offset + count] = bytes(count)
    buf = bytearray(len(model))
    top.pread(memoryview(buf), 0, 0)
    assert buf == model
    assert chain.plugin.store.pages == {}  # nothing reached the plugin


# -- blocksize ---------------------------------------------------------------------------------
def test_blocksize_plugin_sees_only_aligned_bounded_requests(tmp):
    log = tmp / "calls"
    ops = [("pwrite", 1, 5000, 1), ("pwrite", 4095, 70000, 2), ("pread", 3, 100000), ("zero", 100, 300000),
           ("trim", 1000, 200000), ("cache", 10, 10), ("pread", 0, 512 * 1024)]
    with serve("--filter=blocksize", RECORDER, "size=1000000", "cache=native", f"log={log}", "minblock=4k",
               "maxdata=16k",
               "maxlen=64k") as srv:
        assert info(srv.uri)["export-size"] == 1000000 - 1000000 % 4096
        ours = run_ops(srv.uri, ops)
        calls = recorder_calls(log)
    with serve_nbdkit("--filter=blocksize", "memory", "1000000", "minblock=4k", "maxdata=16k", "maxlen=64k") as ref:
        assert ours == run_ops(ref.uri, ops)
    assert calls and all(offset % 4096 == 0 and count % 4096 == 0 for _, offset, count, _ in calls)
    assert all(count <= 16384 for op, _, count, _ in calls if op in ("pread", "pwrite"))
    assert all(count <= 65536 for _, _, count, _ in calls)


def test_blocksize_unaligned_fast_zero_is_refused():
    _, top = open_chain([("blocksize", [("minblock", "512")])], plugin="memory", plugin_params=[("size", "1M")])
    from nbdformats.api.chain import FLAG_FAST_ZERO
    from nbdformats.api.errors import NBDError
    with pytest.raises(NBDError, match="read-modify-write"):
        top.zero(1000, 10, FLAG_FAST_ZERO)
    top.zero(1024, 512, FLAG_FAST_ZERO)


@pytest.mark.parametrize("fua, flushes, fua_pieces", [("emulate", 1, 0), ("native", 0, 16)])
def test_blocksize_over_emulated_fua_flushes_once(tmp, fua, flushes, fua_pieces):
    """As nbdkit's filter (test-fua): a FUA write split into 16 pieces reaches a plugin that
    emulates FUA as 16 pieces without FUA and one flush, not a flush per piece."""
    from nbdformats.api.chain import FLAG_FUA
    log = tmp / "calls"
    _, top = open_chain([("blocksize", [("maxdata", "4k")])],
                        plugin_params=[("log", str(log)), ("fua", fua), ("size", "1M")])
    top.pwrite(memoryview(bytes(65536)), 0, FLAG_FUA)
    calls = recorder_calls(log)
    assert [op for op, *_ in calls].count("pwrite") == 16
    assert [op for op, *_ in calls].count("flush") == flushes
    assert sum("FUA" in flags for op, _, _, flags in calls if op == "pwrite") == fua_pieces


# -- blocksize-policy --------------------------------------------------------------------------
@pytest.mark.parametrize("params", [("blocksize-preferred=64k",),
                                    ("blocksize-minimum=512", "blocksize-maximum=1M"),
                                    ("blocksize-minimum=4k", "blocksize-preferred=16k", "blocksize-maximum=8M")])
def test_blocksize_policy_advertises_like_nbdkit(params):
    with serve("--filter=blocksize-policy", "memory", "1M", *params) as ours, \
            serve_nbdkit("--filter=blocksize-policy", "memory", "1M", *params) as theirs:
        keys = ("block_size_minimum", "block_size_preferred", "block_size_maximum")
        # The chain's maximum as it is, even over 64M (reads and writes over 64M are refused, as nbdkit's are).
        assert [info(ours.uri)[k] for k in keys] == [info(theirs.uri)[k] for k in keys]


def test_blocksize_policy_error_matches_nbdkit():
    args = ("--filter=blocksize-policy", "memory", "1M", "blocksize-error-policy=error",
            "blocksize-minimum=4k", "blocksize-maximum=64k")
    ops = [("pread", 0, 4096), ("pread", 1, 4096), ("pread", 0, 100), ("pwrite", 0, 128 * 1024, 1),
           ("pwrite", 8192, 8192, 1), ("zero", 4096, 128 * 1024), ("zero", 4095, 4096), ("trim", 0, 1000),
           ("cache", 512, 4096), ("extents", 512 * 1024, 4096), ("pread", 8192, 8192)]
    def first_type(outcomes: list) -> list:  # extents replies may differ in length: compare the type
        return [r[0][1] if isinstance(r, list) else r for r in outcomes]

    with serve(*args) as ours, serve_nbdkit(*args) as theirs:
        mine = first_type(run_ops(ours.uri, ops))
        assert mine == first_type(run_ops(theirs.uri, ops))
    assert mine.count("EINVAL") == 6


def test_blocksize_policy_write_disconnect():
    with serve("--filter=blocksize-policy", "memory", "1M", "blocksize-write-disconnect=64k") as srv:
        out = nbdsh(srv.uri, """
h.pwrite(b"a" * 65536, 0)
try:
    h.pwrite(b"b" * 65537, 0)
except nbd.Error as e:
    print("write failed")
print("connected", h.aio_is_ready())
""").stdout.decode()
        assert "write failed" in out and "connected False" in out
        assert run_ops(srv.uri, [("pread", 0, 4)]) == [hashlib.sha256(b"aaaa").hexdigest()[:16]]


# -- readahead, noextents, nocache -------------------------------------------------------------
def test_readahead_prefetches_after_each_read(tmp):
    log = tmp / "calls"
    with serve("--filter=readahead", RECORDER, "size=4M", "cache=native", f"log={log}") as srv:
        # Stay connected until the prefetches are done: a connection that ends drops the
        # prefetches still queued.
        with NBDClient.connect(srv.uri) as client:
            for i in range(8):
                client.pread(4096, i * 4096)
            client.pread(4096, 1024 * 1024)
            deadline = time.monotonic() + 10
            while len([c for c in recorder_calls(log) if c[0] == "cache"]) < 9 and time.monotonic() < deadline:
                time.sleep(0.05)
        calls = recorder_calls(log)
    reads = [(offset, count) for op, offset, count, _ in calls if op == "pread"]
    caches = [(offset, count) for op, offset, count, _ in calls if op == "cache"]
    assert sorted(caches) == sorted((offset + count, 32768) for offset, count in reads)


def test_readahead_window():
    from nbdformats.filters.readahead import READAHEAD_MAX, READAHEAD_MIN, Window
    window = Window()
    assert window.after_read(0, 4096, 1 << 30) == (4096, READAHEAD_MIN)
    # Reads that land beyond what was prefetched double the window (for the next prefetch), up to 4M.
    sizes = [window.after_read(offset, 4096, 1 << 30)[1] for offset in range(MIB, 64 * MIB, 4 * MIB)]
    assert sizes[:3] == [READAHEAD_MIN, 2 * READAHEAD_MIN, 4 * READAHEAD_MIN] and sizes[-1] == READAHEAD_MAX
    window.after_read(0, 4096, 1 << 30)  # backwards: back to the minimum
    assert window.after_read(4096, 4096, 1 << 30) == (8192, READAHEAD_MIN)
    assert window.after_read((1 << 30) - 4096, 4096, 1 << 30) is None  # nothing after the end


def test_readahead_warns_without_cache_below(tmp):
    with serve("--filter=readahead", RECORDER, "cache=none") as srv:
        nbdsh(srv.uri, "h.pread(4096, 0)")
        assert "does nothing" in srv.stderr()


def test_noextents_hides_holes(tmp):
    disk = tmp / "sparse.img"
    with open(disk, "wb") as f:
        f.truncate(4 * MIB)
        f.write(b"data")
    with serve("file", str(disk)) as plain, serve("--filter=noextents", "file", str(disk)) as hidden:
        assert len(nbdinfo_json(plain.uri, "--map")) > 1
        assert [(e["offset"], e["length"], e["type"]) for e in nbdinfo_json(hidden.uri, "--map")] == \
            [(0, 4 * MIB, 0)]
        assert served_sha(hidden.uri, tmp) == sha256_file(disk)


@pytest.mark.parametrize("mode, advertised, plugin_sees", [
    ("none", False, []),
    ("emulate", True, ["pread"]),
    ("nop", True, []),
])
def test_nocache_modes(tmp, mode, advertised, plugin_sees):
    log = tmp / "calls"
    with serve("--filter=nocache", RECORDER, "size=1M", "cache=native", f"log={log}", f"cachemode={mode}") as srv:
        assert info(srv.uri)["can_cache"] is advertised
        log.write_text("")  # forget nbdinfo's reads
        outcome = run_ops(srv.uri, [("cache", 0, 8192)])
        calls = recorder_calls(log)
    assert outcome == (["ok"] if advertised else ["EINVAL"])
    assert sorted({op for op, *_ in calls}) == plugin_sees


# -- multi-conn --------------------------------------------------------------------------------
@pytest.mark.parametrize("mode, advertised", [("auto", True), ("emulate", True), ("plugin", False),
                                              ("disable", False), ("unsafe", True)])
def test_multi_conn_advertised(mode, advertised):
    with serve("--filter=multi-conn", RECORDER, "multi-conn=false", f"multi-conn-mode={mode}") as srv:
        assert info(srv.uri)["can_multi_conn"] is advertised


TWO_CONNECTIONS = """
h2 = nbd.NBD()
h2.connect_uri(h.get_uri())
h.pwrite(b"1" * 512, 0)
h2.pwrite(b"2" * 512, 4096)
h.flush()
h.pread(512, 0)
h2.flush()
h.pwrite(b"3" * 512, 8192, nbd.CMD_FLAG_FUA)
h2.shutdown()
h.shutdown()
"""


@pytest.mark.parametrize("track", ["connection", "fast", "off"])
def test_multi_conn_emulation_flushes_like_nbdkit(tmp, track):
    reference, ours = tmp / "nbdkit.log", tmp / "ours.log"
    args = ("multi-conn-mode=emulate", f"multi-conn-track-dirty={track}")
    with serve_nbdkit("--filter=multi-conn", "--filter=log", "memory", "1M", f"logfile={reference}", *args) as ref:
        nbdsh(ref.uri, TWO_CONNECTIONS)
    with serve("--filter=multi-conn", RECORDER, "size=1M", "multi-conn=false", f"log={ours}", *args) as srv:
        nbdsh(srv.uri, TWO_CONNECTIONS)
        calls = recorder_calls(ours)
    assert calls == nbdkit_calls(reference)
    assert [op for op, *_ in calls].count("flush") >= 2


# -- noparallel --------------------------------------------------------------------------------
PARALLEL_READS = """
import time
start = time.monotonic()
pending = {h.aio_pread(nbd.Buffer(512), i * 512) for i in range(4)}
while pending:
    h.poll(-1)
    pending = {c for c in pending if not h.aio_command_completed(c)}
print(time.monotonic() - start)
"""


@pytest.mark.parametrize("filters, serialized", [((), False), (("--filter=noparallel",), True),
                                                 (("--filter=noparallel", "serialize=all-requests"), True)])
def test_noparallel_serializes_requests(filters, serialized):
    flags = [f for f in filters if f.startswith("--")]
    params = [f for f in filters if not f.startswith("--")]
    with serve(*flags, "--filter=delay", "memory", "1M", "rdelay=200ms", *params) as srv:
        elapsed = float(nbdsh(srv.uri, PARALLEL_READS).stdout.split()[-1])
    assert (elapsed >= 0.75) is serialized, elapsed


def test_noparallel_connections_one_client_at_a_time():
    with serve("--filter=noparallel", "memory", "1M", "serialize=connections") as srv:
        assert info(srv.uri)["can_multi_conn"] is False
        out = nbdsh(srv.uri, """
import subprocess, sys, time
second = subprocess.Popen([sys.executable, "-c", "import nbd, time; h = nbd.NBD(); h.connect_uri(%r); "
                           "print(time.monotonic())" % h.get_uri()], stdout=subprocess.PIPE)
time.sleep(1)
left = time.monotonic()
h.shutdown()
print(left, float(second.communicate(timeout=60)[0]))
""").stdout.split()
        left, second_connected = float(out[-2]), float(out[-1])
        assert second_connected >= left


# -- error and delay ---------------------------------------------------------------------------
def test_error_rate_100_percent_gives_eio_and_the_server_stays_up():
    with serve("--filter=error", "memory", "1M", "error-rate=100%") as srv:
        for _ in range(3):
            assert run_ops(srv.uri, [("pread", 0, 512), ("pwrite", 0, 512, 1), ("zero", 0, 512), ("flush",)]) == \
                ["EIO", "EIO", "EIO", "ok"]
        assert srv.proc.poll() is None


def test_error_per_operation_and_file_match_nbdkit(tmp):
    trigger = tmp / "inject"
    args = ("--filter=error", "memory", "1M", "error=ENOSPC", "error-pwrite-rate=1", "error-zero-rate=100%",
            "error-trim=EPERM", "error-trim-rate=100%", f"error-pread-file={trigger}", "error-pread-rate=1",
            "error-pread=EIO")
    ops = [("pread", 0, 512), ("pwrite", 0, 512, 1), ("zero", 0, 512), ("trim", 0, 512), ("extents", 0, 512),
           ("cache", 0, 512)]
    results = []
    for start in (serve, serve_nbdkit):
        with start(*args) as srv:
            # Extents replies may differ in length between servers: only success matters here.
            results.append(["ok" if isinstance(r, list) else r for r in run_ops(srv.uri, ops)])
            trigger.touch()
            results.append(run_ops(srv.uri, ops[:1]))
            trigger.unlink()
    assert results[0] == results[2] and results[1] == results[3] == ["EIO"]
    assert results[0][:4] == [results[0][0], "ENOSPC", "ENOSPC", "EPERM"] and results[0][0] != "EIO"


def test_error_rate_is_random():
    with serve("--filter=error", "memory", "1M", "error-pread-rate=0.5") as srv:
        outcomes = run_ops(srv.uri, [("pread", 0, 512)] * 400)
    assert 120 < outcomes.count("EIO") < 280


def test_error_refuses_unknown_errors():
    proc = run([*NBDFORMATS, "-f", "-U", "/nonexistent/sock", "--filter=error", "memory", "1M", "error=EFOO"],
               check=False, timeout=30)
    assert proc.returncode != 0 and b"error=EFOO" in proc.stderr


def test_delay_reads_only():
    script = """
import time
t = time.monotonic(); h.pread(512, 0); read = time.monotonic() - t
t = time.monotonic(); h.pwrite(b"x" * 512, 0); write = time.monotonic() - t
try:
    h.zero(512, 0, nbd.CMD_FLAG_FAST_ZERO)
except nbd.Error as e:
    print("fast zero", e.errno)
print(read, write)
"""
    with serve("--filter=delay", "memory", "1M", "rdelay=300ms", "delay-zero=5", "delay-fast-zero=false") as srv:
        start = time.monotonic()
        out = nbdsh(srv.uri, script).stdout.decode().split()
        assert time.monotonic() - start < 4  # the fast zero failed at once, not after 5 s
    assert out[:3] == ["fast", "zero", "ENOTSUP"]
    read, write = float(out[3]), float(out[4])
    assert read >= 0.3 and write < 0.25


def test_blocksize_advertises_4g_but_reads_over_64m_are_refused():
    """As nbdkit: the blocksize filter's 4G-1 maximum is advertised as it is; a read or write over
    64 MiB is still refused (the server's bound on what one request may hold in memory)."""
    with serve("--filter=blocksize", "memory", "128M") as ours, NBDClient.connect(ours.uri) as nbd:
        assert info(ours.uri)["block_size_maximum"] == 4 * 1024 * MIB - 1
        refused = nbd.send_request(P.CMD_READ, 0, 64 * MIB + 1, into=memoryview(bytearray(64 * MIB + 1)))
        assert refused.error == errno.EINVAL
        assert nbd.pread(64 * MIB, 0) == bytes(64 * MIB)

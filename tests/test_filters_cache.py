"""cache filter: modes, reclaim, ENOSPC, cache-on-read, extents, concurrency; in-process and with real clients."""

from __future__ import annotations

import errno
import os
import threading

import pytest

from conftest import nbdsh, random_file, run, serve, sha256_file
from fixtures.filterchain import open_chain
from fixtures.tmpfs import mounted_tmpfs
from nbdformats.api.chain import EXTENT_DATA, EXTENT_HOLE, EXTENT_ZERO, FLAG_FUA, FLAG_MAY_TRIM, Extents
from nbdformats.api.errors import ConfigError
from nbdformats.filters import cache as C

KIB, MIB = 1 << 10, 1 << 20
BLOCK = 64 * KIB


@pytest.fixture(autouse=True)
def cache_tmpdir(tmp, monkeypatch):
    """Cache files go to the test's directory (the filter reads $TMPDIR at start-up)."""
    directory = tmp / "cachedir"
    directory.mkdir()
    monkeypatch.setenv("TMPDIR", str(directory))
    return directory


def cache_chain(*params: str, size: str = "1M", plugin: tuple[str, ...] = ()):
    chain, top = open_chain([("cache", [tuple(p.split("=", 1)) for p in params])],
                            plugin_params=[("size", size), *[tuple(p.split("=", 1)) for p in plugin]])
    return chain, chain.plugin, top


def ops(plugin) -> list[tuple[str, int, int, int]]:
    calls = list(plugin.calls)
    plugin.calls.clear()
    return calls


def pattern(n: int, seed: int) -> bytes:
    return bytes((seed + i * 7) & 0xFF for i in range(n))


# -- sans-IO ----------------------------------------------------------------------------------

def test_overlay_paints_dirty_ranges_over_plugin_extents():
    below = [(0, 100, EXTENT_HOLE | EXTENT_ZERO), (100, 100, EXTENT_DATA)]
    assert C.overlay(below, []) == below
    assert C.overlay(below, [(50, 100, EXTENT_DATA)]) == [
        (0, 50, EXTENT_HOLE | EXTENT_ZERO), (50, 50, EXTENT_DATA), (100, 50, EXTENT_DATA), (150, 50, EXTENT_DATA)]
    assert C.overlay(below, [(0, 10, EXTENT_ZERO), (190, 10, EXTENT_ZERO)]) == [
        (0, 10, EXTENT_ZERO), (10, 90, EXTENT_HOLE | EXTENT_ZERO), (100, 90, EXTENT_DATA), (190, 10, EXTENT_ZERO)]


# -- modes ------------------------------------------------------------------------------------

def test_writeback_keeps_writes_until_flush():
    _, plugin, top = cache_chain()
    data = pattern(BLOCK + 4096, 1)
    top.pwrite(memoryview(data), BLOCK - 2048, 0)
    # Both partial blocks were read from the plugin (read-modify-write); nothing written yet.
    assert all(op == "pread" for op, *_ in ops(plugin))
    assert plugin.data[BLOCK - 2048:2 * BLOCK + 2048] == bytes(len(data))
    buf = bytearray(len(data))
    top.pread(memoryview(buf), BLOCK - 2048, 0)
    assert buf == data and ops(plugin) == []  # served from the cache
    top.flush(0)
    assert ops(plugin) == [("pwrite", 0, 3 * BLOCK, 0), ("flush", 0, 0, 0)]  # one run of 3 blocks
    assert plugin.data[BLOCK - 2048:2 * BLOCK + 2048] == data
    top.flush(0)
    assert ops(plugin) == [("flush", 0, 0, 0)]  # nothing dirty any more


def test_writeback_writes_back_at_exit_what_was_never_flushed():
    chain, plugin, top = cache_chain()
    top.pwrite(memoryview(b"w" * 5000), 100, 0)
    top.close()
    assert plugin.data[100:5100] == bytes(5000)
    chain.cleanup()
    assert plugin.data[100:5100] == b"w" * 5000 and ("flush", 0, 0, 0) in plugin.calls


def test_writeback_fua_write_goes_through_at_once():
    _, plugin, top = cache_chain(plugin=("fua=emulate",))
    top.pwrite(memoryview(b"a" * 512), 4096, FLAG_FUA)
    # Our FUA is native: the plugin's layer emulates it with a flush; no other block written back.
    assert [c for c in ops(plugin) if c[0] != "pread"] == [("pwrite", 4096, 512, 0), ("flush", 0, 0, 0)]
    assert plugin.data[4096:4608] == b"a" * 512


def test_writethrough_writes_every_write_to_the_plugin():
    _, plugin, top = cache_chain("cache=writethrough")
    top.pwrite(memoryview(b"b" * BLOCK), BLOCK, 0)
    top.pwrite(memoryview(b"c" * 100), 10, 0)
    assert ops(plugin) == [("pwrite", BLOCK, BLOCK, 0), ("pwrite", 10, 100, 0)]
    buf = bytearray(BLOCK)
    top.pread(memoryview(buf), BLOCK, 0)
    assert buf == b"b" * BLOCK and ops(plugin) == []  # the full block was cached
    top.flush(0)
    assert ops(plugin) == [("flush", 0, 0, 0)]


def test_unsafe_never_writes_back_on_flush():
    _, plugin, top = cache_chain("cache=unsafe", plugin=("flush=false", "fua=none"))
    assert top.can_flush() and top.can_fua() == 2
    top.pwrite(memoryview(b"d" * BLOCK), 0, FLAG_FUA)
    top.flush(0)
    assert ops(plugin) == [] and plugin.data[:BLOCK] == bytes(BLOCK)


def test_zero_and_trim():
    _, plugin, top = cache_chain()
    top.pwrite(memoryview(b"e" * (3 * BLOCK)), 0, 0)
    top.flush(0)
    ops(plugin)
    top.zero(BLOCK + 100, BLOCK - 100, FLAG_MAY_TRIM)  # partial block 0, whole block 1
    buf = bytearray(3 * BLOCK)
    top.pread(memoryview(buf), 0, 0)
    assert buf == b"e" * (BLOCK - 100) + bytes(BLOCK + 100) + b"e" * BLOCK
    assert ops(plugin) == []
    top.flush(0)
    assert sorted(ops(plugin)) == sorted([("pwrite", 0, BLOCK, 0), ("zero", BLOCK, BLOCK, 0), ("flush", 0, 0, 0)])
    assert plugin.data[:3 * BLOCK] == buf
    # Trim drops whole blocks from the cache and goes to the plugin.
    top.trim(2 * BLOCK, BLOCK, 0)
    assert ops(plugin) == [("trim", BLOCK, 2 * BLOCK, 0)]
    top.pread(memoryview(buf)[:BLOCK], 2 * BLOCK, 0)
    assert ops(plugin) == [("pread", 2 * BLOCK, BLOCK, 0)]


def test_zero_through_plugin_that_cannot_zero_writes_zeroes():
    chain, top = open_chain([("cache", [("cache", "writethrough")]), ("nozero", [])], plugin_params=[("size", "1M")])
    plugin = chain.plugin
    top.zero(3 * KIB, 1 * KIB, 0)
    assert ops(plugin) == [("pwrite", 1 * KIB, 3 * KIB, 0)]


def test_disk_size_not_a_multiple_of_the_block_size():
    _, plugin, top = cache_chain(size=str(MIB + 1000))
    top.pwrite(memoryview(b"h" * 1500), MIB - 500, 0)  # ends at the last byte of the disk
    top.zero(200, MIB + 300, 0)
    top.flush(0)
    assert plugin.data[MIB - 500:] == b"h" * 800 + bytes(200) + b"h" * 500
    assert ("pwrite", MIB - BLOCK, BLOCK + 1000, 0) in plugin.calls  # the short last block ends the run


# -- reads ------------------------------------------------------------------------------------

def test_cache_on_read_and_prefetch(tmp):
    _, plugin, top = cache_chain("cache-on-read=true")
    buf = bytearray(100)
    top.pread(memoryview(buf), BLOCK + 5, 0)
    assert ops(plugin) == [("pread", BLOCK, BLOCK, 0)]  # the whole block, cached
    top.pread(memoryview(buf), BLOCK + 500, 0)
    assert ops(plugin) == []

    _, plugin, top = cache_chain()  # cache-on-read off: reads pass, NBD_CMD_CACHE prefetches
    top.pread(memoryview(buf), 5, 0)
    top.pread(memoryview(buf), 5, 0)
    assert ops(plugin) == [("pread", 5, 100, 0)] * 2
    top.cache(BLOCK + 1, 10, 0)
    assert ops(plugin) == [("pread", 0, BLOCK, 0), ("pread", BLOCK, BLOCK, 0)]
    top.pread(memoryview(bytearray(2 * BLOCK)), 0, 0)
    assert ops(plugin) == []


def test_min_block_size_caches_the_whole_block_a_read_touches(tmp):
    """nbdkit's test-cache-block-size, in-process: a 64K read caches the whole 128K block, so a
    later change of the file under its second half is not seen (the block after it is)."""
    image = tmp / "cache-block-size.img"
    with open(image, "wb") as f:
        f.truncate(256 * 1024)
    _, top = open_chain([("cache", [("cache-min-block-size", "128K"), ("cache-on-read", "true")])],
                        plugin="file", plugin_params=[("file", str(image))])
    buf = bytearray(64 * 1024)
    top.pread(memoryview(buf), 0, 0)
    pattern = b"abcd" * 16 * 1024
    with open(image, "r+b") as f:
        f.seek(64 * 1024)
        f.write(pattern * 2)
    top.pread(memoryview(buf), 64 * 1024, 0)
    assert buf == bytes(64 * 1024)
    top.pread(memoryview(buf), 128 * 1024, 0)
    assert buf == pattern


def test_cache_on_read_follows_path(tmp):
    switch = tmp / "switch"
    _, plugin, top = cache_chain(f"cache-on-read={switch}")
    buf = memoryview(bytearray(10))
    top.pread(buf, 0, 0)
    top.pread(buf, 0, 0)
    assert len(ops(plugin)) == 2
    switch.touch()
    top.pread(buf, 0, 0)
    top.pread(buf, 0, 0)
    assert ops(plugin) == [("pread", 0, BLOCK, 0)]


def test_uncached_runs_are_read_in_one_call():
    _, plugin, top = cache_chain()
    top.pwrite(memoryview(b"f" * BLOCK), 2 * BLOCK, 0)
    ops(plugin)
    buf = bytearray(5 * BLOCK)
    top.pread(memoryview(buf), 0, 0)
    assert ops(plugin) == [("pread", 0, 2 * BLOCK, 0), ("pread", 3 * BLOCK, 2 * BLOCK, 0)]
    assert buf[2 * BLOCK:3 * BLOCK] == b"f" * BLOCK


def test_extents_show_dirty_blocks():
    chain, top = open_chain([("cache", [])], "memory", [("size", "1M")])
    top.pwrite(memoryview(b"g" * 100), BLOCK + 10, 0)  # dirty, only in the cache
    top.zero(BLOCK, 3 * BLOCK, 0)  # dirty zero
    extents = Extents(0, MIB)
    top.extents(MIB, 0, 0, extents)
    assert list(extents) == [(0, BLOCK, EXTENT_HOLE | EXTENT_ZERO), (BLOCK, BLOCK, EXTENT_DATA),
                             (2 * BLOCK, BLOCK, EXTENT_HOLE | EXTENT_ZERO), (3 * BLOCK, BLOCK, EXTENT_ZERO),
                             (4 * BLOCK, MIB - 4 * BLOCK, EXTENT_HOLE | EXTENT_ZERO)]
    top.flush(0)
    extents = Extents(0, MIB)
    top.extents(MIB, 0, 0, extents)
    # Written back: the plugin has the data (memory reports the page of it as data, the rest of
    # the block as allocated zeroes, as nbdkit's sparse array does).
    start, length, kind = next(e for e in extents if e[0] <= BLOCK + 10 < e[0] + e[1])
    assert kind == EXTENT_DATA and start + length >= BLOCK + 110


# -- limits -----------------------------------------------------------------------------------

def test_lru_reclaim_keeps_the_cache_under_its_maximum():
    chain, plugin, top = cache_chain("cache-on-read=true", "cache-max-size=1M", size="4M")
    store = chain.filters[0].stores[""]
    buf = memoryview(bytearray(BLOCK))
    peak = 0
    for offset in range(0, 4 * MIB, BLOCK):
        top.pread(buf, offset, 0)
        peak = max(peak, store.allocated())
    assert 0 < peak <= MIB
    ops(plugin)
    top.pread(buf, 4 * MIB - BLOCK, 0)  # the most recently used block is still cached
    assert ops(plugin) == []
    top.pread(buf, 0, 0)  # the least recently used one was reclaimed
    assert ops(plugin) == [("pread", 0, BLOCK, 0)]


def test_dirty_blocks_written_back_when_over_the_maximum():
    chain, plugin, top = cache_chain("cache-max-size=1M", size="4M")
    store = chain.filters[0].stores[""]
    data = pattern(2 * MIB, 3)
    for offset in range(0, 2 * MIB, 256 * KIB):
        top.pwrite(memoryview(data)[offset:offset + 256 * KIB], offset, 0)
        assert store.allocated() <= MIB
    calls = ops(plugin)
    assert ("flush", 0, 0, 0) in calls  # a write back outside a flush is flushed at once
    top.flush(0)
    assert plugin.data[:2 * MIB] == data


def test_enospc_reclaims_then_bypasses(monkeypatch):
    """Injected ENOSPC: the cache file 'fills up' at 256K."""
    chain, plugin, top = cache_chain("cache-on-read=true", size="2M")
    store = chain.filters[0].stores[""]
    real_write = C.BlockCache.write

    def small_disk(self, data, offset):
        if self.allocated() + len(data) > 256 * KIB:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, data, offset)

    monkeypatch.setattr(C.BlockCache, "write", small_disk)
    top.pread(memoryview(bytearray(512 * KIB)), 0, 0)  # fills with clean blocks, reclaiming
    assert store.allocated() <= 256 * KIB
    data = pattern(MIB, 5)
    top.pwrite(memoryview(data), MIB, 0)  # clean blocks make room, then dirty ones, then bypass
    assert store.allocated() <= 256 * KIB
    buf = bytearray(MIB)
    top.pread(memoryview(buf), MIB, 0)
    assert buf == data
    top.flush(0)
    assert plugin.data[MIB:] == data


def test_config_errors():
    with pytest.raises(ConfigError, match="less than"):
        cache_chain("cache-max-size=1M", "cache-low-threshold=90", "cache-high-threshold=90")
    with pytest.raises(ConfigError, match="power of two"):
        cache_chain("cache-min-block-size=5000")
    with pytest.raises(ConfigError, match="at least 1048576"):
        cache_chain("cache-max-size=512K")
    with pytest.raises(ConfigError, match="cache="):
        cache_chain("cache=sometimes")
    with pytest.raises(ConfigError, match="absolute /PATH"):
        cache_chain("cache-on-read=relative/path")


# -- concurrency ------------------------------------------------------------------------------

def test_concurrent_partial_writes_to_one_block_lose_nothing():
    _, plugin, top = cache_chain()
    pieces = 64  # 64 writers of 1K each into one 64K block, all from an uncached start
    barrier = threading.Barrier(8)

    def writer(worker: int) -> None:
        barrier.wait()
        for index in range(worker, pieces, 8):
            top.pwrite(memoryview(bytes([index + 1]) * KIB), index * KIB, 0)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    top.flush(0)
    assert plugin.data[:BLOCK] == b"".join(bytes([i + 1]) * KIB for i in range(pieces))


def test_concurrent_writes_reads_and_reclaim_never_tear_or_lose_a_block():
    """Writers own blocks and rewrite them whole; readers pull the whole 4M disk through a 1M
    cache, so blocks are filled from the plugin, reclaimed and written back all the time."""
    chain, plugin, top = cache_chain("cache-on-read=true", "cache-max-size=1M", size="4M")
    stop = threading.Event()
    last: dict[int, int] = {}
    torn: list[int] = []

    def writer(blocks: range) -> None:
        value = 0
        while not stop.is_set():
            for block in blocks:
                value = value % 250 + 1
                top.pwrite(memoryview(bytes([value]) * BLOCK), block * BLOCK, 0)
                last[block] = value

    def reader(start: int) -> None:
        buf = bytearray(BLOCK)
        for round in range(12):
            for block in range(start, 64, 2):
                top.pread(memoryview(buf), block * BLOCK, 0)
                if block < 16 and len(set(buf)) != 1:
                    torn.append(block)

    writers = [threading.Thread(target=writer, args=(range(first, 16, 4),)) for first in range(4)]
    readers = [threading.Thread(target=reader, args=(first,)) for first in range(2)]
    for t in writers + readers:
        t.start()
    for t in readers:
        t.join()
    stop.set()
    for t in writers:
        t.join()
    top.flush(0)
    assert torn == []
    assert all(plugin.data[b * BLOCK:(b + 1) * BLOCK] == bytes([v]) * BLOCK for b, v in last.items())


# -- real clients -----------------------------------------------------------------------------

def cache_usage(pid: int, directory) -> int:
    """Bytes allocated by the server's (unlinked) cache files in `directory`, via /proc."""
    total = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        path = f"/proc/{pid}/fd/{fd}"
        try:
            if os.readlink(path).startswith(f"{directory}/"):
                total += os.stat(path).st_blocks * 512
        except OSError:
            continue
    return total


def file_bytes(path, offset: int, count: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(count)


def qemu_io_flush(uri: str) -> None:
    run(["qemu-io", "-f", "raw", "-c", "flush", uri], timeout=60)


@pytest.mark.parametrize("mode, after_write, after_flush", [
    ("writeback", False, True),
    ("writethrough", True, True),
    ("unsafe", False, False),
])
def test_mode_decides_when_data_reaches_the_plugin(tmp, mode, after_write, after_flush):
    disk = tmp / "disk.img"
    disk.write_bytes(bytes(MIB))
    with serve("--filter=cache", "file", str(disk), f"cache={mode}") as srv:
        nbdsh(srv.uri, "h.pwrite(b'\\xaa' * 100000, 5000)\nh.shutdown()")
        assert (file_bytes(disk, 5000, 100000) == b"\xaa" * 100000) is after_write
        assert (file_bytes(disk, 0, 5000) + file_bytes(disk, 105000, MIB - 105000)) == bytes(MIB - 100000)
        qemu_io_flush(srv.uri)
        assert (file_bytes(disk, 5000, 100000) == b"\xaa" * 100000) is after_flush
        # Whatever reached the plugin, clients see the written data.
        out = nbdsh(srv.uri, "print(h.pread(100000, 5000) == b'\\xaa' * 100000)").stdout
        assert out == b"True\n"


@pytest.mark.parametrize("mode, kept", [("writeback", True), ("unsafe", False)])
def test_unflushed_writes_at_server_exit(tmp, mode, kept):
    disk = tmp / "disk.img"
    disk.write_bytes(bytes(MIB))
    with serve("--filter=cache", "file", str(disk), f"cache={mode}") as srv:
        nbdsh(srv.uri, "h.pwrite(b'\\x77' * 70000, 3000)\nh.shutdown()")
        assert file_bytes(disk, 3000, 70000) == bytes(70000)
    # The server exited (SIGTERM) after the client left without flushing.
    assert (file_bytes(disk, 3000, 70000) == b"\x77" * 70000) is kept


def test_writeback_fua_write_reaches_the_plugin_at_once(tmp):
    disk = tmp / "disk.img"
    disk.write_bytes(bytes(MIB))
    with serve("--filter=cache", "file", str(disk)) as srv:
        nbdsh(srv.uri, "h.pwrite(b'\\x55' * 4096, 8192, nbd.CMD_FLAG_FUA)\nh.pwrite(b'\\x66' * 4096, 0)")
        assert file_bytes(disk, 8192, 4096) == b"\x55" * 4096 and file_bytes(disk, 0, 4096) == bytes(4096)


READ_ALL = """
import hashlib, os
def usage():
    total = 0
    for fd in os.listdir("/proc/{pid}/fd"):
        path = "/proc/{pid}/fd/" + fd
        try:
            if os.readlink(path).startswith("{directory}/"):
                total += os.stat(path).st_blocks * 512
        except OSError:
            pass
    return total
digest, peak = hashlib.sha256(), 0
for offset in range(0, h.get_size(), 65536):
    digest.update(h.pread(65536, offset))
    peak = max(peak, usage())
print(digest.hexdigest(), peak, usage())
"""


def test_lru_reclaim_keeps_cache_file_under_max_size(tmp, cache_tmpdir):
    disk = random_file(tmp / "disk.img", 4 * MIB)
    with serve("--filter=cache", "file", str(disk), "cache-on-read=true", "cache-max-size=1M") as srv:
        out = nbdsh(srv.uri, READ_ALL.format(pid=srv.proc.pid, directory=cache_tmpdir)).stdout.split()
    digest, peak, final = out[0].decode(), int(out[1]), int(out[2])
    assert digest == sha256_file(disk)
    assert 512 * KIB <= peak <= MIB and final <= MIB


def test_cache_on_read_switches_with_the_file(tmp, cache_tmpdir):
    disk = random_file(tmp / "disk.img", 2 * MIB)
    switch = tmp / "cache-reads"
    with serve("--filter=cache", "file", str(disk), f"cache-on-read={switch}") as srv:
        read = "h.pread(1048576, 0)"
        nbdsh(srv.uri, read)
        assert cache_usage(srv.proc.pid, cache_tmpdir) == 0
        switch.touch()
        nbdsh(srv.uri, read)
        assert cache_usage(srv.proc.pid, cache_tmpdir) >= MIB
        switch.unlink()
        nbdsh(srv.uri, "h.pread(1048576, 1048576)")
        assert cache_usage(srv.proc.pid, cache_tmpdir) < 2 * MIB


@pytest.fixture
def small_tmpfs(tmp):
    """A 512 KiB tmpfs (needs root, as the test suite runs here): the cache fills it up."""
    with mounted_tmpfs(tmp / "small", "512k") as mountpoint:
        yield mountpoint


def test_full_cache_filesystem_is_survived(tmp, small_tmpfs, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(small_tmpfs))
    source = random_file(tmp / "source", 4 * MIB, seed=9)
    disk = tmp / "disk.img"
    disk.write_bytes(bytes(4 * MIB))
    with serve("--filter=cache", "file", str(disk), "cache-on-read=true") as srv:
        run(["nbdcopy", str(source), srv.uri], timeout=60)  # several connections (multi-conn)
        copy = tmp / "copy"
        run(["nbdcopy", srv.uri, str(copy)], timeout=60)
        assert sha256_file(copy) == sha256_file(source)
        qemu_io_flush(srv.uri)
        assert sha256_file(disk) == sha256_file(source)
        assert srv.stderr().count("no space") == 1  # the filesystem did fill up


TWO_WRITERS = """
import threading
h2 = nbd.NBD()
h2.connect_uri(h.get_uri())
assert h.can_multi_conn()
def write(handle, first):
    # Interleaved 4K pieces: both connections write into every 64K block.
    for offset in range(first * 4096, 1048576, 8192):
        handle.pwrite(bytes([first + 1]) * 4096, offset)
threads = [threading.Thread(target=write, args=(x, i)) for i, x in enumerate((h, h2))]
for t in threads: t.start()
for t in threads: t.join()
h2.shutdown()
h.flush()  # one connection's flush covers the other's writes (multi-conn)
"""


def test_two_connections_writing_one_block_then_one_flush(tmp):
    disk = tmp / "disk.img"
    disk.write_bytes(bytes(MIB))
    with serve("--filter=cache", "file", str(disk)) as srv:
        nbdsh(srv.uri, TWO_WRITERS)
        assert disk.read_bytes() == (b"\x01" * 4096 + b"\x02" * 4096) * (MIB // 8192)

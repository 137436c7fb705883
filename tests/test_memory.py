"""memory plugin: nbdkit's three allocators (sparse, malloc[,mlock=true], zstd), each checked
with real clients for data, holes, trim and zero, resize, and against nbdkit's own."""

from __future__ import annotations

import json

import pytest

from conftest import NBDFORMATS, nbdcopy_to_file, nbdinfo_json, random_file, run, serve, serve_nbdkit, sha256_file
from nbdformats.client import NBDClient

MIB = 1 << 20
ALLOCATORS = ["sparse", "malloc", "malloc,mlock=true", "zstd"]
HOLE_ZERO = 3


def map_of(uri: str) -> list[tuple[int, int, int]]:
    """nbdinfo --map as (offset, length, type)."""
    out = run(["nbdinfo", "--map", "--json", uri]).stdout
    return [(e["offset"], e["length"], e["type"]) for e in json.loads(out)]


@pytest.mark.parametrize("allocator", ALLOCATORS)
def test_allocator_keeps_data_and_reports_holes(tmp_path, allocator):
    source = random_file(tmp_path / "src.img", 8 * MIB, seed=3)
    data = source.read_bytes()
    with serve("memory", "32M", f"allocator={allocator}") as srv:
        run(["nbdcopy", "--destination-is-zero", str(source), srv.uri])  # the first 8 MiB
        with NBDClient.connect(srv.uri) as client:
            client.pwrite(b"tail", 32 * MIB - 4)
            assert bytes(client.pread(4, 32 * MIB - 4)) == b"tail"
            client.trim(MIB, 2 * MIB)
            client.zero(4096, 5 * MIB + 100)
            client.flush()
        copy = tmp_path / "copy.img"
        nbdcopy_to_file(srv.uri, copy)
        extents = map_of(srv.uri)
    expected = bytearray(data) + bytearray(24 * MIB)
    expected[2 * MIB:3 * MIB] = bytes(MIB)
    expected[5 * MIB + 100:5 * MIB + 100 + 4096] = bytes(4096)
    expected[-4:] = b"tail"
    assert copy.read_bytes() == expected
    if allocator.startswith("malloc"):
        assert extents == [(0, 32 * MIB, 0)]  # no sparseness, as nbdkit's malloc allocator
    else:
        holes = [(o, n) for o, n, t in extents if t == HOLE_ZERO]
        assert (2 * MIB, MIB) in holes  # the trimmed MiB is free again
        assert any(o <= 8 * MIB and o + n >= 31 * MIB for o, n in holes)  # never written


@pytest.mark.parametrize("allocator", ALLOCATORS)
def test_allocator_resize(allocator):
    with serve("memory", "1M", f"allocator={allocator}") as srv:
        with NBDClient.connect(srv.uri) as client:
            client.pwrite(b"kept", 1000)
            client.pwrite(b"gone", 3000)
            client.resize(4 * MIB)
            assert bytes(client.pread(4, 1000)) == b"kept" and bytes(client.pread(8, 4 * MIB - 8)) == bytes(8)
            client.resize(2048)
            client.resize(MIB)
            assert bytes(client.pread(4, 1000)) == b"kept" and bytes(client.pread(4, 3000)) == bytes(4)


def test_zstd_allocator_stores_compressible_data_in_less_memory(tmp_path):
    """Zeroed-out text compresses: the server's memory grows by far less than the data written."""
    text = b"".join(b"line %08d of a very compressible disk image\n" % i for i in range(2 * MIB // 48 + 1))
    source = tmp_path / "text.img"
    source.write_bytes((text * 40)[:64 * MIB])
    rss = {}
    for allocator in ("sparse", "zstd"):
        with serve("memory", "64M", f"allocator={allocator}") as srv:
            run(["nbdcopy", str(source), srv.uri])
            nbdcopy_to_file(srv.uri, tmp_path / "back.img")
            with open(f"/proc/{srv.proc.pid}/status") as f:
                rss[allocator] = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) // 1024
        assert sha256_file(tmp_path / "back.img") == sha256_file(source)
    assert rss["zstd"] + 40 < rss["sparse"], rss  # sparse holds the 64 MiB, zstd a few


def test_allocator_matches_nbdkit(tmp_path):
    source = random_file(tmp_path / "src.img", 4 * MIB, seed=5)
    for allocator in ("malloc", "zstd"):
        with serve_nbdkit("memory", "4M", f"allocator={allocator}") as ref, \
                serve("memory", "4M", f"allocator={allocator}") as srv:
            for server in (ref, srv):
                run(["nbdcopy", str(source), server.uri])
            assert nbdinfo_json(srv.uri)["exports"][0]["export-size"] == \
                nbdinfo_json(ref.uri)["exports"][0]["export-size"]
            nbdcopy_to_file(ref.uri, tmp_path / "ref.img")
            nbdcopy_to_file(srv.uri, tmp_path / "ours.img")
        assert sha256_file(tmp_path / "ours.img") == sha256_file(tmp_path / "ref.img") == sha256_file(source)


def test_bad_allocator_and_impossible_malloc():
    bad = run([*NBDFORMATS, "memory", "1M", "allocator=slab"], check=False)
    assert bad.returncode == 1 and b"allocator=slab: use sparse, malloc[,mlock=true] or zstd" in bad.stderr
    option = run([*NBDFORMATS, "memory", "1M", "allocator=zstd,mlock=true"], check=False)
    assert option.returncode == 1 and b"only malloc takes mlock" in option.stderr
    huge = run([*NBDFORMATS, "-U", "-", "memory", "1E", "allocator=malloc", "--run", "true"], check=False)
    assert huge.returncode == 1 and b"allocator=malloc cannot allocate" in huge.stderr


@pytest.mark.parametrize("allocator", ["sparse", "zstd", "malloc"])
def test_connections_writing_into_one_new_page_lose_nothing(allocator):
    """Connections run in threads of their own: two clients writing different 4 KiB pieces of the
    same unwritten 32 KiB page at once must both land (an unlocked allocation would keep one)."""
    import threading

    pages, piece = 400, 4096
    with serve("memory", str(pages * 32768), f"allocator={allocator}", options=("-t", "4")) as srv:
        clients = [NBDClient.connect(srv.uri) for _ in range(4)]

        def writer(number: int) -> None:
            data = bytes([number + 1]) * piece
            for page in range(pages):
                clients[number].pwrite(data, page * 32768 + number * piece)

        threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        whole = clients[0].pread(pages * 32768, 0)
        for client in clients:
            client.close()
    for page in range(pages):
        for number in range(4):
            start = page * 32768 + number * piece
            assert whole[start:start + piece] == bytes([number + 1]) * piece, (page, number)

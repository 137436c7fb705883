"""Online resize through filters: those whose size is the plugin's (or their own, like cow's
overlay) follow NBD_CMD_RESIZE; those that change the size refuse it.  No common client sends
NBD_CMD_RESIZE, so our own (nbdformats.client) does."""

from __future__ import annotations

import errno
import subprocess

import pytest

from conftest import nbdinfo_json, run, serve
from fixtures.luks import qemu_luks1
from nbdformats.protocol import wire as P
from nbdformats.client import NBDClient
from nbdformats.api.errors import NBDError

MIB = 1 << 20
HOLE_ZERO = 3  # NBD_STATE_HOLE | NBD_STATE_ZERO


def grow_shrink_grow(uri: str, before: bytes) -> None:
    """Resize 1M -> 8M -> 2K -> 1M on one connection; `before` is what the disk held at 2040..2048."""
    with NBDClient.connect(uri) as client:
        assert client.size == MIB and client.info.flags & P.TF_SEND_RESIZE
        client.pwrite(b"kept", 1000)
        client.pwrite(b"gone", 3000)  # inside the first block of every filter, past the 2K end below
        client.resize(8 * MIB)
        assert client.size == 8 * MIB
        assert bytes(client.pread(4, 1000)) == b"kept"
        assert bytes(client.pread(4096, 8 * MIB - 4096)) == bytes(4096)  # grown: zeroes
        with NBDClient.connect(uri) as second:
            assert second.size == 8 * MIB
        client.pwrite(b"far", 5 * MIB)
        assert bytes(client.pread(3, 5 * MIB)) == b"far"
        client.resize(2048)
        with pytest.raises(NBDError):
            client.pread(4096, 0)  # past the new end
        assert bytes(client.pread(8, 2040)) == before
        client.resize(MIB)
        assert bytes(client.pread(4, 1000)) == b"kept"
        # Bytes cut off by the shrink read as zeroes when the disk grows again, even those in
        # the same cache block as kept data, and those the plugin still has under cow.
        assert bytes(client.pread(MIB - 2048, 2048)) == bytes(MIB - 2048)
        client.flush()
    assert nbdinfo_json(uri)["exports"][0]["export-size"] == MIB


@pytest.mark.parametrize("filters", [
    ["--filter=cache"],
    ["--filter=cache", "cache=writethrough"],
    ["--filter=cache", "cache-on-read=true"],
    ["--filter=rate", "rate=1G"],
    ["--filter=fua", "fuamode=force"],
    ["--filter=nozero"],
    ["--filter=cow"],
    ["--filter=cow", "cow-on-read=true", "--filter=cache"],
], ids=lambda f: "+".join(a.removeprefix("--filter=") for a in f))
def test_filters_follow_resize_of_a_file(tmp_path, filters):
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"A" * MIB)
    with serve("file", str(disk), *filters) as srv:
        grow_shrink_grow(srv.uri, b"A" * 8)
    if "--filter=cow" in filters:
        assert disk.read_bytes() == b"A" * MIB  # cow resizes its overlay; the plugin is never written
    else:
        data = disk.read_bytes()
        assert len(data) == MIB and data[1000:1004] == b"kept" and data[2048:] == bytes(MIB - 2048)


def test_cache_writes_back_only_what_is_inside_the_new_size(tmp_path):
    """Writeback: dirty blocks past a shrink are dropped, the ones inside reach the file on flush."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4 * MIB))
    with serve("file", str(disk), "--filter=cache") as srv:
        with NBDClient.connect(srv.uri) as client:
            client.pwrite(b"x" * 8192, 4096)
            client.pwrite(b"y" * 8192, 3 * MIB)
            assert disk.read_bytes()[4096:4100] == bytes(4)  # still only in the cache
            client.resize(2 * MIB)
            assert disk.stat().st_size == 2 * MIB
            client.flush()
        assert disk.read_bytes()[4096:4096 + 8192] == b"x" * 8192
        with NBDClient.connect(srv.uri) as client:
            client.resize(4 * MIB)
            assert bytes(client.pread(8192, 3 * MIB)) == bytes(8192)


def test_cow_resize_hides_the_plugin_past_a_shrink(tmp_path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"A" * (4 * MIB))
    with serve("file", str(disk), "--filter=cow") as srv:
        with NBDClient.connect(srv.uri) as client:
            client.resize(MIB + 100)  # not a whole number of blocks
            client.resize(3 * MIB)
            assert bytes(client.pread(200, MIB)) == b"A" * 100 + bytes(100)
            extents = client.block_status(2 * MIB, MIB)
            # [1M, 1M+100) is the plugin's data; the rest is a hole reading as zeroes.
            assert extents[0] == (100, 0) and all(flags == HOLE_ZERO for _, flags in extents[1:])
            client.pwrite(b"new", 2 * MIB)
            assert bytes(client.pread(3, 2 * MIB)) == b"new"


def test_memory_under_cache_resizes():
    with serve("memory", "1M", "--filter=cache") as srv:
        grow_shrink_grow(srv.uri, bytes(8))


@pytest.mark.parametrize("chain", [
    ["--filter=offset", "offset=4096"],
    ["--filter=truncate", "truncate=512K"],
    ["--filter=partition", "partition=1"],
    ["--filter=gzip"],
    ["--filter=tar", "tar-entry=disk.img"],
    ["--filter=luks", "passphrase=secret"],
])
def test_filters_that_change_the_size_do_not_offer_resize(tmp_path, chain):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4 * MIB))
    image = disk
    if "--filter=gzip" in chain:
        image = tmp_path / "disk.img.gz"
        run(["gzip", "-k", str(disk)])
    elif "--filter=tar" in chain:
        image = tmp_path / "disk.tar"
        run(["tar", "-C", str(tmp_path), "-cf", str(image), "disk.img"])
    elif "--filter=partition" in chain:
        subprocess.run(["sfdisk", "-q", str(disk)], input=b"2048,2048,L\n", check=True, timeout=30)
    elif "--filter=luks" in chain:
        disk.unlink()
        qemu_luks1(disk, "secret", "4M")
    with serve("file", str(image), *chain) as srv:
        with NBDClient.connect(srv.uri) as client:
            assert not client.info.flags & P.TF_SEND_RESIZE
            refused = client.send_request(P.CMD_RESIZE, 2 * MIB, 0)  # sent anyway: the server judges
            # A read-only export refuses it as it refuses a write.
            assert refused.error == (errno.EPERM if client.read_only else errno.EINVAL)
            assert len(client.pread(512, 0)) == 512  # the connection goes on

"""Fault injection: the error filter at 5-50% under nbdcopy and qemu-img convert (clients see
EIO, the server stays up, nothing is written outside the requested ranges, and a clean copy
works afterwards), and a full filesystem under the file plugin (clients see ENOSPC)."""

from __future__ import annotations

import hashlib
import os

import pytest

from conftest import nbdsh, random_file, run, serve, sha256_file
from fixtures.hardening import Raw
from fixtures.tmpfs import mounted_tmpfs
from nbdformats.protocol import wire as P

SIZE = 8 << 20
SENTINEL = b"\xa5" * 4096


def blocks(data: bytes, size: int = 65536) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize("rate", ["5%", "50%"])
def test_read_errors_reach_nbdcopy_and_qemu_img(tmp_path, rate):
    disk = random_file(tmp_path / "disk.img", SIZE, seed=21)
    # blocksize splits qemu's 2 MiB reads into 64 KiB ones before the error filter sees them,
    # so even at 5% some read fails (0.95^128 is 0.1%).
    with serve("--filter=blocksize", "--filter=error", "file", str(disk), "maxdata=64K", "error=EIO",
               f"error-pread-rate={rate}") as srv:
        copy = run(["nbdcopy", "--request-size=65536", srv.uri, tmp_path / "out.img"], check=False, timeout=60)
        assert copy.returncode != 0 and b"Input/output error" in copy.stderr
        convert = run(["qemu-img", "convert", "-f", "raw", "-O", "raw", srv.uri, tmp_path / "q.img"],
                      check=False, timeout=60)
        assert convert.returncode != 0 and b"Input/output error" in convert.stderr
        # Block status is not affected: nbdinfo --map still works, the server is up.
        assert run(["nbdinfo", "--map", srv.uri]).returncode == 0
        assert srv.proc.poll() is None
        assert "Traceback" not in srv.stderr()
    with serve("file", str(disk)) as srv:  # the same file, no faults: a clean copy
        run(["nbdcopy", srv.uri, tmp_path / "clean.img"])
    assert sha256_file(tmp_path / "clean.img") == sha256_file(disk)


@pytest.mark.parametrize("rate", ["10%", "50%"])
def test_write_errors_never_touch_other_ranges(tmp_path, rate):
    """Copy 4 MiB into the middle of an 8 MiB disk through the offset filter while writes fail:
    outside [2M, 6M) the disk keeps its sentinel bytes, inside each block is old or new."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(SENTINEL * (SIZE // 4096))
    source = random_file(tmp_path / "src.img", 4 << 20, seed=22)
    args = ("--filter=blocksize", "--filter=error", "--filter=offset", "file", str(disk), "maxdata=64K",
            "offset=2M", "range=4M",
            "error=EIO", f"error-pwrite-rate={rate}", f"error-zero-rate={rate}")
    with serve(*args) as srv:
        copy = run(["nbdcopy", "--request-size=65536", source, srv.uri], check=False, timeout=60)
        assert copy.returncode != 0 and b"Input/output error" in copy.stderr
        convert = run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", source, srv.uri],
                      check=False, timeout=60)
        assert convert.returncode != 0 and b"Input/output error" in convert.stderr
        assert srv.proc.poll() is None
    data = disk.read_bytes()
    assert data[:2 << 20] == SENTINEL * 512 and data[6 << 20:] == SENTINEL * 512
    new = blocks(source.read_bytes(), 4096)
    for index, block in enumerate(blocks(data[2 << 20:6 << 20], 4096)):
        assert block in (SENTINEL, new[index]), f"block {index} is neither old nor new"
    with serve("--filter=offset", "file", str(disk), "offset=2M", "range=4M") as srv:  # faults gone
        run(["nbdcopy", source, srv.uri])
    assert hashlib.sha256(disk.read_bytes()[2 << 20:6 << 20]).digest() == hashlib.sha256(source.read_bytes()).digest()


def test_faults_on_one_connection_do_not_disturb_another(tmp_path):
    disk = random_file(tmp_path / "disk.img", SIZE, seed=23)
    flag = tmp_path / "inject"
    with serve("--filter=error", "file", str(disk), "error=EIO", "error-rate=100%", f"error-file={flag}") as srv:
        good = Raw(srv.socket)
        good.go()
        expected = disk.read_bytes()[:65536]
        assert good.read(0, 65536) == expected
        flag.touch()  # now every request fails, for everyone, until the file goes
        good.request(P.CMD_READ, 7, 0, 4096)
        assert good.simple_reply() == (7, P.NBD_EIO)
        out = nbdsh(srv.uri, "try:\n    h.pread(4096, 0)\nexcept nbd.Error as e:\n    print(e.errno)\n")
        assert out.stdout.strip() == b"EIO"
        flag.unlink()
        assert good.read(0, 65536, cookie=8) == expected  # the same connection recovers


@pytest.fixture
def full_filesystem(tmp_path):
    """A 1 MiB tmpfs (root, as the suite runs here and in CI) holding a sparse 8 MiB disk."""
    with mounted_tmpfs(tmp_path / "small", "1m") as mountpoint:
        yield mountpoint


def test_disk_full_gives_enospc_to_the_client(full_filesystem):
    disk = full_filesystem / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(SIZE)
    with serve("file", str(disk)) as srv:
        client = Raw(srv.socket)
        client.go()
        errors = set()
        for index in range(SIZE // (256 << 10)):
            errors.add(client.write(index * (256 << 10), os.urandom(256 << 10), cookie=index + 1))
        assert P.NBD_ENOSPC in errors and 0 in errors  # the first ones fit, later ones do not
        script = "try:\n    h.pwrite(b'x' * 1048576, 7 << 20)\nexcept nbd.Error as e:\n    print(e.errno)\n"
        assert nbdsh(srv.uri, script).stdout.strip() == b"ENOSPC"
        assert client.read(0, 4096, cookie=99)  # reads still work
        assert srv.proc.poll() is None

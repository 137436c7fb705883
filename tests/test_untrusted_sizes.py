"""Sizes read from untrusted headers (issue 20, item 2): each is checked when the export opens,
against 2^63-1 (what NBD and off_t can hold) and against what its container can hold, with a
message naming the field.  Before, such files started a server whose handshakes died with
struct.error or whose reads logged OverflowError tracebacks.

The files are written from the format specifications by tests/fixtures/hostile.py, with
valid checksums, so only the sizes lie."""

from __future__ import annotations

import re

import pytest

from conftest import NBDFORMATS, run
from fixtures.hostile import gzip_claiming, tar_sparse_claiming, write, xz_claiming, zip64_claiming, zstd_frame_claiming
from fixtures.serving import fails
from fixtures.xva import XvaDisk, make_xva

MAX = (1 << 63) - 1
DATA = bytes(range(256)) * 256  # 64 KiB


def refused_at_start(*args: str) -> str:
    message = fails(*args)
    assert "Traceback" not in message, message
    return message


@pytest.mark.parametrize("claimed, message", [
    (MAX, r"xz block 0: the index's Uncompressed Size 9223372036854775807 is more than its \d+ compressed bytes"),
    (1 << 40, r"Uncompressed Size 1099511627776 is more than its \d+ compressed bytes can hold"),
])
def test_xz_index_sizes(tmp_path, claimed, message):
    path = write(tmp_path / "lying.xz", xz_claiming(DATA, claimed))
    assert re.search(message, refused_at_start("--filter=xz", "file", str(path)))


@pytest.mark.parametrize("claimed", [1 << 63, (1 << 64) - 1, 1 << 20])
def test_zstd_frame_content_size(tmp_path, claimed):
    path = write(tmp_path / "lying.zst", zstd_frame_claiming(DATA[:1000], claimed))
    message = refused_at_start("--filter=zstd", "file", str(path))
    assert (f"declares a Frame_Content_Size of {claimed} bytes, more than its 1 block(s) can hold"
            in message), message


@pytest.mark.parametrize("claimed, deflate, message", [
    (1 << 63, False, "'disk.img': the uncompressed size is 9223372036854775808, more than 2^63-1"),
    ((1 << 64) - 1, True, "'disk.img': the uncompressed size is 18446744073709551615, more than 2^63-1"),
    (1 << 40, True, "'disk.img' claims 1099511627776 bytes, more than its"),
])
def test_zip64_sizes(tmp_path, claimed, deflate, message):
    path = write(tmp_path / "lying.zip", zip64_claiming("disk.img", DATA, claimed, deflate))
    assert message in refused_at_start("--filter=zip", "file", str(path), "zip-entry=disk.img")


def test_tar_sparse_real_size(tmp_path):
    path = write(tmp_path / "lying.tar", tar_sparse_claiming("disk.img", DATA[:4096], 1 << 64))
    message = refused_at_start("--filter=tar", "file", str(path), "tar-entry=disk.img")
    assert "disk.img: the GNU sparse real size is 18446744073709551616, more than 2^63-1" in message


def test_xva_virtual_size(tmp_path):
    for size in (1 << 63, 1 << 64):
        path = make_xva(tmp_path / f"{size}.xva", [XvaDisk(DATA * 16, virtual_size=size)])
        message = refused_at_start("--filter=xva", "file", str(path))
        assert f"ova.xml: the virtual_size of VDI Ref:4 is {size}, more than 2^63-1" in message, message


def test_gzip_isize(tmp_path):
    """gzip-lazy takes the size from the trailer: a 4 GiB ISIZE on 300 compressed bytes is a lie."""
    path = write(tmp_path / "lying.gz", gzip_claiming(DATA, 0xFFFFFFFF))
    message = refused_at_start("--filter=gzip", "file", str(path), "gzip-lazy=true")
    assert "the gzip trailer's ISIZE 4294967295 is more than" in message, message


def test_a_size_at_the_limit_still_serves(tmp_path):
    """The checks refuse only lies: a zip64 member claiming exactly its real size serves."""
    path = write(tmp_path / "honest.zip", zip64_claiming("disk.img", DATA, len(DATA), deflate=True))
    proc = run([*NBDFORMATS, "-U", "-", "--filter=zip", "file", str(path), "--run", 'nbdinfo --size "$uri"'],
               timeout=60)
    assert proc.stdout.strip() == str(len(DATA)).encode()

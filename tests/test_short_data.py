"""Short output is never zeroes (issue 20, item 6): when a member or stream decodes to less than
its header declares, reads of the real data succeed and reads past it fail with EIO.  Before,
libarchive's "ZIP uncompressed data is wrong size" was only logged and the archive filter
served zeroes as good data.  Every decoder is checked: zip (ours and libarchive's), gzip, xz,
zstd, and a tar.gz unpacked by libarchive."""

from __future__ import annotations

import gzip
import io
import tarfile

import pytest

from conftest import SYSTEM_PYTHON, random_file, run, serve
from fixtures.hostile import gzip_claiming, write, xz_claiming, zip64_claiming, zstd_frame_claiming

MiB = 1 << 20
READ_PAST = """
real, size = {real}, h.get_size()
assert size == {declared}, size
if {prefix_served}:
    assert h.pread(4096, 0) == open({source!r}, 'rb').read(4096)
    assert h.pread(4096, real - 4096) == open({source!r}, 'rb').read()[real - 4096:real]
for offset in (0, real, real + 4096, size - 4096)[1 if {prefix_served} else 0:]:
    try:
        h.pread(4096, offset)
    except nbd.Error as e:
        assert e.errno == 'EIO', (offset, e)
    else:
        raise AssertionError(f"read at {{offset}} past the real data succeeded")
print("ok")
"""


def check_reads(uri: str, source, real: int, declared: int, prefix_served: bool = True) -> None:
    """The export has the declared size; its first `real` bytes read as `source` (unless the
    decoder refuses the whole unit: `prefix_served` false) and reads past them fail with EIO."""
    code = ("import nbd\nh = nbd.NBD()\n" + f"h.connect_uri({uri!r})\n" +
            READ_PAST.format(real=real, declared=declared, source=str(source), prefix_served=prefix_served))
    assert run([SYSTEM_PYTHON, "-c", code], timeout=120).stdout.strip() == b"ok"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("short") / "data.img"
    random_file(path, MiB, seed=20)
    return path


@pytest.mark.parametrize("filter_name", ["zip", "archive"])
def test_zip_member_claiming_1_gib_decoding_to_1_mib(tmp_path, data, filter_name):
    archive = write(tmp_path / "lying.zip", zip64_claiming("disk.img", data.read_bytes(), 1 << 30, deflate=True))
    with serve(f"--filter={filter_name}", "file", str(archive), f"{filter_name}-entry=disk.img") as srv:
        check_reads(srv.uri, data, MiB, 1 << 30)
        assert "Traceback" not in srv.stderr()


def test_gzip_lazy_with_an_isize_beyond_the_data(tmp_path, data):
    path = write(tmp_path / "lying.gz", gzip_claiming(data.read_bytes(), 2 * MiB))
    with serve("--filter=gzip", "file", str(path), "gzip-lazy=true") as srv:
        check_reads(srv.uri, data, MiB, 2 * MiB)


@pytest.mark.parametrize("xz_max_block", ["512M", "64K"])  # decoded whole, or into a spill
def test_xz_block_shorter_than_its_index_says(tmp_path, data, xz_max_block):
    path = write(tmp_path / "lying.xz", xz_claiming(data.read_bytes(), 2 * MiB))
    with serve("--filter=xz", "file", str(path), f"xz-max-block={xz_max_block}") as srv:
        proc = run([SYSTEM_PYTHON, "-c", "import nbd\nh = nbd.NBD()\n" + f"h.connect_uri({srv.uri!r})\n"
                    "try:\n    h.pread(4096, 2 * 1048576 - 4096)\nexcept nbd.Error as e:\n    print(e.errno)\n"],
                   timeout=120)
        assert proc.stdout.strip() == b"EIO"  # lzma checks the block against the index


def test_zstd_frame_shorter_than_its_content_size(tmp_path):
    """libzstd checks Frame_Content_Size at the end of the frame: the whole frame is refused."""
    payload = bytes(range(256)) * 256  # 64 KiB in one raw block; the frame claims 128 KiB
    path = write(tmp_path / "lying.zst", zstd_frame_claiming(payload, 128 * 1024))
    source = write(tmp_path / "payload", payload)
    with serve("--filter=zstd", "file", str(path)) as srv:
        check_reads(srv.uri, source, len(payload), 128 * 1024, prefix_served=False)


def test_tar_gz_member_cut_short_through_libarchive(tmp_path, data):
    """A tar.gz whose member's data ends early (the archive truncated inside it)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as archive:
        info = tarfile.TarInfo("disk.img")
        info.size = MiB
        archive.addfile(info, io.BytesIO(data.read_bytes()))
    cut = out.getvalue()[:512 + MiB // 2]
    path = write(tmp_path / "cut.tar.gz", gzip.compress(cut))
    with serve("--filter=archive", "file", str(path), "archive-entry=disk.img") as srv:
        check_reads(srv.uri, data, MiB // 2, MiB)

"""The bzip2 and lzip filters: bytes served equal `bzip2 -dc` / `lzip -dc` of files made by the
real tools (one and several streams or members, trailing data, members decoded through a spill),
random reads, corrupt and truncated files; and disk images inside them equal qemu's decode."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from conftest import NBDFORMATS, SYSTEM_PYTHON, run, serve
from fixtures.compressed import make_image
from fixtures.vdisks import make_raw, qemu_convert, qemu_raw

SIZE = 6 << 20


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("bzlz")
    raw = work / "disk.img"
    make_image(raw, SIZE)
    made = {"raw": raw}
    made["bz2"] = work / "disk.img.bz2"
    made["bz2"].write_bytes(run(["bzip2", "-c", "-1", raw]).stdout)  # 100k blocks: many of them
    made["bz2-streams"] = work / "streams.bz2"
    made["bz2-streams"].write_bytes(made["bz2"].read_bytes() + run(["bzip2", "-c", "-9", raw]).stdout)
    made["lz"] = work / "disk.img.lz"
    made["lz"].write_bytes(run(["lzip", "-c", raw]).stdout)
    made["lz-members"] = work / "members.lz"
    made["lz-members"].write_bytes(run(["lzip", "-c", "-b", "1MiB", raw]).stdout)  # a member per ~1 MiB
    made["lz-trailing"] = work / "trailing.lz"
    made["lz-trailing"].write_bytes(made["lz-members"].read_bytes() + b"trailing data, ignored by lzip -d\n")
    return made


def reference(path: Path) -> bytes:
    tool = "bzip2" if path.name.endswith(".bz2") else "lzip"
    return run([tool, "-dc", path]).stdout


def copy_out(uri: str, out: Path) -> bytes:
    out.unlink(missing_ok=True)
    run(["nbdcopy", uri, out])
    return out.read_bytes()


@pytest.mark.parametrize("key, extra", [("bz2", ()), ("bz2-streams", ("bzip2-threads=1",)), ("lz", ()),
                                        ("lz-members", ()), ("lz-trailing", ()), ("lz", ("lzip-max-block=1M",))])
def test_served_bytes_equal_the_tools_output(files, tmp_path, key, extra):
    path = files[key]
    expected = reference(path)
    name = "bzip2" if key.startswith("bz2") else "lzip"
    with serve(f"--filter={name}", "file", path, *extra) as srv:
        assert copy_out(srv.uri, tmp_path / "out.raw") == expected
        # Random reads, as a guest reads: each decodes only the block or member it needs.
        rng = random.Random(1)
        reads = [(rng.randrange(len(expected) - 70000), rng.randrange(1, 70000)) for _ in range(40)]
        script = ("import nbd, sys, json\nh = nbd.NBD()\nh.connect_uri(sys.argv[1])\n"
                  "for offset, n in json.loads(sys.argv[2]):\n"
                  "    sys.stdout.buffer.write(h.pread(n, offset))\n")
        import json
        got = run([SYSTEM_PYTHON, "-c", script, srv.uri, json.dumps(reads)]).stdout
        assert got == b"".join(expected[o:o + n] for o, n in reads)


@pytest.mark.parametrize("fmt, filter_name, tool", [("vdi", "vdi", "bzip2"), ("vmdk", "vmdk", "lzip")])
def test_disk_images_inside(tmp_path, fmt, filter_name, tool):
    image = qemu_convert(make_raw(tmp_path / "raw.img", 8 << 20), fmt, tmp_path / f"disk.{fmt}")
    expected = qemu_raw(image, fmt, tmp_path / "ref.raw")
    packed = tmp_path / f"disk.{fmt}.{'bz2' if tool == 'bzip2' else 'lz'}"
    packed.write_bytes(run([tool, "-c", image]).stdout)
    with serve(f"--filter={filter_name}", f"--filter={tool}", "file", packed) as srv:
        assert copy_out(srv.uri, tmp_path / "out.raw") == expected


def corrupted(source: Path, out: Path, at: int, flip: int = 0x10) -> Path:
    data = bytearray(source.read_bytes())
    data[at] ^= flip
    out.write_bytes(bytes(data))
    return out


@pytest.mark.parametrize("key, damage", [("bz2", "middle"), ("bz2", "truncated"), ("lz-members", "middle"),
                                         ("lz-members", "truncated"), ("lz", "trailer")])
def test_corrupt_and_truncated_files(files, tmp_path, key, damage):
    source = files[key]
    size = source.stat().st_size
    if damage == "middle":
        bad = corrupted(source, tmp_path / source.name, size // 2)
    elif damage == "trailer":
        bad = corrupted(source, tmp_path / source.name, size - 3)  # the member size's high bytes
    else:
        bad = tmp_path / source.name
        bad.write_bytes(source.read_bytes()[:size * 2 // 3])
    name = "bzip2" if key.startswith("bz2") else "lzip"
    proc = run([*NBDFORMATS, "-v", "-U", "-", f"--filter={name}", "file", bad, "--run", 'nbdcopy "$uri" null:'],
               check=False, timeout=120)
    err = proc.stderr.decode()
    assert proc.returncode != 0, "served as if whole"
    assert "Traceback" not in err and "internal error" not in err, err
    assert any(word in err for word in ("corrupt", "truncated", "CRC", "does not fit", "no lzip member")), err

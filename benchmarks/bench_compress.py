"""Compressed images: nbdformats' gzip, xz and zstd filters vs nbdkit's gzip and xz, same run.

    .venv/bin/python benchmarks/bench_compress.py [--size-mib 1024] [--keep DIR]

A disk-like image (a third random, a third zeroes, a third text, in runs of up to 1 MiB) is
compressed with gzip -6, xz -1 --block-size=16MiB and zstd (one frame, and the seekable format
with 1 MiB frames).  Each server variant is started fresh and timed for:
  first 4K   server start to the first 4 KiB read at a random offset answered (start-up work
             such as indexing, plus the read itself);
  full read  nbdcopy of the whole disk to null: on the same running server;
and the bytes read are checked against the source (sha256 of a full copy, once per variant).
nbdkit's gzip inflates everything to a temporary file before the first answer; ours indexes
at start (or loads gzip-index=, or takes gzip-lazy's trailer size and indexes while reading).
"""

from __future__ import annotations

import argparse
import hashlib
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbd

from _common import ENV, NBDFORMATS, ROOT, MiB, Server, nbdcopy_sha256

sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from fixtures.compressed import make_image, seekable_zstd  # noqa: E402


def compress(argv: list, out: Path, timeout: float = 3600) -> None:
    with open(out, "wb") as f:
        subprocess.run([str(a) for a in argv], check=True, stdout=f, timeout=timeout, env=ENV)


def first_read(argv: list, sock: str, offset: int, log: Path) -> tuple[Server, float, bytes]:
    """Start a server; seconds until a 4 KiB read at `offset` is answered."""
    started = time.monotonic()
    server = Server(argv, sock, log)
    while True:
        server.check_running()
        h = nbd.NBD()  # a handle whose connect failed cannot be used again
        try:
            h.connect_unix(sock)
            break
        except nbd.Error:
            if time.monotonic() - started > 600:
                raise server.fail("no socket after 600 s")
            time.sleep(0.005)
    try:
        data = h.pread(4096, offset)
    except nbd.Error as e:
        raise server.fail(str(e)) from None
    elapsed = time.monotonic() - started
    h.shutdown()
    return server, elapsed, data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--keep", type=Path, help="Keep (and reuse) the compressed files in this directory")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-compress-"))
    work.mkdir(parents=True, exist_ok=True)
    size = args.size_mib * MiB
    image = work / "disk.img"
    if not image.exists() or image.stat().st_size != size:
        print(f"making a {args.size_mib} MiB image and compressing it (once)...", flush=True)
        make_image(image, size, seed=11)
        for f in work.glob("disk.img.*"):
            f.unlink()
    files = {"gz": work / "disk.img.gz", "xz": work / "disk.img.xz", "zst": work / "disk.img.zst",
             "seek.zst": work / "disk.img.seek.zst"}
    if not files["gz"].exists():
        compress(["gzip", "-6", "-c", image], files["gz"])
    if not files["xz"].exists():
        compress(["xz", "-1", "-T2", "--block-size=16MiB", "-c", image], files["xz"])
    if not files["zst"].exists():
        compress(["zstd", "-q", "-c", image], files["zst"])
    source = image.read_bytes()
    if not files["seek.zst"].exists():
        seekable_zstd(source, files["seek.zst"], frame_size=MiB)
    digest = hashlib.sha256(source).hexdigest()
    offset = random.Random(3).randrange(size - 4096) & ~4095
    index = work / "disk.img.gz.gzi"
    index.unlink(missing_ok=True)

    sock = str(work / "sock")
    variants = [
        ("nbdkit gzip", ["nbdkit", "-f", "-U", sock, "--filter=gzip", "file", files["gz"]]),
        ("ours gzip", [*NBDFORMATS, "-f", "-U", sock, "--filter=gzip", "file", files["gz"]]),
        ("ours gzip, saving gzip-index", [*NBDFORMATS, "-f", "-U", sock, "--filter=gzip", "file", files["gz"],
                                          f"gzip-index={index}"]),
        ("ours gzip, second start (index)", [*NBDFORMATS, "-f", "-U", sock, "--filter=gzip", "file", files["gz"],
                                             f"gzip-index={index}"]),
        ("ours gzip-lazy", [*NBDFORMATS, "-f", "-U", sock, "--filter=gzip", "file", files["gz"], "gzip-lazy=true"]),
        ("nbdkit xz (16 MiB blocks)", ["nbdkit", "-f", "-U", sock, "--filter=xz", "file", files["xz"]]),
        ("ours xz (16 MiB blocks)", [*NBDFORMATS, "-f", "-U", sock, "--filter=xz", "file", files["xz"]]),
        ("ours zstd seekable (1 MiB)", [*NBDFORMATS, "-f", "-U", sock, "--filter=zstd", "file", files["seek.zst"]]),
        ("ours zstd one frame (spill)", [*NBDFORMATS, "-f", "-U", sock, "--filter=zstd", "file", files["zst"]]),
    ]
    print(f"{args.size_mib} MiB image: gzip {files['gz'].stat().st_size // MiB} MiB, "
          f"xz {files['xz'].stat().st_size // MiB} MiB, zstd {files['zst'].stat().st_size // MiB} MiB; "
          f"first read at offset {offset}")
    print(f"{'variant':34} {'first 4K':>9} {'full read':>10} {'MiB/s':>7}  bytes")
    for label, argv in variants:
        server, first, data = first_read(argv, sock, offset, work / "server.log")
        with server:
            ok = data == source[offset:offset + 4096]
            started = time.monotonic()
            full_digest = nbdcopy_sha256(server.uri)
            full = time.monotonic() - started
            ok = ok and full_digest == digest
        print(f"{label:34} {first:8.2f}s {full:9.2f}s {args.size_mib / full:7.0f}  {'same' if ok else 'DIFFERENT'}",
              flush=True)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

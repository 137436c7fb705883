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
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from fixtures.compressed import make_image, seekable_zstd  # noqa: E402

MiB = 1024 * 1024
OURS = [sys.executable, "-m", "nbdformats"]
ENV = dict(os.environ, PATH="/usr/bin:/usr/sbin:/bin:/sbin:" + os.environ.get("PATH", ""))


def sh(argv: list, out: Path | None = None, timeout: float = 3600) -> None:
    with open(out, "wb") if out else open(os.devnull, "wb") as f:
        subprocess.run([str(a) for a in argv], check=True, stdout=f, timeout=timeout, env=ENV)


def first_read(argv: list, sock: str, offset: int, log: Path) -> tuple[subprocess.Popen, float, bytes]:
    """Start a server; seconds until a 4 KiB read at `offset` is answered."""
    started = time.monotonic()
    with open(log, "wb") as f:
        proc = subprocess.Popen([str(a) for a in argv], stdout=f, stderr=f, env=ENV, start_new_session=True)
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"{argv} exited {proc.returncode}: {log.read_text()[-2000:]}")
        h = nbd.NBD()  # a handle whose connect failed cannot be used again
        try:
            h.connect_unix(sock)
            break
        except nbd.Error:
            if time.monotonic() - started > 600:
                raise SystemExit(f"{argv}: no socket after 600 s")
            time.sleep(0.005)
    try:
        data = h.pread(4096, offset)
    except nbd.Error as e:
        stop(proc)
        raise SystemExit(f"{argv}: {e}\n{log.read_text()[-2000:]}") from None
    elapsed = time.monotonic() - started
    h.shutdown()
    return proc, elapsed, data


def copy_digest(uri: str) -> str:
    """nbdcopy the whole disk to a pipe, hashing what arrives."""
    copier = subprocess.Popen(["nbdcopy", uri, "-"], stdout=subprocess.PIPE, env=ENV)
    h = hashlib.sha256()
    assert copier.stdout is not None
    while chunk := copier.stdout.read(4 * MiB):
        h.update(chunk)
    if copier.wait(600):
        raise SystemExit(f"nbdcopy {uri} failed")
    return h.hexdigest()


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


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
        sh(["gzip", "-6", "-c", image], files["gz"])
    if not files["xz"].exists():
        sh(["xz", "-1", "-T2", "--block-size=16MiB", "-c", image], files["xz"])
    if not files["zst"].exists():
        sh(["zstd", "-q", "-c", image], files["zst"])
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
        ("ours gzip", [*OURS, "-f", "-U", sock, "--filter=gzip", "file", files["gz"]]),
        ("ours gzip, saving gzip-index", [*OURS, "-f", "-U", sock, "--filter=gzip", "file", files["gz"],
                                          f"gzip-index={index}"]),
        ("ours gzip, second start (index)", [*OURS, "-f", "-U", sock, "--filter=gzip", "file", files["gz"],
                                             f"gzip-index={index}"]),
        ("ours gzip-lazy", [*OURS, "-f", "-U", sock, "--filter=gzip", "file", files["gz"], "gzip-lazy=true"]),
        ("nbdkit xz (16 MiB blocks)", ["nbdkit", "-f", "-U", sock, "--filter=xz", "file", files["xz"]]),
        ("ours xz (16 MiB blocks)", [*OURS, "-f", "-U", sock, "--filter=xz", "file", files["xz"]]),
        ("ours zstd seekable (1 MiB)", [*OURS, "-f", "-U", sock, "--filter=zstd", "file", files["seek.zst"]]),
        ("ours zstd one frame (spill)", [*OURS, "-f", "-U", sock, "--filter=zstd", "file", files["zst"]]),
    ]
    print(f"{args.size_mib} MiB image: gzip {files['gz'].stat().st_size // MiB} MiB, "
          f"xz {files['xz'].stat().st_size // MiB} MiB, zstd {files['zst'].stat().st_size // MiB} MiB; "
          f"first read at offset {offset}")
    print(f"{'variant':34} {'first 4K':>9} {'full read':>10} {'MiB/s':>7}  bytes")
    for label, argv in variants:
        Path(sock).unlink(missing_ok=True)
        proc, first, data = first_read(argv, sock, offset, work / "server.log")
        try:
            ok = data == source[offset:offset + 4096]
            started = time.monotonic()
            full_digest = copy_digest(f"nbd+unix:///?socket={sock}")
            full = time.monotonic() - started
            ok = ok and full_digest == digest
        finally:
            stop(proc)
        print(f"{label:34} {first:8.2f}s {full:9.2f}s {args.size_mib / full:7.0f}  {'same' if ok else 'DIFFERENT'}",
              flush=True)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Compressed images: nbdformats' gzip, xz and zstd filters vs nbdkit's gzip and xz, same run.

    .venv/bin/python benchmarks/bench_compress.py [--size-mib 1024] [--rounds 3] [--keep DIR]

A disk-like image (a third random, a third zeroes, a third text, in runs of up to 1 MiB) is
compressed with gzip -6, xz -1 --block-size=16MiB and zstd (one frame, and the seekable format
with 1 MiB frames).  Each server variant is started fresh and timed for:
  first 4K   server start to the first 4 KiB read at a random offset answered (start-up work
             such as indexing, plus the read itself);
  full read  nbdcopy of the whole disk to null: (4 connections where the server offers
             multi-conn), on the same running server, with the server's CPU time (user and
             system, all threads) during it;
and the bytes read are checked against the source in the first round (sha256 of a full copy,
not timed).  Start to copied is the two together: a server started to copy a disk out.  Last,
benchmarks/inflaters.py times the gzip index pass and a sequential read in-process with each
inflate (zlib-ng's and the system zlib's).  Variants take turns round by round; medians of the rounds and ratios to nbdkit's
filter for the same file are printed, and the raw results saved under benchmarks/results/
(benchmarks/tables.py makes the docs tables from them).  nbdkit's gzip inflates everything to
a temporary file before the first answer; ours indexes at start (or loads gzip-index=, or
takes gzip-lazy's trailer size and indexes while reading).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbd

from _common import ENV, NBDFORMATS, ROOT, MiB, Server, cpu_seconds, nbdcopy_sha256, timed
from _results import Run

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
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="Keep (and reuse) the compressed files in this directory")
    args = parser.parse_args()
    run = Run("compress", {"size_mib": args.size_mib, "rounds": args.rounds})
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

    sock = str(work / "sock")
    ours = [*NBDFORMATS, "-f", "-U", sock]
    nbdkit = ["nbdkit", "-f", "-U", sock]
    # (label, format, argv); "saving gzip-index" removes the index first, so "second start" loads it.
    variants = [
        ("nbdkit gzip", "gzip", [*nbdkit, "--filter=gzip", "file", files["gz"]]),
        ("nbdformats gzip", "gzip", [*ours, "--filter=gzip", "file", files["gz"]]),
        ("nbdformats gzip, saving gzip-index", "gzip", [*ours, "--filter=gzip", "file", files["gz"],
                                                        f"gzip-index={index}"]),
        ("nbdformats gzip, second start (index)", "gzip", [*ours, "--filter=gzip", "file", files["gz"],
                                                           f"gzip-index={index}"]),
        ("nbdformats gzip-lazy", "gzip", [*ours, "--filter=gzip", "file", files["gz"], "gzip-lazy=true"]),
        ("nbdkit xz (16 MiB blocks)", "xz", [*nbdkit, "--filter=xz", "file", files["xz"]]),
        ("nbdformats xz (16 MiB blocks)", "xz", [*ours, "--filter=xz", "file", files["xz"]]),
        ("nbdformats zstd seekable (1 MiB frames)", "zstd", [*ours, "--filter=zstd", "file", files["seek.zst"]]),
        ("nbdformats zstd one frame (spill)", "zstd", [*ours, "--filter=zstd", "file", files["zst"]]),
    ]
    sizes = {key: path.stat().st_size for key, path in files.items()}
    print(f"{args.size_mib} MiB image: gzip {sizes['gz'] // MiB} MiB, xz {sizes['xz'] // MiB} MiB, "
          f"zstd {sizes['zst'] // MiB} MiB; first read at offset {offset}; load average {os.getloadavg()[0]:.2f}")
    raw: dict[str, dict[str, list[float]]] = {label: {"first_4k_s": [], "full_read_s": [], "full_read_cpu_s": []}
                                              for label, _, _ in variants}
    for round_number in range(args.rounds):
        print(f"round {round_number + 1}/{args.rounds}", flush=True)
        for label, _, argv in variants:
            if "saving gzip-index" in label:
                index.unlink(missing_ok=True)
            server, first, data = first_read(argv, sock, offset, work / "server.log")
            with server:
                if data != source[offset:offset + 4096]:
                    raise server.fail("the first 4 KiB read differs from the source")
                cpu_before = cpu_seconds(server.proc.pid)
                full = timed("nbdcopy", server.uri, "null:")
                full_cpu = cpu_seconds(server.proc.pid) - cpu_before
                if round_number == 0 and nbdcopy_sha256(server.uri) != digest:
                    raise server.fail("the full read differs from the source")
            raw[label]["first_4k_s"].append(first)
            raw[label]["full_read_s"].append(full)
            raw[label]["full_read_cpu_s"].append(full_cpu)
            print(f"  {label:42} {first:8.2f}s {full:9.2f}s  server CPU {full_cpu:6.2f}s", flush=True)

    medians = []
    for label, fmt, _ in variants:
        first, full = statistics.median(raw[label]["first_4k_s"]), statistics.median(raw[label]["full_read_s"])
        medians.append({"label": label, "format": fmt, "server": label.split()[0], "first_4k_s": first,
                        "full_read_s": full, "mib_per_s": args.size_mib / full,
                        "full_read_cpu_s": statistics.median(raw[label]["full_read_cpu_s"])})
    print(f"\nmedians of {args.rounds} rounds (load average now {os.getloadavg()[0]:.2f}):")
    print(f"{'variant':42} {'first 4K':>9} {'full read':>10} {'MiB/s':>7} {'vs nbdkit':>10} {'server CPU':>11}")
    for row in medians:
        reference = next((r for r in medians if r["format"] == row["format"] and r["server"] == "nbdkit"), None)
        ratio = f"{row['mib_per_s'] / reference['mib_per_s']:.2f}x" if reference and reference is not row else ""
        print(f"{row['label']:42} {row['first_4k_s']:8.2f}s {row['full_read_s']:9.2f}s {row['mib_per_s']:7.0f} "
              f"{ratio:>10} {row['full_read_cpu_s']:10.2f}s")
    # The inflates on their own, in-process: the gzip index pass and a sequential read behind it.
    inflaters = json.loads(subprocess.run([NBDFORMATS[0], str(ROOT / "benchmarks" / "inflaters.py"), str(files["gz"]),
                                           str(args.rounds)], check=True, capture_output=True, text=True,
                                          timeout=3600, env=dict(ENV, PYTHONPATH=str(ROOT))).stdout)
    print("\nin-process gzip inflate, medians:")
    for name, m in inflaters.items():
        print(f"  {name:8} index pass {m['index_s']:6.2f}s  sequential read behind it {m['read_s']:6.2f}s")
    run.save({"medians": medians, "rounds": raw, "compressed_bytes": sizes, "first_read_offset": offset,
              "inflaters": inflaters})
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Disk images: nbdformats' qcow2, vmdk and vhdx filters vs qemu-nbd on the same files, same run;
and qcow2 inside a multi-block .xz and a .tar.gz (with a saved gzip index), which qemu-nbd cannot open.

    .venv/bin/python benchmarks/bench_images.py [--size-mib 1024] [--rounds 3] [--keep DIR]

A disk-like image (a third random, a third zeroes, a third text) is converted by qemu-img to
qcow2 (64 KiB clusters), compressed qcow2 (zlib), a streamOptimized VMDK (every grain compressed,
as in OVAs) and a dynamic VHDX; the qcow2 is compressed with `xz --block-size=16MiB` and put in a
.tar.gz.  Each server variant is started fresh and timed:
  first 4K   server start to the first 4 KiB read at a random offset answered;
  full read  nbdcopy of the whole disk to null: on the same running server (as bench_compress.py:
             hashing the copy as it runs would measure the hash, about 450 MiB/s here, not the server);
and the bytes are checked against the source in the first round (sha256 of a full copy, not timed).  Variants run one after the
other, round by round (interleaved), and the table shows medians.  The raw results go to
benchmarks/results/ (benchmarks/_results.py); the docs' table (docs/filters/image.md) comes from them.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ENV, NBDFORMATS, ROOT, MiB, nbdcopy_sha256, timed
from _results import Run
from bench_compress import compress, first_read

sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from fixtures.compressed import make_image  # noqa: E402


def qemu_img(*args: object) -> None:
    subprocess.run(["qemu-img", *map(str, args)], check=True, timeout=3600, env=ENV)


def make_files(work: Path, size: int) -> dict[str, Path]:
    """The raw image and its qcow2 forms (made once per size in `work`)."""
    files = {"raw": work / "disk.raw", "qcow2": work / "disk.qcow2", "compressed": work / "compressed.qcow2",
             "xz": work / "disk.qcow2.xz", "tar.gz": work / "disk.tar.gz", "vmdk": work / "disk.vmdk",
             "vhdx": work / "disk.vhdx"}
    if not files["raw"].exists() or files["raw"].stat().st_size != size:
        print(f"making a {size // MiB} MiB image and its qcow2 forms (once)...", flush=True)
        make_image(files["raw"], size, seed=17)
        for name, path in files.items():
            if name != "raw":
                path.unlink(missing_ok=True)
    if not files["qcow2"].exists():
        qemu_img("convert", "-f", "raw", "-O", "qcow2", files["raw"], files["qcow2"])
    if not files["compressed"].exists():
        qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", files["raw"], files["compressed"])
    if not files["vmdk"].exists():
        qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", files["raw"], files["vmdk"])
    if not files["vhdx"].exists():
        qemu_img("convert", "-f", "raw", "-O", "vhdx", "-o", "subformat=dynamic", files["raw"], files["vhdx"])
    if not files["xz"].exists():
        compress(["xz", "-1", "-T2", "--block-size=16MiB", "-c", files["qcow2"]], files["xz"])
    if not files["tar.gz"].exists():
        subprocess.run(["tar", "czf", files["tar.gz"], "-C", work, files["qcow2"].name], check=True, timeout=3600,
                       env=ENV)
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="Keep (and reuse) the images in this directory")
    args = parser.parse_args()
    run = Run("images", {"size_mib": args.size_mib, "rounds": args.rounds})
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-images-"))
    work.mkdir(parents=True, exist_ok=True)
    size = args.size_mib * MiB
    files = make_files(work, size)
    source = files["raw"].read_bytes()
    digest = hashlib.sha256(source).hexdigest()
    offset = random.Random(5).randrange(size - 4096) & ~4095
    index = work / "disk.tar.gz.gzi"
    index.unlink(missing_ok=True)

    sock = str(work / "sock")
    qemu_nbd = ["qemu-nbd", "-f", "qcow2", "-r", "-t", "-k", sock]
    ours = [*NBDFORMATS, "-f", "-U", sock, "--filter=qcow2"]
    variants = [
        ("qemu-nbd qcow2", [*qemu_nbd, files["qcow2"]]),
        ("ours qcow2", [*ours, "file", files["qcow2"]]),
        ("qemu-nbd qcow2 compressed", [*qemu_nbd, files["compressed"]]),
        ("ours qcow2 compressed", [*ours, "file", files["compressed"]]),
        ("qemu-nbd vmdk streamOptimized", ["qemu-nbd", "-f", "vmdk", "-r", "-t", "-k", sock, files["vmdk"]]),
        ("ours vmdk streamOptimized", [*NBDFORMATS, "-f", "-U", sock, "--filter=vmdk", "file", files["vmdk"]]),
        ("qemu-nbd vhdx dynamic", ["qemu-nbd", "-f", "vhdx", "-r", "-t", "-k", sock, files["vhdx"]]),
        ("ours vhdx dynamic", [*NBDFORMATS, "-f", "-U", sock, "--filter=vhdx", "file", files["vhdx"]]),
        ("ours qcow2 in xz (16 MiB blocks)", [*ours, "--filter=xz", "file", files["xz"]]),
        ("ours qcow2 in tar.gz, saving gzip-index", [*ours, "--filter=tar", "--filter=gzip", "file", files["tar.gz"],
                                                    "tar-entry=disk.qcow2", f"gzip-index={index}"]),
        ("ours qcow2 in tar.gz, saved gzip-index", [*ours, "--filter=tar", "--filter=gzip", "file", files["tar.gz"],
                                                   "tar-entry=disk.qcow2", f"gzip-index={index}"]),
    ]
    print(f"{args.size_mib} MiB disk: qcow2 {files['qcow2'].stat().st_size // MiB} MiB, compressed "
          f"{files['compressed'].stat().st_size // MiB} MiB, xz {files['xz'].stat().st_size // MiB} MiB; "
          f"first read at offset {offset}")
    print(f"{'variant':42} {'first 4K':>9} {'full read':>10} {'MiB/s':>7}  bytes")
    rounds: dict[str, list[dict[str, float | bool]]] = {label: [] for label, _ in variants}
    for round_number in range(args.rounds):
        for label, argv in variants:
            server, first, data = first_read(argv, sock, offset, work / "server.log")
            with server:
                full = timed("nbdcopy", server.uri, "null:")  # the server's speed, not a hash's
                same = data == source[offset:offset + 4096] and (round_number > 0 or nbdcopy_sha256(server.uri) == digest)
            rounds[label].append({"first_4k_s": round(first, 4), "full_read_s": round(full, 4), "same_bytes": same})
            print(f"round {round_number + 1}: {label:42} {first:8.2f}s {full:9.2f}s {args.size_mib / full:7.0f}  "
                  f"{'same' if same else 'DIFFERENT'}", flush=True)
    results = []
    for label, measured in rounds.items():
        first = statistics.median(float(m["first_4k_s"]) for m in measured)
        full = statistics.median(float(m["full_read_s"]) for m in measured)
        results.append({"variant": label, "first_4k_s": first, "full_read_s": full,
                        "mib_per_s": round(args.size_mib / full, 1), "same_bytes": all(m["same_bytes"] for m in measured),
                        "rounds": measured})
    print(f"\nmedians of {args.rounds} rounds")
    for r in results:
        print(f"{r['variant']:42} {r['first_4k_s']:8.2f}s {r['full_read_s']:9.2f}s {r['mib_per_s']:7.0f}  "
              f"{'same' if r['same_bytes'] else 'DIFFERENT'}")
    run.save(results)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

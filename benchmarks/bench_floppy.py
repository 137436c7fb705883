"""Start-up time and memory of the floppy plugin: `nbdformats floppy` vs `nbdkit floppy`, same tree.

    .venv/bin/python benchmarks/bench_floppy.py [WORKDIR] [--files 100000] [--per-dir 1000]
                                                [--big-gib 3] [--rounds 3]

The tree holds FILES small files (0-2 KiB, long names) in directories of PER-DIR (a FAT
directory holds at most 65536 entries, so 100,000 files cannot share one), plus one sparse
file of BIG-GIB GiB: neither server may read or keep file data at start-up.  The files are
read once first (page cache warm for both).  For each server and round: the time from spawn
until the socket is there and a client's handshake succeeds, the peak RSS (VmHWM) after
start-up, the time of `nbdcopy` of the whole disk to null: (nbdformats reports the sparse
file's holes, so nbdcopy skips them; nbdkit 1.32 reports none) and the peak RSS after it.
The servers take turns round by round, in alternating order; the table shows medians, and the raw
results go to benchmarks/results/ (benchmarks/_results.py; docs/plugins/floppy.md's table comes from them).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import NBDFORMATS, Server, sh, timed  # noqa: E402
from _results import Run  # noqa: E402

SERVERS = {"nbdformats": NBDFORMATS, "nbdkit": ["nbdkit"]}


def make_tree(root: Path, files: int, per_dir: int, big_gib: int) -> None:
    marker = root / ".complete"
    if marker.exists() and marker.read_text() == f"{files} {per_dir} {big_gib}":
        return  # reuse: creating 100,000 files takes a while
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    block = os.urandom(2048)
    for i in range(files):
        directory = root / f"directory {i // per_dir:04d}"
        if i % per_dir == 0:
            directory.mkdir()
        (directory / f"a file with a long name {i:06d}.txt").write_bytes(block[:i % 2049])
    if big_gib:
        with open(root / "big.img", "wb") as f:
            f.truncate(big_gib << 30)
    marker.write_text(f"{files} {per_dir} {big_gib}")


def warm_page_cache(tree: Path) -> None:
    """Read every file once so that neither server pays for a cold cache."""
    for directory, _, files in os.walk(tree):
        for name in files:
            with open(os.path.join(directory, name), "rb") as f:
                while f.read(1 << 20):
                    pass


def measure(server: str, tree: Path, workdir: Path) -> dict[str, float]:
    sock = workdir / f"{server}.sock"
    started = time.perf_counter()
    with Server([*SERVERS[server], "-f", "-U", sock, "floppy", f"dir={tree}"], sock) as running:
        running.wait_for_socket(600)
        sh("nbdinfo", "--size", running.uri, timeout=60)
        startup = time.perf_counter() - started
        rss_ready = running.peak_rss_kib()
        copy = timed("nbdcopy", running.uri, "null:", timeout=1800)
        rss_after = running.peak_rss_kib()
    return {"startup_s": startup, "rss_ready_mib": rss_ready / 1024, "copy_s": copy,
            "rss_after_copy_mib": rss_after / 1024}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir", nargs="?", default="/var/tmp/bench-floppy")
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--per-dir", type=int, default=1000)
    parser.add_argument("--big-gib", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    run = Run("floppy", {"files": args.files, "per_dir": args.per_dir, "big_gib": args.big_gib,
                         "rounds": args.rounds})
    workdir = Path(args.workdir)
    tree = workdir / "tree"
    started = time.perf_counter()
    make_tree(tree, args.files, args.per_dir, args.big_gib)
    print(f"tree: {args.files} files in directories of {args.per_dir}, a {args.big_gib} GiB sparse file "
          f"(made in {time.perf_counter() - started:.1f} s)")
    warm_page_cache(tree)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in SERVERS}
    for round_number in range(args.rounds):
        order = list(SERVERS) if round_number % 2 == 0 else list(reversed(SERVERS))
        for name in order:
            results[name].append(measure(name, tree, Path(tempfile.mkdtemp(dir=workdir))))
    keys = ["startup_s", "rss_ready_mib", "copy_s", "rss_after_copy_mib"]
    print(f"{'server':<12}" + "".join(f"{k:>20}" for k in keys))
    medians = {name: {k: statistics.median(r[k] for r in rounds) for k in keys} for name, rounds in results.items()}
    for name in results:
        print(f"{name:<12}" + "".join(f"{medians[name][k]:>20.2f}" for k in keys))
    run.save({"medians": medians, "rounds": results})


if __name__ == "__main__":
    main()

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
The servers take turns round by round, in alternating order; the table shows medians.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
PYTHON = str(VENV_PYTHON) if VENV_PYTHON.exists() else sys.executable
SERVERS = {"nbdformats": [PYTHON, "-m", "nbdformats"], "nbdkit": ["nbdkit"]}
ENV = dict(os.environ, PATH="/usr/bin:/usr/sbin:/bin:/sbin:" + os.environ.get("PATH", ""))


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


def peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def measure(server: str, tree: Path, workdir: Path) -> dict[str, float]:
    sock = workdir / f"{server}.sock"
    sock.unlink(missing_ok=True)
    uri = f"nbd+unix:///?socket={sock}"
    started = time.perf_counter()
    proc = subprocess.Popen([*SERVERS[server], "-f", "-U", str(sock), "floppy", f"dir={tree}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV,
                            start_new_session=True)
    try:
        while not sock.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"{server} exited {proc.returncode}")
            if time.perf_counter() - started > 600:
                raise RuntimeError(f"{server} did not start in 600 s")
            time.sleep(0.005)
        subprocess.run(["nbdinfo", "--size", uri], check=True, capture_output=True, timeout=60, env=ENV)
        startup = time.perf_counter() - started
        rss_ready = peak_rss_kib(proc.pid)
        copy_started = time.perf_counter()
        subprocess.run(["nbdcopy", uri, "null:"], check=True, capture_output=True, timeout=1800, env=ENV)
        copy = time.perf_counter() - copy_started
        rss_after = peak_rss_kib(proc.pid)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
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
    for name, rounds in results.items():
        print(f"{name:<12}" + "".join(f"{statistics.median(r[k] for r in rounds):>20.2f}" for k in keys))


if __name__ == "__main__":
    main()

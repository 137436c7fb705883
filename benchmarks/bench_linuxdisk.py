"""Start-up of the linuxdisk plugin on large flat directories: `nbdformats linuxdisk` vs `nbdkit linuxdisk`.

    .venv/bin/python benchmarks/bench_linuxdisk.py [WORKDIR] [--files 20000 100000] [--type ext2]
                                                   [--rounds 3] [--timeout 1800]

For each FILES count, one directory holding that many empty files (`file000000` ...; made once and
reused).  For each server and round: the time from spawn until a client's handshake succeeds
(`nbdinfo --size`), i.e. the whole filesystem build, and the server's peak RSS (VmHWM).  A server that
exits instead (nbdkit 1.32 runs out of inodes on such trees) or is not ready within TIMEOUT seconds is
recorded as failed, with the first line of its messages.  The servers take turns round by round, in
alternating order; the table shows medians, and the raw results go to benchmarks/results/
(benchmarks/_results.py; docs/plugins/linuxdisk.md's table comes from them).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import NBDFORMATS, Server, sh  # noqa: E402
from _results import Run  # noqa: E402

SERVERS = {"nbdformats": NBDFORMATS, "nbdkit": ["nbdkit"]}


def make_flat(directory: Path, files: int) -> None:
    marker = directory.with_name(directory.name + ".complete")
    if marker.exists() and marker.read_text() == str(files):
        return
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        (directory / f"file{i:06d}").touch()
    marker.write_text(str(files))


def measure(server: str, tree: Path, fs_type: str, workdir: Path, timeout: float) -> dict[str, float | str]:
    sock, log = workdir / f"{server}.sock", workdir / f"{server}.log"
    started = time.perf_counter()
    with Server([*SERVERS[server], "-f", "-U", sock, "linuxdisk", f"dir={tree}", f"type={fs_type}"], sock,
                log=log) as running:
        try:
            running.wait_for_socket(timeout)
            sh("nbdinfo", "--size", running.uri, timeout=60)
        except SystemExit as e:
            lines = [line for line in str(e).splitlines()[1:] if line.strip()]
            return {"failed": lines[0] if lines else str(e).splitlines()[0]}  # the cause comes first
        startup = time.perf_counter() - started
        rss = running.peak_rss_kib()
    return {"startup_s": startup, "rss_ready_mib": rss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir", nargs="?", default="/var/tmp/bench-linuxdisk")
    parser.add_argument("--files", type=int, nargs="+", default=[20_000, 100_000])
    parser.add_argument("--type", default="ext2", choices=["ext2", "ext3", "ext4"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds a server may take to be ready")
    args = parser.parse_args()
    run = Run("linuxdisk", {"files": args.files, "type": args.type, "rounds": args.rounds, "timeout": args.timeout})
    workdir = Path(args.workdir)
    os.environ["TMPDIR"] = str(workdir)  # both servers build their image there
    results: dict[str, dict[str, list[dict[str, float | str]]]] = {}
    for files in args.files:
        tree = workdir / f"flat-{files}"
        make_flat(tree, files)
        print(f"one directory of {files} empty files, {args.type}", flush=True)
        per_server = results[str(files)] = {name: [] for name in SERVERS}
        for round_number in range(args.rounds):
            order = list(SERVERS) if round_number % 2 == 0 else list(reversed(SERVERS))
            for name in order:
                outcome = measure(name, tree, args.type, Path(tempfile.mkdtemp(dir=workdir)), args.timeout)
                per_server[name].append(outcome)
                print(f"  round {round_number + 1} {name}: {outcome}", flush=True)
    medians: dict[str, dict[str, dict[str, float | str]]] = {}
    print(f"\n{'files':>8} {'server':<12} {'ready (s)':>10} {'RSS (MiB)':>10}")
    for files, per_server in results.items():
        for name, rounds in per_server.items():
            good = [r for r in rounds if "failed" not in r]
            if good:
                summary: dict[str, float | str] = {
                    "startup_s": statistics.median(float(r["startup_s"]) for r in good),
                    "rss_ready_mib": statistics.median(float(r["rss_ready_mib"]) for r in good)}
                print(f"{files:>8} {name:<12} {summary['startup_s']:>10.2f} {summary['rss_ready_mib']:>10.1f}")
            else:
                summary = {"failed": str(rounds[0]["failed"])}
                print(f"{files:>8} {name:<12} failed: {summary['failed']}")
            medians.setdefault(files, {})[name] = summary
    run.save({"medians": medians, "rounds": results})


if __name__ == "__main__":
    main()

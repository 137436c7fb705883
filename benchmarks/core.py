#!/usr/bin/python3
"""Core server benchmark: nbdformats against nbdkit and qemu-nbd, same image, same clients, same run.

    /usr/bin/python3 benchmarks/core.py [--rounds 3] [--size 1G] [--count 30000] [--only memory|file|nbd]

Workloads per server: sequential write and read of the whole export with nbdcopy (4 connections when the
server allows multi-conn, and 1), random 4 KiB reads and writes at queue depth 1 and 16 through libnbd's
aio API, and the server's peak RSS.  Servers run one at a time, interleaved round by round so each sees the
same machine state; the table shows medians and the ratio of nbdformats to nbdkit (higher is better), and
the server's CPU time per unit of work (/proc/PID/stat before and after each workload).  Raw results go to
benchmarks/results/ (benchmarks/_results.py); benchmarks/tables.py makes the docs' tables from them.

`--only nbd` measures the nbd plugins instead: nbdkit's and ours forwarding to one nbdkit memory server
(its results are saved as benchmark core-nbd; a run of all, core, covers memory and file).

Needs Debian's python3 (for libnbd's binding, python3-libnbd), nbdkit, qemu-utils and libnbd-bin.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import nbd

from _common import NBDFORMATS, Server, cpu_seconds, timed
from _results import Run

BLOCK = 4096


def parse_size(text: str) -> int:
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * scale[text[-1].upper()] if text[-1].upper() in scale else int(text)


def nbdcopy(src: str, dst: str, connections: int, size: int) -> float:
    return size / timed("nbdcopy", "-C", connections, src, dst, timeout=600) / 1e6


def random_io(uri: str, write: bool, depth: int, count: int, size: int) -> float:
    """IOPS of `count` random 4 KiB requests, `depth` in flight (libnbd aio, auto-retired)."""
    h = nbd.NBD()
    h.connect_uri(uri)
    blocks = size // BLOCK
    rng = random.Random(1)
    offsets = [rng.randrange(blocks) * BLOCK for _ in range(count)]
    buffers = [nbd.Buffer.from_bytearray(bytearray(os.urandom(BLOCK))) for _ in range(depth)]
    free = list(range(depth))
    completed = [0]

    def completion_for(i: int):
        def done(err) -> int:
            free.append(i)
            completed[0] += 1
            return 1  # retire the command
        return done

    callbacks = [completion_for(i) for i in range(depth)]
    submit = h.aio_pwrite if write else h.aio_pread
    start = time.perf_counter()
    issued = 0
    while completed[0] < count:
        while free and issued < count:
            i = free.pop()
            submit(buffers[i], offsets[issued], completion=callbacks[i])
            issued += 1
        h.poll(-1)
    elapsed = time.perf_counter() - start
    h.shutdown()
    return count / elapsed


def run_workloads(server: Server, source: str, size: int, count: int) -> dict[str, dict[str, float]]:
    """Each workload's figure and the server's CPU seconds during it."""
    results: dict[str, dict[str, float]] = {}
    h = nbd.NBD()
    h.connect_uri(server.uri)
    multi = h.can_multi_conn()
    h.shutdown()
    conns = 4 if multi else 1
    workloads = {
        "seq_write": lambda: nbdcopy(source, server.uri, conns, size),
        "seq_write_c1": lambda: nbdcopy(source, server.uri, 1, size),
        "seq_read": lambda: nbdcopy(server.uri, "null:", conns, size),
        "seq_read_c1": lambda: nbdcopy(server.uri, "null:", 1, size),
        "randwrite_qd16": lambda: random_io(server.uri, True, 16, count, size),
        "randwrite_qd1": lambda: random_io(server.uri, True, 1, count // 3, size),
        "randread_qd16": lambda: random_io(server.uri, False, 16, count, size),
        "randread_qd1": lambda: random_io(server.uri, False, 1, count // 3, size),
    }
    for workload, run in workloads.items():
        before = cpu_seconds(server.proc.pid)
        value = run()
        results[workload] = {"value": value, "cpu_s": cpu_seconds(server.proc.pid) - before,
                             "work": size if workload.startswith("seq") else
                             (count if workload.endswith("qd16") else count // 3)}
    results["peak_rss"] = {"value": server.peak_rss_kib() / 1024}
    return results


def startup_and_idle(argv_prefix: list[str], work: str) -> tuple[float, float]:
    """Median wall time of `-U - memory 1M --run true` (start, serve nothing, exit) and idle RSS (MB)."""
    times = []
    for _ in range(5):
        start = time.perf_counter()
        subprocess.run([*argv_prefix, "-U", "-", "memory", "1M", "--run", "true"], check=True, timeout=60)
        times.append(time.perf_counter() - start)
    sock = os.path.join(work, "idle.sock")
    with Server([*argv_prefix, "-f", "-U", sock, "memory", "1M"], sock) as server:
        server.wait_for_socket()
        time.sleep(0.5)
        with open(f"/proc/{server.proc.pid}/status") as f:
            rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
    return statistics.median(times), rss


UNITS = {"seq_write": "MB/s", "seq_write_c1": "MB/s", "seq_read": "MB/s", "seq_read_c1": "MB/s",
         "randwrite_qd16": "IOPS", "randwrite_qd1": "IOPS", "randread_qd16": "IOPS", "randread_qd1": "IOPS",
         "peak_rss": "MB"}


def cpu_per_unit(result: dict[str, float], workload: str) -> float:
    """Server CPU per unit of work: ms per GiB moved (sequential), us per request (random)."""
    if workload.startswith("seq"):
        return result["cpu_s"] * 1000 / (result["work"] / (1 << 30))
    return result["cpu_s"] * 1e6 / result["work"]


def summarize(servers: list[str], runs: dict[str, list[dict[str, dict[str, float]]]]) -> dict[str, dict[str, dict]]:
    """Medians over rounds of each figure and of its CPU per unit of work."""
    summary: dict[str, dict[str, dict]] = {}
    for name in servers:
        summary[name] = {}
        for workload in UNITS:
            rounds = [r[workload] for r in runs[name]]
            entry = {"value": statistics.median(r["value"] for r in rounds)}
            if "cpu_s" in rounds[0]:
                entry["cpu"] = statistics.median(cpu_per_unit(r, workload) for r in rounds)
            summary[name][workload] = entry
    return summary


def print_table(servers: list[str], summary: dict[str, dict[str, dict]], rounds: int, size: str) -> None:
    print(f"\nmedians of {rounds} interleaved rounds, {size} export, {os.cpu_count()} CPUs; "
          "cpu: server CPU in ms per GiB (sequential) or us per request (random)")
    print(f"{'workload':22}" + "".join(f"{n:>24}" for n in servers) + "   nbdformats/nbdkit (speed; cpu)")
    for workload, unit in UNITS.items():
        cells = []
        for name in servers:
            entry = summary[name][workload]
            cell = f"{entry['value']:.0f}" + (f" ({entry['cpu']:.0f})" if "cpu" in entry else "")
            cells.append(f"{cell:>24}")
        ratios = []
        for kind in ("memory", "file", "nbd"):
            ours, theirs = summary.get(f"nbdformats {kind}"), summary.get(f"nbdkit {kind}")
            if not (ours and theirs and theirs[workload]["value"]):
                continue
            speed = ours[workload]["value"] / theirs[workload]["value"]
            if workload == "peak_rss":
                ratios.append(f"{kind} {1 / speed:.2f}x")  # lower RSS is better
            else:
                ratios.append(f"{kind} {speed:.2f}x; cpu {ours[workload]['cpu'] / theirs[workload]['cpu']:.2f}x")
        print(f"{workload + ' (' + unit + ')':22}" + "".join(cells) + "   " + ", ".join(ratios))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", default="1G")
    parser.add_argument("--count", type=int, default=30000, help="random requests per QD16 run")
    parser.add_argument("--only", choices=["memory", "file", "nbd"], help="only this backend")
    parser.add_argument("--no-qemu", action="store_true", help="leave qemu-nbd out")
    args = parser.parse_args()
    run_record = Run(f"core-{args.only}" if args.only else "core", vars(args))
    size = parse_size(args.size)
    work = tempfile.mkdtemp(prefix="nbdformats-bench-")
    try:
        source = os.path.join(work, "src.img")
        image = os.path.join(work, "disk.img")
        with open(source, "wb") as f:  # random data: nbdcopy cannot skip it
            for _ in range(size // (1 << 20)):
                f.write(os.urandom(1 << 20))
        with open(image, "wb") as f:
            f.truncate(size)
        sock = os.path.join(work, "sock")
        servers = []
        if args.only in (None, "memory"):
            servers += [("nbdkit memory", ["nbdkit", "-f", "-U", sock, "memory", str(size)]),
                        ("nbdformats memory", [*NBDFORMATS, "-f", "-U", sock, "memory", str(size)])]
        if args.only in (None, "file"):
            servers += [("nbdkit file", ["nbdkit", "-f", "-U", sock, "file", image]),
                        ("nbdformats file", [*NBDFORMATS, "-f", "-U", sock, "file", image])]
            if not args.no_qemu:
                servers += [("qemu-nbd file", ["qemu-nbd", "-t", "-k", sock, "-f", "raw", "--cache=writeback",
                                               "--aio=threads", image])]
        upstream = None
        if args.only == "nbd":  # both nbd plugins forward to the same nbdkit memory server
            upstream_sock = os.path.join(work, "upstream.sock")
            upstream = Server(["nbdkit", "-f", "-U", upstream_sock, "memory", str(size)], upstream_sock)
            upstream.wait_for_socket()
            servers += [("nbdkit nbd", ["nbdkit", "-f", "-U", sock, "nbd", f"socket={upstream_sock}"]),
                        ("nbdformats nbd", [*NBDFORMATS, "-f", "-U", sock, "nbd", f"socket={upstream_sock}"])]
        runs: dict[str, list[dict[str, dict[str, float]]]] = {name: [] for name, _ in servers}
        try:
            for round_number in range(args.rounds):
                for name, argv in servers:
                    print(f"round {round_number + 1}/{args.rounds}: {name}", file=sys.stderr, flush=True)
                    with Server(argv, sock) as server:
                        server.wait_for_socket()
                        runs[name].append(run_workloads(server, source, size, args.count))
        finally:
            if upstream is not None:
                upstream.stop()
        startup = {}
        print("\nstart-up (-U - memory 1M --run true, median of 5) and idle RSS:")
        for name, prefix in (("nbdkit", ["nbdkit"]), ("nbdformats", NBDFORMATS)):
            seconds, rss = startup_and_idle(prefix, work)
            startup[name] = {"seconds": seconds, "idle_rss_mb": rss}
            print(f"  {name:12} {seconds:6.3f} s   {rss:6.1f} MB")
        names = [name for name, _ in servers]
        summary = summarize(names, runs)
        print_table(names, summary, args.rounds, args.size)
        run_record.save({"servers": names, "rounds": runs, "summary": summary, "startup": startup})
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

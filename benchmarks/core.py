#!/usr/bin/python3
"""Core server benchmark: nbdformats against nbdkit and qemu-nbd, same image, same clients, same run.

    /usr/bin/python3 benchmarks/core.py [--rounds 3] [--size 1G] [--count 30000] [--only memory|file]

Workloads per server: sequential write and read of the whole export with nbdcopy (4 connections when the
server allows multi-conn, and 1), random 4 KiB reads and writes at queue depth 1 and 16 through libnbd's
aio API, and the server's peak RSS.  Servers run one at a time, interleaved round by round so each sees the
same machine state; the table shows medians and the ratio of nbdformats to nbdkit (higher is better).

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

from _common import NBDFORMATS, Server, timed

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


def run_workloads(server: Server, source: str, size: int, count: int) -> dict[str, float]:
    results: dict[str, float] = {}
    h = nbd.NBD()
    h.connect_uri(server.uri)
    multi = h.can_multi_conn()
    h.shutdown()
    conns = 4 if multi else 1
    results["seq_write"] = nbdcopy(source, server.uri, conns, size)
    results["seq_write_c1"] = nbdcopy(source, server.uri, 1, size)
    results["seq_read"] = nbdcopy(server.uri, "null:", conns, size)
    results["seq_read_c1"] = nbdcopy(server.uri, "null:", 1, size)
    results["randwrite_qd16"] = random_io(server.uri, True, 16, count, size)
    results["randwrite_qd1"] = random_io(server.uri, True, 1, count // 3, size)
    results["randread_qd16"] = random_io(server.uri, False, 16, count, size)
    results["randread_qd1"] = random_io(server.uri, False, 1, count // 3, size)
    results["peak_rss"] = server.peak_rss_kib() / 1024
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", default="1G")
    parser.add_argument("--count", type=int, default=30000, help="random requests per QD16 run")
    parser.add_argument("--only", choices=["memory", "file"], help="only this backend")
    parser.add_argument("--no-qemu", action="store_true", help="leave qemu-nbd out")
    args = parser.parse_args()
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
        results: dict[str, list[dict[str, float]]] = {name: [] for name, _ in servers}
        for round_number in range(args.rounds):
            for name, argv in servers:
                print(f"round {round_number + 1}/{args.rounds}: {name}", file=sys.stderr, flush=True)
                with Server(argv, sock) as server:
                    server.wait_for_socket()
                    results[name].append(run_workloads(server, source, size, args.count))
        print("\nstart-up (-U - memory 1M --run true, median of 5) and idle RSS:")
        for name, prefix in (("nbdkit", ["nbdkit"]), ("nbdformats", NBDFORMATS)):
            seconds, rss = startup_and_idle(prefix, work)
            print(f"  {name:12} {seconds:6.3f} s   {rss:6.1f} MB")
        medians = {name: {w: statistics.median(r[w] for r in runs) for w in UNITS}
                   for name, runs in results.items()}
        names = [name for name, _ in servers]
        print(f"\nmedians of {args.rounds} interleaved rounds, {args.size} export, {os.cpu_count()} CPUs")
        header = f"{'workload':16}" + "".join(f"{n:>20}" for n in names) + "   nbdformats/nbdkit"
        print(header)
        for workload, unit in UNITS.items():
            row = f"{workload + ' (' + unit + ')':16}" + "".join(f"{medians[n][workload]:>20.0f}" for n in names)
            ratios = []
            for kind in ("memory", "file"):
                ours, theirs = medians.get(f"nbdformats {kind}"), medians.get(f"nbdkit {kind}")
                if ours and theirs and theirs[workload]:
                    ratio = ours[workload] / theirs[workload]
                    if workload == "peak_rss":
                        ratio = 1 / ratio  # lower RSS is better
                    ratios.append(f"{kind} {ratio:.2f}x")
            print(row + "   " + ", ".join(ratios))
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/python3
"""Ceph benchmark: the rbd plugin against `rbd bench`, the S3 plugin against nbdkit's S3 plugin.

    /usr/bin/python3 benchmarks/bench_ceph.py [--rounds 3] [--size 256M] [--count 4000] [--only rbd|s3]

Starts the test cluster (tests/ceph/up.sh: one OSD on a file, radosgw, all on this machine).
RBD: sequential write and read of a whole image with nbdcopy (4 connections, 4 MiB requests) and
random 4 KiB reads and writes at queue depth 16 (libnbd aio) through `nbdformats rbd` (after
nbdcopy's final flush, so librbd's cache is in writeback mode as in `rbd bench`), and the
same workloads through librbd directly with `rbd bench` (4 MiB and 4 KiB I/Os, 16 in flight):
the difference is the overhead of NBD and of our server.  S3: sequential read of one object with
nbdcopy (1 and 4 connections) and random 4 KiB reads at QD16, through `nbdformats S3` and
`nbdkit S3` (Debian's nbdkit-plugin-python with python3-boto3).  Rounds are interleaved; the
table shows medians.

Needs Debian's python3 (libnbd binding), nbdkit, nbdkit-plugin-python, python3-boto3, libnbd-bin,
the Ceph packages up.sh installs, and boto3 in .venv.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _results import Run  # noqa: E402
from _common import ENV, NBDFORMATS, ROOT, MiB, Server  # noqa: E402
from core import parse_size, random_io  # noqa: E402

UP = os.path.join(ROOT, "tests", "ceph", "up.sh")


def cluster_env() -> dict[str, str]:
    out = subprocess.run(["bash", UP], check=True, capture_output=True, timeout=900).stdout.decode()
    env = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    os.environ.update(env)
    ENV.update(env)  # the servers' environment: CEPH_CONF and the keyring
    return env


def nbdcopy_rate(src: str, dst: str, connections: int, size: int) -> float:
    """MB/s of one nbdcopy; a write ends with a flush (counted: the data is then in the cluster)."""
    flush = ["--flush"] if dst.startswith("nbd") else []
    start = time.perf_counter()
    subprocess.run(["nbdcopy", "-C", str(connections), f"--request-size={4 * MiB}", *flush, src, dst],
                   check=True, timeout=900)
    return size / (time.perf_counter() - start) / 1e6


def rbd_bench(spec: str, io_type: str, io_size: int, pattern: str, total: int) -> float:
    """MB/s (io_size >= 1 MiB) or IOPS of `rbd bench` with 16 I/Os in flight."""
    out = subprocess.run(["rbd", "bench", "--io-type", io_type, "--io-size", str(io_size), "--io-threads", "16",
                          "--io-total", str(total), "--io-pattern", pattern, spec],
                         check=True, capture_output=True, timeout=900).stdout.decode()
    ops_per_sec = float(re.search(r"ops/sec: ([0-9.]+)", out).group(1))
    return ops_per_sec * io_size / 1e6 if io_size >= MiB else ops_per_sec


def bench_rbd(args, work: str, source: str, size: int) -> dict[str, dict[str, list[float]]]:
    pool = os.environ["NBDF_CEPH_RBD_POOL"]
    image = f"bench-{uuid.uuid4().hex[:8]}"
    spec = f"{pool}/{image}"
    subprocess.run(["rbd", "create", "--size", str(size // MiB), spec], check=True, timeout=120)
    sock = os.path.join(work, "sock")
    results: dict[str, dict[str, list[float]]] = {"rbd bench (librbd)": {}, "nbdformats rbd": {}}

    def add(who: str, workload: str, value: float) -> None:
        results[who].setdefault(workload, []).append(value)

    try:
        for round_number in range(args.rounds):
            print(f"rbd round {round_number + 1}/{args.rounds}", file=sys.stderr, flush=True)
            add("rbd bench (librbd)", "seq write (MB/s)", rbd_bench(spec, "write", 4 * MiB, "seq", size))
            add("rbd bench (librbd)", "seq read (MB/s)", rbd_bench(spec, "read", 4 * MiB, "seq", size))
            add("rbd bench (librbd)", "rand write 4K QD16 (IOPS)", rbd_bench(spec, "write", 4096, "rand", 4096 * args.count))
            add("rbd bench (librbd)", "rand read 4K QD16 (IOPS)", rbd_bench(spec, "read", 4096, "rand", 4096 * args.count))
            with Server([*NBDFORMATS, "-f", "-U", sock, "rbd", f"pool={pool}", f"image={image}"], sock) as server:
                server.wait_for_socket()
                add("nbdformats rbd", "seq write (MB/s)", nbdcopy_rate(source, server.uri, 4, size))
                add("nbdformats rbd", "seq read (MB/s)", nbdcopy_rate(server.uri, "null:", 4, size))
                add("nbdformats rbd", "rand write 4K QD16 (IOPS)", random_io(server.uri, True, 16, args.count, size))
                add("nbdformats rbd", "rand read 4K QD16 (IOPS)", random_io(server.uri, False, 16, args.count, size))
                add("nbdformats rbd", "peak RSS (MB)", server.peak_rss_kib() / 1024)
    finally:
        subprocess.run(["rbd", "rm", "--no-progress", spec], check=False, timeout=300)
    return results


def bench_s3(args, work: str, source: str, size: int) -> dict[str, dict[str, list[float]]]:
    import boto3
    endpoint, access, secret = (os.environ[k] for k in ("NBDF_CEPH_S3_ENDPOINT", "NBDF_CEPH_S3_ACCESS",
                                                        "NBDF_CEPH_S3_SECRET"))
    s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=access, aws_secret_access_key=secret,
                      region_name="us-east-1")
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    s3.upload_file(source, bucket, "disk.img")
    params = [f"endpoint-url={endpoint}", f"access-key={access}", f"secret-key={secret}",
              f"bucket={bucket}", "key=disk.img"]
    sock = os.path.join(work, "sock")
    servers = {"nbdkit S3": ["nbdkit", "-f", "-U", sock, "S3", *params],
               "nbdformats S3": [*NBDFORMATS, "-f", "-U", sock, "S3", *params]}
    results: dict[str, dict[str, list[float]]] = {name: {} for name in servers}
    try:
        for round_number in range(args.rounds):
            for name, argv in servers.items():
                print(f"S3 round {round_number + 1}/{args.rounds}: {name}", file=sys.stderr, flush=True)
                with Server(argv, sock) as server:
                    server.wait_for_socket()
                    r = results[name]
                    r.setdefault("seq read 1 conn (MB/s)", []).append(nbdcopy_rate(server.uri, "null:", 1, size))
                    r.setdefault("seq read 4 conns (MB/s)", []).append(nbdcopy_rate(server.uri, "null:", 4, size))
                    r.setdefault("rand read 4K QD16 (IOPS)", []).append(
                        random_io(server.uri, False, 16, args.count // 4, size))
                    r.setdefault("peak RSS (MB)", []).append(server.peak_rss_kib() / 1024)
    finally:
        s3.delete_object(Bucket=bucket, Key="disk.img")
        s3.delete_bucket(Bucket=bucket)
    return results


def print_table(title: str, results: dict[str, dict[str, list[float]]]) -> None:
    names = list(results)
    workloads = list(dict.fromkeys(w for r in results.values() for w in r))
    print(f"\n{title}")
    print(f"{'workload':28}" + "".join(f"{n:>22}" for n in names) + "   ratio")
    for workload in workloads:
        values = [statistics.median(results[n][workload]) if workload in results[n] else None for n in names]
        cells = "".join(f"{v:>22.0f}" if v is not None else f"{'-':>22}" for v in values)
        ratio = ""
        if None not in values and values[0]:
            ratio = f"{values[1] / values[0]:.2f}x"
        print(f"{workload:28}{cells}   {ratio}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", default="256M", help="image and object size")
    parser.add_argument("--count", type=int, default=4000, help="random 4 KiB requests per run")
    parser.add_argument("--only", choices=["rbd", "s3"])
    args = parser.parse_args()
    size = parse_size(args.size)
    cluster_env()
    with tempfile.TemporaryDirectory(prefix="nbdformats-bench-ceph-") as work:
        source = os.path.join(work, "src.img")
        with open(source, "wb") as f:  # random data: nothing can be skipped as zeroes
            for _ in range(size // MiB):
                f.write(os.urandom(MiB))
        header = f"medians of {args.rounds} rounds, {args.size}, {os.cpu_count()} CPUs, single-node Ceph on this machine"
        if args.only in (None, "rbd"):
            rbd_run = Run("ceph-rbd", vars(args))
            rbd = bench_rbd(args, work, source, size)
            print_table(f"RBD ({header}); ratio = nbdformats / librbd", rbd)
            rbd_run.save({"medians": medians(rbd), "rounds": rbd})
        if args.only in (None, "s3"):
            s3_run = Run("ceph-s3", vars(args))
            s3 = bench_s3(args, work, source, size)
            print_table(f"S3 ({header}); ratio = nbdformats / nbdkit", s3)
            s3_run.save({"medians": medians(s3), "rounds": s3})
    return 0


def medians(results: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    return {who: {workload: statistics.median(values) for workload, values in per.items()}
            for who, per in results.items()}


if __name__ == "__main__":
    sys.exit(main())

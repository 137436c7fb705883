"""Per-request latency of nbdkit Python plugin scripts: `nbdkit python` vs `nbdformats python`.

    .venv/bin/python benchmarks/bench_python_plugin.py [--batches 40] [--batch 250] [--block 4096]

Both servers run the same scripts from tests/fixtures/python_plugins in the same run, on Unix
sockets: ramdisk.py (nbdkit's default thread model, serialize_all_requests) and file.py
(THREAD_MODEL_PARALLEL); nbdformats calls both from the connection's own thread.  Each
server also serves the native `memory` plugin, the floor of that server's own round trip, so
"script cost" = script latency - memory latency is what running the Python script costs there.

One libnbd client sends synchronous requests (queue depth 1): each sample is a full round
trip.  All servers run at once and take turns in short batches, so load from other processes
on the machine falls on all of them alike; the figure is the median of the batch medians.

At queue depth 1 where the scheduler puts client and server decides much of the round trip: on
one CPU a request costs two context switches; on two, two wake-ups of an idle CPU (~20 us each
in this VM).  Left to itself the scheduler picks either, run to run.  So each measurement runs
three ways: all on one CPU, client and servers on different CPUs (taskset), and unpinned.
Last, the in-process cost of our plugin layer is timed directly (no sockets).  Raw results go to
benchmarks/results/ (benchmarks/_results.py); benchmarks/tables.py makes the docs' table from them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import timeit
from pathlib import Path

import nbd  # libnbd's Python binding (Debian: python3-libnbd)
from _common import Server
from _results import Run

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "tests" / "fixtures" / "python_plugins"
DISK_SIZE = 64 * 1024 * 1024
SERVERS = {"nbdkit": ["nbdkit"], "nbdformats": [sys.executable, "-m", "nbdformats"]}


def batch_median(h: nbd.NBD, kind: str, offsets: list[int], data: bytes) -> float:
    """Median microseconds per synchronous request over one batch."""
    clock = time.perf_counter_ns
    samples = []
    block = len(data)
    for offset in offsets:
        t0 = clock()
        if kind == "write":
            h.pwrite(data, offset)
        else:
            h.pread(block, offset)
        samples.append(clock() - t0)
    return statistics.median(samples) / 1000


def layer_overhead(image: str) -> list[tuple[str, float]]:
    """Microseconds our python plugin adds to one call, in process: Layer call minus direct script call."""
    from nbdformats.api.chain import Chain
    from nbdformats.registry import load_plugin

    results = []
    for script, pairs in (("ramdisk.py", [("size", "1M")]), ("file.py", [("file", image)])):
        chain = Chain([], load_plugin("python")())
        chain.configure({0: [("script", str(SCRIPTS / script)), *pairs]})
        chain.get_ready()
        layer = chain.open(readonly=False, export_name="")
        module, h = chain.plugin.module, layer.handle.h
        buf = memoryview(bytearray(4096))
        number = 100_000

        def per_call(fn) -> float:
            return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6

        results.append((f"{script} pread", per_call(lambda: layer.pread(buf, 4096, 0))
                        - per_call(lambda: module.pread(h, buf, 4096, 0))))
        results.append((f"{script} pwrite", per_call(lambda: layer.pwrite(buf, 4096, 0))
                        - per_call(lambda: module.pwrite(h, buf, 4096, 0))))
        layer.close()
    return results


def measure(tmp: str, workloads: dict[str, list[str]], args: argparse.Namespace, client_cpus: set[int],
            server_prefix: list[str]) -> dict[tuple[str, str, str], float]:
    """Median microseconds per request for each (server, workload, read|write), the client
    running on `client_cpus` and each server command prefixed with `server_prefix`."""
    os.sched_setaffinity(0, client_cpus)
    procs, handles = [], {}
    try:
        for server, program in SERVERS.items():
            for workload, plugin_args in workloads.items():
                sock = os.path.join(tmp, f"{server}-{len(procs)}.sock")
                server_process = Server([*server_prefix, *program, "-f", "-U", sock, *plugin_args], sock)
                procs.append(server_process)
                server_process.wait_for_socket(30)
                h = nbd.NBD()
                h.connect_uri(f"nbd+unix:///?socket={sock}")
                handles[server, workload] = h
        data = os.urandom(args.block)
        slots = DISK_SIZE // args.block
        offsets = [((i * 7919) % slots) * args.block for i in range(args.batch)]
        medians: dict[tuple[str, str, str], list[float]] = {}
        for kind in ("read", "write"):
            for h in handles.values():  # warm up: fill the disks, page in
                batch_median(h, kind, offsets, data)
            for turn in range(args.batches):
                keys = list(handles)
                keys = keys[turn % len(keys):] + keys[:turn % len(keys)]  # rotate who goes first
                for key in keys:
                    median = batch_median(handles[key], kind, offsets, data)
                    medians.setdefault((*key, kind), []).append(median)
        for h in handles.values():
            h.shutdown()
    finally:
        for server_process in procs:
            server_process.stop()
    return {key: statistics.median(values) for key, values in medians.items()}


def print_table(latency: dict[tuple[str, str, str], float], workloads: dict[str, list[str]]) -> None:
    print(f"{'workload':<17} {'request':<7} {'nbdkit':>8} {'nbdformats':>11} {'speed-up':>9}   "
          f"{'script cost: nbdkit':>20} {'nbdformats':>11}")
    for workload in workloads:
        for kind in ("read", "write"):
            row = [latency[server, workload, kind] for server in SERVERS]
            cost = ""
            if workload != "memory (native)":
                costs = [latency[server, workload, kind] - latency[server, "memory (native)", kind]
                         for server in SERVERS]
                cost = f"{costs[0]:>20.1f} {costs[1]:>11.1f}"
            print(f"{workload:<17} {kind:<7} {row[0]:>8.1f} {row[1]:>11.1f} {row[0] / row[1]:>8.2f}x   {cost}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=20, help="turns per server and placement (default 20)")
    parser.add_argument("--batch", type=int, default=250, help="requests per turn (default 250)")
    parser.add_argument("--block", type=int, default=4096, help="bytes per request (default 4096)")
    args = parser.parse_args()
    run = Run("python-plugin", vars(args))

    cpus = sorted(os.sched_getaffinity(0))
    placements = {"client and servers on one CPU": ({cpus[0]}, ["taskset", "-c", str(cpus[0])])}
    if len(cpus) > 1:
        placements["client on one CPU, servers on another"] = ({cpus[0]}, ["taskset", "-c", str(cpus[1])])
        placements["unpinned (the scheduler decides)"] = (set(cpus), [])
    with tempfile.TemporaryDirectory(prefix="bench-python-plugin-") as tmp:
        image = os.path.join(tmp, "disk.img")
        with open(image, "wb") as f:
            f.write(os.urandom(DISK_SIZE))
        workloads = {
            "memory (native)": ["memory", str(DISK_SIZE)],
            "ramdisk.py": ["python", str(SCRIPTS / "ramdisk.py"), f"size={DISK_SIZE}"],
            "file.py": ["python", str(SCRIPTS / "file.py"), f"file={image}"],
        }
        print(f"{args.block}-byte requests, queue depth 1, {args.batches} turns of {args.batch} per server: "
              "median microseconds per request; speed-up = nbdkit / nbdformats")
        results: dict[str, dict[str, float]] = {}
        for placement, (client_cpus, server_prefix) in placements.items():
            latency = measure(tmp, workloads, args, client_cpus, server_prefix)
            print(f"\n{placement}:")
            print_table(latency, workloads)
            results[placement] = {"|".join(key): value for key, value in latency.items()}
        os.sched_setaffinity(0, set(cpus))
        print("\nin process, what our plugin layer adds to one script call (no sockets):")
        overheads = layer_overhead(image)
        for label, overhead in overheads:
            print(f"  {label:<16} {overhead:6.2f} us")
        run.save({"latency_us": results, "layer_overhead_us": dict(overheads)})


if __name__ == "__main__":
    main()

"""stripe over 1, 2 and 4 local nbdformats servers: sequential read and write throughput with nbdcopy.

    .venv/bin/python benchmarks/bench_stripe.py [--size-mib 128] [--leg-rate 400M] [--repeat 3]

Each leg is `nbdformats file` serving a random file of size/N in the page cache, so the striped
disk has the same size whatever N is.  For each N a fresh front server runs `stripe` over the legs
and nbdcopy (4 connections, its defaults) copies the source into it (write) and the disk to
/dev/null (read); the best of --repeat runs is reported, and one read is checked by sha256.

Two settings, reported one after the other:
  unlimited  legs as fast as this machine serves them: everything shares the same cores, so this
             measures what the extra hop and the splitting cost;
  --leg-rate each leg limited by nbdformats' rate filter (bits/s, nbdkit's rate= syntax; default
             400M = 50 MiB/s): stands for servers on other machines, each limited by its disk or
             link, which is what striping is for.
Also reported for reference: the same file served directly by one nbdformats server (no stripe).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
from pathlib import Path

from _common import NBDFORMATS, MiB, Server, nbdcopy_sha256, timed
from _results import Run

STRIPE_SIZE = "1M"


def serve(args: list[str], sock: str) -> Server:
    server = Server([*NBDFORMATS, "-f", "-U", sock, *args], sock)
    server.wait_for_socket()
    return server


def measure(front: str, source: Path, size: int, repeat: int) -> tuple[float, float]:
    """(write MiB/s, read MiB/s), best of `repeat`."""
    writes = [timed("nbdcopy", source, front) for _ in range(repeat)]
    reads = [timed("nbdcopy", front, "null:") for _ in range(repeat)]
    return size / MiB / min(writes), size / MiB / min(reads)


def run_setting(work: Path, source: Path, size: int, legs_counts: list[int], rate: str | None,
                repeat: int) -> dict[str, dict[str, float]]:
    """MiB/s written and read by setup ("one server", "stripe over N")."""
    label = f"legs limited to {rate} bit/s each" if rate else "unlimited legs"
    print(f"\n{label} ({size // MiB} MiB disk, stripe-size={STRIPE_SIZE})")
    print(f"{'setup':<26}{'write MiB/s':>12}{'read MiB/s':>12}")
    expected = hashlib.sha256(source.read_bytes()).hexdigest()
    rate_filter, rate_param = (["--filter=rate"], [f"rate={rate}", "burstiness=0.1"]) if rate else ([], [])
    with serve([*rate_filter, "file", str(work / "direct.img"), *rate_param], str(work / "direct.sock")) as direct:
        write, read = measure(direct.uri, source, size, repeat)
    print(f"{'one server, no stripe':<26}{write:>12.0f}{read:>12.0f}")
    results = {"one server, no stripe": {"write": write, "read": read}}
    for count in legs_counts:
        servers: list[Server] = []
        try:
            for leg in range(count):
                image = work / f"leg{count}-{leg}.img"
                with open(image, "wb") as f:
                    f.truncate(size // count)
                servers.append(serve([*rate_filter, "file", str(image), *rate_param],
                                     str(work / f"leg{count}-{leg}.sock")))
            legs = [f"server={leg.uri}" for leg in servers]
            front = serve(["stripe", *legs, f"stripe-size={STRIPE_SIZE}"], str(work / f"front{count}.sock"))
            servers.append(front)
            write, read = measure(front.uri, source, size, repeat)
            if nbdcopy_sha256(front.uri) != expected:
                raise SystemExit(f"stripe over {count}: data read back differs from the source")
        finally:
            for server in servers:
                server.stop()
        print(f"{f'stripe over {count}':<26}{write:>12.0f}{read:>12.0f}")
        results[f"stripe over {count}"] = {"write": write, "read": read}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=128)
    parser.add_argument("--leg-rate", default="400M", help="rate= of each leg in the limited setting ('' to skip)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    size = args.size_mib * MiB
    record = Run("stripe", vars(args))
    with tempfile.TemporaryDirectory(prefix="bench-stripe-") as tmp:
        work = Path(tmp)
        source = work / "source.img"
        with open(source, "wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(MiB))
        with open(work / "direct.img", "wb") as f:
            f.truncate(size)
        print(f"{os.cpu_count()} CPUs; nbdcopy defaults (4 connections, 64 requests each)")
        results = {"unlimited": run_setting(work, source, size, [1, 2, 4], None, args.repeat)}
        if args.leg_rate:
            results["limited"] = run_setting(work, source, size, [1, 2, 4], args.leg_rate, args.repeat)
        record.save({"mib_per_s": results})


if __name__ == "__main__":
    main()

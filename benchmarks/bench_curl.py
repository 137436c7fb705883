"""Remote images: nbdformats' curl plugin vs nbdkit's, on the same nginx, in the same run.

    .venv/bin/python benchmarks/bench_curl.py [--size-mib 256] [--rounds 3] [--keep DIR]

A disk-like image (random, zero and text runs) and its xz form (`xz -1 --block-size=16MiB`)
are served by nginx on 127.0.0.1 (tests/fixtures/nginx.py; keep-alive, sendfile).  Each
variant starts a server on a Unix socket, and `nbdcopy --connections=N` copies the whole disk
to a pipe that is hashed (checked against the source) and timed:

  raw http    curl url=http://.../disk.img
  raw https   the same over TLS (cainfo= the test CA)
  xz          --filter=xz curl url=http://.../disk.img.xz

with N = 1 and 4 (ours also gets connections=N; nbdkit 1.32's curl plugin has no pool: one
libcurl handle per NBD connection, so N client connections are N HTTP connections there too,
when the server offers multi-conn).  Rounds interleave the servers; the table shows the
median MiB/s per variant and ours/nbdkit.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from _common import ENV, NBDFORMATS, MiB, Server, nbdcopy_sha256  # noqa: E402
from _results import Run  # noqa: E402
from fixtures.compressed import make_image  # noqa: E402
from fixtures.nginx import Nginx  # noqa: E402



def timed_copy(uri: str, connections: int) -> tuple[float, str]:
    """nbdcopy the whole disk to a pipe, hashing what arrives: (seconds, sha256)."""
    started = time.monotonic()
    digest = nbdcopy_sha256(uri, f"--connections={connections}", timeout=1800)
    return time.monotonic() - started, digest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="Keep (and reuse) the image files in this directory")
    args = parser.parse_args()
    run = Run("curl", {"size_mib": args.size_mib, "rounds": args.rounds})
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-curl-"))
    root = work / "root"
    root.mkdir(parents=True, exist_ok=True)
    image, xz = root / "disk.img", root / "disk.img.xz"
    size = args.size_mib * MiB
    if not image.exists() or image.stat().st_size != size:
        print(f"making a {args.size_mib} MiB image and its xz form (once)...", flush=True)
        make_image(image, size, seed=13)
        xz.unlink(missing_ok=True)
    if not xz.exists():
        with open(xz, "wb") as out:
            subprocess.run(["xz", "-1", "-T2", "--block-size=16MiB", "-c", image], stdout=out, check=True,
                           timeout=3600, env=ENV)
    expected = hashlib.sha256(image.read_bytes()).hexdigest()
    sock = work / "sock"
    nginx = Nginx(root, work / "nginx", workers=2).start()
    try:
        http, https = f"{nginx.url}/disk.img", f"{nginx.tls_url}/disk.img"
        variants: list[tuple[str, int, str, list]] = []
        for n in (1, 4):
            ours = [*NBDFORMATS, "-f", "-U", sock]
            nbdkit = ["nbdkit", "-f", "-r", "-U", sock]
            variants += [
                ("raw http", n, "nbdkit", [*nbdkit, "curl", f"url={http}"]),
                ("raw http", n, "ours", [*ours, "curl", f"url={http}", f"connections={n}"]),
                ("raw https", n, "nbdkit", [*nbdkit, "curl", f"url={https}", f"cainfo={nginx.ca_cert}"]),
                ("raw https", n, "ours", [*ours, "curl", f"url={https}", f"cainfo={nginx.ca_cert}",
                                          f"connections={n}"]),
                ("xz", n, "nbdkit", [*nbdkit, "--filter=xz", "curl", f"url={http}.xz"]),
                ("xz", n, "ours", [*ours, "--filter=xz", "curl", f"url={http}.xz", f"connections={n}"]),
            ]
        print(f"{args.size_mib} MiB image, xz {xz.stat().st_size // MiB} MiB; nginx on 127.0.0.1; "
              f"{args.rounds} rounds", flush=True)
        results: dict[tuple[str, int, str], list[float]] = {}
        for round_number in range(args.rounds):
            for label, n, server, argv in variants:
                with Server(argv, sock) as running:
                    running.wait_for_socket(120)
                    seconds, digest = timed_copy(running.uri, n)
                if digest != expected:
                    raise SystemExit(f"{server} {label}: the copy differs from the image")
                results.setdefault((label, n, server), []).append(args.size_mib / seconds)
            print(f"round {round_number + 1} done", flush=True)
    finally:
        nginx.stop()
    print(f"\n{'variant':12} {'conns':>5} {'nbdkit MiB/s':>13} {'ours MiB/s':>11} {'ours/nbdkit':>12}")
    medians: dict[str, float] = {}
    for label in ("raw http", "raw https", "xz"):
        for n in (1, 4):
            theirs = statistics.median(results[(label, n, "nbdkit")])
            ours = statistics.median(results[(label, n, "ours")])
            medians[f"{label}|{n}|nbdkit"], medians[f"{label}|{n}|ours"] = theirs, ours
            print(f"{label:12} {n:5} {theirs:13.0f} {ours:11.0f} {ours / theirs:11.2f}x")
    run.save({"mib_per_s": medians, "rounds": {"|".join(map(str, key)): values for key, values in results.items()}})
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

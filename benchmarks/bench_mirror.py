"""mirror: a rebuild's throughput against nbdcopy of the same copy, and a client's throughput during a rebuild.

    .venv/bin/python benchmarks/bench_mirror.py [--size-mib 512] [--client-mib 128] [--resync-rate 100M] [--rounds 3]

The two copies are `nbdformats file` servers on files in the page cache: the source holds --size-mib of
random data, the target starts empty (a sparse file).  Each round measures, one after the other:
  nbdcopy   nbdcopy (its defaults) copies the source server onto the target server;
  rebuild   a mirror starts with a state file that says the target is stale, and rebuilds it at full speed:
            from the log's "rebuilding" line to the state file saying it is in sync (both watched from here);
  client    nbdcopy writes --client-mib of random data into the mirror, then reads the whole disk, with both
            copies in sync ("idle"), then while a rebuild limited to --resync-rate runs ("during rebuild"); a
            round whose rebuild ended before the client was done says so ("overlapped": false).
The target is emptied before each nbdcopy and rebuild.  Medians of the rounds are reported, and the raw
results saved under benchmarks/results/ (benchmarks/_results.py), from which benchmarks/tables.py makes the
table in docs/plugins/mirror.md.

Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from _common import NBDFORMATS, MiB, Server, timed
from _results import Run

POLL = 0.005  # seconds between looks at the mirror's log and state file


def serve_file(image: Path, sock: Path) -> Server:
    server = Server([*NBDFORMATS, "-f", "-U", sock, "file", image], sock)
    server.wait_for_socket()
    return server


def empty(image: Path, size: int) -> None:
    with open(image, "wb") as f:
        f.truncate(size)


def write_state(path: Path, size: int, source: Server, target: Server) -> None:
    """The state file of docs/plugins/mirror.md: the source in sync, the target stale."""
    path.write_text(json.dumps({"format": "nbdformats-mirror-state", "version": 1, "size": size,
                                "copies": {source.uri: "in-sync", target.uri: "stale"}}))


def target_in_sync(state: Path, target: Server) -> bool:
    return json.loads(state.read_text())["copies"][target.uri] == "in-sync"


def start_mirror(work: Path, state: Path, source: Server, target: Server, *extra: str) -> Server:
    sock, log = work / "mirror.sock", work / "mirror.log"
    mirror = Server([*NBDFORMATS, "-f", "-U", sock, "mirror", f"server={source.uri}", f"server={target.uri}",
                     f"state={state}", *extra], sock, log)
    mirror.wait_for_socket()
    return mirror


def wait_until(condition, mirror: Server, timeout: float = 3600) -> float:
    """When `condition()` became true (time.perf_counter())."""
    deadline = time.monotonic() + timeout
    while not condition():
        mirror.check_running()
        if time.monotonic() > deadline:
            raise mirror.fail(f"nothing happened in {timeout:.0f} s")
        time.sleep(POLL)
    return time.perf_counter()


def measure_client(mirror: Server, client_source: Path) -> tuple[float, float]:
    """Seconds to write the client's data into the mirror, and to read the whole disk back."""
    return timed("nbdcopy", client_source, mirror.uri), timed("nbdcopy", mirror.uri, "null:")


def one_round(work: Path, size: int, client_source: Path, resync_rate: str) -> dict:
    result: dict = {}
    source = serve_file(work / "source.img", work / "source.sock")
    state = work / "state.json"
    try:
        empty(work / "target.img", size)
        with serve_file(work / "target.img", work / "target.sock") as target:
            result["nbdcopy_s"] = timed("nbdcopy", source.uri, target.uri)
        empty(work / "target.img", size)
        with serve_file(work / "target.img", work / "target.sock") as target:
            write_state(state, size, source, target)
            with start_mirror(work, state, source, target) as mirror:
                log = work / "mirror.log"
                started = wait_until(lambda: "rebuilding server 1" in log.read_text(), mirror)
                result["rebuild_s"] = wait_until(lambda: target_in_sync(state, target), mirror) - started
                result["idle_write_s"], result["idle_read_s"] = measure_client(mirror, client_source)
        empty(work / "target.img", size)
        with serve_file(work / "target.img", work / "target.sock") as target:
            write_state(state, size, source, target)
            with start_mirror(work, state, source, target, f"resync-rate={resync_rate}") as mirror:
                wait_until(lambda: "rebuilding server 1" in (work / "mirror.log").read_text(), mirror)
                result["during_write_s"], result["during_read_s"] = measure_client(mirror, client_source)
                result["overlapped"] = not target_in_sync(state, target)
    finally:
        source.stop()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=512, help="the disk (default 512)")
    parser.add_argument("--client-mib", type=int, default=128, help="what the client writes (default 128)")
    parser.add_argument("--resync-rate", default="100M", help="resync-rate= of the rebuild the client runs "
                                                              "alongside (default 100M)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not 0 < args.client_mib <= args.size_mib:
        parser.error("--client-mib must be from 1 to --size-mib")
    record = Run("bench_mirror", vars(args))
    size = args.size_mib * MiB
    with tempfile.TemporaryDirectory(prefix="bench-mirror-") as tmp:
        work = Path(tmp)
        with open(work / "source.img", "wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(MiB))
        client_source = work / "client.img"
        client_source.write_bytes(os.urandom(args.client_mib * MiB))
        rounds = [one_round(work, size, client_source, args.resync_rate) for _ in range(args.rounds)]

    def median_mib_s(key: str, mib: int) -> float:
        return round(mib / statistics.median(r[key] for r in rounds), 1)

    summary = {
        "nbdcopy_mib_s": median_mib_s("nbdcopy_s", args.size_mib),
        "rebuild_mib_s": median_mib_s("rebuild_s", args.size_mib),
        **{f"{when}_{what}_mib_s": median_mib_s(f"{when}_{what}_s", args.client_mib if what == "write" else
                                                 args.size_mib)
           for when in ("idle", "during") for what in ("write", "read")},
        "all_overlapped": all(r["overlapped"] for r in rounds),
    }
    print(f"{args.size_mib} MiB disk, {args.rounds} rounds (medians), MiB/s:")
    for key, value in summary.items():
        print(f"  {key:<24}{value}")
    record.save({"rounds": rounds, "summary": summary})


if __name__ == "__main__":
    main()

"""nbdformats-stats: draw the JSON lines of `nbdformats --stats-json=PATH` as a PNG.

    nbdformats-stats stats.jsonl -o stats.png

Three panels over time: throughput (MiB/s) per operation, requests per second, and latency
(p50 solid, p99 dashed, log scale).  The file may hold several runs of the server (one per
"start" line); the last one is drawn unless --run picks another.  Needs matplotlib
(`pip install 'nbdformats[stats]'`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable

MIB = 1 << 20
# Operations that move data: their bytes are throughput.  The others have counts and latency.
DATA_OPERATIONS = ("read", "write")
ORDER = ("read", "write", "zero", "trim", "flush", "extents", "cache", "resize")


class StatsFileError(Exception):
    pass


@dataclass
class Run:
    """One run of the server: its start line and its interval lines in order."""

    start: dict[str, Any]
    intervals: list[dict[str, Any]] = field(default_factory=list)
    stopped: bool = False

    @property
    def interval(self) -> float:
        return float(self.start.get("interval", 1.0))

    def operations(self) -> list[str]:
        seen = {name for line in self.intervals for name in line["ops"]}
        return [name for name in ORDER if name in seen] + sorted(seen - set(ORDER))


def load_runs(lines: Iterable[str]) -> list[Run]:
    """Parse the JSON lines of a stats file into runs; a clear error for anything malformed."""
    runs: list[Run] = []
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
            event = line["event"]
        except (ValueError, TypeError, KeyError):
            raise StatsFileError(f"line {number}: not a line written by --stats-json") from None
        if event == "start":
            runs.append(Run(line))
        elif not runs:
            raise StatsFileError(f"line {number}: {event!r} before any start line")
        elif event == "interval":
            if not isinstance(line.get("ops"), dict) or "elapsed" not in line:
                raise StatsFileError(f"line {number}: interval line without ops or elapsed")
            runs[-1].intervals.append(line)
        elif event == "stop":
            runs[-1].stopped = True
    return runs


@dataclass
class Series:
    """What the panels draw for one operation: x in seconds since the start."""

    time: list[float] = field(default_factory=list)
    mib_per_s: list[float] = field(default_factory=list)
    ops_per_s: list[float] = field(default_factory=list)
    p50_us: list[float] = field(default_factory=list)
    p99_us: list[float] = field(default_factory=list)


def series(run: Run) -> dict[str, Series]:
    """Per operation: rates and latencies at the middle of each interval.

    Intervals without requests are missing from the file; rates drop to zero there and
    latency lines break (NaN), so idle time looks idle.
    """
    result = {name: Series() for name in run.operations()}
    previous_end: float | None = None
    for line in run.intervals:
        end = float(line["elapsed"])
        seconds = max(float(line.get("seconds", run.interval)), 1e-9)
        if previous_end is not None and end - seconds > previous_end + run.interval / 2:
            for s in result.values():  # an idle gap
                for t in (previous_end + run.interval / 2, end - seconds - run.interval / 2):
                    s.time.append(t)
                    s.mib_per_s.append(0.0)
                    s.ops_per_s.append(0.0)
                    s.p50_us.append(math.nan)
                    s.p99_us.append(math.nan)
        middle = end - seconds / 2
        for name, s in result.items():
            op = line["ops"].get(name)
            s.time.append(middle)
            if op is None:
                s.mib_per_s.append(0.0)
                s.ops_per_s.append(0.0)
                s.p50_us.append(math.nan)
                s.p99_us.append(math.nan)
                continue
            s.mib_per_s.append(op.get("bytes", 0) / MIB / seconds)
            s.ops_per_s.append(op.get("count", 0) / seconds)
            latency = op.get("latency_us", {})
            s.p50_us.append(float(latency.get("p50", math.nan)))
            s.p99_us.append(float(latency.get("p99", math.nan)))
        previous_end = end
    return result


def plot(run: Run, output: str, title: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    data = series(run)
    figure, (throughput, rate, latency) = plt.subplots(3, 1, figsize=(10, 9), sharex=True,
                                                       constrained_layout=True)
    colors = {name: f"C{index}" for index, name in enumerate(data)}
    for name, s in data.items():
        if name in DATA_OPERATIONS:
            throughput.plot(s.time, s.mib_per_s, color=colors[name], label=name)
        rate.plot(s.time, s.ops_per_s, color=colors[name], label=name)
        latency.plot(s.time, s.p50_us, color=colors[name], label=f"{name} p50")
        latency.plot(s.time, s.p99_us, color=colors[name], linestyle="--", label=f"{name} p99")
    throughput.set_ylabel("throughput (MiB/s)")
    rate.set_ylabel("requests per second")
    latency.set_ylabel("latency (µs)")
    latency.set_yscale("log")
    latency.set_xlabel("seconds since the server started")
    for axes in (throughput, rate, latency):
        axes.grid(True, alpha=0.3)
        if axes.get_legend_handles_labels()[0]:  # beside the panel: the lines stay visible
            axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    latency.set_xlim(left=0)
    throughput.set_ylim(bottom=0)
    rate.set_ylim(bottom=0)
    start = run.start
    what = " ".join([*(f"--filter={f}" for f in start.get("filters", [])), start.get("plugin", "")]).strip()
    figure.suptitle(title or f"nbdformats {what}".strip() + f" (one point per {run.interval:g} s)")
    figure.savefig(output, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nbdformats-stats",
                                     description="Plot the throughput and latency recorded by "
                                                 "nbdformats --stats-json=PATH as a PNG.")
    parser.add_argument("path", help="the file written by --stats-json")
    parser.add_argument("-o", "--output", help="the PNG to write (default: PATH.png)")
    parser.add_argument("--run", type=int, default=-1,
                        help="which run of the server to draw when the file holds several: 1 for the "
                             "first, -1 (default) for the last")
    parser.add_argument("--title", help="the plot's title")
    args = parser.parse_args(argv)
    try:
        with open(args.path, encoding="utf-8") as f:
            runs = load_runs(f)
        if not runs:
            raise StatsFileError("no start line: is this a file written by --stats-json?")
        if args.run == 0 or not -len(runs) <= args.run <= len(runs):
            raise StatsFileError(f"--run {args.run}: the file holds {len(runs)} run(s)")
        run = runs[args.run - 1 if args.run > 0 else args.run]
        if not run.intervals:
            raise StatsFileError("the server recorded no requests in this run: nothing to plot")
        if importlib.util.find_spec("matplotlib") is None:
            raise StatsFileError("matplotlib is needed: pip install 'nbdformats[stats]' "
                                 "(or apt-get install python3-matplotlib)")
        output = args.output or f"{args.path}.png"
        plot(run, output, args.title)
    except (OSError, StatsFileError) as e:
        print(f"nbdformats-stats: error: {e}", file=sys.stderr)
        return 1
    total = sum(op["count"] for line in run.intervals for op in line["ops"].values())
    print(f"{output}: {total} requests over {run.intervals[-1]['elapsed']:.1f} s")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

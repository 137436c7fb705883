"""Raw benchmark results kept with what produced them, and the tables in the docs made from them.

Every benchmark run writes one JSON file under benchmarks/results/: the benchmark's name, the commit it
measured (and whether the tree had uncommitted changes), the date, the machine (CPUs, load average
before the run), the arguments, and its raw measurements.  A run that started on a busy machine (load
average over QUIET_LOAD) is saved but marked void, and tables leave it out.  `benchmarks/tables.py`
rewrites the tables in README.md and docs/ from the newest valid file of each benchmark.

Standard library only: the benchmarks run under Debian's python3 without the virtualenv.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
QUIET_LOAD = 0.5  # the one-minute load average above which a run does not count


def load_average() -> float:
    return os.getloadavg()[0]


def commit() -> tuple[str, bool]:
    """The commit measured and whether the work tree differed from it."""
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout.strip())
    return head, dirty


class Run:
    """One benchmark run: note the machine state first, save everything at the end."""

    def __init__(self, name: str, arguments: dict[str, Any]) -> None:
        self.name = name
        self.arguments = arguments
        self.started = datetime.datetime.now(datetime.timezone.utc)
        self.load_before = load_average()
        self.commit, self.dirty = commit()
        self.void = self.load_before > QUIET_LOAD
        if self.void:
            print(f"warning: load average {self.load_before:.2f} > {QUIET_LOAD} before the run: "
                  "its figures are void (saved, marked void, left out of the tables)", flush=True)

    def save(self, results: Any) -> Path:
        RESULTS.mkdir(parents=True, exist_ok=True)
        stamp = self.started.strftime("%Y%m%dT%H%M%SZ")
        path = RESULTS / f"{self.name}-{stamp}-{self.commit}{'-dirty' if self.dirty else ''}.json"
        record = {
            "benchmark": self.name, "commit": self.commit, "dirty": self.dirty,
            "started": self.started.isoformat(timespec="seconds"),
            "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpus": os.cpu_count(), "load_before": round(self.load_before, 2), "load_after": round(load_average(), 2),
            "void": self.void, "arguments": self.arguments, "results": results,
        }
        path.write_text(json.dumps(record, indent=1) + "\n")
        print(f"raw results: {path.relative_to(ROOT)}", flush=True)
        return path


def newest(name: str) -> dict[str, Any] | None:
    """The newest valid (not void, committed tree) run of a benchmark, or None."""
    for path in sorted(RESULTS.glob(f"{name}-*.json"), reverse=True):
        record = json.loads(path.read_text())
        if record["benchmark"] == name and not record["void"] and not record["dirty"]:
            record["file"] = str(path.relative_to(ROOT))
            return record
    return None

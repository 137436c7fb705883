#!/usr/bin/python3
"""Rewrite the benchmark tables in README.md and docs/ from the raw results in benchmarks/results/.

    /usr/bin/python3 benchmarks/tables.py          # rewrite
    /usr/bin/python3 benchmarks/tables.py --check  # exit 1 if a table differs from what the results give

A table lives between `<!-- table:NAME -->` and `<!-- /table -->` in a Markdown file; NAME says which
benchmark and which part (TABLES below).  Each is made from the newest run of its benchmark that is not
void (load average over 0.5 before it started) and measured a committed tree; the line under it names the
results file.  Nothing is copied by hand.
"""

from __future__ import annotations

import re
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

from _results import ROOT, newest

LABELS = {
    "seq_write": "sequential write, 4 connections (MB/s)", "seq_write_c1": "sequential write, 1 connection (MB/s)",
    "seq_read": "sequential read, 4 connections (MB/s)", "seq_read_c1": "sequential read, 1 connection (MB/s)",
    "randwrite_qd16": "random 4 KiB writes, QD16 (IOPS)", "randwrite_qd1": "random 4 KiB writes, QD1 (IOPS)",
    "randread_qd16": "random 4 KiB reads, QD16 (IOPS)", "randread_qd1": "random 4 KiB reads, QD1 (IOPS)",
}


def source_line(record: dict[str, Any]) -> str:
    rounds = record["arguments"].get("rounds")
    return (f"*From `{record['file']}`: commit {record['commit']}, {record['started'][:10]}, "
            + (f"{rounds} interleaved rounds (medians), " if rounds else "")
            + f"{record['cpus']} CPUs, load average {record['load_before']} before the run.*")


def core_table(kind: str) -> Callable[[dict[str, Any]], str]:
    """nbdformats against nbdkit (and qemu-nbd for files): speed, and server CPU per unit of work."""
    def table(record: dict[str, Any]) -> str:
        summary = record["results"]["summary"]
        ours, theirs, qemu = summary[f"nbdformats {kind}"], summary[f"nbdkit {kind}"], summary.get(f"qemu-nbd {kind}")
        head = f"| workload | nbdkit {kind} | nbdformats {kind} |" + (" qemu-nbd |" if qemu else "") + \
            " speed vs nbdkit | server CPU vs nbdkit |"
        lines = [head, "|---" * (head.count("|") - 1) + "|"]
        for workload, label in LABELS.items():
            o, t = ours[workload], theirs[workload]
            unit = "ms/GiB" if workload.startswith("seq") else "us/req"
            row = f"| {label} | {t['value']:.0f} ({t['cpu']:.0f} {unit}) | {o['value']:.0f} ({o['cpu']:.0f} {unit}) |"
            if qemu:
                q = qemu[workload]
                row += f" {q['value']:.0f} ({q['cpu']:.0f} {unit}) |"
            row += f" {o['value'] / t['value']:.2f}x | {o['cpu'] / t['cpu']:.2f}x |"
            lines.append(row)
        rss = f"| peak RSS (MB) | {theirs['peak_rss']['value']:.0f} | {ours['peak_rss']['value']:.0f} |"
        lines.append(rss + (f" {qemu['peak_rss']['value']:.0f} |" if qemu else "") + " | |")
        return "\n".join(lines) + "\n\n" + source_line(record)
    return table


def python_plugin_table(record: dict[str, Any]) -> str:
    """Microseconds per request at queue depth 1 under nbdkit and under nbdformats, per CPU placement."""
    latency = record["results"]["latency_us"]
    placements = list(latency)
    head = "| script | request | " + " | ".join(f"{p}: nbdkit / nbdformats (speed-up)" for p in placements) + " |"
    lines = [head, "|---" * (2 + len(placements)) + "|"]
    for workload in ("memory (native)", "ramdisk.py", "file.py"):
        for kind in ("read", "write"):
            cells = []
            for placement in placements:
                theirs = latency[placement][f"nbdkit|{workload}|{kind}"]
                ours = latency[placement][f"nbdformats|{workload}|{kind}"]
                cells.append(f"{theirs:.1f} / {ours:.1f} us ({theirs / ours:.2f}x)")
            lines.append(f"| {workload} | {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + source_line(record)


def curl_table(record: dict[str, Any]) -> str:
    """MiB/s copying the image through the curl plugin, nbdkit's and ours, from one nginx."""
    medians = record["results"]["mib_per_s"]
    lines = ["| variant | connections | nbdkit (MiB/s) | nbdformats (MiB/s) | nbdformats/nbdkit |", "|---|---|---|---|---|"]
    for label in ("raw http", "raw https", "xz"):
        for n in (1, 4):
            theirs, ours = medians[f"{label}|{n}|nbdkit"], medians[f"{label}|{n}|ours"]
            lines.append(f"| {label} | {n} | {theirs:.0f} | {ours:.0f} | {ours / theirs:.2f}x |")
    return "\n".join(lines) + "\n\n" + source_line(record)


def two_server_table(first: str, second: str) -> Callable[[dict[str, Any]], str]:
    """Median of each workload for two servers (or tools) and the ratio second/first."""
    def table(record: dict[str, Any]) -> str:
        medians = record["results"]["medians"]
        lines = [f"| workload | {first} | {second} | {second}/{first} |", "|---|---|---|---|"]
        for workload, theirs in medians[first].items():
            ours = medians[second].get(workload)
            if ours is not None:
                ratio = f"{ours / theirs:.2f}x" if theirs and "RSS" not in workload else ""
                lines.append(f"| {workload} | {theirs:.0f} | {ours:.0f} | {ratio} |")
        return "\n".join(lines) + "\n\n" + source_line(record)
    return table


def mirror_table(record: dict[str, Any]) -> str:
    """A rebuild against nbdcopy of the same copy, and a client with and without a rebuild running."""
    s, arguments = record["results"]["summary"], record["arguments"]
    rate = arguments["resync_rate"]
    lines = ["| measurement | MiB/s |", "|---|---|",
             f"| nbdcopy of the source server onto an empty server | {s['nbdcopy_mib_s']:.0f} |",
             f"| mirror rebuild of the same copy, full speed | {s['rebuild_mib_s']:.0f} "
             f"({s['rebuild_mib_s'] / s['nbdcopy_mib_s']:.2f}x nbdcopy) |"]
    for what, label in (("write", f"client nbdcopy writing {arguments['client_mib']} MiB"),
                        ("read", "client nbdcopy reading the disk")):
        lines.append(f"| {label}, copies in sync / during a rebuild at resync-rate={rate} | "
                     f"{s[f'idle_{what}_mib_s']:.0f} / {s[f'during_{what}_mib_s']:.0f} |")
    note = "" if s["all_overlapped"] else " Some rebuilds ended before the client did."
    return "\n".join(lines) + "\n\n" + source_line(record) + note


def stripe_table(record: dict[str, Any]) -> str:
    """Write and read MiB/s through stripe over 1, 2 and 4 legs, with legs unlimited and rate-limited."""
    results = record["results"]["mib_per_s"]
    limited = results.get("limited")
    rate = record["arguments"]["leg_rate"]
    head = "| setup | legs unlimited: write / read MiB/s |" + (f" legs limited to {rate} bit/s each: write / read MiB/s |"
                                                              if limited else "")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for setup, figures in results["unlimited"].items():
        row = f"| {setup} | {figures['write']:.0f} / {figures['read']:.0f} |"
        if limited:
            row += f" {limited[setup]['write']:.0f} / {limited[setup]['read']:.0f} |"
        lines.append(row)
    return "\n".join(lines) + "\n\n" + source_line(record) + " Best of the repeats."


def compress_table(fmt: str) -> Callable[[dict[str, Any]], str]:
    """One format's variants of bench_compress.py: time to the first 4 KiB from server start, full
    read speed, start to copied (the median over rounds of both together), and the full read and
    start to copied against nbdkit's filter on the same file (where nbdkit has one)."""
    def table(record: dict[str, Any]) -> str:
        rows = [r for r in record["results"]["medians"] if r["format"] == fmt]
        rounds = record["results"]["rounds"]
        reference = next((r for r in rows if r["server"] == "nbdkit"), None)
        size = record["arguments"]["size_mib"]

        def start_to_copied(row: dict[str, Any]) -> float:
            r = rounds[row["label"]]
            return statistics.median(a + b for a, b in zip(r["first_4k_s"], r["full_read_s"]))

        with_cpu = all("full_read_cpu_s" in r for r in rows)
        lines = [f"| {size} MiB image | first 4 KiB from start (s) | full read (MiB/s) |"
                 + (" server CPU in the full read (s) |" if with_cpu else "") + " start to copied (s) |"
                 + (" full read / start to copied vs nbdkit |" if reference else ""),
                 "|---|---|---|---|" + ("---|" if with_cpu else "") + ("---|" if reference else "")]
        for r in rows:
            line = (f"| {r['label']} | {r['first_4k_s']:.2f} | {r['mib_per_s']:.0f} |"
                    + (f" {r['full_read_cpu_s']:.2f} |" if with_cpu else "") + f" {start_to_copied(r):.2f} |")
            if reference:
                if r is not reference:
                    line += (f" {r['mib_per_s'] / reference['mib_per_s']:.2f}x /"
                             f" {start_to_copied(reference) / start_to_copied(r):.2f}x")
                line += " |"
            lines.append(line)
        return "\n".join(lines) + "\n\n" + source_line(record)
    return table


def inflaters_table(record: dict[str, Any]) -> str:
    """bench_compress.py's in-process gzip inflate: index pass and sequential read per inflate."""
    inflaters = record["results"].get("inflaters")
    if not inflaters:
        return "*The newest run of `compress` predates this table: run bench_compress.py again.*"
    size = record["arguments"]["size_mib"]
    lines = [f"| inflate ({size} MiB image, in-process) | index pass (s) | sequential read behind it (s) |",
             "|---|---|---|"]
    for name, m in inflaters.items():
        lines.append(f"| {name} | {m['index_s']:.2f} | {m['read_s']:.2f} |")
    return "\n".join(lines) + "\n\n" + source_line(record)


def luks_servers_table(record: dict[str, Any]) -> str:
    """bench_luks.py: nbdcopy read and write MB/s through the luks filter, nbdkit's and ours."""
    lines = ["| image | server | read (MB/s) | write (MB/s) | read / write vs nbdkit |", "|---|---|---|---|---|"]
    for image, servers in record["results"]["servers_mb_per_s"].items():
        theirs = servers.get("nbdkit")
        for name, m in servers.items():
            ratio = (f"{m['read'] / theirs['read']:.2f}x / {m['write'] / theirs['write']:.2f}x"
                     if theirs and name != "nbdkit" else "")
            lines.append(f"| {image} | {name} | {m['read']:.0f} | {m['write']:.0f} | {ratio} |")
    return "\n".join(lines) + "\n\n" + source_line(record)


def luks_cipher_table(record: dict[str, Any]) -> str:
    """bench_luks.py: in-process decrypt and encrypt MB/s of each cipher implementation."""
    lines = ["| cipher | implementation | decrypt (MB/s) | encrypt (MB/s) |", "|---|---|---|---|"]
    for case, implementations in record["results"]["cipher_mb_per_s"].items():
        for implementation, m in implementations.items():
            lines.append(f"| {case} | {implementation} | {m['decrypt']:.0f} | {m['encrypt']:.0f} |")
    return "\n".join(lines) + "\n\n" + source_line(record)


def floppy_table(record: dict[str, Any]) -> str:
    """Start-up time, peak RSS and a whole-disk copy: nbdkit floppy against ours, on one tree."""
    medians, arguments = record["results"]["medians"], record["arguments"]
    theirs, ours = medians["nbdkit"], medians["nbdformats"]
    rows = (("ready: spawn to a client's handshake (s)", "startup_s", ".2f"),
            ("peak RSS when ready (MiB)", "rss_ready_mib", ".0f"),
            ("nbdcopy of the whole disk to null: (s)", "copy_s", ".2f"),
            ("peak RSS after the copy (MiB)", "rss_after_copy_mib", ".0f"))
    lines = [f"{arguments['files']} files in directories of {arguments['per_dir']} and a sparse "
             f"{arguments['big_gib']} GiB file:", "",
             "| measure | nbdkit | nbdformats | nbdformats/nbdkit |", "|---|---|---|---|"]
    for label, key, spec in rows:
        lines.append(f"| {label} | {theirs[key]:{spec}} | {ours[key]:{spec}} | {ours[key] / theirs[key]:.2f}x |")
    return "\n".join(lines) + "\n\n" + source_line(record)


def linuxdisk_table(record: dict[str, Any]) -> str:
    """Start-up (the whole filesystem build) on one flat directory of N empty files, nbdkit's and ours."""
    medians, arguments = record["results"]["medians"], record["arguments"]

    def cell(result: dict[str, Any]) -> str:
        if "failed" in result:
            return f"fails: {result['failed']}"
        return f"{result['startup_s']:.2f} s, {result['rss_ready_mib']:.0f} MiB"

    lines = [f"{arguments['type']}, one directory of N empty files; ready (spawn to a client's handshake) "
             "and peak RSS:", "", "| N | nbdkit linuxdisk | nbdformats linuxdisk |", "|---|---|---|"]
    for files, per_server in medians.items():
        lines.append(f"| {int(files):,} | {cell(per_server['nbdkit'])} | {cell(per_server['nbdformats'])} |")
    return "\n".join(lines) + "\n\n" + source_line(record)


def images_table(record: dict[str, Any]) -> str:
    """bench_images.py: each image variant's first 4 KiB and full read, ours against qemu-nbd's on the same file."""
    rows = {r["variant"]: r for r in record["results"]}
    size = record["arguments"]["size_mib"]
    lines = [f"| {size} MiB disk | first 4 KiB from start (s) | full read (MiB/s) | vs qemu-nbd |", "|---|---|---|---|"]
    for label, r in rows.items():
        theirs = rows.get(label.replace("ours ", "qemu-nbd ", 1)) if label.startswith("ours ") else None
        ratio = f"{r['mib_per_s'] / theirs['mib_per_s']:.2f}x" if theirs else ""
        wrong = "" if r["same_bytes"] else " (bytes differ!)"
        lines.append(f"| {label}{wrong} | {r['first_4k_s']:.2f} | {r['mib_per_s']:.0f} | {ratio} |")
    return "\n".join(lines) + "\n\n" + source_line(record)


TABLES: dict[str, tuple[str, Callable[[dict[str, Any]], str]]] = {
    "compress-gzip": ("compress", compress_table("gzip")),
    "compress-xz": ("compress", compress_table("xz")),
    "compress-zstd": ("compress", compress_table("zstd")),
    "compress-inflaters": ("compress", inflaters_table),
    "luks-servers": ("luks", luks_servers_table),
    "luks-cipher": ("luks", luks_cipher_table),
    "ceph-rbd": ("ceph-rbd", two_server_table("rbd bench (librbd)", "nbdformats rbd")),
    "ceph-s3": ("ceph-s3", two_server_table("nbdkit S3", "nbdformats S3")),
    "curl": ("curl", curl_table),
    "floppy": ("floppy", floppy_table),
    "linuxdisk": ("linuxdisk", linuxdisk_table),
    "python-plugin": ("python-plugin", python_plugin_table),
    "core-memory": ("core", core_table("memory")),
    "core-file": ("core", core_table("file")),
    "core-nbd": ("core-nbd", core_table("nbd")),
    "mirror-resync": ("bench_mirror", mirror_table),
    "stripe": ("stripe", stripe_table),
    "images": ("images", images_table),
}
MARKER = re.compile(r"(<!-- table:([\w-]+) -->\n)(.*?)(<!-- /table -->)", re.S)


def render(text: str) -> str:
    def replace(match: re.Match[str]) -> str:
        name = match.group(2)
        if name not in TABLES:
            raise SystemExit(f"unknown table {name!r}")
        benchmark, make = TABLES[name]
        record = newest(benchmark)
        body = make(record) if record else f"*No valid run of `{benchmark}` yet: run the benchmark on a quiet machine.*"
        return f"{match.group(1)}{body}\n{match.group(4)}"
    return MARKER.sub(replace, text)


def main() -> int:
    check = "--check" in sys.argv[1:]
    stale = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), ROOT / "benchmarks" / "README.md"]:
        text = path.read_text()
        if "<!-- table:" not in text:
            continue
        updated = render(text)
        if updated != text:
            stale.append(str(path.relative_to(ROOT)))
            if not check:
                path.write_text(updated)
    if check and stale:
        print("tables out of date (run benchmarks/tables.py):", ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

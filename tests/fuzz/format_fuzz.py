#!/usr/bin/env python3
"""Format fuzzer: mutated gzip/xz/zstd streams, tar/zip archives, LUKS1/LUKS2 headers (and
LUKS2 JSON), XVA exports (ova.xml, entity bombs) served through their filters, and hostile
directories for the floppy and linuxdisk plugins.

Each case opens the chain in-process and reads the disk (its start, middle and end).  The
only acceptable failures are ConfigError (start-up) and NBDError (open or a request); any
other exception, or a case slower than --case-timeout, is a finding.  Run one format per
process, so that a crash or hang in a C library shows up as such:

    .venv/bin/python tests/fuzz/format_fuzz.py --format tar --cases 5000 --seed 1
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from nbdformats.api.chain import Chain  # noqa: E402
from nbdformats.api.errors import ConfigError, NBDError  # noqa: E402
from nbdformats.registry import load_filter, load_plugin  # noqa: E402

PATH_ENV = "/usr/bin:/usr/sbin:/bin:/sbin:" + os.environ.get("PATH", "")
DISK = bytes(range(256)) * 1024 * 2 + os.urandom(256 << 10) + bytes(256 << 10)  # 1 MiB: text, noise, zeroes
PASSPHRASE = b"fuzz passphrase"


def sh(*cmd: str | Path) -> None:
    subprocess.run([str(c) for c in cmd], check=True, capture_output=True, timeout=60, env=dict(os.environ, PATH=PATH_ENV))


# -- Valid seeds, made once per run ----------------------------------------------------------
def seed_file(fmt: str, work: Path) -> tuple[Path, list[tuple[str, list[tuple[str, str]]]]]:
    """A valid input of this format and the filters (with parameters) that serve it."""
    raw = work / "disk.img"
    raw.write_bytes(DISK)
    if fmt == "gzip":
        sh("gzip", "-k", "-9", raw)
        return work / "disk.img.gz", [("gzip", [])]
    if fmt == "xz":
        sh("xz", "-k", "--block-size=65536", raw)
        return work / "disk.img.xz", [("xz", [])]
    if fmt == "zstd":
        from fixtures.compressed import seekable_zstd
        return seekable_zstd(DISK, work / "disk.zst", frame_size=65536), [("zstd", [])]
    if fmt == "tar":
        with tarfile.open(work / "a.tar", "w", format=tarfile.PAX_FORMAT) as tar:
            tar.add(raw, "dir/disk.img")
        return work / "a.tar", [("tar", [("tar-entry", "dir/disk.img")])]
    if fmt == "zip":
        with zipfile.ZipFile(work / "a.zip", "w", zipfile.ZIP_DEFLATED) as z:
            z.write(raw, "disk.img")
        return work / "a.zip", [("zip", [("zip-entry", "disk.img")])]
    if fmt in ("luks1", "luks2"):
        from fixtures.luks import cryptsetup_format, fast_pbkdf
        key = work / "key"
        key.write_bytes(PASSPHRASE)
        options = fast_pbkdf("pbkdf2" if fmt == "luks1" else "argon2id")
        image = cryptsetup_format(work / "luks.img", key, fmt, (16 << 20) + (1 << 20) if fmt == "luks2" else 4 << 20,
                                  *options)
        return image, [("luks", [("keyfile", str(key))])]
    if fmt == "xva":
        from fixtures.xva import XvaDisk, make_xva
        return make_xva(work / "vm.xva", [XvaDisk(DISK)]), [("xva", [])]
    raise SystemExit(f"unknown format {fmt}")


# -- Mutations ---------------------------------------------------------------------------------
def mutate_bytes(rng: random.Random, data: bytes, hot: int) -> bytes:
    """Flip, overwrite with extreme values, insert, delete or truncate; mostly within `hot` bytes."""
    raw = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        if not raw:
            break
        span = hot if rng.random() < 0.8 else len(raw)
        pos = rng.randrange(max(1, min(span, len(raw))))
        kind = rng.random()
        if kind < 0.4:
            raw[pos] ^= 1 << rng.randrange(8)
        elif kind < 0.6:
            raw[pos:pos + 8] = rng.choice([b"\xff" * 8, b"\0" * 8, b"\x7f" + b"\xff" * 7, b"\x80" + b"\0" * 7])
        elif kind < 0.7:
            raw[pos:pos] = rng.randbytes(rng.randint(1, 512))
        elif kind < 0.8:
            del raw[pos:pos + rng.randint(1, 512)]
        elif kind < 0.9:
            del raw[rng.randrange(len(raw)):]  # truncation
        else:
            raw[pos] = rng.randrange(256)
    return bytes(raw)


def mutate_luks2_json(rng: random.Random, image: Path, out: Path) -> None:
    from fixtures.luks import rewrite_luks2_json
    shutil.copy(image, out)
    extremes = [-1, 0, 2 ** 63, 2 ** 64, "x", None, [], {}, "18446744073709551615", 1e308, "512", "dynamic"]

    def change(meta, depth=0):
        keys = list(meta) if isinstance(meta, dict) else list(range(len(meta))) if isinstance(meta, list) else []
        for key in keys:
            if rng.random() < 0.15:
                if rng.random() < 0.3 and isinstance(meta, dict):
                    del meta[key]
                else:
                    meta[key] = rng.choice(extremes)
            elif isinstance(meta[key], (dict, list)) and depth < 6:
                change(meta[key], depth + 1)
    rewrite_luks2_json(out, change)


BOMB = b"""<?xml version="1.0"?>
<!DOCTYPE v [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">
<!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;"><!ENTITY d "&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;">
<!ENTITY e "&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;"><!ENTITY f "&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;">
<!ENTITY g "&f;&f;&f;&f;&f;&f;&f;&f;&f;&f;"><!ENTITY h "&g;&g;&g;&g;&g;&g;&g;&g;&g;&g;">]>
<value><struct><member><name>version</name><value>&h;</value></member></struct></value>"""
EXTERNAL = b"""<?xml version="1.0"?>
<!DOCTYPE v [<!ENTITY x SYSTEM "file:///etc/passwd">]><value>&x;</value>"""


def mutate_xva(rng: random.Random, image: Path, out: Path) -> None:
    with tarfile.open(image) as tar:
        members = [(m, tar.extractfile(m).read() if m.isfile() else b"") for m in tar.getmembers()]
    ova = members[0][1]
    choice = rng.random()
    if choice < 0.15:
        ova = BOMB
    elif choice < 0.25:
        ova = EXTERNAL
    elif choice < 0.35:
        ova = b"<value>" * 10000  # deep nesting
    else:
        text = ova.decode()
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(len(text))
            text = text[:pos] + rng.choice(["<", ">", "&", "</value>", "<struct>", "Ref:99", "-1",
                                            "99999999999999999999", "", "\x00"]) + text[pos + rng.randint(0, 20):]
        ova = text.encode("utf-8", "replace")
    with tarfile.open(out, "w") as tar:
        for index, (member, data) in enumerate(members):
            if index == 0:
                data = ova
            elif rng.random() < 0.05:
                data = mutate_bytes(rng, data, len(data))
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))


def make_case(fmt: str, rng: random.Random, seed: Path, out: Path) -> None:
    if fmt == "luks2" and rng.random() < 0.5:
        return mutate_luks2_json(rng, seed, out)
    if fmt == "xva" and rng.random() < 0.7:
        return mutate_xva(rng, seed, out)
    data = seed.read_bytes()
    hot = {"luks1": 4096, "luks2": 32768, "tar": 2048, "zip": len(data), "xva": 4096}.get(fmt, len(data))
    if fmt == "zip" and rng.random() < 0.5:  # the central directory and end record sit at the end
        tail = mutate_bytes(rng, data[-200:], 200)
        out.write_bytes(data[:-200] + tail)
        return
    out.write_bytes(mutate_bytes(rng, data, hot))


# -- Running a case ------------------------------------------------------------------------------
def read_disk(filters: list[tuple[str, list[tuple[str, str]]]], path: Path) -> str:
    chain = Chain([load_filter(name)() for name, _ in filters], load_plugin("file")())
    pairs = {i: params for i, (_, params) in enumerate(filters)}
    pairs[len(filters)] = [("file", str(path))]
    chain.configure(pairs)
    chain.get_ready()
    try:
        top = chain.open(True, "")
        try:
            size = top.get_size()
            spots = sorted({0, size // 2, max(0, size - (1 << 20))})
            failures = 0
            for spot in spots:
                for offset in range(spot, min(size, spot + (1 << 20)), 65536):
                    buf = bytearray(min(65536, size - offset))
                    try:
                        top.pread(memoryview(buf), offset, 0)
                    except NBDError:
                        failures += 1
            return f"read, {failures} EIO"
        finally:
            top.close()
    finally:
        chain.cleanup()


def run_cases(fmt: str, cases: int, seed: int, case_timeout: float, work: Path) -> dict:
    base, filters = seed_file(fmt, work)
    assert read_disk(filters, base) == "read, 0 EIO", "the unmutated seed must read cleanly"
    rng = random.Random(seed)
    outcomes: dict[str, int] = {}
    findings = []
    slowest = 0.0
    for index in range(cases):
        case = work / f"case{index % 4}"
        make_case(fmt, rng, base, case)
        start = time.monotonic()
        try:
            outcome = "read" if read_disk(filters, case) == "read, 0 EIO" else "read with EIO"
        except ConfigError:
            outcome = "ConfigError"
        except NBDError:
            outcome = "NBDError"
        except Exception:  # noqa: BLE001 - this is what the fuzzer looks for
            keep = work / f"finding-{index}"
            shutil.copy(case, keep)
            findings.append(f"case {index} (kept as {keep}): {traceback.format_exc(limit=6)}")
            outcome = "crash"
        elapsed = time.monotonic() - start
        slowest = max(slowest, elapsed)
        if elapsed > case_timeout:
            findings.append(f"case {index} took {elapsed:.1f} s")
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    return {"format": fmt, "cases": cases, "outcomes": outcomes, "slowest": round(slowest, 2),
            "findings": findings[:5]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--format", required=True,
                        choices=["gzip", "xz", "zstd", "tar", "zip", "luks1", "luks2", "xva"])
    parser.add_argument("--cases", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--case-timeout", type=float, default=10.0)
    parser.add_argument("--keep", action="store_true", help="keep the work directory (findings)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix=f"nbdf-{args.format}-fuzz-"))
    try:
        result = run_cases(args.format, args.cases, args.seed, args.case_timeout, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))
    return 1 if result["findings"] else 0


if __name__ == "__main__":
    sys.exit(main())


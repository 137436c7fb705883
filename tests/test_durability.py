"""FLUSH and FUA reach the disk (issue 20): the server runs under strace, which records every
fdatasync, fsync, sync_file_range and syncfs with the file each one was for (-y) and when
(-ttt); a libnbd client writes, flushes and writes with FUA, noting when each began and ended.
kill -9 tests (test_crash_consistency.py) keep the page cache, so they cannot show this.

For each stack: a plain write syncs nothing; a FLUSH syncs the file that holds the data (the
file plugin's, under cache=writeback once the dirty blocks are written back to it, under
luks the file of ciphertext; cow's overlay, which stands in for the disk while the server
lives); a FUA write syncs it before its reply; and the bytes are in that file while the
server still runs (read back from the file, for LUKS decrypted by an independent cipher)."""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import pytest

from conftest import NBDFORMATS, SYSTEM_PYTHON, run, start
from fixtures.luks import reference_crypt
from fixtures.luks_spec import LUKS2_SEGMENT_OFFSET, luks2_image

pytestmark = pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (scripts/setup installs it)")

SYNCS = "fdatasync,fsync,sync_file_range,syncfs"
DISK = 4 << 20
CLIENT = """
import json, sys, time, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
block = bytes(range(256)) * 256  # 64 KiB
phases = {}
def phase(name, action):
    started = time.time()
    action()
    phases[name] = (started, time.time())
    time.sleep(0.3)  # nothing of the next phase can be taken for this one
phase("write", lambda: h.pwrite(block, 1 << 20))
phase("flush", lambda: h.flush())
phase("fua", lambda: h.pwrite(block[::-1], 2 << 20, nbd.CMD_FLAG_FUA))
print(json.dumps(phases))
"""
LINE = re.compile(r"^\d+\s+(?P<time>\d+\.\d+) (?P<call>\w+)\((?P<fd>\d+)<(?P<path>[^>]*)>")


def syncs(log: Path, path_pattern: str) -> list[float]:
    """When the traced server synced a file whose path matches `path_pattern`."""
    times = []
    for line in log.read_text().splitlines():
        match = LINE.match(line)
        if match and re.search(path_pattern, match["path"]) and "= 0" in line:
            times.append(float(match["time"]))
    return times


def traced(tmp: Path, *args: str):
    """The server under strace (killed with it when the test ends)."""
    strace = ["strace", "-f", "-qq", "-y", "-ttt", "-e", f"trace={SYNCS}", "-e", "signal=none",
              "-o", str(tmp / "strace.log")]
    return start([*strace, *NBDFORMATS, "-f", "-U"], list(args))


def stacks(tmp: Path) -> tuple[dict[str, tuple[list[str], str]], bytes]:
    """(server arguments, the path the data's syncs must name) per stack, and the LUKS volume key."""
    disk = tmp / "disk.img"
    disk.write_bytes(bytes(DISK))
    luks = tmp / "disk.luks"
    image, key = luks2_image(bytes(DISK), b"durable", random.Random(1))
    luks.write_bytes(image)
    (tmp / "key").write_bytes(b"durable")
    return {
        "file": (["file", str(disk)], "disk.img$"),
        "cache=writeback": (["--filter=cache", "file", str(disk), "cache=writeback"], "disk.img$"),
        "cow": (["--filter=cow", "file", str(disk)], "/nbdformats-cow-"),  # an unlinked temporary file
        "luks": (["--filter=luks", "file", str(luks), f"keyfile={tmp / 'key'}"], "disk.luks$"),
    }, key


@pytest.mark.parametrize("stack", ["file", "cache=writeback", "cow", "luks"])
def test_flush_and_fua_reach_the_disk(tmp_path, monkeypatch, stack):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    all_stacks, key = stacks(tmp_path)
    args, target = all_stacks[stack]
    with traced(tmp_path, *args) as srv:
        phases = json.loads(run([SYSTEM_PYTHON, "-c", CLIENT, srv.uri], timeout=60).stdout)
        written = Path(args[args.index("file") + 1]).read_bytes()
    times = syncs(tmp_path / "strace.log", target)

    def within(name: str) -> int:
        start, end = phases[name]
        return sum(start <= t <= end for t in times)

    assert within("write") == 0, (times, phases)  # no sync without FLUSH or FUA: the test can tell
    assert within("flush") >= 1, (times, phases)
    assert within("fua") >= 1, (times, phases)
    block = bytes(range(256)) * 256
    if stack in ("file", "cache=writeback"):
        assert written[1 << 20:(1 << 20) + len(block)] == block
        assert written[2 << 20:(2 << 20) + len(block)] == block[::-1]
    elif stack == "luks":
        for offset, expected in ((1 << 20, block), (2 << 20, block[::-1])):
            sealed = written[LUKS2_SEGMENT_OFFSET + offset:LUKS2_SEGMENT_OFFSET + offset + len(block)]
            assert reference_crypt("aes-xts-plain64", key, sealed, 512, encrypt=False,
                                   first_sector=offset // 512) == expected
    else:  # cow: the disk below is never written
        assert written == bytes(DISK)

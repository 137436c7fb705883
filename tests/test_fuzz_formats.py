"""Format fuzzing, bounded for CI: mutated inputs for every format filter (tests/fuzz/format_fuzz.py,
one process per format, so a crash or hang in a C library fails the test too), and hostile
directories for the floppy and linuxdisk plugins.

A long run: .venv/bin/python tests/fuzz/format_fuzz.py --format luks2 --cases 20000 --seed 2
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from conftest import NBDFORMATS, run

FUZZER = Path(__file__).parent / "fuzz" / "format_fuzz.py"
CASES = int(os.environ.get("NBDFORMATS_FORMAT_CASES", "150"))


@pytest.mark.parametrize("fmt", ["gzip", "xz", "zstd", "tar", "zip", "luks1", "luks2", "xva"])
def test_mutated_inputs_give_clear_errors(fmt):
    proc = run([sys.executable, FUZZER, "--format", fmt, "--cases", str(CASES), "--seed", "11",
                "--case-timeout", "10"], check=False, timeout=240)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    assert not result["findings"], "\n".join(result["findings"])
    assert sum(result["outcomes"].values()) == CASES
    assert result["outcomes"].get("ConfigError", 0) > 0  # the mutations do reach the parsers


def hostile_tree(root: Path) -> Path:
    """Names and file kinds a directory-to-disk plugin must survive."""
    root.mkdir()
    (root / "ok.txt").write_bytes(b"fine\n")
    os.mkfifo(root / "a-fifo")  # reading it would block forever
    os.symlink("loop", root / "loop")  # a dangling self-referencing link
    os.symlink("/", root / "to-root")
    (root / ("n" * 255)).write_bytes(b"long name")
    os.makedirs(root / "/".join(["d"] * 40))  # deep nesting
    (root / os.fsdecode(b"bad-\xff\xfe-utf8")).write_bytes(b"x")
    secret = root / "unreadable"
    secret.write_bytes(b"secret")
    secret.chmod(0)
    with open(root / "sparse-4G", "wb") as f:
        f.truncate(4 << 30)
    return root


@pytest.mark.parametrize("plugin", ["floppy", "linuxdisk"])
def test_hostile_directories_do_not_hang_or_crash(tmp_path, plugin):
    tree = hostile_tree(tmp_path / "tree")
    sock = tmp_path / "sock"
    script = f"nbdinfo --size \"$uri\" && nbdcopy \"$uri\" {tmp_path / 'out.img'}"
    proc = run([*NBDFORMATS, "-U", sock, plugin, tree, "--run", script], check=False, timeout=120,
               env={"TMPDIR": str(tmp_path)})
    err = proc.stderr.decode(errors="replace")
    assert "Traceback" not in err, err[-3000:]
    if proc.returncode != 0:  # refused: with a message that names the problem, before serving
        assert "error" in err.lower() and len(err.strip().splitlines()) < 20, err[-3000:]
    else:
        assert (tmp_path / "out.img").stat().st_size > 0


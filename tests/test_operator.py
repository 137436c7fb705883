"""Operator features: --stats-json and nbdformats-stats, -D debug flags and -v, progress bars,
connection details for python plugins (is_tls, peer_*), --dump-plugin of a python script, and
the sample service files."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from conftest import ROOT

# -- progress bars -----------------------------------------------------------------------------

PROGRESS_SCRIPT = """
import sys, time
from nbdformats.core.progress import progress
seconds = float(sys.argv[1])
steps = 10
with progress(1 << 20, "demo: indexing") as bar:
    for _ in range(steps):
        time.sleep(seconds / steps)
        bar.update((1 << 20) // steps)
    bar.set(1 << 20)
print("done", file=sys.stderr)
"""


def stderr_on_a_terminal(seconds: float) -> str:
    """Run the progress demo with stderr on a pseudo-terminal; what the terminal showed."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal's size
    try:
        proc = subprocess.Popen([sys.executable, "-c", PROGRESS_SCRIPT, str(seconds)], stderr=slave,
                                stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL, cwd=ROOT)
        os.close(slave)
        slave = -1
        output = bytearray()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                output += chunk
            elif proc.poll() is not None:
                break
        assert proc.wait(10) == 0
        return output.decode(errors="replace")
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)


def test_progress_bar_shows_on_a_terminal_for_long_work():
    shown = stderr_on_a_terminal(1.8)
    assert "demo: indexing" in shown and "1.00M/1.00M" in shown and "done" in shown


def test_progress_bar_hidden_for_quick_work():
    shown = stderr_on_a_terminal(0.3)
    assert "demo: indexing" not in shown and "done" in shown


def test_progress_bar_hidden_when_stderr_is_not_a_terminal():
    proc = subprocess.run([sys.executable, "-c", PROGRESS_SCRIPT, "1.5"], capture_output=True, timeout=30, cwd=ROOT)
    assert proc.returncode == 0 and proc.stderr == b"done\n"

"""What the benchmark scripts share: the server commands, a server started and stopped around a
measurement, timed commands, nbdcopy's checksum of a served disk, a process's peak memory.

Standard library only: core.py runs under Debian's python3 without the virtualenv.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
NBDFORMATS = [str(VENV_PYTHON) if VENV_PYTHON.exists() else sys.executable, "-m", "nbdformats"]
# Debian's nbdkit, libnbd tools and python3 (with the nbd module) before anything else on PATH.
ENV = dict(os.environ, PATH="/usr/bin:/usr/sbin:/bin:/sbin:" + os.environ.get("PATH", ""))
MiB = 1024 * 1024


def compile_package() -> None:
    """Byte-compile nbdformats, as pip does when it installs a package: start-up times then
    measure the server, not Python compiling every module again (an editable install run with
    PYTHONDONTWRITEBYTECODE=1, as on this machine, never keeps the compiled files)."""
    subprocess.run([NBDFORMATS[0], "-m", "compileall", "-q", str(ROOT / "nbdformats")], check=True,
                   stdout=subprocess.DEVNULL, timeout=300)


compile_package()


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process, all its threads, so far (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


class Server:
    """`argv` (a server serving on the Unix socket `sock`) started in a session of its own, its
    output to `log` (or discarded); stopped on leaving the `with` block."""

    def __init__(self, argv: list, sock: str | Path, log: Path | None = None) -> None:
        self.argv = [str(a) for a in argv]
        self.sock = str(sock)
        self.uri = f"nbd+unix:///?socket={self.sock}"
        self.log = log
        Path(self.sock).unlink(missing_ok=True)
        with open(log, "wb") if log is not None else open(os.devnull, "wb") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=out, stdin=subprocess.DEVNULL, env=ENV,
                                         start_new_session=True)

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def fail(self, why: str) -> SystemExit:
        """Stop the server; the SystemExit to raise, with the end of its log."""
        self.stop()
        tail = self.log.read_text(errors="replace")[-2000:] if self.log is not None else ""
        return SystemExit(f"{' '.join(self.argv)}: {why}" + (f"\n{tail}" if tail else ""))

    def check_running(self) -> None:
        if self.proc.poll() is not None:
            raise self.fail(f"exited with status {self.proc.returncode}")

    def wait_for_socket(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.sock):
            self.check_running()
            if time.monotonic() > deadline:
                raise self.fail(f"no socket after {timeout:.0f} s")
            time.sleep(0.005)

    def peak_rss_kib(self) -> int:
        """The server's peak resident memory so far (VmHWM)."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        return 0

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def sh(*argv: object, timeout: float = 3600) -> bytes:
    """Run a command (Debian's tools first on PATH); its output; an error if it fails."""
    return subprocess.run([str(a) for a in argv], check=True, capture_output=True, timeout=timeout, env=ENV).stdout


def timed(*argv: object, timeout: float = 3600) -> float:
    """Seconds `argv` takes to run (an error if it fails)."""
    start = time.perf_counter()
    sh(*argv, timeout=timeout)
    return time.perf_counter() - start


def nbdcopy_sha256(uri: str, *options: str, timeout: float = 600) -> str:
    """The SHA-256 of the whole served disk, as nbdcopy (with `options`) reads it."""
    digest = hashlib.sha256()
    with subprocess.Popen(["nbdcopy", *options, uri, "-"], stdout=subprocess.PIPE, env=ENV) as copier:
        assert copier.stdout is not None
        while chunk := copier.stdout.read(4 * MiB):
            digest.update(chunk)
        if copier.wait(timeout):
            raise SystemExit(f"nbdcopy {uri} failed")
    return digest.hexdigest()

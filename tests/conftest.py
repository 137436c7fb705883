"""Shared test helpers: start nbdformats (or nbdkit / qemu-nbd) on a Unix socket, run tools.

Every subprocess has a timeout.  Use `serve(...)` as a context manager::

    with serve("memory", "1M") as srv:
        run(["nbdinfo", "--json", srv.uri])
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parent.parent
NBDFORMATS = [sys.executable, "-m", "nbdformats"]
# Debian's python3 has the libnbd binding (python3-libnbd); nbdsh runs "python3 -m nbd".
SYSTEM_PYTHON = "/usr/bin/python3"
TIMEOUT = 120


def run(cmd: list[str], *, timeout: float = TIMEOUT, check: bool = True, input: bytes | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a command with a timeout; on failure the assertion shows its output."""
    full_env = dict(os.environ, **(env or {}))
    full_env["PATH"] = "/usr/bin:/usr/sbin:/bin:/sbin:" + full_env.get("PATH", "")
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, timeout=timeout, input=input,
                          env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}\nstdout: {proc.stdout.decode(errors='replace')[-4000:]}"
                             f"\nstderr: {proc.stderr.decode(errors='replace')[-4000:]}")
    return proc


def nbdsh(uri: str, script: str, timeout: float = TIMEOUT, check: bool = True) -> subprocess.CompletedProcess:
    """Run a Python snippet against `uri` with libnbd's binding; `h` is the connected handle."""
    code = ("import nbd, sys, errno\nh = nbd.NBD()\nh.set_strict_mode(0)\n"
            "h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)\n" +
            f"h.connect_uri({uri!r})\n" + script)
    return run([SYSTEM_PYTHON, "-c", code], timeout=timeout, check=check)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def nbdcopy_to_file(uri: str, path: str | Path, *extra: str) -> None:
    run(["nbdcopy", *extra, uri, str(path)])


def served_sha(uri: str, tmp: Path, name: str = "out.img") -> str:
    """The SHA-256 of the whole served disk, copied by nbdcopy into tmp/name."""
    target = tmp / name
    target.unlink(missing_ok=True)
    nbdcopy_to_file(uri, target)
    return sha256_file(target)


def nbdinfo_json(uri: str, *extra: str) -> dict:
    return json.loads(run(["nbdinfo", "--json", *extra, uri]).stdout)


@dataclass
class Server:
    proc: subprocess.Popen
    socket: str
    export: str = ""

    @property
    def uri(self) -> str:
        return f"nbd+unix:///{self.export}?socket={self.socket}"

    def uri_for(self, export: str) -> str:
        return f"nbd+unix:///{export}?socket={self.socket}"

    def stderr(self) -> str:
        return Path(self.socket + ".log").read_text(errors="replace")


def _wait_for_socket(proc: subprocess.Popen, sock: str, log: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(sock):
            return
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}:\n{Path(log).read_text(errors='replace')}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"server did not create {sock} in {timeout}s:\n{Path(log).read_text(errors='replace')}")


@contextlib.contextmanager
def start(argv_before_socket: list[str], argv_after_socket: list[str], *, timeout: float = 60,
          export: str = "") -> Iterator[Server]:
    # Not under $TMPDIR: tests point TMPDIR at small filesystems for the server, not for its log.
    tmp = tempfile.mkdtemp(prefix="nbdf-test-", dir="/tmp")
    sock = os.path.join(tmp, "sock")
    log = sock + ".log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen([*argv_before_socket, sock, *argv_after_socket], stdout=logf, stderr=logf,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for_socket(proc, sock, log, timeout)
        yield Server(proc, sock, export)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


def serve(*args: str, options: tuple[str, ...] = (), **kw) -> contextlib.AbstractContextManager[Server]:
    """nbdformats -f [options] -U SOCK ARGS... (args: [--filter=X ...] PLUGIN key=value ...)."""
    return start([*NBDFORMATS, "-f", *options, "-U"], list(args), **kw)


def serve_nbdkit(*args: str, options: tuple[str, ...] = (), **kw) -> contextlib.AbstractContextManager[Server]:
    """The reference server, nbdkit, on the same terms (wrapped in timeout: 1.32 can hang)."""
    return start(["timeout", "600", "nbdkit", "-f", *options, "-U"], list(args), **kw)


def serve_qemu_nbd(image: str, *options: str, **kw) -> contextlib.AbstractContextManager[Server]:
    return start(["timeout", "600", "qemu-nbd", "-f", "raw", "-t", *options, "-k"], [image], **kw)


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path


def random_file(path: str | Path, size: int, seed: int = 0) -> Path:
    """Deterministic pseudo-random content (fast: repeated blocks of sha256 chains)."""
    block = bytearray()
    state = hashlib.sha256(str(seed).encode()).digest()
    while len(block) < 1 << 16:
        state = hashlib.sha256(state).digest()
        block += state
    block = bytes(block)
    with open(path, "wb") as f:
        written = 0
        index = 0
        while written < size:
            piece = hashlib.sha256(block[:64] + index.to_bytes(8, "little")).digest() + block
            n = min(len(piece), size - written)
            f.write(piece[:n])
            written += n
            index += 1
    return Path(path)


# Reports test modules add for the end of the run (CI's log): section title -> lines.
SUMMARY: dict[str, list[str]] = {}


def pytest_configure(config) -> None:
    """The servers the tests start make their temporary files (-U -'s private directory, cache and
    cow files) in a directory of this run; pytest_sessionfinish reports what is left there."""
    os.environ["TMPDIR"] = tempfile.mkdtemp(prefix="nbdf-session-", dir="/tmp")


FIRST_SEEN: dict[str, str] = {}  # a server's private directory -> the test during which it appeared


@pytest.fixture(autouse=True)
def _note_private_directories(request: pytest.FixtureRequest) -> Iterator[None]:
    """Which test a leaked `nbdformats-*` directory appeared in (module fixtures' servers keep
    theirs until the module ends, so a leak is only judged at the end of the session)."""
    yield
    for path in Path(os.environ["TMPDIR"]).glob("nbdformats-*"):
        FIRST_SEEN.setdefault(path.name, request.node.nodeid)


def pytest_sessionfinish(session, exitstatus) -> None:
    session_tmpdir = os.environ["TMPDIR"]
    leaked = sorted(p.name for p in Path(session_tmpdir).glob("nbdformats-*"))
    shutil.rmtree(session_tmpdir, ignore_errors=True)
    if leaked:
        SUMMARY["temporary files left behind"] = [
            f"{session_tmpdir}/{name} (first seen after {FIRST_SEEN.get(name, 'a session fixture')})" for name in leaked]
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter) -> None:
    for title, lines in SUMMARY.items():
        terminalreporter.section(title)
        for line in lines:
            terminalreporter.write_line(line)

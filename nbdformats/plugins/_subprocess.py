"""Running a user's script or command with its output checked and bounded (sh, eval, data's
<(SCRIPT), tmpdisk and ondemand's command=, the exportname filter's exportdesc=script:).

Standard output is read up to a limit; standard error is kept up to STDERR_KEPT bytes (the rest
is read and dropped, so a chatty script cannot block); a script that runs past its time limit is
killed with its whole process group.  Callers turn a `Finished` into their own error.
"""

from __future__ import annotations

import errno
import os
import selectors
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Mapping

STDERR_KEPT = 64 * 1024
READ_SIZE = 1 << 16


class ScriptFailed(Exception):
    """The command could not run, ran too long, or wrote more than allowed."""


@dataclass
class Finished:
    status: int  # the exit status; minus the signal number when a signal ended it
    stdout: bytes
    stderr: bytes
    stdin_refused: bool = False  # it exited without reading all of its input

    def stderr_text(self) -> str:
        return self.stderr.decode(errors="replace").strip()

    def describe(self) -> str:
        """How it ended, for an error message."""
        how = f"killed by signal {-self.status}" if self.status < 0 else f"exited with status {self.status}"
        message = self.stderr_text().splitlines()
        return how + (f": {message[0]}" if message else "")


def run(argv: list[str], *, stdout_limit: int, timeout: float, input: bytes | memoryview = b"",
        env: Mapping[str, str] | None = None, cwd: str | None = None, keep_first: bool = False) -> Finished:
    """Run argv, feeding it `input`, and collect its output.

    More than `stdout_limit` bytes of output is an error, unless `keep_first`: then the command
    is stopped once it has written that much and the first `stdout_limit` bytes are returned
    (for generators whose output is cut, like data's <(SCRIPT)[:N]).
    """
    def start(command: list[str]) -> subprocess.Popen:
        # close_fds=False: as under nbdkit, the command inherits what the server inherited; the
        # server's own descriptors are all close-on-exec (Python's default) and do not leak.
        return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=dict(env) if env is not None else None, cwd=cwd, close_fds=False,
                                start_new_session=True)  # its own process group: killed as a whole

    try:
        try:
            process = start(argv)
        except OSError as e:
            if e.errno != errno.ENOEXEC:
                raise
            process = start(["/bin/sh", *argv])  # a script without #!: run by the shell, as execvp does
    except OSError as e:
        raise ScriptFailed(f"cannot run {argv[0]}: {e.strerror}") from None
    assert process.stdin and process.stdout and process.stderr
    deadline = time.monotonic() + timeout
    stdout, stderr = bytearray(), bytearray()
    pending = memoryview(input).cast("B")
    stdin_refused = finished_early = False
    selector = selectors.DefaultSelector()
    try:
        if pending:
            os.set_blocking(process.stdin.fileno(), False)
            selector.register(process.stdin, selectors.EVENT_WRITE)
        else:
            process.stdin.close()
        selector.register(process.stdout, selectors.EVENT_READ)
        selector.register(process.stderr, selectors.EVENT_READ)
        while selector.get_map() and not finished_early:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ScriptFailed(f"{argv[0]}: still running after {timeout:g} seconds: killed")
            for key, _ in selector.select(left):
                if key.fileobj is process.stdin:
                    try:
                        pending = pending[os.write(key.fd, pending[:READ_SIZE]):]
                    except BrokenPipeError:  # it exited (or closed stdin) without reading everything
                        pending, stdin_refused = pending[:0], True
                    if not pending:
                        selector.unregister(process.stdin)
                        process.stdin.close()
                    continue
                chunk = os.read(key.fd, READ_SIZE)
                if not chunk:
                    selector.unregister(key.fileobj)
                elif key.fileobj is process.stderr:
                    stderr += chunk[:max(0, STDERR_KEPT - len(stderr))]
                else:
                    stdout += chunk
                    if len(stdout) > stdout_limit:
                        if not keep_first:
                            raise ScriptFailed(f"{argv[0]}: wrote more than {stdout_limit} bytes: killed")
                        del stdout[stdout_limit:]
                        finished_early = True
                        break
    except BaseException:
        _kill(process)
        raise
    finally:
        selector.close()
        for stream in (process.stdin, process.stdout, process.stderr):
            stream.close()
        if finished_early:
            _kill(process)
        status = _wait(process, deadline)
    return Finished(status, bytes(stdout), bytes(stderr), stdin_refused)


def _kill(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _wait(process: subprocess.Popen, deadline: float) -> int:
    """The exit status; a command still running once its output is closed is killed at the deadline."""
    try:
        return process.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        _kill(process)
        return process.wait()


def shell_quote(text: str) -> str:
    """Quote for /bin/sh, as nbdkit's shell_quote: single quotes, ' written as '\\''."""
    return "'" + text.replace("'", "'\\''") + "'"

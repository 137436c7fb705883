"""exitwhen filter: exit gracefully when an outside event happens (nbdkit-exitwhen-filter compatible).

Events: a file created or deleted, a pipe closed, a process exited, a script exiting with
code 88.  Once one has happened, new clients are refused and the server exits when the last
client disconnects; if one has happened before start-up, the server exits at once.
Events are checked when clients connect and disconnect, and every exit-when-poll seconds
while no client is connected.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import select
import subprocess
import threading
from typing import Any, Callable

from ..api.chain import Filter, request_shutdown
from ..api.errors import ConfigError, NBDError
from ..api.params import Float, Int, Param, Path, String
from ._connections import ConnectionTracker

log = logging.getLogger("nbdformats.exitwhen")

SCRIPT_EVENT = 88  # exit code of an exit-when-script that saw its event
SCRIPT_TIMEOUT = 60.0


def process_watch(pid: int) -> int:
    """An open /proc/PID/stat: readable while the process lives, ESRCH after (no PID reuse race)."""
    try:
        return os.open(f"/proc/{pid}/stat", os.O_RDONLY)
    except OSError as e:
        raise ConfigError(f"exit-when-process-exits={pid}: {e.strerror}") from None


class ExitwhenFilter(Filter):
    """Exit gracefully when a file appears or disappears, a pipe closes, a process or script says so."""

    name = "exitwhen"
    resize_passthrough = True
    exit_when_file_created = Param(Path(kind=None), repeat=True, help="Exit when this file exists")
    exit_when_file_deleted = Param(Path(kind=None), repeat=True, help="Exit when this file no longer exists")
    exit_when_pipe_closed = Param(Int(minimum=0), repeat=True,
                                  help="Exit when the other end of the pipe on this file descriptor closes")
    exit_when_fd_closed = Param(Int(minimum=0), repeat=True, help="Same as exit-when-pipe-closed")
    exit_when_process_exits = Param(Int(minimum=1), repeat=True, help="Exit when process PID exits")
    exit_when_pid_exits = Param(Int(minimum=1), repeat=True, help="Same as exit-when-process-exits")
    exit_when_script = Param(String(), repeat=True,
                             help="Shell command run at each check: exit code 88 means the event happened")
    exit_when_poll = Param(Float(minimum=0.01), default=60.0,
                           help="Seconds between checks while no client is connected (default 60)")

    def config_complete(self) -> None:
        self.checks: list[Callable[[], bool]] = []
        for path in self.exit_when_file_created:
            self.checks.append(functools.partial(self._file_created, path))
        for path in self.exit_when_file_deleted:
            self.checks.append(functools.partial(self._file_deleted, path))
        for fd in [*self.exit_when_pipe_closed, *self.exit_when_fd_closed]:
            try:
                os.fstat(fd)
            except OSError as e:
                raise ConfigError(f"exit-when-pipe-closed={fd}: {e.strerror}") from None
            self.checks.append(functools.partial(self._pipe_closed, fd))
        for pid in [*self.exit_when_process_exits, *self.exit_when_pid_exits]:
            watch = process_watch(pid)
            self.checks.append(functools.partial(self._process_exited, watch))
        for script in self.exit_when_script:
            self.checks.append(functools.partial(self._script_says, script))
        self.lock = threading.Lock()
        self.exiting = False
        self.stopping = threading.Event()

    # -- events --------------------------------------------------------------------------------
    @staticmethod
    def _file_created(path: str) -> bool:
        return os.access(path, os.R_OK)

    @staticmethod
    def _file_deleted(path: str) -> bool:
        return not os.access(path, os.R_OK)

    @staticmethod
    def _pipe_closed(fd: int) -> bool:
        poller = select.poll()
        poller.register(fd, 0)  # only HUP, ERR and NVAL are reported: nothing is read
        return any(events & (select.POLLHUP | select.POLLERR | select.POLLNVAL) for _, events in poller.poll(0))

    @staticmethod
    def _process_exited(watch: int) -> bool:
        try:
            os.pread(watch, 1, 0)
            return False
        except OSError as e:
            if e.errno == errno.ESRCH:
                return True
            log.error("exit-when-process-exits: %s", e.strerror)
            return False

    @staticmethod
    def _script_says(script: str) -> bool:
        try:
            status = subprocess.run(["/bin/sh", "-c", script], stdin=subprocess.DEVNULL,
                                    timeout=SCRIPT_TIMEOUT).returncode
        except (OSError, subprocess.TimeoutExpired) as e:
            log.error("exit-when-script: %s", e)
            return False
        if status not in (0, SCRIPT_EVENT):
            log.error("exit-when-script: %r exited with status %d", script, status)
        return status == SCRIPT_EVENT

    def event_happened(self) -> bool:
        """Check the events (once one has happened, the answer stays True)."""
        with self.lock:
            if not self.exiting and any(check() for check in self.checks):
                log.info("exitwhen: event detected: refusing new clients, exiting when the last one leaves")
                self.exiting = True
            return self.exiting

    # -- the server's life ---------------------------------------------------------------------
    def get_ready(self) -> None:
        self.tracker = ConnectionTracker(self._connection_ended)
        if self.event_happened():
            log.info("exitwhen: the event happened before start-up: exiting")
            raise SystemExit(0)
        self._start_polling()
        os.register_at_fork(after_in_child=self._start_polling)  # threads do not survive daemonizing

    def _start_polling(self) -> None:
        if self.checks:
            threading.Thread(target=self._poll, daemon=True, name="nbdformats-exitwhen").start()

    def _poll(self) -> None:
        while not self.stopping.wait(self.exit_when_poll):
            if self.tracker.count() == 0 and self.event_happened():
                request_shutdown()
                return

    def cleanup(self) -> None:
        self.stopping.set()

    def preconnect(self, client: Any, readonly: bool) -> None:
        if self.event_happened():
            raise NBDError(errno.ESHUTDOWN, "exitwhen: the server is exiting: rejecting new connection")
        self.tracker.connected(client)

    def disconnected(self, client: Any) -> None:
        self.tracker.disconnected(client)

    def _connection_ended(self, remaining: int) -> None:
        if self.event_happened() and remaining == 0:
            log.debug("exitwhen: exiting on last client connection")
            request_shutdown()


FILTER = ExitwhenFilter

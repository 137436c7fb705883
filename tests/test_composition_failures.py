"""Issue 24: nbd, stripe and mirror when their servers fail, hang (SIGSTOP) and come back.

The legs are real servers (nbdkit and nbdformats, memory and file plugins) on Unix sockets whose paths
stay the same across restarts, so a leg can come back where the front expects it.  Expected bytes come
from what the tests wrote (or nbdcopy of a server), never from the code under test.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

from conftest import NBDFORMATS, random_file, run, serve, sha256_file
from nbdformats.api.errors import ConfigError, NBDError
from nbdformats.client import NBDClient
from nbdformats.plugins import _mirror_state
from nbdformats.plugins._resync import MOST_CHUNKS, DirtyMap, WriteTracker, chunk_size
from nbdformats.protocol import wire as P

MIB = 1 << 20
TIMEOUT_ARGS = ("request-timeout=1", "connect-timeout=1")
SLACK = 4.0  # seconds a request may take beyond its timeout on a busy two-core machine


class Leg:
    """An NBD server at a fixed socket path: it can be stopped, hung (SIGSTOP) and started again."""

    def __init__(self, path: Path, *argv: str, nbdkit: bool = True) -> None:
        self.socket = path
        self.argv = ["timeout", "600", "nbdkit", "-f"] if nbdkit else ["timeout", "600", *NBDFORMATS, "-f"]
        self.args = list(argv)
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.socket}"

    def start(self) -> "Leg":
        self.socket.unlink(missing_ok=True)
        self.proc = subprocess.Popen([*self.argv, "-U", str(self.socket), *self.args], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_for(self.socket.exists, 30, f"{self.socket} to listen")
        return self

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signum)
        if signum == signal.SIGSTOP:  # kill() returns before the target stops: wait until it has
            stat = Path(f"/proc/{self.proc.pid}/stat")
            deadline = time.monotonic() + 10
            while stat.read_text().rsplit(")", 1)[1].split()[0] != "T" and time.monotonic() < deadline:
                time.sleep(0.005)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGKILL)
            self.proc.wait(10)
        self.socket.unlink(missing_ok=True)

    def read_all(self, tmp: Path) -> bytes:
        """The whole disk, as nbdcopy reads it."""
        out = tmp / f"{self.socket.name}.img"
        out.unlink(missing_ok=True)
        run(["nbdcopy", self.uri, out])
        return out.read_bytes()


@pytest.fixture
def legs(tmp_path):
    """legs(n, *args): n nbdkit servers started with args; all killed at the end of the test."""
    started: list[Leg] = []

    def make(count: int, *args: str, nbdkit: bool = True) -> list[Leg]:
        new = [Leg(tmp_path / f"leg{len(started) + i}.sock", *args, nbdkit=nbdkit).start() for i in range(count)]
        started.extend(new)
        return new

    yield make
    for leg in started:
        leg.kill()


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout} s for {what}"
        time.sleep(0.05)


def timed(call: Callable[[], object]) -> tuple[object, float]:
    start = time.monotonic()
    return call(), time.monotonic() - start


def failing_fast(call: Callable[[], object], limit: float) -> NBDError:
    """The NBDError `call` raises within `limit` seconds."""
    start = time.monotonic()
    with pytest.raises(NBDError) as raised:
        call()
    assert time.monotonic() - start < limit, f"took {time.monotonic() - start:.1f} s"
    return raised.value


def succeeds_soon(call: Callable[[], object], timeout: float = 20) -> object:
    """What `call` returns once it stops failing (a leg coming back, a reconnection after back-off)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except NBDError:
            assert time.monotonic() < deadline, f"still failing after {timeout} s"
            time.sleep(0.2)


# -- nbd ------------------------------------------------------------------------------------------
def test_nbd_reconnects_and_a_flush_reports_writes_lost_with_the_server(tmp_path, legs):
    (up,) = legs(1, "memory", "1M")
    with serve("nbd", f"socket={up.socket}") as srv, NBDClient.connect(srv.uri) as nbd:
        nbd.pwrite(b"flushed", 0)
        nbd.flush()
        nbd.pwrite(b"unflushed", 4096)
        up.kill()
        up.start()  # a new, empty server at the same address
        assert succeeds_soon(lambda: nbd.pread(9, 4096)) == bytes(9)  # connected again: the write is gone...
        lost = failing_fast(nbd.flush, 5)  # ... and the flush says so rather than claim it durable
        assert lost.errno == errno.EIO and "may be lost: its connection broke before they were flushed" in str(lost)
        nbd.flush()  # reported once
        nbd.pwrite(b"again", 0)
        nbd.flush()
        assert nbd.pread(5, 0) == b"again"
        assert "writes it acknowledged may be lost" in srv.stderr()


def test_nbd_with_retry_request_rides_over_a_restart(tmp_path, legs):
    (up,) = legs(1, "memory", "1M")
    with serve("--filter=retry-request", "nbd", f"socket={up.socket}", "retry-request-delay=1",
               "retry-request-retries=5") as srv, NBDClient.connect(srv.uri) as nbd:
        nbd.pwrite(b"before", 0, P.CMD_FLAG_FUA)
        up.kill()
        up.start()
        assert nbd.pread(6, 0) == bytes(6)  # no error reaches the client: the filter retried
        nbd.pwrite(b"after", 0)
        assert nbd.pread(5, 0) == b"after"


def test_nbd_request_timeout_on_a_hung_server(tmp_path, legs):
    (up,) = legs(1, "memory", "1M")
    with serve("nbd", f"socket={up.socket}", *TIMEOUT_ARGS) as srv, NBDClient.connect(srv.uri) as nbd:
        nbd.pwrite(b"kept", 0, P.CMD_FLAG_FUA)
        up.signal(signal.SIGSTOP)
        hung = failing_fast(lambda: nbd.pread(4, 0), 1 + SLACK)
        assert hung.errno == errno.EIO and "got no reply in 1 s" in str(hung)
        # A new client connection is refused within connect-timeout, not left waiting.
        (proc, seconds) = timed(lambda: run(["nbdinfo", "--size", srv.uri], check=False, timeout=60))
        assert proc.returncode != 0 and seconds < 1 + SLACK  # type: ignore[attr-defined]
        up.signal(signal.SIGCONT)
        assert succeeds_soon(lambda: nbd.pread(4, 0)) == b"kept"  # the same server, connected again


def test_nbd_shared_mode_works_after_the_server_detaches(tmp_path, legs):
    (up,) = legs(1, "memory", "1M")
    sock, pidfile = tmp_path / "front.sock", tmp_path / "front.pid"
    run([*NBDFORMATS, "-U", sock, "-P", pidfile, "nbd", f"socket={up.socket}", "shared=true"], timeout=30)
    wait_for(pidfile.exists, 30, "the detached server's pid file")
    try:
        run(["nbdcopy", "--", "[", "nbdkit", "pattern", "1M", "]", f"nbd+unix:///?socket={sock}"], timeout=30)
        run(["nbdcopy", f"nbd+unix:///?socket={sock}", tmp_path / "copy.img"], timeout=30)
        pattern = b"".join(i.to_bytes(8, "big") for i in range(0, MIB, 8))
        assert (tmp_path / "copy.img").read_bytes() == pattern
    finally:
        os.kill(int(pidfile.read_text()), signal.SIGTERM)


@pytest.mark.parametrize("plugin", ["nbd uri=nbd://h/", "stripe server=nbd://h/", "mirror server=nbd://h/"])
@pytest.mark.parametrize("param,message", [
    ("request-timeout=nan", "must be from 0 to 86400 seconds"),
    ("request-timeout=-1", "must be from 0 to 86400 seconds"),
    ("connect-timeout=0", "must be from 0.01 to 86400 seconds"),
    ("connect-timeout=1e9", "must be from 0.01 to 86400 seconds"),
    ("connect-timeout=soon", "'soon' is not a number of seconds"),
])
def test_bad_timeouts_are_refused(tmp_path, plugin, param, message):
    proc = run([*NBDFORMATS, "-U", tmp_path / "sock", *plugin.split(), param], check=False, timeout=30)
    assert proc.returncode == 1 and f"{param}: {message}" in proc.stderr.decode(), proc.stderr.decode()
    assert "Traceback" not in proc.stderr.decode()


# -- stripe ---------------------------------------------------------------------------------------
def test_stripe_fails_fast_on_a_hung_or_dead_leg_and_recovers(tmp_path, legs):
    a, b = legs(2, "memory", "4M")
    data = random_file(tmp_path / "data.img", 8 * MIB, seed=24).read_bytes()
    with serve("stripe", f"server={a.uri}", f"server={b.uri}", *TIMEOUT_ARGS) as srv, \
            NBDClient.connect(srv.uri) as nbd:
        nbd.pwrite(data, 0)
        b.signal(signal.SIGSTOP)  # leg 1 holds the odd stripes (1 MiB each)
        hung = failing_fast(lambda: nbd.pread(MIB, MIB), 1 + SLACK)
        assert hung.errno == errno.EIO
        assert nbd.pread(MIB, 0) == data[:MIB]  # leg 0 still serves its stripes
        for _ in range(3):  # while leg 1 hangs, each request to it fails within connect-timeout or at once
            failing_fast(lambda: nbd.pread(MIB, 3 * MIB), 1 + SLACK)
        b.signal(signal.SIGCONT)
        assert succeeds_soon(lambda: nbd.pread(MIB, MIB)) == data[MIB:2 * MIB]
        b.kill()
        dead = failing_fast(lambda: nbd.pread(2 * MIB, 0), SLACK)  # touches both legs
        assert dead.errno == errno.EIO
        b.start()  # a new, empty server
        assert succeeds_soon(lambda: nbd.pread(MIB, MIB)) == bytes(MIB)
        assert nbd.pread(MIB, 2 * MIB) == data[2 * MIB:3 * MIB]


# -- mirror ---------------------------------------------------------------------------------------
def mirror_args(legs: list[Leg], *extra: str) -> list[str]:
    return ["mirror", *(f"server={leg.uri}" for leg in legs), *extra]


def recorded(state: Path) -> dict[str, str]:
    """The state file's copies, by socket path."""
    return {re.sub(r".*socket=", "", uri): value for uri, value in json.loads(state.read_text())["copies"].items()}


def in_sync(state: Path, leg: Leg) -> bool:
    return recorded(state).get(str(leg.socket)) == "in-sync"


def test_mirror_hung_leg_times_out_and_is_rebuilt_when_it_resumes(tmp_path, legs):
    a, b = legs(2, "memory", "8M")
    state = tmp_path / "state.json"
    first = random_file(tmp_path / "first.img", 8 * MIB, seed=1).read_bytes()
    with serve(*mirror_args([a, b], f"state={state}", *TIMEOUT_ARGS)) as srv, NBDClient.connect(srv.uri) as nbd:
        nbd.pwrite(first, 0)
        b.signal(signal.SIGSTOP)
        for offset in range(0, 8 * MIB, MIB):  # reads take turns: the one sent to b completes from a
            data, seconds = timed(lambda: nbd.pread(MIB, offset))
            assert data == first[offset:offset + MIB] and seconds < 1 + SLACK
        _, seconds = timed(lambda: nbd.pwrite(b"second" * 1000, 0))  # completes from the copy left
        assert seconds < 1 + SLACK
        expected = b"second" * 1000 + first[6000:]
        for offset in range(0, 8 * MIB, MIB):
            data, seconds = timed(lambda: nbd.pread(MIB, offset))
            assert data == expected[offset:offset + MIB] and seconds < SLACK
        assert recorded(state) == {str(a.socket): "in-sync", str(b.socket): "stale"}
        assert re.search(r"server 1 \(.*\) is stale and no longer used: .*READ got no reply in 1 s", srv.stderr())
        b.signal(signal.SIGCONT)
        wait_for(lambda: in_sync(state, b), 60, "server 1 to be rebuilt")
        nbd.flush()
        assert a.read_all(tmp_path) == expected and b.read_all(tmp_path) == expected
        # The state file says in-sync a moment before the rebuild's summary is logged.
        wait_for(lambda: re.search(r"server 1 \(.*\) rebuilt in .*MiB of data copied", srv.stderr()), 10,
                 "the rebuild's summary")


class RandomWriter(threading.Thread):
    """Writes 64 KiB blocks of random bytes at random places of [start, end) of `uri` until stopped, and
    keeps what it wrote in `expected` (the disk's content, given at first)."""

    def __init__(self, uri: str, expected: bytearray, start: int, end: int) -> None:
        super().__init__(daemon=True)
        self.uri, self.expected, self.start_at, self.end = uri, expected, start, end
        self.stopping = threading.Event()
        self.writes = 0

    def run(self) -> None:
        generator = random.Random(24)
        with NBDClient.connect(self.uri) as nbd:
            while not self.stopping.is_set():
                offset = generator.randrange(self.start_at, self.end, 64 * 1024)
                block = generator.randbytes(64 * 1024)
                nbd.pwrite(block, offset)
                self.expected[offset:offset + len(block)] = block
                self.writes += 1


def test_mirror_starts_degraded_and_rebuilds_under_concurrent_writers(tmp_path, legs):
    a, b = legs(2, "memory", "32M")
    state = tmp_path / "state.json"
    source = random_file(tmp_path / "source.img", 32 * MIB, seed=2)
    with serve(*mirror_args([a, b], f"state={state}")) as srv:
        run(["nbdcopy", "--flush", source, srv.uri])
    b.kill()
    # Restarted with a copy down: it starts, degraded, and serves from the copy left.
    with serve(*mirror_args([a, b], f"state={state}", "resync-rate=8M", *TIMEOUT_ARGS)) as srv:
        assert re.search(r"starting without server 1 \(.*\) \(cannot connect: .*\): it is rebuilt", srv.stderr())
        assert recorded(state) == {str(a.socket): "in-sync", str(b.socket): "stale"}
        run(["nbdcopy", srv.uri, tmp_path / "read.img"])
        assert sha256_file(tmp_path / "read.img") == sha256_file(source)
        b.start()  # back, and empty
        # While the rebuild runs (8 MiB/s: about 4 s), nbdcopy rewrites the first 8 MiB again and again and
        # another client writes random blocks over the rest: most of what it writes behind the rebuild is
        # not written again after the copy rejoins, so a region the rebuild failed to copy again shows.
        expected = bytearray(source.read_bytes())
        writer = RandomWriter(srv.uri, expected, 8 * MIB, 32 * MIB)
        writer.start()
        head = tmp_path / "head.img"
        copies = copies_during_rebuild = 0
        while not in_sync(state, b):
            rebuilding = "rebuilding server 1" in srv.stderr()
            random_file(head, 8 * MIB, seed=100 + copies)
            run(["nbdcopy", head, srv.uri])
            copies += 1
            copies_during_rebuild += rebuilding
            assert copies < 300, "the rebuild did not finish"
        writer.stopping.set()
        writer.join(30)
        assert copies_during_rebuild >= 3 and writer.writes > 100 and "rejoins the mirror" in srv.stderr()
        expected[:8 * MIB] = head.read_bytes()
        with NBDClient.connect(srv.uri) as nbd:
            nbd.flush()
            assert nbd.pread(32 * MIB, 0) == expected
        assert a.read_all(tmp_path) == expected
        assert b.read_all(tmp_path) == expected


def test_mirror_rebuild_progress_in_stats_json(tmp_path, legs):
    """--stats-json lines carry the mirror's copies and the rebuild's progress while a copy is stale."""
    a, b = legs(2, "memory", "16M")
    state, stats = tmp_path / "state.json", tmp_path / "stats.jsonl"
    with serve(*mirror_args([a, b], f"state={state}")) as srv:
        run(["nbdcopy", "--flush", random_file(tmp_path / "source.img", 16 * MIB, seed=3), srv.uri])
    b.kill()
    with serve(*mirror_args([a, b], f"state={state}", "resync-rate=4M", *TIMEOUT_ARGS),
               options=(f"--stats-json={stats}", "--stats-interval=0.2")) as srv:
        wait_for(lambda: '"stale"' in stats.read_text(), 20, "a stats line showing the stale copy")
        b.start()
        wait_for(lambda: in_sync(state, b), 60, "server 1 to be rebuilt")
        time.sleep(0.5)  # an interval after the rebuild
    lines = [json.loads(line) for line in stats.read_text().splitlines()]
    statuses = [line["status"]["mirror"] for line in lines if "status" in line]
    assert statuses[0]["copies"] == {a.uri: "in-sync", b.uri: "stale"} and statuses[0]["rebuild"] is None
    progress = [s["rebuild"] for s in statuses if s["rebuild"] is not None]
    assert len(progress) >= 3, progress  # about 4 s at 4 MiB/s, a line every 0.2 s
    assert all(p["size"] == 16 * MIB and p["server"].startswith("server 1") for p in progress)
    positions = [p["position"] for p in progress]
    assert positions == sorted(positions) and positions[-1] > positions[0]
    assert 0 < progress[-1]["copied"] <= 16 * MIB
    # Once every copy is in sync again the mirror reports nothing, and idle intervals write no line.
    intervals = [line for line in lines if line["event"] == "interval"]
    assert "status" not in intervals[-1] or intervals[-1]["status"]["mirror"]["rebuild"] is not None


def test_mirror_with_a_state_file_never_reads_a_stale_copy(tmp_path, legs):
    images = [random_file(tmp_path / f"{name}.img", 8 * MIB, seed=3) for name in "ab"]
    a, b = (legs(1, "file", str(image), nbdkit=False)[0] for image in images)
    state = tmp_path / "state.json"
    update = random_file(tmp_path / "update.img", 2 * MIB, seed=4)
    with serve(*mirror_args([a, b], f"state={state}", *TIMEOUT_ARGS)) as srv:
        b.kill()
        run(["nbdcopy", "--flush", update, srv.uri])  # b misses it
    expected = update.read_bytes() + images[0].read_bytes()[2 * MIB:]
    assert images[0].read_bytes() == expected
    images[1].write_bytes(b"\xbb" * (8 * MIB))  # what reading the stale copy would show
    b.start()

    def reads(*extra: str) -> set[bytes]:
        """What 16 reads of each MiB return through a mirror over a and b."""
        seen = set()
        with serve(*mirror_args([a, b], *extra)) as srv, NBDClient.connect(srv.uri) as nbd:
            for _ in range(16):
                for offset in range(0, 8 * MIB, MIB):
                    seen.add(bytes(nbd.pread(MIB, offset)) == expected[offset:offset + MIB])
        return seen

    # Without the state file the mirror cannot know, and reads the stale copy too: the check below means something.
    assert reads() == {True, False}
    # With it, b is known stale: never read, only rebuilt (slowly, so that it is still stale while read).
    assert reads(f"state={state}", "resync-rate=256K") == {True}
    assert recorded(state)[str(b.socket)] == "stale"


def test_mirror_write_quorum_not_met_fails_writes_and_loses_nothing_acknowledged(tmp_path, legs):
    a, b = legs(2, "memory", "4M")
    state = tmp_path / "state.json"
    acknowledged = random_file(tmp_path / "ack.img", MIB, seed=5).read_bytes()
    with serve(*mirror_args([a, b], "write-quorum=2", f"state={state}", *TIMEOUT_ARGS)) as srv, \
            NBDClient.connect(srv.uri) as nbd:
        nbd.pwrite(acknowledged, 0)
        nbd.flush()
        b.kill()
        refused = failing_fast(lambda: nbd.pwrite(b"refused", 2 * MIB), 1 + SLACK)
        assert refused.errno == errno.EIO and "fewer than write-quorum=2" in str(refused)
        again = failing_fast(lambda: nbd.pwrite(b"refused", 2 * MIB), SLACK)
        assert again.errno == errno.EIO and "1 copies in sync can be reached, fewer than write-quorum=2" in str(again)
        assert nbd.pread(MIB, 0) == acknowledged
        assert recorded(state)[str(b.socket)] == "stale"
        b.start()  # empty: the rebuild gives it back what was acknowledged
        wait_for(lambda: in_sync(state, b), 60, "server 1 to be rebuilt")
        nbd.pwrite(b"quorum again", 3 * MIB)
        nbd.flush()
        copies = [leg.read_all(tmp_path) for leg in (a, b)]
        assert copies[0] == copies[1]
        assert copies[0][:MIB] == acknowledged and copies[0][3 * MIB:3 * MIB + 12] == b"quorum again"


def test_mirror_refuses_writes_while_the_state_file_cannot_be_written(tmp_path, legs):
    a, b = legs(2, "memory", "1M")
    state = tmp_path / "state.json"
    with serve(*mirror_args([a, b], f"state={state}", *TIMEOUT_ARGS)) as srv, NBDClient.connect(srv.uri) as nbd:
        state.unlink()
        state.mkdir()  # nothing can be renamed over a directory that holds a file
        (state / "blocker").touch()
        b.kill()
        refused = failing_fast(lambda: nbd.pwrite(b"not recorded", 0), SLACK)
        assert refused.errno == errno.EIO and f"cannot record which copies are in sync in {state}" in str(refused)
        assert failing_fast(lambda: nbd.pwrite(b"still not", 0), SLACK).errno == errno.EIO
        assert len(nbd.pread(12, 0)) == 12  # reads go on
        (state / "blocker").unlink()
        state.rmdir()
        nbd.pwrite(b"recorded now", 0)
        assert recorded(state) == {str(a.socket): "in-sync", str(b.socket): "stale"}
        assert "writes are refused until it can be written" in srv.stderr()


def test_mirror_last_copy_in_sync_is_waited_for_not_dropped(tmp_path, legs):
    image = random_file(tmp_path / "a.img", MIB, seed=7)
    (a,) = legs(1, "file", str(image), nbdkit=False)
    state = tmp_path / "state.json"
    with serve(*mirror_args([a], f"state={state}", *TIMEOUT_ARGS)) as srv, NBDClient.connect(srv.uri) as nbd:
        nbd.pwrite(b"acknowledged", 0)
        a.kill()
        assert failing_fast(lambda: nbd.pread(12, 0), SLACK).errno == errno.EIO
        a.start()
        assert succeeds_soon(lambda: nbd.pread(12, 0)) == b"acknowledged"
        lost = failing_fast(nbd.flush, SLACK)  # the server went away before a flush: say so once
        assert "may be lost" in str(lost)
        nbd.flush()
        assert recorded(state) == {str(a.socket): "in-sync"}


def test_mirror_does_not_rebuild_a_copy_that_came_back_too_small(tmp_path, legs):
    a, b = legs(2, "memory", "4M")
    state = tmp_path / "state.json"
    with serve(*mirror_args([a, b], f"state={state}", *TIMEOUT_ARGS)) as srv, NBDClient.connect(srv.uri) as nbd:
        b.kill()
        nbd.pwrite(b"x", 0)
        b.args = ["memory", "2M"]
        b.start()
        wait_for(lambda: "it has 2097152 bytes, fewer than 4194304" in srv.stderr(), 30, "the size to be refused")
        assert recorded(state)[str(b.socket)] == "stale"


def test_mirror_rebuild_that_loses_its_target_starts_over(tmp_path, legs):
    a, b = legs(2, "memory", "16M")
    state = tmp_path / "state.json"
    data = random_file(tmp_path / "data.img", 16 * MIB, seed=8)
    with serve(*mirror_args([a, b], f"state={state}", "resync-rate=4M", *TIMEOUT_ARGS)) as srv:
        b.kill()
        run(["nbdcopy", "--flush", data, srv.uri])
        b.start()
        wait_for(lambda: "rebuilding server 1" in srv.stderr(), 30, "the rebuild to start")
        b.kill()  # in the middle of it (16 MiB at 4 MiB/s)
        wait_for(lambda: re.search(r"rebuilding server 1 \(.*\) failed: ", srv.stderr()), 30, "the rebuild to fail")
        assert recorded(state)[str(b.socket)] == "stale"
        b.start()
        wait_for(lambda: in_sync(state, b), 60, "the rebuild to start over and finish")
        assert b.read_all(tmp_path) == data.read_bytes()


def test_mirror_refuses_to_start_below_write_quorum(tmp_path, legs):
    a, b = legs(2, "memory", "1M")
    b.kill()
    proc = run([*NBDFORMATS, "-U", tmp_path / "sock", *mirror_args([a, b], "write-quorum=2")], check=False, timeout=60)
    message = proc.stderr.decode()
    assert proc.returncode == 1 and "Traceback" not in message
    assert re.search(r"mirror: 1 copies in sync can be used, fewer than write-quorum=2: server 0 \(.*leg0.sock\): "
                     r"in sync; server 1 \(.*leg1.sock\): cannot connect: (No such file|Connection refused)", message)
    # With a state file that says a holds the data, b alone is not enough even for write-quorum=1.
    state = tmp_path / "state.json"
    _mirror_state.save(str(state), _mirror_state.MirrorState(MIB, {a.uri: True, b.uri: False}))
    b.start()
    a.kill()
    proc = run([*NBDFORMATS, "-U", tmp_path / "sock", *mirror_args([a, b], f"state={state}")], check=False, timeout=60)
    assert proc.returncode == 1 and re.search(r"0 copies in sync can be used, .*server 0 \(.*\): in sync, cannot "
                                              r"connect: .*; server 1 \(.*\): stale$", proc.stderr.decode().strip())


def test_mirror_rebuilds_a_new_empty_server_and_keeps_holes(tmp_path, legs):
    a, b = legs(2, "memory", "16M")
    state = tmp_path / "state.json"
    data = random_file(tmp_path / "data.img", MIB, seed=6).read_bytes()
    with serve(*mirror_args([a], f"state={state}")) as srv, NBDClient.connect(srv.uri) as nbd:
        nbd.pwrite(data, 0)
        nbd.pwrite(data, 9 * MIB)
        nbd.flush()
    (c,) = legs(1, "memory", "16M")
    run(["nbdcopy", "--", "[", "nbdkit", "pattern", "16M", "]", b.uri])  # b is not empty, c is
    with serve(*mirror_args([a, b, c], f"state={state}")) as srv:
        assert re.search(r"starting without server 1 .*\(stale\)", srv.stderr())
        wait_for(lambda: in_sync(state, b) and in_sync(state, c), 60, "the new copies to be rebuilt")
        # The state file says in-sync a moment before the rebuild's summary is logged.
        wait_for(lambda: re.search(r"server 2 .* rebuilt in .*: 2 MiB of data copied .*, 14 MiB zeroed", srv.stderr()),
                 10, "server 2's rebuild summary")
    expected = data + bytes(8 * MIB) + data + bytes(6 * MIB)
    maps = []
    for leg in (a, b, c):
        assert leg.read_all(tmp_path) == expected
        extents = json.loads(run(["nbdinfo", "--json", "--map", leg.uri]).stdout)
        maps.append([(e["offset"], e["length"], e["type"]) for e in extents])
    assert maps[1] == maps[2] == maps[0]  # holes on the source are holes on the rebuilt copies


def test_mirror_detached_server_rebuilds_too(tmp_path, legs):
    a, b = legs(2, "memory", "4M")
    b.kill()
    state, sock, pidfile = tmp_path / "state.json", tmp_path / "front.sock", tmp_path / "front.pid"
    run([*NBDFORMATS, "-U", sock, "-P", pidfile, *mirror_args([a, b], f"state={state}")], timeout=60)
    wait_for(pidfile.exists, 30, "the detached server's pid file")
    try:
        run(["nbdcopy", "--", "[", "nbdkit", "pattern", "4M", "]", f"nbd+unix:///?socket={sock}"], timeout=30)
        b.start()
        wait_for(lambda: in_sync(state, b), 60, "server 1 to be rebuilt by the detached server")
        assert b.read_all(tmp_path) == a.read_all(tmp_path) == b"".join(
            i.to_bytes(8, "big") for i in range(0, 4 * MIB, 8))
    finally:
        os.kill(int(pidfile.read_text()), signal.SIGTERM)


@pytest.mark.parametrize("extra,message", [
    (("state=/nonexistent/dir/state.json",), "state=/nonexistent/dir/state.json: its directory does not exist"),
    (("resync-rate=fast",), "resync-rate=fast:"),
])
def test_mirror_bad_parameters(tmp_path, extra, message):
    proc = run([*NBDFORMATS, "-U", tmp_path / "sock", "mirror", "server=nbd://h/", *extra], check=False, timeout=30)
    assert proc.returncode == 1 and message in proc.stderr.decode(), proc.stderr.decode()


def test_mirror_same_server_twice_is_refused(tmp_path):
    proc = run([*NBDFORMATS, "-U", tmp_path / "sock", "mirror", "server=nbd://h/", "server=nbd://h/"],
               check=False, timeout=30)
    assert proc.returncode == 1 and "a server= is given twice" in proc.stderr.decode()


# -- The state file and the dirty map ----------------------------------------------------------------
@pytest.mark.parametrize("content,message", [
    (b"{", "Expecting property name"),
    (b'{"format": "other"}', "not a nbdformats-mirror-state file"),
    (b'{"format": "nbdformats-mirror-state", "version": 2}', "version 2, this mirror knows version 1"),
    (b'{"format": "nbdformats-mirror-state", "version": 1, "size": -1, "copies": {}}', "no valid size"),
    (b'{"format": "nbdformats-mirror-state", "version": 1, "size": 1, "copies": {"u": "maybe"}}',
     '"copies" must map URIs to "in-sync" or "stale"'),
    (b"\xff" * 10, "codec can't decode"),
])
def test_bad_state_files_are_refused(tmp_path, content, message):
    path = tmp_path / "state.json"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=re.escape(f"mirror: state={path}: ") + ".*" + re.escape(message)):
        _mirror_state.load(str(path))


def test_state_file_round_trip_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "state.json"
    assert _mirror_state.load(str(path)) is None
    state = _mirror_state.MirrorState(12345, {"nbd://a/": True, "nbd://b/": False})
    _mirror_state.save(str(path), state)
    _mirror_state.save(str(path), state)
    assert _mirror_state.load(str(path)) == state
    assert json.loads(path.read_text())["copies"] == {"nbd://a/": "in-sync", "nbd://b/": "stale"}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_dirty_map_takes_marked_runs_and_stays_small():
    dirty = DirtyMap(10 * MIB + 1, MIB)  # 11 chunks, the last one short
    assert dirty.take(0, 4) == (0, 4) and dirty.take(4, 100) == (4, 7) and dirty.take(0, 100) is None
    dirty.mark(MIB - 1, 2)  # straddles chunks 0 and 1
    dirty.mark(5 * MIB, 0)  # nothing
    dirty.mark(10 * MIB, 1)
    assert dirty.marked_bytes() == 3 * MIB
    assert dirty.take(1, 100) == (1, 1) and dirty.take(2, 100) == (10, 1) and dirty.take(0, 100) == (0, 1)
    assert chunk_size(1 << 40) == MIB and chunk_size((1 << 40) + 1) == 2 * MIB
    assert -(-(1 << 50) // chunk_size(1 << 50)) <= MOST_CHUNKS


def test_writes_that_overlap_a_copy_in_time_are_marked_again():
    tracker, dirty = WriteTracker(), DirtyMap(8 * MIB, MIB)
    while dirty.take(0, 100):
        pass
    with tracker.tracking(0, 10):  # done before the copy: the copy reads what it wrote
        pass
    with tracker.tracking(MIB - 1, 2):  # in flight when the copy begins: chunk 1 only is in the copied range
        with tracker.copying(dirty, MIB, 3 * MIB):
            with tracker.tracking(2 * MIB + 5, 1):  # starts during the copy
                pass
            with tracker.tracking(5 * MIB, 1):  # elsewhere
                pass
    with tracker.tracking(2 * MIB, 1):  # after the copy: it reaches the target after the copy did
        pass
    assert [dirty.take(0, 100), dirty.take(0, 100)] == [(1, 2), None]


def test_held_writes_wait_for_the_hold_and_the_hold_for_writes_in_flight():
    tracker = WriteTracker()
    order: list[str] = []
    inside = threading.Event()

    def write() -> None:
        with tracker.tracking(0, 1):
            inside.set()
            time.sleep(0.2)
            order.append("write in flight done")

    first = threading.Thread(target=write)
    first.start()
    inside.wait(5)
    def new_write() -> None:
        with tracker.tracking(0, 1):
            order.append("new write")

    with tracker.held():
        order.append("held")
        second = threading.Thread(target=new_write)
        second.start()
        time.sleep(0.2)
        order.append("released")
    second.join(5)
    first.join(5)
    assert order == ["write in flight done", "held", "released", "new write"]

"""Busy polling for the next request (server/busypoll.py): the adaptive window, the polling loop
on a real socket, and what a server does with it: right answers, and no CPU burnt when idle."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from conftest import NBDFORMATS, run, serve
from nbdformats.server import busypoll
from nbdformats.server.busypoll import FIRST_WINDOW_NS, BusyPoll
from nbdformats.client import NBDClient

needs_two_cpus = pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="busy polling is off on one CPU")


@needs_two_cpus
def test_window_grows_while_requests_come_soon_and_drops_when_idle():
    poller = BusyPoll(64)
    assert poller.window_ns == 0  # a new connection waits the normal way
    poller.waited(10_000)
    assert poller.window_ns == FIRST_WINDOW_NS
    for _ in range(3):
        poller.waited(30_000)
    assert poller.window_ns == 32_000  # doubled while the poll missed requests that came soon
    poller.waited(20_000)
    assert poller.window_ns == 32_000  # a wait the window covers: it stays
    for _ in range(5):
        poller.waited(60_000)
    assert poller.window_ns == 64_000  # up to the maximum, not beyond
    poller.waited(65_000)  # longer than the maximum: idle
    assert poller.window_ns == 0
    poller.waited(2_000)  # a short wait that a poll would have caught: start again small
    assert poller.window_ns == FIRST_WINDOW_NS


def test_zero_maximum_never_polls():
    poller = BusyPoll(0)
    poller.waited(1000)
    assert poller.window_ns == 0
    assert poller.poll(lambda: 1) is None


@needs_two_cpus
def test_poll_catches_data_sent_within_the_window():
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.setblocking(False)
        buf = bytearray(16)

        def try_receive() -> int | None:
            try:
                return ours.recv_into(buf)
            except BlockingIOError:
                return None

        poller = BusyPoll(10_000)  # 10 ms: room for a thread switch on a loaded machine
        poller.window_ns = 10_000_000
        sender = threading.Timer(0.001, theirs.sendall, (b"request",))
        sender.start()
        assert poller.poll(try_receive) == 7 and bytes(buf[:7]) == b"request"
        sender.join()
        poller.window_ns = 1_000_000
        start = time.monotonic()
        assert poller.poll(try_receive) is None  # nothing comes: gives up after the window
        assert time.monotonic() - start < 1


@needs_two_cpus
def test_a_miss_counts_its_polling_as_waiting():
    """A request that comes just after the window (polling missed it, then a short sleep) is a
    wait longer than the maximum: polling stops, instead of spinning a whole window before every
    such request (a pipelined stream whose client is the bottleneck)."""
    from nbdformats.api.chain import ThreadModel
    from nbdformats.protocol.transmission import RequestDecoder
    from nbdformats.server.budget import CONNECTION_LIMIT, Budget
    from nbdformats.server.engine import Engine
    from nbdformats.server.stream import SocketStream
    from test_protocol import memory_transmission

    ours, theirs = socket.socketpair()
    with ours, theirs:
        engine = Engine(SocketStream(ours), memory_transmission(), RequestDecoder(), thread_model=ThreadModel.PARALLEL,
                        threads=1, latency_bound=False, busy_poll_us=20_000, budget=Budget(CONNECTION_LIMIT),
                        stats=None, server_connections=["this connection"], peer="test")
        assert engine.busy_poll is not None
        engine.busy_poll.window_ns = 10_000_000  # polls 10 ms, the maximum is 20 ms
        sender = threading.Timer(0.025, theirs.sendall, (b"late",))  # after the window and the maximum
        sender.start()
        buf = memoryview(bytearray(16))
        assert engine._receive(buf) == 4
        sender.join()
        assert engine.busy_poll.window_ns == 0


def test_only_one_poller_per_spare_cpu():
    assert busypoll._pollers._value == max(1, (os.cpu_count() or 1) - 1)


def server_cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


@needs_two_cpus
@pytest.mark.parametrize("plugin", [["memory", "64M"], ["file", "disk.img"]], ids=["inline", "threads"])
def test_an_idle_connection_burns_no_cpu_after_polling(tmp_path, plugin):
    """Many quick requests grow the window; then the client sleeps while connected. A server
    that kept spinning would use a whole CPU second per second."""
    if plugin[0] == "file":
        (tmp_path / "disk.img").write_bytes(bytes(64 << 20))
        plugin = ["file", str(tmp_path / "disk.img")]
    with serve(*plugin) as srv:
        with NBDClient.connect(srv.uri) as client:
            for i in range(2000):
                client.pwrite(i.to_bytes(4, "little") * 1024, (i % 1000) * 4096)
            for i in range(1000, 2000):
                assert bytes(client.pread(4, (i % 1000) * 4096)) == i.to_bytes(4, "little")
            before = server_cpu_seconds(srv.proc.pid)
            time.sleep(2)
            used = server_cpu_seconds(srv.proc.pid) - before
            assert used < 0.5, f"the idle server used {used:.2f} s of CPU in 2 s"
            assert bytes(client.pread(4, 0)) == (1000).to_bytes(4, "little")  # still serving


def test_busy_poll_option():
    bad = run([*NBDFORMATS, "--busy-poll=-1", "memory", "1M"], check=False)
    assert bad.returncode != 0 and b"--busy-poll needs microseconds from 0 (off) to 10000" in bad.stderr
    off = run([*NBDFORMATS, "--busy-poll=0", "-U", "-", "memory", "1M", "--run", 'nbdinfo --size "$uri"'])
    assert off.stdout.strip() == str(1 << 20).encode()

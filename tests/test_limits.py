"""Limits that keep one client from hurting the server or other clients: backpressure against a
client that never reads its replies, the per-connection in-flight limits, --max-connections,
--handshake-timeout and the largest request accepted."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from pathlib import Path

import pytest

from conftest import random_file, serve
from fixtures.hardening import Raw, rss_mib
from nbdformats.protocol import wire as P
from nbdformats.server.budget import CONNECTION_LIMIT, SERVER_LIMIT, SMALL_ALLOWANCE
from nbdformats.protocol.transmission import MAX_PAYLOAD

GATE = str(Path(__file__).parent / "fixtures" / "plugins" / "gate.py")


@pytest.mark.parametrize("plugin", ["memory", "file"])
def test_client_that_never_reads_replies_cannot_grow_server_memory(tmp_path, plugin):
    """128 reads of 16 MiB (2 GiB of replies) from a client that reads nothing: the server stops
    reading requests instead of queueing replies, and other clients are still served."""
    disk = random_file(tmp_path / "disk.img", 32 << 20, seed=5)
    args = ("memory", "32M") if plugin == "memory" else ("file", str(disk))
    with serve(*args) as srv:
        good = Raw(srv.socket)
        good.go()
        if plugin == "memory":  # memory reads of data, not holes
            assert good.write(0, disk.read_bytes()) == 0
        before = rss_mib(srv.proc.pid)
        greedy = Raw(srv.socket)
        greedy.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        greedy.go()
        count, length = 128, 16 << 20

        def flood() -> None:  # sendall blocks once the server stops reading: run it aside
            try:
                for cookie in range(count):
                    greedy.request(P.CMD_READ, cookie, 0, length)
            except OSError:
                pass

        sender = threading.Thread(target=flood, daemon=True)
        sender.start()
        expected = hashlib.sha256(disk.read_bytes()[5 << 20:(5 << 20) + 65536]).hexdigest()
        peak = before
        for i in range(20):  # meanwhile a well-behaved client gets right answers
            assert hashlib.sha256(good.read(5 << 20, 65536, cookie=i)).hexdigest() == expected
            peak = max(peak, rss_mib(srv.proc.pid))
            time.sleep(0.05)
        # the connection's in-flight byte cap, plus the reply being built
        bound = (CONNECTION_LIMIT + length) / (1 << 20) + 48
        assert peak - before < bound, (before, peak)
        # The stalled client catches up and gets every reply intact (threads may reorder them).
        first = hashlib.sha256(disk.read_bytes()[:length]).digest()
        cookies = set()
        for _ in range(count):
            cookie, error = greedy.simple_reply()
            assert error == 0
            cookies.add(cookie)
            assert hashlib.sha256(greedy.recv_exact(length)).digest() == first
        assert cookies == set(range(count))
        sender.join(10)
        assert srv.proc.poll() is None


def test_many_clients_that_never_read_are_bounded_server_wide():
    """Many clients each pipeline 32 MiB reads and never read the replies: the server-wide budget
    bounds what they pin together, not just per connection, and the memory goes back once they
    have gone.  (docs/security.md gives the figure for 200 clients.)"""
    clients_count, reads_each, length = 40, 4, 32 << 20
    with serve("memory", "1G") as srv:
        before = rss_mib(srv.proc.pid)
        clients = []
        for _ in range(clients_count):
            client = Raw(srv.socket)
            client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            client.go()
            clients.append(client)

        def flood(client: Raw) -> None:
            try:
                for cookie in range(reads_each):
                    client.request(P.CMD_READ, cookie, 0, length)
            except OSError:
                pass

        senders = [threading.Thread(target=flood, args=(c,), daemon=True) for c in clients]
        for sender in senders:
            sender.start()
        peak = before
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            peak = max(peak, rss_mib(srv.proc.pid))
            time.sleep(0.05)
        # 40 clients x 4 x 32 MiB = 5 GiB asked for; the server holds its 512 MiB budget, each
        # connection's small allowance, one request beyond, and what threads and allocator keep.
        bound = SERVER_LIMIT + clients_count * SMALL_ALLOWANCE + length
        assert peak - before < bound / (1 << 20) + 128, (before, peak)
        well_behaved = Raw(srv.socket)  # its small reads need none of the server's budget
        well_behaved.go()
        assert well_behaved.read(0, 4096) == bytes(4096)
        for client in clients:
            client.sock.close()
        deadline = time.monotonic() + 20
        while rss_mib(srv.proc.pid) - before > 64 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert rss_mib(srv.proc.pid) - before <= 64  # freed buffers went back to the kernel


def probe(sock: str) -> int:
    """How many reads are waiting at the gate (this read also opens it)."""
    client = Raw(sock)
    client.go()
    count = int(client.read(32 << 20, 8))
    client.close()
    return count


@pytest.mark.parametrize("length,threads,limit", [(4096, 8, 8), (16 << 20, 128, CONNECTION_LIMIT // (16 << 20))])
def test_in_flight_limit_per_connection(length, threads, limit):
    """Pipelined requests beyond the limit wait unread: a blocking plugin runs at most -t requests
    of one connection at once, and at most CONNECTION_LIMIT of reads however many threads."""
    with serve(GATE, options=("-t", str(threads))) as srv:
        client = Raw(srv.socket)
        client.go()
        for cookie in range(limit * 2):
            client.request(P.CMD_READ, cookie, 0, length)
        time.sleep(1.0)
        assert probe(srv.socket) == limit
        answered = set()
        for _ in range(limit * 2):  # every request is answered once the gate opens
            cookie, error = client.simple_reply()
            assert error == 0
            answered.add(cookie)
            client.recv_exact(length)
        assert answered == set(range(limit * 2))


def test_max_connections_refuses_extra_clients_and_frees_slots():
    with serve("memory", "1M", options=("--max-connections", "2")) as srv:
        first, second = Raw(srv.socket), Raw(srv.socket)
        first.go()
        second.go()
        third = Raw(srv.socket)
        with pytest.raises((EOFError, ConnectionResetError)):
            third.go()
        assert "--max-connections 2 reached" in srv.stderr()
        second.request(P.CMD_DISC, 1, 0, 0)
        assert second.closed_by_server(10)
        time.sleep(0.2)
        fourth = Raw(srv.socket)  # the freed slot is usable again
        fourth.go()
        assert fourth.write(0, b"slot") == 0 and first.read(0, 4) == b"slot"


def test_handshake_timeout_drops_silent_and_slow_clients():
    with serve("memory", "1M", options=("--handshake-timeout", "1")) as srv:
        silent = Raw(srv.socket)
        silent.greeting()
        start = time.monotonic()
        assert silent.closed_by_server(10)
        assert 0.8 < time.monotonic() - start < 5
        # A slow-loris client trickling a valid handshake byte by byte is dropped as well.
        slow = Raw(srv.socket)
        slow.greeting()
        handshake = b"\0\0\0\3" + P.OPTION_HEADER.pack(P.IHAVEOPT, P.OPT_LIST, 0)
        start = time.monotonic()
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            for byte in handshake * 50:
                slow.send(bytes([byte]))
                time.sleep(0.05)
        assert time.monotonic() - start < 5
        # A client that finished its handshake is not subject to it.
        idle = Raw(srv.socket)
        idle.go()
        time.sleep(1.5)
        assert idle.write(0, b"still here") == 0
        assert "handshake timed out" in srv.stderr()


def test_largest_request_is_accepted_and_larger_ones_refused():
    with serve("memory", f"{2 * MAX_PAYLOAD}") as srv:
        client = Raw(srv.socket)
        client.go()
        assert len(client.read(0, MAX_PAYLOAD)) == MAX_PAYLOAD
        client.request(P.CMD_READ, 2, 0, MAX_PAYLOAD + 1)
        assert client.simple_reply() == (2, P.NBD_EINVAL)
        client.request(P.CMD_WRITE, 3, 0, MAX_PAYLOAD + 1)
        client.send(bytes(MAX_PAYLOAD + 1))  # drained, refused, the stream stays in step
        assert client.simple_reply() == (3, P.NBD_EINVAL)
        client.request(P.CMD_BLOCK_STATUS, 4, 0, 0xFFFFFFFF)  # no meta context: refused, not a crash
        assert client.simple_reply() == (4, P.NBD_EINVAL)
        assert client.write(4096, b"ok", cookie=5) == 0 and client.read(4096, 2, cookie=6) == b"ok"

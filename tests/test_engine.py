"""The transmission engine (server/engine.py) on a socketpair, without a server around it."""

from __future__ import annotations

import os
import socket
import threading
import time

from nbdformats.api.chain import ThreadModel
from nbdformats.protocol import wire as P
from nbdformats.protocol.transmission import RequestDecoder
from nbdformats.server import engine as engine_module
from nbdformats.server.budget import CONNECTION_LIMIT, SERVER_LIMIT, SMALL_ALLOWANCE, Budget
from nbdformats.server.engine import Engine
from nbdformats.server.stream import SocketStream
from test_protocol import memory_transmission, request


class CountingSocket(socket.socket):
    """A socket that counts its sendmsg calls."""

    sends = 0

    def sendmsg(self, buffers, *args):  # type: ignore[override]
        self.sends += 1
        return super().sendmsg(buffers, *args)


def engine_for(sock: socket.socket, threads: int = 1) -> Engine:
    return Engine(SocketStream(sock), memory_transmission(structured=False), RequestDecoder(),
                  thread_model=ThreadModel.PARALLEL, threads=threads, latency_bound=False, busy_poll_us=0,
                  budget=Budget(CONNECTION_LIMIT, Budget(SERVER_LIMIT), SMALL_ALLOWANCE), stats=None, server_connections=(),
                  peer="test")


def run_aside(engine: Engine) -> threading.Event:
    finished = threading.Event()
    threading.Thread(target=lambda: (engine.run(), finished.set()), daemon=True).start()
    return finished


def test_engine_answers_pipelined_requests_together():
    """Requests that arrive together are answered together (one sendmsg), each reply intact:
    writes, reads of what they wrote, and a refused request, in one go from the client."""
    ours, client = socket.socketpair()
    server_side = CountingSocket(fileno=os.dup(ours.fileno()))
    ours.close()
    engine = engine_for(server_side)
    batch = b"".join(request(P.CMD_WRITE, i * 4096, 4, cookie=i) + b"%04d" % i for i in range(10))
    batch += b"".join(request(P.CMD_READ, i * 4096, 4, cookie=100 + i) for i in range(10))
    batch += request(P.CMD_READ, 2 << 20, 4, cookie=999)  # past the end of the 1M disk: EINVAL
    client.sendall(batch)
    finished = run_aside(engine)
    expected = 10 * 16 + 10 * (16 + 4) + 16
    received = b""
    client.settimeout(10)
    while len(received) < expected:
        received += client.recv(65536)
    replies = {}
    position = 0
    while position < len(received):
        magic, error, cookie = P.SIMPLE_REPLY.unpack_from(received, position)
        assert magic == P.SIMPLE_REPLY_MAGIC
        position += 16
        data = b""
        if 100 <= cookie < 110:
            data, position = received[position:position + 4], position + 4
        replies[cookie] = (error, data)
    assert replies == {**{i: (0, b"") for i in range(10)}, **{100 + i: (0, b"%04d" % i) for i in range(10)},
                       999: (P.NBD_EINVAL, b"")}
    assert server_side.sends < 21  # not one per request (one, when the 21 arrive at once)
    client.sendall(request(P.CMD_DISC))
    assert finished.wait(10)
    client.close()


def test_the_watchdog_stops_when_no_connection_needs_it():
    """An idle server keeps no thread waking up every few milliseconds."""
    ours, client = socket.socketpair()
    engine = engine_for(ours, threads=4)
    finished = run_aside(engine)
    for _ in range(100):
        if engine_module._watchdog is not None and engine_module._watchdog.is_alive():
            break
        time.sleep(0.01)
    watchdog = engine_module._watchdog
    assert watchdog is not None and watchdog.is_alive() and engine in engine_module._watched
    client.sendall(request(P.CMD_DISC))
    assert finished.wait(10)
    watchdog.join(5)
    assert not watchdog.is_alive() and engine_module._watchdog is None
    ours.close()
    client.close()

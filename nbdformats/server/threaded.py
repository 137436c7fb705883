"""Transmission for blocking chains: worker threads that each read, run and answer a request.

Handing every request from the event loop to a worker and back costs two thread wake-ups
(~40-70 us on this 2-core machine), more than a page-cache read or write.  nbdkit avoids it by
letting each worker read the next request itself; so do we once the handshake is over: each
of a connection's threads takes the receive lock, decodes one request (`RequestDecoder`, the
same sans-IO code as the event loop uses), releases the lock, runs it on the chain and sends
the reply under the send lock.  Blocking sends are the backpressure: a thread whose client does
not read waits, and with it the requests it would have read.

Before sleeping in recv(), the thread holding the receive lock of the server's only connection
busy polls a while (server/busypoll.py): with several connections the spinning thread would take
the GIL and a CPU from the others.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import weakref
from typing import Any, Callable, Collection

from ..protocol import wire as P
from .busypoll import DEFAULT_MAX_US, BusyPoll
from ..api.chain import WouldBlock, set_must_not_block
from ..protocol.errors import ProtocolError
from ..protocol.transmission import Request, RequestDecoder
from .transmission import Transmission

log = logging.getLogger("nbdformats")

# One lock for chains whose thread model is serialize_all_requests: one request at a time server-wide.
SERVER_WIDE_LOCK = threading.Lock()
# Bytes of READ replies being built or sent per connection: without it, 16 threads each blocked
# sending a 64 MiB reply to a client that does not read would hold 1 GiB.  One read always runs.
MAX_IN_FLIGHT_BYTES = 64 * 1024 * 1024
# Threads a connection starts with; more are added (up to -t) when the backend really blocks.
# Threads contend for the GIL, and handing the receive lock from one to the next costs a wake-up
# per request: one thread per connection measured as fast or faster than two here for page-cache
# I/O at queue depth 1 and 16, and sixteen three times slower.  A read that a nowait_reads plugin
# cannot serve from the page cache adds a thread at once; otherwise a watchdog adds one when every
# thread of a connection has been inside a request for longer than SLOW_REQUEST while the client
# has more requests waiting (a page-cache request takes microseconds; one that takes
# milliseconds waits for a disk or a network, and another thread can wait at the same time).
# Chains that wait on the network (`latency_bound`: nbd, rbd, S3, curl...) start with all -t
# threads: their round trips of 0.1-4 ms are too short for the watchdog, and one thread would
# send them one at a time.
INITIAL_THREADS = 1
SLOW_REQUEST = 0.004
WATCHDOG_INTERVAL = 0.005
# Replies to requests that arrived together are sent together, up to these limits: one sendmsg
# (and one wake-up of the client) instead of one each.  At queue depth 1 nothing waits.
COALESCE_BYTES = 256 * 1024
COALESCE_BUFFERS = 64  # sendmsg takes at most IOV_MAX (1024) buffers

_watched: "weakref.WeakSet[ThreadedTransmission]" = weakref.WeakSet()
_watchdog_lock = threading.Lock()
_watchdog: threading.Thread | None = None


def _watch_for_blocked_connections() -> None:
    """Runs while some connection may need more threads; an idle server has no watchdog."""
    global _watchdog
    while True:
        time.sleep(WATCHDOG_INTERVAL)
        with _watchdog_lock:
            connections = list(_watched)
            if not connections:
                _watchdog = None
                return
        for connection in connections:
            connection.grow_if_blocked()


def _watch(connection: "ThreadedTransmission") -> None:
    global _watchdog
    with _watchdog_lock:
        _watched.add(connection)
        if _watchdog is None:
            _watchdog = threading.Thread(target=_watch_for_blocked_connections, name="nbdformats-watchdog",
                                         daemon=True)
            _watchdog.start()


def _unwatch(connection: "ThreadedTransmission") -> None:
    with _watchdog_lock:
        _watched.discard(connection)


class ThreadedTransmission:
    def __init__(self, sock: socket.socket, transmission: Transmission, decoder: RequestDecoder, *,
                 threads: int, serialize_all: bool, peer: Any, on_finished: Callable[[], None],
                 try_nowait_reads: bool = False, busy_poll_us: int = DEFAULT_MAX_US,
                 server_connections: Collection[Any] = (), latency_bound: bool = False) -> None:
        self.sock = sock
        self.transmission = transmission
        self.decoder = decoder
        self.serialize_all = serialize_all
        self.try_nowait_reads = try_nowait_reads
        self.peer = peer
        self.on_finished = on_finished
        self._pending: list[Request] = []  # decoded but not yet taken by a thread
        self._recv_lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._stopping = False  # DISC, EOF, an error, or the server shutting down
        self._budget = threading.Condition()
        self._budget_used = 0  # bytes of READ replies in flight
        self._max_threads = threads
        self._initial_threads = threads if latency_bound else min(INITIAL_THREADS, threads)
        # Holding a reply while answering the next request suits requests that take microseconds;
        # one that waits for another machine would hold it for a round trip.
        self._coalesce = not latency_bound
        self._running = 0  # live threads; the last one to leave reports the connection finished
        self._busy_since: dict[int, float] = {}  # thread ident -> when its current request started
        self._busy_poll = BusyPoll(busy_poll_us)
        self._server_connections = server_connections  # busy polling is for a server's only connection

    def start(self, leftover: bytes) -> None:
        if leftover:
            self._pending.extend(self.decoder.receive(leftover))
        for _ in range(self._initial_threads):
            self._add_thread()
        if self._max_threads > self._initial_threads:
            _watch(self)

    def grow_if_blocked(self) -> None:
        """Watchdog: add a thread when all of them have been stuck in requests for a while and
        the client has sent more."""
        if self._stopping or self._running >= self._max_threads:
            _unwatch(self)  # nothing more to add
            return
        starts = list(self._busy_since.values())
        if len(starts) >= self._running and starts and time.monotonic() - max(starts) > SLOW_REQUEST \
                and (self._pending or self._client_sent_more()):
            self._add_thread()

    def _client_sent_more(self) -> bool:
        """Whether bytes wait to be received (every thread is busy: nobody is receiving them)."""
        try:
            return bool(self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except OSError:  # nothing (BlockingIOError), or the connection is gone
            return False

    def _add_thread(self) -> None:
        with self._state_lock:
            if self._running >= self._max_threads:
                return
            self._running += 1
            number = self._running
        threading.Thread(target=self._serve, name=f"nbdformats-conn-{number}", daemon=True).start()

    def stop(self) -> None:
        """Stop reading requests; running ones finish and are answered (server shutdown)."""
        self._stopping = True
        try:
            self.sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass

    def _next_request(self, wait: bool = True) -> Request | None:
        """The next request; None when the connection ends (or, with `wait=False`, when none
        is decoded and waiting: then nothing is received)."""
        if not self._recv_lock.acquire(blocking=wait):
            return None
        try:
            while not self._pending:
                if self._stopping or not wait:
                    return None
                buf = self.decoder.get_buffer()
                try:
                    n = self._receive(buf)
                except OSError:
                    n = 0
                if n == 0:
                    self._stopping = True
                    return None
                self._pending.extend(self.decoder.buffer_updated(n))
            req = self._pending.pop(0)
            if req.type == P.CMD_DISC:
                # "The server MUST handle all outstanding requests ... and close the TCP session."
                self._stopping = True
                self._pending.clear()
                return None
            return req
        finally:
            self._recv_lock.release()

    def _receive(self, buf: memoryview) -> int:
        """recv_into(buf), busy polling first while requests keep coming soon."""
        recv_into = self.sock.recv_into
        poller = self._busy_poll
        if not poller.max_ns or len(self._server_connections) != 1:
            return recv_into(buf)

        def try_receive() -> int | None:
            try:
                return recv_into(buf, 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return None

        start = time.perf_counter_ns()
        received = poller.poll(try_receive)
        if received is not None:
            return received
        received = recv_into(buf)
        poller.waited(time.perf_counter_ns() - start)
        return received

    def _send_held(self, held: list, cost: int) -> None:
        """Send held replies, then give back their READ budget (even if the send fails)."""
        try:
            self._send(held)
        except OSError:
            self._stopping = True
        finally:
            held.clear()  # the replies' memory goes with their budget
            with self._budget:
                self._budget_used -= cost
                self._budget.notify_all()

    def _send(self, buffers: list) -> None:
        with self._send_lock:
            total = sum(len(b) for b in buffers)
            sent = self.sock.sendmsg(buffers)
            if sent < total:  # rare: the socket buffer filled; finish the rest
                remainder = b"".join(bytes(b) for b in buffers)[sent:]
                self.sock.sendall(remainder)

    def _read_from_cache_or_block(self, req: Request) -> list:
        set_must_not_block(True)
        try:
            return self.transmission.process(req, nowait=True)
        except WouldBlock:
            self._add_thread()  # real disk I/O ahead: another thread keeps the connection going
        finally:
            set_must_not_block(False)
        return self.transmission.process(req)

    def _serve(self) -> None:
        transmission = self.transmission
        held: list = []  # replies not sent yet: sent together in one sendmsg (see COALESCE_BYTES)
        held_bytes = held_cost = 0
        me = threading.get_ident()
        try:
            while True:
                try:
                    # While holding replies, take only requests already decoded: the client may
                    # be waiting for those replies before it sends more.
                    req = self._next_request(wait=not held)
                    if req is None and held and not self._stopping:
                        self._send_held(held, held_cost)
                        held, held_bytes, held_cost = [], 0, 0
                        req = self._next_request()
                except ProtocolError as e:
                    log.warning("%s: %s; closing the connection", self.peer or "client", e)
                    self._stopping = True
                    break
                if req is None:
                    break
                problem = transmission.check(req)
                cost = req.length if problem is None and req.type == P.CMD_READ else 0
                with self._budget:
                    if held and self._budget_used + cost > MAX_IN_FLIGHT_BYTES:
                        # Never wait for budget that our own held replies use: send them first.
                        self._budget.release()
                        try:
                            self._send_held(held, held_cost)
                        finally:
                            self._budget.acquire()
                        held, held_bytes, held_cost = [], 0, 0
                    while self._budget_used and self._budget_used + cost > MAX_IN_FLIGHT_BYTES:
                        self._budget.wait()
                    self._budget_used += cost
                held_cost += cost
                self._busy_since[me] = time.monotonic()
                try:
                    if problem is not None:
                        buffers = [transmission.replies.error(req.cookie, req.offset, *problem)]
                    elif self.serialize_all:
                        with SERVER_WIDE_LOCK:
                            buffers = transmission.process(req)
                    elif self.try_nowait_reads and req.type == P.CMD_READ:
                        buffers = self._read_from_cache_or_block(req)
                    else:
                        buffers = transmission.process(req)
                finally:
                    self._busy_since.pop(me, None)
                held.extend(buffers)
                held_bytes += sum(len(b) for b in buffers)
                buffers = None
                if (self._coalesce and self._pending and held_bytes < COALESCE_BYTES
                        and len(held) < COALESCE_BUFFERS):
                    continue  # more requests already received: answer them together
                self._send_held(held, held_cost)
                held, held_bytes, held_cost = [], 0, 0
        except Exception:
            log.exception("connection thread failed")
            self._stopping = True
        finally:
            if held or held_cost:  # what was answered still goes out, and its budget comes back
                self._send_held(held, held_cost)
            with self._state_lock:
                self._running -= 1
                last = self._running == 0
            if last:
                _unwatch(self)
                self.on_finished()

"""The transmission engine: how one connection's requests are received, admitted, run and answered.

One engine per connection, whatever the chain's thread model, with or without TLS.  It works as
nbdkit's threads do: each of the connection's threads takes the receive lock, decodes the next
request (protocol/transmission.py's RequestDecoder) from the stream (server/stream.py) or takes
one already decoded, releases the lock, admits the request against the in-flight budget, runs it
(server/transmission.py: `Transmission.process` calls the chain) and sends the reply under the
send lock.  So a request never changes threads, and blocking sends are the backpressure: a thread
whose client does not read waits, and so do the requests it would have read.

Threads.  A connection starts with one thread: threads contend for the GIL, and for page-cache or
in-memory I/O one thread per connection measured as fast as two or more.  A watchdog adds one
(up to `-t`) when every thread of a connection has been inside a request for SLOW_REQUEST while
the client has sent more: that request waits for a disk or another machine, and another thread
can wait alongside.  While no request is slow the watchdog checks less and less often (up to
every WATCHDOG_IDLE_INTERVAL), so the first slow requests are noticed within 0.1 s.  Chains whose callbacks wait for another machine (`latency_bound`: nbd, rbd,
S3, curl...) start with all `-t` threads, as nbdkit's connections do; their 0.1-4 ms round trips
are too short for the watchdog.  `serialize_requests` gives a connection one thread,
`serialize_all_requests` one plus a server-wide lock around each request.

Replies to requests that arrived together go out together: a thread that has more requests
already decoded answers them before sending, then sends all the replies with one sendmsg (at most
COALESCE_BYTES or COALESCE_BUFFERS): one system call and one wake-up of the client instead of one
each.  At queue depth 1 nothing waits.

Before sleeping in recv, the thread holding the receive lock of the server's only connection busy
polls a while (server/busypoll.py); with several connections the spinning thread would take the
GIL and a CPU from the others.

Memory: READ replies and WRITE payloads in flight are charged to the connection's budget and to
the server-wide one (server/budget.py) before their buffers are allocated; a request waits for
room (one request always fits), so memory stays bounded however many clients pipeline large
requests without reading the replies.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from typing import Any, Collection

from ..api.chain import ThreadModel, set_request_client
from ..protocol import wire as P
from ..protocol.errors import ProtocolError
from ..protocol.transmission import Request, RequestDecoder, aligned_buffer
from .budget import Budget
from .busypoll import BusyPoll
from .stats import StatsRecorder, reply_failed
from .stream import Stream
from .transmission import Transmission

log = logging.getLogger("nbdformats")

# One lock for chains whose thread model is serialize_all_requests: one request at a time server-wide.
SERVER_WIDE_LOCK = threading.Lock()
SLOW_REQUEST = 0.004
WATCHDOG_INTERVAL = 0.005
WATCHDOG_IDLE_INTERVAL = 0.1
COALESCE_BYTES = 256 * 1024
COALESCE_BUFFERS = 64  # sendmsg takes at most IOV_MAX (1024) buffers
READ_ONLY_COMMANDS = frozenset((P.CMD_READ, P.CMD_BLOCK_STATUS, P.CMD_CACHE))


class Engine:
    def __init__(self, stream: Stream, transmission: Transmission, decoder: RequestDecoder, *,
                 thread_model: ThreadModel, threads: int, latency_bound: bool, busy_poll_us: int,
                 budget: Budget, stats: StatsRecorder | None, server_connections: Collection[Any],
                 peer: str) -> None:
        self.stream = stream
        self.transmission = transmission
        self.decoder = decoder
        self.budget = budget
        self.stats = stats
        self.peer = peer
        self.serialize_all = thread_model == ThreadModel.SERIALIZE_ALL_REQUESTS
        self.max_threads = max(1, threads) if thread_model == ThreadModel.PARALLEL else 1
        self.initial_threads = self.max_threads if latency_bound else 1
        # Holding a reply while answering the next request suits requests that take microseconds;
        # one that waits for another machine would hold it for a round trip.
        self.coalesce = not latency_bound
        self.busy_poll = BusyPoll(busy_poll_us) if stream.can_busy_poll else None
        self.server_connections = server_connections  # busy polling is for a server's only connection
        decoder.allocate_payload = self._allocate_payload
        self._pending: list[Request] = []  # decoded but not yet taken by a thread
        self._recv_lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self.stopping = False  # DISC, EOF, an error, or the server shutting down
        self.client_gone = False  # a send failed: replies can no longer be delivered
        self._running = 0  # live threads
        self._finished = threading.Event()
        self._busy_since: dict[int, float] = {}  # thread ident -> when its current request started

    # -- Life ------------------------------------------------------------------------------------
    def run(self, leftover: bytes = b"") -> None:
        """Serve until the client disconnects or stop() is called; returns when every thread of
        the connection has finished.  The calling thread is the connection's first thread."""
        try:
            if leftover:
                self._pending.extend(self.decoder.receive(leftover))
        except ProtocolError as e:
            log.warning("%s: %s; closing the connection", self.peer, e)
            return
        with self._state_lock:
            self._running = 1
        for _ in range(self.initial_threads - 1):
            self._add_thread()
        if self.max_threads > self._running:
            _watch(self)
        self._serve()
        self._finished.wait()

    def stop(self) -> None:
        """Stop reading requests; running ones finish and are answered (server shutdown)."""
        self.stopping = True
        self.stream.stop_reading()

    def grow_if_blocked(self) -> bool:
        """Watchdog: add a thread when all of them have been inside requests for a while and
        the client has sent more.  Whether a request of this connection is running slowly."""
        if self.stopping or self._running >= self.max_threads:
            _unwatch(self)
            return False
        starts = list(self._busy_since.values())
        slow = bool(starts) and time.monotonic() - min(starts) > SLOW_REQUEST / 2
        if starts and len(starts) >= self._running and time.monotonic() - max(starts) > SLOW_REQUEST \
                and (self._pending or self.stream.has_input()):
            self._add_thread()
        return slow

    def _add_thread(self) -> None:
        with self._state_lock:
            if self._running >= self.max_threads or self.stopping:
                return
            self._running += 1
            number = self._running
        threading.Thread(target=self._serve, name=f"nbdformats-conn-{number}", daemon=True).start()

    # -- Receiving -------------------------------------------------------------------------------
    def _allocate_payload(self, length: int, alignment: int) -> memoryview:
        """The decoder's hook for a WRITE payload: charge it to the budget, then allocate.

        Runs on the thread holding the receive lock: while it waits for room nothing more is read
        from this client."""
        self.budget.acquire(length)
        return aligned_buffer(length, alignment)

    def _next_request(self, wait: bool = True) -> Request | None:
        """The next request; None when the connection ends (or, with `wait=False`, when none is
        decoded and waiting: then nothing is received)."""
        if not self._recv_lock.acquire(blocking=wait):
            return None
        try:
            while not self._pending:
                if self.stopping or not wait:
                    return None
                buf = self.decoder.get_buffer()
                try:
                    n = self._receive(buf)
                except OSError:
                    n = 0
                if n == 0:
                    self.stopping = True
                    return None
                self._pending.extend(self.decoder.buffer_updated(n))
            req = self._pending.pop(0)
            if req.type == P.CMD_DISC:
                # "The server MUST handle all outstanding requests ... and close the TCP session."
                self.stopping = True
                self._pending.clear()
                return None
            return req
        finally:
            self._recv_lock.release()

    def _receive(self, buf: memoryview) -> int:
        """recv_into(buf), busy polling first while requests keep coming soon."""
        poller = self.busy_poll
        if poller is None or not poller.max_ns or len(self.server_connections) != 1:
            return self.stream.recv_into(buf)
        # The wait counts from the first try: a request that comes after the window plus a short
        # sleep would otherwise keep the window open, and every wait would spin it out for nothing.
        start = time.perf_counter_ns()
        received = poller.poll(lambda: self.stream.try_recv_into(buf))
        if received is not None:
            return received
        received = self.stream.recv_into(buf)
        poller.waited(time.perf_counter_ns() - start)
        return received

    # -- Running and answering -------------------------------------------------------------------
    def _run_request(self, req: Request, problem: tuple[int, str] | None) -> list[Any]:
        transmission = self.transmission
        stats = self.stats
        if problem is not None:
            if stats is not None:
                stats.record_refused(req.type, req.length)
            return [transmission.replies.error(req.cookie, req.offset, *problem)]
        start = time.perf_counter_ns() if stats is not None else 0
        if self.serialize_all:
            with SERVER_WIDE_LOCK:
                buffers = transmission.process(req)
        else:
            buffers = transmission.process(req)
        if stats is not None:
            stats.record(req.type, req.length, time.perf_counter_ns() - start, reply_failed(buffers))
        return buffers

    def _send_held(self, held: list[Any], cost: int) -> None:
        """Send held replies, then give back their budget (even if the send fails)."""
        try:
            with self._send_lock:
                self.stream.send(held)
        except OSError:
            self.stopping = True
            self.client_gone = True
        finally:
            held.clear()  # the replies' memory goes with their budget
            self.budget.release(cost)

    def _serve(self) -> None:
        set_request_client(self.stream.hangup_fd)  # a sleeping request wakes when its client hangs up
        transmission = self.transmission
        budget = self.budget
        held: list[Any] = []  # replies not sent yet: sent together in one sendmsg
        held_bytes = held_cost = 0
        me = threading.get_ident()
        try:
            while True:
                try:
                    # While holding replies, take only requests already decoded: the client may be
                    # waiting for those replies before it sends more.
                    req = self._next_request(wait=not held)
                    if req is None and held and not self.stopping:
                        self._send_held(held, held_cost)
                        held_bytes = held_cost = 0
                        req = self._next_request()
                except ProtocolError as e:
                    log.warning("%s: %s; closing the connection", self.peer, e)
                    self.stopping = True
                    break
                if req is None:
                    break
                if self.client_gone and req.type in READ_ONLY_COMMANDS:
                    continue  # nobody will see the answer; writes still reach the disk
                problem = transmission.check(req)
                cost = req.length if req.payload is not None else 0  # a WRITE's payload was charged
                if problem is None and req.type == P.CMD_READ:
                    if not budget.try_acquire(req.length):
                        if held:  # never wait for budget that our own held replies use: send them first
                            self._send_held(held, held_cost)
                            held_bytes = held_cost = 0
                        budget.acquire(req.length)
                    cost = req.length
                held_cost += cost
                self._busy_since[me] = time.monotonic()
                try:
                    buffers = self._run_request(req, problem)
                finally:
                    del self._busy_since[me]
                    req.payload = None  # the WRITE buffer is done with
                held.extend(buffers)
                held_bytes += sum(map(len, buffers))
                buffers = []  # `held` owns the replies now: their memory goes when their budget does
                if (self.coalesce and self._pending and held_bytes < COALESCE_BYTES
                        and len(held) < COALESCE_BUFFERS):
                    continue  # more requests already received: answer them together
                self._send_held(held, held_cost)
                held_bytes = held_cost = 0
        except Exception:
            log.exception("%s: connection thread failed", self.peer)
            self.stopping = True
        finally:
            if held or held_cost:  # what was answered still goes out, and its budget comes back
                self._send_held(held, held_cost)
            with self._state_lock:
                self._running -= 1
                last = self._running == 0
            if last:
                self.stopping = True
                self._release_undelivered()
                _unwatch(self)
                self._finished.set()

    def _release_undelivered(self) -> None:
        """Give back the budget of WRITEs decoded but never run (the connection ended first)."""
        for req in self._pending:
            if req.payload is not None:
                self.budget.release(req.length)
        self._pending.clear()
        partial = self.decoder.abandon_payload()
        if partial:
            self.budget.release(partial)


# -- The watchdog: one thread for the whole server, running while some connection may grow ------
_watched: "weakref.WeakSet[Engine]" = weakref.WeakSet()
_watchdog_lock = threading.Lock()
_watchdog: threading.Thread | None = None


def _watch_for_blocked_connections() -> None:
    """Checks every WATCHDOG_INTERVAL while some request runs slowly; while none does (page-cache or
    in-memory I/O: microseconds), less and less often, up to WATCHDOG_IDLE_INTERVAL: waking up and
    taking the GIL 200 times a second would cost the connections themselves."""
    global _watchdog
    interval = WATCHDOG_INTERVAL
    while True:
        time.sleep(interval)
        with _watchdog_lock:
            engines = list(_watched)
            if not engines:
                _watchdog = None
                return
        slow = [engine.grow_if_blocked() for engine in engines]
        interval = WATCHDOG_INTERVAL if any(slow) else min(interval * 2, WATCHDOG_IDLE_INTERVAL)


def _watch(engine: Engine) -> None:
    global _watchdog
    with _watchdog_lock:
        _watched.add(engine)
        if _watchdog is None:
            _watchdog = threading.Thread(target=_watch_for_blocked_connections, name="nbdformats-watchdog",
                                         daemon=True)
            _watchdog.start()


def _unwatch(engine: Engine) -> None:
    with _watchdog_lock:
        _watched.discard(engine)


"""One client connection: asyncio glue around the sans-IO handshake and transmission code.

The path of one READ: the event loop receives bytes straight into `RequestDecoder`'s buffer
(`get_buffer`/`buffer_updated`), which yields `Request`s; `_dispatch` checks each one and
runs `Transmission.process` inline (non-blocking chains) or in a worker thread (blocking
chains); `process` calls `Layer.pread` down the chain into the reply buffer; `_send` writes
it with one `transport.write`.  When the transport's buffer fills up we stop reading, so a
client that does not read its replies cannot make the server queue without bound: decoded
requests wait in a backlog while replies are over the high-water mark or too many requests
(or read bytes) are running, and reading resumes only once that backlog is empty.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections import deque
from typing import Any, Callable, Sequence

from ..protocol import wire as P
from .busypoll import BusyPoll
from .settings import ServerSettings
from ..api.chain import Layer, ThreadModel, WouldBlock, set_must_not_block
from ..api.errors import NBDError
from ..protocol.errors import ProtocolError
from ..protocol.handshake import Abort, ExportRequest, ListExports, NeedData, ServerHandshake, StartTLS, oldstyle_greeting
from .threaded import COALESCE_BUFFERS, COALESCE_BYTES, MAX_IN_FLIGHT_BYTES, ThreadedTransmission
from ..protocol.transmission import Request, RequestDecoder
from .transmission import Transmission, export_info
from .workers import WorkerPool

log = logging.getLogger("nbdformats")

MAX_IN_FLIGHT = 64  # requests running in threads per connection before we stop reading more
# Replies queued in user space before we stop reading requests: room for several 256 KiB reads
# keeps a single pipelining client (nbdcopy -C 1) streaming; memory per connection stays bounded.
WRITE_HIGH_WATER = 4 * 1024 * 1024
WRITE_LOW_WATER = 1024 * 1024
HANDSHAKE_BUFFER = 16 * 1024
SOCKET_SEND_BUFFER = 2 * 1024 * 1024  # capped by net.core.wmem_max


class Connection(asyncio.BufferedProtocol):
    def __init__(self, settings: ServerSettings, *, skip_handshake: bool = False) -> None:
        self.settings = settings
        self.chain = settings.chain
        self.skip_handshake = skip_handshake
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.layer: Layer | None = None
        self.transmission: Transmission | None = None
        self.decoder: RequestDecoder | None = None
        self.handshake: ServerHandshake | None = None
        self._hs_buffer = bytearray(HANDSHAKE_BUFFER)
        self._hs_wakeup: asyncio.Future | None = None
        self._hs_task: asyncio.Task | None = None
        self._early_requests = bytearray()
        self._handed_off = False
        self._preconnected = False  # preconnect() passed: disconnected() is owed at the end
        self._holds_connection_lock = False
        self._threaded: ThreadedTransmission | None = None
        # Inline chains on a plain socket: busy poll it for the next request (server/busypoll.py).
        self._busy_poll: BusyPoll | None = None
        self._fd = -1
        self._idle_since = 0  # perf_counter_ns when the loop last went back to waiting for us
        self._threads_done: asyncio.Future | None = None
        self._idle: asyncio.Future | None = None  # set when running requests finish (shutdown waits)
        self._closed = False
        self._disconnecting = False
        self._in_flight = 0
        self._in_flight_bytes = 0
        self._backlog: deque[Request] = deque()  # decoded, waiting for room to run
        self._paused_for_writes = False
        self._reading_paused = False
        self.peer: Any = None
        self.client_socket: Any = None
        self.pool: WorkerPool | None = None
        self._own_pool = False
        self.closed = self.loop.create_future()
        model = self.chain.thread_model
        self.inline = not self.chain.blocking
        # Reads a blocking plugin can try without blocking (page cache hits) run inline first.
        self.try_inline_reads = not self.inline and self.chain.nowait_reads and model == ThreadModel.PARALLEL
        if not self.inline:
            set_must_not_block(True)  # this is the event loop's thread
            if model in (ThreadModel.PARALLEL, ThreadModel.SERIALIZE_ALL_REQUESTS):
                self.pool = settings.pool(self.loop, model)
            else:  # SERIALIZE_REQUESTS, SERIALIZE_CONNECTIONS: one request at a time on this connection
                self.pool = WorkerPool(self.loop, 1, name="nbdformats-conn")
                self._own_pool = True

    # -- asyncio callbacks ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)  # type: ignore[attr-defined]
        self.peer = transport.get_extra_info("peername")
        self.client_socket = transport.get_extra_info("socket")
        try:  # room in the kernel for several large replies: fewer partial writes buffered in user space
            self.client_socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_SEND_BUFFER)
        except (OSError, AttributeError):
            pass
        self.settings.connections.add(self)
        log.debug("connection from %s", self.peer or "local socket")
        try:
            self.chain.preconnect(self.client_socket, self.settings.readonly)
        except Exception as e:
            log.info("refused a connection from %s: %s", self.peer or "local socket", e)
            self._abort()
            self._closed = True
            self._maybe_release()
            return
        self._preconnected = True
        self._hs_task = self.loop.create_task(self._negotiate())

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.decoder is not None:
            return self.decoder.get_buffer(sizehint)
        return memoryview(self._hs_buffer)

    def buffer_updated(self, nbytes: int) -> None:
        if self.decoder is not None:
            if self._busy_poll is not None:
                self._busy_poll.waited(time.perf_counter_ns() - self._idle_since)
            self._received(nbytes)
            if self._busy_poll is not None:
                self._poll_for_requests(self._busy_poll)
            return
        data = bytes(self._hs_buffer[:nbytes])
        if self.handshake is not None:
            self.handshake.receive_data(data)
        else:  # oldstyle or --no-handshake: the first requests may arrive before the export is open
            self._early_requests += data
        self._wake()

    def _received(self, nbytes: int) -> None:
        try:
            requests = self.decoder.buffer_updated(nbytes)
        except ProtocolError as e:
            log.warning("%s: %s; closing the connection", self.peer or "client", e)
            self._abort()
            return
        if requests:
            self._dispatch(requests)

    def _poll_for_requests(self, poller: BusyPoll) -> None:
        """Busy poll the socket for the next requests, and answer them, before going back to the
        loop; only while this is the server's one connection (the loop has nobody else to
        serve) and the client reads its replies."""
        def try_receive() -> int | None:
            try:
                return os.readv(self._fd, [self.decoder.get_buffer(-1)])
            except BlockingIOError:
                return None

        transport = self.transport
        while (len(self.settings.connections) == 1 and not self._backlog and not self._closed
               and not self._disconnecting and not self._reading_paused  # backpressure: read nothing
               and not transport.is_closing()  # its fd may be closed
               and transport.get_write_buffer_size() == 0):
            try:
                received = poller.poll(try_receive)
            except OSError:
                break  # the transport sees the same error and closes
            if not received:  # nothing yet (the loop wakes us), or EOF (the transport sees it too)
                break
            self._received(received)
        self._idle_since = time.perf_counter_ns()

    def eof_received(self) -> bool | None:
        self._wake()
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if self._handed_off:
            return  # the connection lives on in worker threads (server/threaded.py)
        self._closed = True
        self._wake()
        if self._hs_task is not None and not self._hs_task.done():
            self._hs_task.cancel()
        self._maybe_release()

    def pause_writing(self) -> None:
        self._paused_for_writes = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._paused_for_writes = False
        self._pump()
        self._update_reading()

    # -- Handshake -----------------------------------------------------------------------------
    def _wake(self) -> None:
        if self._hs_wakeup is not None and not self._hs_wakeup.done():
            self._hs_wakeup.set_result(None)

    async def _wait_for_data(self) -> None:
        self._hs_wakeup = self.loop.create_future()
        await self._hs_wakeup
        self._hs_wakeup = None

    async def _run_chain(self, func: Callable[..., Any], *args: Any) -> Any:
        if self.inline:
            return func(*args)
        return await self.pool.run(func, *args)

    async def _negotiate(self) -> None:
        if self.chain.thread_model == ThreadModel.SERIALIZE_CONNECTIONS:
            if self.settings.one_connection_at_a_time is None:
                self.settings.one_connection_at_a_time = asyncio.Lock()
            await self.settings.one_connection_at_a_time.acquire()
            self._holds_connection_lock = True
            if self._closed:  # gave up while waiting
                self._maybe_release()
                return
        try:
            await asyncio.wait_for(self._negotiate_steps(), self.settings.handshake_timeout)
        except asyncio.TimeoutError:
            log.info("%s: handshake timed out", self.peer or "client")
            self._abort()
        except ProtocolError as e:
            log.info("%s: %s", self.peer or "client", e)
            self._abort()
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("handshake failed")
            self._abort()

    async def _negotiate_steps(self) -> None:
        settings = self.settings
        if settings.oldstyle or self.skip_handshake:
            layer = await self._open("")
            info = export_info("", layer, False)
            if settings.oldstyle:
                self.transport.write(oldstyle_greeting(info))
            await self._begin_transmission(layer, info, structured=False, extended=False, meta_context_id=None,
                                           leftover=bytes(self._early_requests))
            return
        hs = self.handshake = ServerHandshake(tls=settings.tls)
        while not self._closed:
            event = hs.next_event()
            self._send_handshake()
            if isinstance(event, NeedData):
                if self._closed or (self.transport is not None and self.transport.is_closing()):
                    return
                await self._wait_for_data()
                continue
            if isinstance(event, Abort):
                self._close_when_sent()
                return
            if isinstance(event, StartTLS):
                await self._start_tls()
                continue
            if isinstance(event, ListExports):
                try:
                    exports = await self._run_chain(self.chain.list_exports, settings.readonly, hs.tls_active)
                    hs.reply_list([(e.name, e.description) for e in exports])
                except Exception as e:
                    hs.reply_error(P.REP_ERR_PLATFORM, f"cannot list exports: {e}")
                continue
            assert isinstance(event, ExportRequest)
            name = event.name
            try:
                layer = await self._open(name)
            except Exception as e:
                reason = str(e) if isinstance(e, NBDError) else f"{type(e).__name__}: {e}"
                log.info("%s: cannot open export %r: %s", self.peer or "client", name, reason)
                hs.reply_error(P.REP_ERR_UNKNOWN, f"cannot open export {name!r}: {reason}")
                continue
            info = export_info(name, layer, hs.structured_replies, settings.description)
            ready = hs.reply_export(info)
            self._send_handshake()
            if ready is None:  # NBD_OPT_INFO: the client only wanted to know
                await self._run_chain(layer.close)
                continue
            await self._begin_transmission(layer, info, structured=hs.structured_replies,
                                           extended=hs.extended_headers, meta_context_id=hs.meta_context_id,
                                           leftover=hs.leftover())
            return

    async def _open(self, name: str) -> Layer:
        readonly = self.settings.readonly
        tls = self.handshake.tls_active if self.handshake else False
        if not name:
            name = await self._run_chain(self.chain.default_export, readonly, tls)
        return await self._run_chain(self.chain.open, readonly, name, self.client_socket, tls)

    def _send_handshake(self) -> None:
        data = self.handshake.data_to_send() if self.handshake else b""
        if data and not self._closed:
            self.transport.write(data)

    async def _start_tls(self) -> None:
        context = self.settings.tls_context
        assert context is not None
        self.transport = await self.loop.start_tls(self.transport, self, context, server_side=True)
        self.handshake.tls_established()

    async def _begin_transmission(self, layer: Layer, info: Any, *, structured: bool, extended: bool,
                                  meta_context_id: int | None, leftover: bytes) -> None:
        self.layer = layer
        self.transmission = Transmission(layer, info, structured=structured, extended=extended,
                                         meta_context_id=meta_context_id, alignment=self.chain.buffer_alignment,
                                         sparse_reads=self.chain.cheap_extents)
        if self.settings.stats is not None:
            self.settings.stats.instrument(self.transmission)
        decoder = RequestDecoder(extended=extended, alignment=self.chain.buffer_alignment)
        log.debug("%s: transmission starts: export %r size %d", self.peer or "client", info.name, info.size)
        if self._closed:
            self._maybe_release()
            return
        raw_socket = self.transport.get_extra_info("socket")
        tls = self.transport.get_extra_info("sslcontext") is not None
        if self.chain.blocking and raw_socket is not None and not tls:
            await self._hand_to_threads(raw_socket, decoder, leftover)
            return
        self.decoder = decoder
        if raw_socket is not None and not tls and self.settings.busy_poll_us:
            self._busy_poll = BusyPoll(self.settings.busy_poll_us)
            self._fd = raw_socket.fileno()
            self._idle_since = time.perf_counter_ns()
        if leftover:
            try:
                requests = decoder.receive(leftover)
            except ProtocolError as e:
                log.warning("%s: %s", self.peer or "client", e)
                self._abort()
                return
            self._dispatch(requests)

    async def _hand_to_threads(self, raw_socket: Any, decoder: RequestDecoder, leftover: bytes) -> None:
        """Blocking chain: worker threads read, run and answer requests themselves (server/threaded.py)."""
        self.transport.pause_reading()
        for _ in range(1000):  # the handshake's last reply must be on the wire before threads write
            if self.transport.get_write_buffer_size() == 0 or self._closed:
                break
            await asyncio.sleep(0.001)
        if self._closed:
            self._maybe_release()
            return
        sock = socket.socket(fileno=os.dup(raw_socket.fileno()))
        sock.setblocking(True)
        model = self.chain.thread_model
        threads = max(1, self.settings.threads) if model == ThreadModel.PARALLEL else 1
        self._threaded = ThreadedTransmission(
            sock, self.transmission, decoder, threads=threads,
            serialize_all=model == ThreadModel.SERIALIZE_ALL_REQUESTS, peer=self.peer,
            try_nowait_reads=self.chain.nowait_reads and model == ThreadModel.PARALLEL,
            busy_poll_us=self.settings.busy_poll_us, server_connections=self.settings.connections,
            latency_bound=self.chain.latency_bound,
            on_finished=lambda: self.loop.call_soon_threadsafe(self._threads_finished))
        # Drop the transport but not the connection: our duplicate descriptor keeps it open.
        self._handed_off = True
        self.transport.abort()
        try:
            self._threaded.start(leftover)
        except ProtocolError as e:
            log.warning("%s: %s", self.peer or "client", e)
            sock.close()
            self._closed = True
            self._maybe_release()

    def _threads_finished(self) -> None:
        self._threaded.sock.close()
        self._closed = True
        if self._threads_done is not None and not self._threads_done.done():
            self._threads_done.set_result(None)  # shutdown() flushes, then releases
        else:
            self._maybe_release()

    # -- Transmission --------------------------------------------------------------------------
    def _dispatch(self, requests: Sequence[Request]) -> None:
        self._backlog.extend(requests)
        self._pump()
        self._update_reading()

    def _can_start(self, req: Request) -> bool:
        if self._paused_for_writes:
            return False
        if self.inline or self._in_flight == 0:
            return True
        cost = req.length if req.type == P.CMD_READ else 0
        return self._in_flight < MAX_IN_FLIGHT and self._in_flight_bytes + cost <= MAX_IN_FLIGHT_BYTES

    def _pump(self) -> None:
        """Start backlog requests while replies have room (the backlog holds what was read).

        Replies to requests answered inline here are written together (one writev, one wake-up
        of the client) up to COALESCE_BYTES, as connection threads do (server/threaded.py)."""
        transmission = self.transmission
        backlog = self._backlog
        held: list[Any] = []
        held_bytes = 0

        def answer(buffers: list[Any]) -> None:
            nonlocal held, held_bytes
            if not held and not backlog:  # alone (queue depth 1): nothing to wait for
                self._send(buffers)
                return
            held.extend(buffers)
            held_bytes += sum(len(b) for b in buffers)
            if held_bytes >= COALESCE_BYTES or len(held) >= COALESCE_BUFFERS:
                self._send(held)  # may pause writing: _can_start() sees it
                held, held_bytes = [], 0

        try:
            while backlog and not self._disconnecting and not self._closed:
                req = backlog[0]
                if req.type == P.CMD_DISC:
                    # "The server MUST handle all outstanding requests ... and close the TCP session."
                    backlog.clear()
                    self._disconnecting = True
                    self._set_reading(False)
                    if held:
                        self._send(held)
                        held = []
                    if self._in_flight == 0:
                        self._close_when_sent()
                    return
                problem = transmission.check(req)
                if problem is not None:
                    backlog.popleft()
                    err, message = problem
                    answer([transmission.replies.error(req.cookie, req.offset, err, message)])
                    continue
                if not self._can_start(req):
                    return
                backlog.popleft()
                if self.inline:
                    answer(transmission.process(req))
                    continue
                if self.try_inline_reads and req.type == P.CMD_READ:
                    try:
                        answer(transmission.process(req, nowait=True))
                        continue
                    except WouldBlock:
                        pass  # not in the page cache: read it in a worker
                cost = req.length if req.type == P.CMD_READ else 0
                self._in_flight += 1
                self._in_flight_bytes += cost
                self.pool.submit(transmission.process, (req,),
                                 lambda result, error, cost=cost: self._request_done(result, error, cost))
        finally:
            if held:
                self._send(held)

    def _request_done(self, buffers: Any, error: BaseException | None, cost: int) -> None:
        self._in_flight -= 1
        self._in_flight_bytes -= cost
        if error is not None:  # process() catches request errors; this is a bug
            log.error("request failed unexpectedly", exc_info=error)
            self._abort()
            return
        self._send(buffers)
        self._pump()
        self._update_reading()
        if self._in_flight == 0:
            if self._idle is not None and not self._idle.done():
                self._idle.set_result(None)
            elif self._disconnecting:
                self._close_when_sent()
            self._maybe_release()

    def _send(self, buffers: Sequence[Any]) -> None:
        if self._closed:
            return
        if len(buffers) == 1:
            self.transport.write(buffers[0])
        else:
            self.transport.writelines(buffers)

    def _set_reading(self, on: bool) -> None:
        if self._closed or self.transport is None:
            return
        if on and self._reading_paused:
            self._reading_paused = False
            self.transport.resume_reading()
        elif not on and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()

    def _update_reading(self) -> None:
        if self._disconnecting:
            return
        # Read more only when everything read so far has started: the backlog stays bounded.
        self._set_reading(not (self._paused_for_writes or self._backlog))

    # -- Closing -------------------------------------------------------------------------------
    async def shutdown(self) -> None:
        """The server is stopping: take no new requests, finish running ones, flush, close."""
        if self._closed:
            return
        if self.transmission is None:  # still negotiating: nothing to finish
            self._close_when_sent()
            return
        if self._threaded is not None:
            self._threads_done = self.loop.create_future()
            self._threaded.stop()
            await self._threads_done
            if self.layer is not None and self.layer.can_write() and self.layer.can_flush():
                try:
                    await self._run_chain(self.layer.flush, 0)
                except Exception as e:
                    log.warning("flush at shutdown failed: %s", e)
            self._maybe_release()
            return
        self._disconnecting = True
        if self.transport is not None:
            self.transport.pause_reading()
        if self._in_flight:
            self._idle = self.loop.create_future()
            await self._idle
        layer = self.layer
        if layer is not None and layer.can_write() and layer.can_flush() and not self._closed:
            try:
                await self._run_chain(layer.flush, 0)
            except Exception as e:
                log.warning("flush at shutdown failed: %s", e)
        self._close_when_sent()

    def _close_when_sent(self) -> None:
        if self.transport is not None and not self._closed:
            self.transport.close()  # flushes what is buffered first

    def _abort(self) -> None:
        if self.transport is not None and not self._closed:
            self.transport.abort()

    def _maybe_release(self) -> None:
        """Close the chain once the client is gone and no request still uses it."""
        if not self._closed or self._in_flight:
            return
        if self.closed.done():
            return
        layer, self.layer = self.layer, None
        if layer is not None:
            if self.inline:
                self._close_layer(layer)
            else:
                self.pool.submit(self._close_layer, (layer,), lambda result, error: None)
        if self._own_pool:
            self.pool.shutdown()
        self.settings.connections.discard(self)
        if self._preconnected:
            self.chain.disconnected(self.client_socket)
        if self._holds_connection_lock:
            self._holds_connection_lock = False
            self.settings.one_connection_at_a_time.release()
        self.closed.set_result(None)
        if self.settings.on_connection_closed is not None:
            self.settings.on_connection_closed(self)

    @staticmethod
    def _close_layer(layer: Layer) -> None:
        try:
            layer.close()
        except Exception:
            log.exception("closing the export failed")

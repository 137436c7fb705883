"""One client connection, served by a thread of its own: the handshake, then the transmission engine.

The thread runs the sans-IO handshake (protocol/handshake.py) over the connection's stream
(server/stream.py), with a deadline; the backend calls the handshake needs (list the exports,
open the chain) run right here.  STARTTLS swaps the stream for a TLS one.  Once an export is
chosen, the same thread becomes the first of the connection's transmission threads
(server/engine.py).  When the client has gone, it closes the chain and reports to the server.
"""

from __future__ import annotations

import logging
import select
import threading
import time
from dataclasses import dataclass
from typing import Callable

from ..api.chain import Layer, ThreadModel, set_request_client
from ..api.errors import ConfigError, NBDError
from ..protocol import wire as P
from ..protocol.errors import ProtocolError
from ..protocol.handshake import (Abort, ExportInfo, ExportRequest, ListExports, NeedData, ServerHandshake, StartTLS,
                                  oldstyle_greeting)
from ..protocol.transmission import RequestDecoder
from ..tls.memorybio import TLSClosed, TLSSocket
from .budget import CONNECTION_LIMIT, SMALL_ALLOWANCE, Budget
from .engine import Engine
from .settings import ServerSettings
from .stream import Stream, TLSStream
from .transmission import Transmission, export_info

log = logging.getLogger("nbdformats")

HANDSHAKE_BUFFER = 16 * 1024


@dataclass
class Opened:
    """What the handshake settled: the chain opened for the export, and the negotiated modes."""

    layer: Layer
    info: ExportInfo
    structured: bool
    extended: bool
    meta_context_id: int | None
    leftover: bytes  # requests that arrived with the end of the handshake


class Connection:
    def __init__(self, settings: ServerSettings, stream: Stream, *, on_closed: Callable[["Connection"], None],
                 skip_handshake: bool = False) -> None:
        self.settings = settings
        self.chain = settings.chain
        self.stream = stream
        self.on_closed = on_closed
        self.skip_handshake = skip_handshake
        self.client_socket = stream.socket
        self.peer = _describe_peer(stream)
        self.tls_active = False
        self.default_exports: dict[int, str] = {}  # each layer's default export name, asked once
        self.multi_conn = self.chain.thread_model != ThreadModel.SERIALIZE_CONNECTIONS
        self.engine: Engine | None = None
        self._stopping = False  # the server is shutting down: flush before closing
        self._client_left = False  # ... but the client had already hung up: close as at a disconnect
        self.closed = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._run, name="nbdformats-conn", daemon=True).start()

    def shutdown(self) -> None:
        """The server is stopping (any thread): take no new requests, finish running ones, flush
        (unless the client has already hung up).

        The client's hang-up is looked at before the stream stops reading (shutting the socket
        down for reading would look the same): a client that has closed its socket is not flushed
        for, whether or not its connection has read the end of stream yet, as when it disconnects
        while the server runs, and as nbdkit, which never flushes at exit.  Otherwise a --run
        command's connections, closed when it exits, got one more flush or not by a race, which
        the stats filter counts (nbdkit's test-multi-conn.sh).
        """
        self._client_left = self._client_hung_up()
        self._stopping = True
        engine = self.engine
        if engine is not None:
            engine.stop()
        else:
            self.stream.stop_reading()  # a handshake waiting for the client gives up

    def _client_hung_up(self) -> bool:
        try:
            fd = self.stream.hangup_fd
            if fd is None:
                return False
            if fd < 0:
                return True  # the connection has already closed its socket
            poller = select.poll()
            poller.register(fd, select.POLLRDHUP)
            return bool(poller.poll(0))  # POLLRDHUP, or POLLHUP, POLLERR, POLLNVAL: gone
        except (OSError, ValueError):  # closed meanwhile (by the connection's own thread)
            return True

    # -- The connection's life -------------------------------------------------------------------
    def _run(self) -> None:
        preconnected = holds_connection_lock = False
        opened: Opened | None = None
        set_request_client(self.stream.hangup_fd)
        try:
            log.debug("connection from %s", self.peer)
            try:
                self.chain.preconnect(self.client_socket, self.settings.readonly)
            except Exception as e:
                log.info("refused a connection from %s: %s", self.peer, e)
                return
            preconnected = True
            lock = self.settings.one_connection_at_a_time
            if lock is not None:  # serialize_connections: a client is served when the previous one has gone
                lock.acquire()
                holds_connection_lock = True
            try:
                opened = self._negotiate()
            except TimeoutError:
                log.info("%s: handshake timed out", self.peer)
            except (ProtocolError, TLSClosed) as e:
                log.info("%s: %s", self.peer, e)
            except OSError as e:
                log.debug("%s: connection lost during the handshake: %s", self.peer, e)
            if opened is None or self._stopping:
                return
            self._transmit(opened)
        except Exception:
            log.exception("%s: connection failed", self.peer)
        finally:
            # Closing runs after the client has gone: its hang-up must not cut a close's sleep
            # short (nbdkit runs .close outside the connection too); a shutdown still does.
            set_request_client(None)
            if opened is not None:
                self._close_layer(opened.layer)
            if preconnected:
                self.chain.disconnected(self.client_socket)
            if holds_connection_lock:
                self.settings.one_connection_at_a_time.release()  # type: ignore[union-attr]
            self.stream.close()
            self.closed.set()
            self.on_closed(self)

    def _transmit(self, opened: Opened) -> None:
        settings, chain = self.settings, self.chain
        transmission = Transmission(opened.layer, opened.info, structured=opened.structured,
                                    extended=opened.extended, meta_context_id=opened.meta_context_id,
                                    alignment=chain.buffer_alignment)
        decoder = RequestDecoder(extended=opened.extended, alignment=chain.buffer_alignment)
        log.debug("%s: transmission starts: export %r size %d", self.peer, opened.info.name, opened.info.size)
        self.engine = Engine(
            self.stream, transmission, decoder, thread_model=chain.thread_model, threads=settings.threads,
            latency_bound=chain.latency_bound, busy_poll_us=settings.busy_poll_us,
            budget=Budget(CONNECTION_LIMIT, settings.budget, SMALL_ALLOWANCE), stats=settings.stats,
            server_connections=settings.connections, peer=self.peer)
        if self._stopping:  # shutdown() came before the engine existed
            self.engine.stop()
        self.engine.run(opened.leftover)
        layer = opened.layer
        if self._stopping and not self._client_left and layer.can_write() and layer.can_flush():
            # SIGTERM is not a crash: what clients wrote reaches the disk.
            try:
                layer.flush(0)
            except Exception as e:
                log.warning("flush at shutdown failed: %s", e)

    @staticmethod
    def _close_layer(layer: Layer) -> None:
        try:
            layer.close()
        except Exception:
            log.exception("closing the export failed")

    # -- Handshake -------------------------------------------------------------------------------
    def _negotiate(self) -> Opened | None:
        """Run the handshake; the opened export, or None when the client left or was refused."""
        settings = self.settings
        if settings.oldstyle or self.skip_handshake:
            name, layer = self._open("")
            info = export_info(name, layer, False, multi_conn=self.multi_conn)
            if settings.oldstyle:
                self.stream.send([oldstyle_greeting(info)])
            return Opened(layer, info, structured=False, extended=False, meta_context_id=None, leftover=b"")
        handshake = ServerHandshake(tls=settings.tls, policy=settings.handshake_policy)
        deadline = time.monotonic() + settings.handshake_timeout
        buffer = memoryview(bytearray(HANDSHAKE_BUFFER))
        while True:
            event = handshake.next_event()
            self._send_handshake(handshake)
            if isinstance(event, NeedData):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                received = self.stream.recv_into(buffer, timeout=remaining)
                if not received:
                    return None
                handshake.receive_data(bytes(buffer[:received]))
            elif isinstance(event, Abort):
                return None
            elif isinstance(event, StartTLS):
                self._start_tls(deadline)
                handshake.tls_established()
            elif isinstance(event, ListExports):
                try:
                    exports = self.chain.list_exports(settings.readonly, self.tls_active, self.default_exports)
                    handshake.reply_list([(e.name, e.description) for e in exports])
                except Exception as e:
                    handshake.reply_error(P.REP_ERR_PLATFORM, f"cannot list exports: {e}")
            else:
                assert isinstance(event, ExportRequest)
                opened = self._choose_export(handshake, event.name)
                if opened is not None:
                    return opened

    def _choose_export(self, handshake: ServerHandshake, name: str) -> Opened | None:
        """Answer NBD_OPT_INFO, NBD_OPT_GO or NBD_OPT_EXPORT_NAME; the export if transmission starts."""
        try:
            name, layer = self._open(name)
        except Exception as e:
            if isinstance(e, (NBDError, ConfigError)):
                reason = str(e)
                log.info("%s: cannot open export %r: %s", self.peer, name, reason)
            else:  # a bug, or an error a component did not expect: show where
                reason = f"{type(e).__name__}: {e}"
                log.warning("%s: cannot open export %r", self.peer, name, exc_info=e)
            handshake.reply_error(P.REP_ERR_UNKNOWN, f"cannot open export {name!r}: {reason}")
            return None
        try:
            # NBD_INFO_NAME is the export's real name (the default export's, when the client asked
            # for ""); the description is the chain's, else --description's.
            description = layer.export_description() or self.settings.description
            info = export_info(name, layer, handshake.structured_replies, description, self.multi_conn)
            ready = handshake.reply_export(info)
            self._send_handshake(handshake)
        except BaseException:
            self._close_layer(layer)
            raise
        if ready is None:  # NBD_OPT_INFO: the client only wanted to know
            self._close_layer(layer)
            return None
        return Opened(layer, info, structured=handshake.structured_replies, extended=handshake.extended_headers,
                      meta_context_id=handshake.meta_context_id, leftover=handshake.leftover())

    def _open(self, name: str) -> tuple[str, Layer]:
        """The export's name (the default export's for "") and the chain opened for it."""
        readonly = self.settings.readonly
        if not name:
            name = self.chain.default_export(readonly, self.tls_active, self.default_exports)
        return name, self.chain.open(readonly, name, self.client_socket, self.tls_active, self.default_exports)

    def _send_handshake(self, handshake: ServerHandshake) -> None:
        data = handshake.data_to_send()
        if data:
            self.stream.send([data])

    def _start_tls(self, deadline: float) -> None:
        context, raw = self.settings.tls_context, self.stream.socket
        if context is None or raw is None:
            raise ProtocolError("TLS is not possible on this connection")
        tls = TLSSocket(raw, context, server_side=True)
        raw.settimeout(max(deadline - time.monotonic(), 0.001))
        try:
            tls.do_handshake()
        finally:
            raw.settimeout(None)
        self.stream = TLSStream(tls)
        self.tls_active = True


def _describe_peer(stream: Stream) -> str:
    if stream.socket is None:
        return "client on stdin"
    try:
        peer = stream.socket.getpeername()
    except OSError:
        return "client"
    return f"{peer[0]} port {peer[1]}" if isinstance(peer, tuple) else "local socket"

"""Listeners and the server's life: TCP/Unix sockets, stdin (-s), a pre-connected fd,
systemd socket activation, --run captive mode, connection limits and signals."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import ssl
import sys
import threading
from dataclasses import dataclass, field
from typing import Iterator

from ..api.chain import ThreadModel, server_stopping
from ..api.errors import ConfigError
from .connection import Connection
from .settings import ServerSettings
from .stream import PipeStream, SocketStream, Stream

log = logging.getLogger("nbdformats")

SD_LISTEN_FDS_START = 3


@dataclass
class ListenConfig:
    unix_path: str | None = None
    port: str | None = None
    vsock: bool = False  # --vsock: AF_VSOCK (to and from virtual machines) on `port`
    addresses: list[str] = field(default_factory=list)
    family: int = socket.AF_UNSPEC  # -4 / -6
    single: bool = False  # -s: one client on stdin/stdout
    fd: int | None = None  # --fd: an already-connected socket
    no_handshake: bool = False
    exit_last: bool = False
    max_connections: int = 0
    serialize_connections: bool = False
    keepalive: bool = False  # --keepalive: TCP keepalive probes on client connections
    selinux_label: str | None = None  # --selinux-label: the SELinux label of listening sockets


def systemd_sockets() -> list[socket.socket]:
    """Sockets passed by systemd socket activation (LISTEN_PID/LISTEN_FDS), if they are ours."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    count = int(os.environ.get("LISTEN_FDS", "0") or 0)
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    return [socket.socket(fileno=SD_LISTEN_FDS_START + i) for i in range(count)]


def make_listeners(config: ListenConfig) -> list[socket.socket]:
    """Bind the listening sockets (before any fork, so errors reach the terminal)."""
    activated = systemd_sockets()
    if activated:
        for sock in activated:
            set_keepalive(sock, config.keepalive)
        return activated
    with selinux_socket_label(config.selinux_label):
        if config.unix_path is not None:
            return [listen_unix(config.unix_path)]
        if config.vsock:
            return [listen_vsock(config.port)]
        sockets = listen_tcp(config)
    for sock in sockets:
        set_keepalive(sock, config.keepalive)  # accepted connections inherit it
    return sockets


def listen_unix(path: str) -> socket.socket:
    if os.path.exists(path) and not os.path.isfile(path):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Bind under a temporary name and rename after listen(): a client that sees the path
    # can connect at once (no "connection refused" window between bind and listen).
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        sock.bind(temporary)
        sock.listen(128)
        os.rename(temporary, path)
    except OSError as e:
        sock.close()
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise OSError(e.errno, f"cannot listen on {path}: {e.strerror or e}") from None  # "AF_UNIX path too long" has no errno
    return sock


def listen_vsock(port: str | None) -> socket.socket:
    """nbdkit's --vsock: any CID (the host reaches a guest by its CID), `port` (default 10809)."""
    number = port or "10809"
    if not number.isdigit() or int(number) > 0xFFFFFFFF:
        raise OSError(0, f"--vsock: the port must be a number (not {number!r})")
    try:
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    except OSError as e:
        raise OSError(e.errno, f"--vsock: this machine has no AF_VSOCK: {e.strerror}") from None
    try:
        sock.bind((socket.VMADDR_CID_ANY, int(number)))
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"cannot listen on vsock port {number}: {e.strerror or e}") from None
    return sock


def listen_tcp(config: ListenConfig) -> list[socket.socket]:
    port = config.port or "10809"
    hosts: list[str | None] = [*config.addresses] or [None]
    sockets = []
    for host in hosts:
        infos = socket.getaddrinfo(host, port, config.family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
        for family, type, proto, _, address in infos:
            sock = socket.socket(family, type, proto)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as e:
                sock.close()
                if host is None and len(infos) > 1 and family == socket.AF_INET6:
                    continue  # no IPv6 on this host: IPv4 is enough
                raise OSError(e.errno, f"cannot listen on {address[0]} port {port}: {e.strerror or e}") from None
            sock.listen(128)
            sockets.append(sock)
    return sockets


def set_keepalive(sock: socket.socket, keepalive: bool) -> None:
    if keepalive and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


SELINUX_FS = "/sys/fs/selinux"


def check_selinux_label() -> None:
    """--selinux-label needs SELinux running (nbdkit fails the same way, when it labels the socket)."""
    if not os.path.exists(os.path.join(SELINUX_FS, "enforce")):
        raise ConfigError(f"--selinux-label: SELinux is not enabled on this machine ({SELINUX_FS} is not mounted)")


@contextlib.contextmanager
def selinux_socket_label(label: str | None) -> Iterator[None]:
    """Sockets created inside get `label`, as libselinux's setsockcreatecon(3) does it: through the
    thread's /proc attribute, cleared again afterwards."""
    if label is None:
        yield
        return
    attribute = "/proc/thread-self/attr/sockcreate"
    try:
        with open(attribute, "w") as f:
            f.write(label)
    except OSError as e:
        raise OSError(e.errno, f"--selinux-label {label}: {e.strerror}") from None
    try:
        yield
    finally:
        fd = os.open(attribute, os.O_WRONLY)
        try:
            os.write(fd, b"")  # an empty write restores the default label
        finally:
            os.close(fd)


class Server:
    """Accepts clients on the event loop and starts a Connection (a thread of its own) for each."""

    def __init__(self, settings: ServerSettings, config: ListenConfig) -> None:
        self.settings = settings
        self.config = config
        self.listeners: list[socket.socket] = []
        self.stopped: asyncio.Future | None = None
        self._all_closed: asyncio.Event | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        if settings.chain.thread_model == ThreadModel.SERIALIZE_CONNECTIONS:
            settings.one_connection_at_a_time = threading.Lock()

    def stop(self) -> None:
        if self.stopped is not None and not self.stopped.done():
            self.stopped.set_result(None)

    def _serve(self, stream: Stream) -> None:
        assert self.loop is not None
        loop = self.loop

        def closed(connection: Connection) -> None:  # on the connection's thread
            loop.call_soon_threadsafe(self._connection_closed, connection)

        connection = Connection(self.settings, stream, skip_handshake=self.config.no_handshake, on_closed=closed)
        self.settings.connections.add(connection)
        connection.start()

    def _connection_closed(self, connection: Connection) -> None:
        connections = self.settings.connections
        connections.discard(connection)
        if not connections:
            if self._all_closed is not None:
                self._all_closed.set()
            if self.config.exit_last or self.config.single or self.config.fd is not None:
                self.stop()

    def _accept(self, listener: socket.socket) -> None:
        try:
            sock, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:  # out of descriptors, or the client gave up: keep listening
            log.warning("accept failed: %s", e.strerror)
            return
        if self.config.max_connections and len(self.settings.connections) >= self.config.max_connections:
            log.warning("refusing a connection: --max-connections %d reached", self.config.max_connections)
            sock.close()
            return
        self._serve(SocketStream(sock))

    async def start(self, listeners: list[socket.socket]) -> None:
        self.loop = loop = asyncio.get_running_loop()
        self.stopped = loop.create_future()
        if self.config.single or self.config.fd is not None:
            stream = _single_stream(0 if self.config.single else self.config.fd, self.config.single)  # type: ignore[arg-type]
            if stream.socket is not None:
                set_keepalive(stream.socket, self.config.keepalive)
            self._serve(stream)
            return
        for sock in listeners:
            sock.setblocking(False)
            loop.add_reader(sock.fileno(), self._accept, sock)
            self.listeners.append(sock)

    async def close(self) -> None:
        """Stop accepting; let running requests finish, flush and close every connection."""
        assert self.loop is not None
        server_stopping()  # requests sleeping in api.sleep() wake up
        for sock in self.listeners:
            self.loop.remove_reader(sock.fileno())
        connections = list(self.settings.connections)
        if not connections:
            return
        self._all_closed = asyncio.Event()
        for connection in connections:
            connection.shutdown()
        try:
            await asyncio.wait_for(self._all_closed.wait(), timeout=40)
        except asyncio.TimeoutError:
            log.warning("%d connections did not finish in time", len(self.settings.connections))


def _single_stream(fd: int, single: bool) -> Stream:
    """The stream of `-s` (stdin and stdout) or `--fd N` (a connected socket)."""
    duplicate = os.dup(fd)
    try:
        sock = socket.socket(fileno=duplicate)
    except OSError:  # not a socket: -s from a pipe or a file
        os.close(duplicate)
        if not single:
            raise
        stream: Stream = PipeStream(os.dup(0), os.dup(1))
    else:
        if sock.type != socket.SOCK_STREAM:
            sock.close()
            raise OSError(f"file descriptor {fd} is not a stream socket")
        stream = SocketStream(sock)
    if single:
        # Keep stdout away from our protocol stream: log lines must not corrupt it.
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        os.close(devnull)
    return stream


def install_signal_handlers(server: Server) -> None:
    from ..api.chain import set_shutdown_hook

    loop = asyncio.get_running_loop()
    def shutdown() -> None:  # from any thread
        loop.call_soon_threadsafe(server.stop)

    set_shutdown_hook(shutdown)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, server.stop)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)


def tls_context(certificates_dir: str, verify_peer: bool) -> ssl.SSLContext:
    """X.509 as nbdkit lays it out: DIR/server-cert.pem, DIR/server-key.pem, DIR/ca-cert.pem."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    cert = os.path.join(certificates_dir, "server-cert.pem")
    key = os.path.join(certificates_dir, "server-key.pem")
    context.load_cert_chain(cert, key)
    ca = os.path.join(certificates_dir, "ca-cert.pem")
    if verify_peer:
        context.load_verify_locations(ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def tune_malloc() -> None:
    """Keep request and reply buffers (up to 64 MiB) on glibc's heap and do not trim it eagerly.

    By default glibc serves allocations over 128 KiB with a fresh mmap and returns freed heap
    to the kernel, so every 256 KiB READ buffer is page-faulted in anew: measured here, that
    halved sequential read throughput.  With these settings freed buffers are reused.

    Each malloc arena keeps up to the trim threshold of free memory, and glibc gives worker
    threads arenas of their own (up to 8 per core): under many clients reading through a
    blocking plugin RSS kept climbing (860 MiB after a minute of tests/fuzz/socket_fuzz.py,
    440 MiB with two arenas).  Python allocates under the GIL, so more arenas buy little.
    """
    try:
        import ctypes
        libc = ctypes.CDLL(None)
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
        libc.mallopt(M_MMAP_THRESHOLD, 65 * 1024 * 1024)
        libc.mallopt(M_TRIM_THRESHOLD, 256 * 1024 * 1024)
        libc.mallopt(M_ARENA_MAX, 2)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def redirect_stdio_to_null() -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    sys.stdout = open(os.devnull, "w")

"""nbd plugin: forward to another NBD server (nbdkit's nbd plugin, with our own client instead of libnbd).

Each client connection gets its own upstream connection (or all share one with shared=true); requests
from the server's worker threads are pipelined on it.  Everything the upstream server offers passes
through: size, read-only, flush, FUA, trim, zero (fast zero), cache, multi-conn, block size constraints,
and block status (holes stay holes).  A request without a reply in request-timeout= seconds breaks the
connection; a broken connection is made again, with back-off, by the next request (_legs.Leg).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import replace

from ..protocol import wire as P
from ..api.chain import (EMULATE, FLAG_FAST_ZERO, FLAG_FUA, FLAG_MAY_TRIM, FLAG_REQ_ONE, NATIVE, NONE, Export,
                         Extents, Plugin, PluginHandle)
from ..client import DEFAULT_PORT, Address, NBDClient, parse_uri
from ..api.errors import ConfigError, NBDError
from ..api.params import Bool, Enum, Int, Param, Path, String
from ._legs import Leg, Timeouts, connect_timeout_param, request_timeout_param

log = logging.getLogger("nbdformats")


def command_flags(flags: int) -> int:
    """nbdkit request flags -> NBD wire flags."""
    wire = 0
    if flags & FLAG_FUA:
        wire |= P.CMD_FLAG_FUA
    if flags & FLAG_REQ_ONE:
        wire |= P.CMD_FLAG_REQ_ONE
    if flags & FLAG_FAST_ZERO:
        wire |= P.CMD_FLAG_FAST_ZERO
    return wire


def zero_command_flags(flags: int) -> int:
    """nbdkit zero() flags -> WRITE_ZEROES wire flags ("may trim" is the absence of NO_HOLE)."""
    return command_flags(flags) | (0 if flags & FLAG_MAY_TRIM else P.CMD_FLAG_NO_HOLE)


class SpawnedServer:
    """command= arg=...: run a server with systemd socket activation (LISTEN_FDS), as libnbd does.

    qemu-nbd, nbdkit and nbdformats all accept a listening socket this way.  The socket lives in a
    private temporary directory; the server is stopped at cleanup.
    """

    def __init__(self, argv: list[str]) -> None:
        self.directory = tempfile.mkdtemp(prefix="nbdformats-nbd-")
        self.path = os.path.join(self.directory, "sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(self.path)
            listener.listen(16)
            fd = listener.fileno()
            # The shell puts the socket on fd 3 and sets LISTEN_PID to its own pid, which exec keeps.
            script = 'fd=$1; shift; LISTEN_PID=$$ LISTEN_FDS=1 exec "$@" 3<&"$fd"'
            self.proc = subprocess.Popen(["/bin/sh", "-c", script, "sh", str(fd), *argv], pass_fds=(fd,),
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as e:
            shutil.rmtree(self.directory, ignore_errors=True)
            raise ConfigError(f"nbd: cannot run {argv[0]}: {e}") from None
        finally:
            listener.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.directory, ignore_errors=True)


class NbdPlugin(Plugin):
    """Forward to another NBD server (Unix socket, TCP, TLS, or a server run by command=)."""

    name = "nbd"
    latency_bound = True  # many requests in flight at once on the upstream connection

    uri = Param(String(), magic=True, help="nbd://HOST[:PORT]/EXPORT, nbds://..., nbd+unix:///EXPORT?socket=PATH")
    socket = Param(Path(kind=None), help="Unix socket of the server")
    socket_fd = Param(Int(minimum=0), help="an inherited, connected socket (implies shared=true)")
    hostname = Param(String(), help="TCP host of the server")
    port = Param(String(), help=f"TCP port or service name (default {DEFAULT_PORT})")
    vsock = Param(String(), help="not supported (AF_VSOCK)")
    command = Param(String(), help="run this NBD server (socket activation) and forward to it; implies shared=true")
    arg = Param(String(), repeat=True, help="an argument of command= (repeat for each)")
    export = Param(String(), help="export name on the server (default: the server's default export)")
    dynamic_export = Param(Bool(), default=False, help="pass each client's export name to the server")
    retry = Param(Int(minimum=0), default=0, help="retry a failed first connection N times, one second apart")
    connect_timeout = connect_timeout_param()
    request_timeout = request_timeout_param()
    shared = Param(Bool(), help="one upstream connection for all clients (default false)")
    tls = Param(Enum("off", "on", "require"), help="TLS to the server (default off, on if another tls option is set)")
    tls_certificates = Param(Path(kind="dir"), help="directory with ca-cert.pem [client-cert.pem client-key.pem]")
    tls_verify = Param(Bool(), help="verify the server's certificate and name (default true)")
    tls_username = Param(String(), help="user whose key tls-psk= holds (default: the login name)")
    tls_psk = Param(Path(kind="file"), help="pre-shared keys file (psktool's format) instead of certificates")

    def config_complete(self) -> None:
        sources = [k for k, v in (("uri", self.uri), ("socket", self.socket), ("socket-fd", self.socket_fd),
                                  ("hostname", self.hostname), ("vsock", self.vsock), ("command", self.command))
                   if v is not None]
        if len(sources) != 1:
            raise ConfigError("nbd: give exactly one of uri=, socket=, socket-fd=, hostname=, command= "
                              f"(got {', '.join(sources) or 'none'})")
        if self.vsock is not None:
            raise ConfigError("nbd: vsock= is not supported")
        if self.tls_username is not None and self.tls_psk is None:
            raise ConfigError("nbd: tls-username= goes with tls-psk=")
        if self.arg and self.command is None:
            raise ConfigError("nbd: arg= needs command=")
        if self.port is not None and self.hostname is None:
            raise ConfigError("nbd: port= needs hostname=")
        implied_shared = self.command is not None or self.socket_fd is not None
        if implied_shared and self.shared is False:
            raise ConfigError("nbd: command= and socket-fd= need shared=true")
        self.shared_mode: bool = bool(self.shared) or implied_shared
        if self.dynamic_export and self.shared_mode:
            raise ConfigError("nbd: dynamic-export=true cannot be combined with shared mode "
                              "(shared=true, command=, socket-fd=)")
        if self.dynamic_export and self.export is not None:
            raise ConfigError("nbd: export= and dynamic-export=true are incompatible")
        self.address: Address = self._address()

    def _address(self) -> Address:
        # "If omitted but another tls option is present, this defaults to on" (nbdkit-nbd-plugin(1)).
        other_tls_option = self.tls_certificates is not None or self.tls_verify is not None or \
            self.tls_psk is not None
        tls = self.tls or ("on" if other_tls_option else "off")
        if self.uri is not None:
            if self.export is not None:
                raise ConfigError("nbd: with uri= the export name goes in the URI, not export=")
            try:
                address = parse_uri(self.uri)
            except ValueError as e:
                raise ConfigError(f"nbd: {e}") from None
            if address.tls == "require" and self.tls == "off":
                raise ConfigError("nbd: an nbds:// URI requires TLS; tls=off contradicts it")
            if address.tls != "require":
                address = replace(address, tls=tls)
        elif self.hostname is not None:
            address = Address(host=self.hostname, port=self._port(), tls=tls)
        elif self.socket_fd is not None:
            address = Address(fd=self.socket_fd, tls=tls)
        else:
            address = Address(unix=self.socket, tls=tls)  # command= fills the socket path in get_ready
        if self.export is not None:
            address = replace(address, export=self.export)
        if self.tls_certificates is not None:
            address = replace(address, tls_certificates=self.tls_certificates)
        if self.tls_verify is not None:
            address = replace(address, tls_verify=self.tls_verify)
        if self.tls_psk is not None:
            address = replace(address, tls_psk_file=self.tls_psk, tls_username=self.tls_username)
        certificates = address.tls_certificates
        if certificates and address.tls_verify and not os.path.exists(os.path.join(certificates, "ca-cert.pem")):
            raise ConfigError(f"nbd: {certificates} has no ca-cert.pem to verify the server with "
                              "(or use tls-verify=false)")
        return address

    def _port(self) -> int:
        if self.port is None:
            return DEFAULT_PORT
        if self.port.isdigit():
            port = int(self.port)
            if not 0 < port < 65536:
                raise ConfigError(f"nbd: port={self.port}: not a TCP port number")
            return port
        try:
            return socket.getservbyname(self.port, "tcp")
        except OSError:
            raise ConfigError(f"nbd: port={self.port}: unknown service name") from None

    def get_ready(self) -> None:
        self.spawned: SpawnedServer | None = None
        self.shared_leg: Leg | None = None
        if self.command is not None:
            self.spawned = SpawnedServer([self.command, *self.arg])
            self.address = replace(self.address, unix=self.spawned.path)
        if self.shared_mode:
            leg = self.leg(self.address)
            try:
                leg.open(self.retry)
            except OSError as e:
                reason = f"cannot connect to {self.address.describe()}: {e}"
                if self.spawned is not None:
                    # A command that fails to start closes the listening socket under our connection.
                    try:
                        self.spawned.proc.wait(1)
                        reason = f"{self.command} exited with status {self.spawned.proc.returncode}"
                    except subprocess.TimeoutExpired:
                        pass
                self.cleanup()
                raise ConfigError(f"nbd: {reason}") from None
            self.shared_leg = leg
            # The server forks to detach after get_ready(), and the child keeps no thread of ours: the
            # connection is closed before, and made again by the first request.
            os.register_at_fork(before=leg.disconnect)

    def leg(self, address: Address) -> Leg:
        return Leg("nbd", "the server", address, Timeouts.of(self))

    def cleanup(self) -> None:
        shared_leg = getattr(self, "shared_leg", None)
        if shared_leg is not None:
            shared_leg.disconnect()
            self.shared_leg = None
        spawned = getattr(self, "spawned", None)
        if spawned is not None:
            spawned.stop()
            self.spawned = None

    def dump_plugin(self) -> None:
        # nbdkit's nbd plugin reports what its libnbd can do, and nbdkit's tests probe these keys;
        # ours is our own client (nbdformats.client), which does the same (no AF_VSOCK), so the
        # keys say so.  No libnbd_version: there is no libnbd behind it.
        print("libnbd_tls=1")
        print("libnbd_uri=1")
        print("libnbd_vsock=0")
        print("libnbd_dynamic_list=1")

    def default_export(self, readonly: bool, is_tls: bool) -> str:
        """With dynamic-export=true, the server's name for its default export, as nbdkit's nbd
        plugin finds it (best effort: "" when the server cannot say)."""
        if not self.dynamic_export:
            return ""
        try:
            with NBDClient.connect(replace(self.address, export=""), meta_contexts=(),
                                   timeout=self.connect_timeout) as probe:
                return probe.info.export_name
        except OSError:
            return ""

    def list_exports(self, readonly: bool, is_tls: bool) -> list[Export]:
        if not self.dynamic_export:
            return [Export("")]
        try:
            exports = NBDClient.list_exports(self.address, timeout=self.connect_timeout)
        except OSError as e:
            raise NBDError(errno.EIO, f"cannot list the exports of {self.address.describe()}: {e}") from None
        return [Export(name, description) for name, description in exports]

    def open_leg(self, export_name: str) -> Leg:
        """A new upstream connection for one client connection."""
        leg = self.leg(replace(self.address, export=export_name) if self.dynamic_export else self.address)
        try:
            leg.open(self.retry)
        except OSError as e:
            raise NBDError(errno.EIO, f"cannot connect to {leg.address.describe()}: {e}") from None
        return leg

    class Handle(PluginHandle):
        def __init__(self, plugin: "NbdPlugin", readonly: bool, export_name: str) -> None:
            self.owned = plugin.shared_leg is None
            self.leg: Leg = plugin.open_leg(export_name) if plugin.shared_leg is None else plugin.shared_leg
            assert self.leg.offer is not None  # the leg is open
            self.offer = self.leg.offer  # what the clients are told, whatever the connection of the moment

        def close(self) -> None:
            if self.owned:
                self.leg.disconnect()

        # What the upstream server offers, passed through.
        def get_size(self) -> int:
            return self.offer.size

        def block_size(self) -> tuple[int, int, int] | None:
            return self.offer.block_size

        def can_write(self) -> bool:
            return not self.offer.has(P.TF_READ_ONLY)

        def can_flush(self) -> bool:
            return self.offer.has(P.TF_SEND_FLUSH)

        def is_rotational(self) -> bool:
            return self.offer.has(P.TF_ROTATIONAL)

        def can_trim(self) -> bool:
            return self.offer.has(P.TF_SEND_TRIM)

        def can_zero(self) -> int:
            # Without upstream WRITE_ZEROES the chain writes zeroes (nbdkit's nbd plugin does the same).
            return NATIVE if self.offer.has(P.TF_SEND_WRITE_ZEROES) else EMULATE

        def can_fast_zero(self) -> bool:
            return self.offer.has(P.TF_SEND_FAST_ZERO) if self.offer.has(P.TF_SEND_WRITE_ZEROES) else True

        def can_fua(self) -> int:
            if self.offer.has(P.TF_SEND_FUA):
                return NATIVE
            return EMULATE if self.offer.has(P.TF_SEND_FLUSH) else NONE

        def can_multi_conn(self) -> bool:
            return self.offer.has(P.TF_CAN_MULTI_CONN)

        def can_extents(self) -> bool:
            return self.offer.block_status

        def can_cache(self) -> int:
            return NATIVE if self.offer.has(P.TF_SEND_CACHE) else NONE

        # Requests, forwarded.
        def pread(self, buf: memoryview, offset: int, flags: int) -> None:
            self.leg.client().pread_into(buf, offset)

        def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
            client, wire = self.leg.client(), command_flags(flags)
            client.pwrite(buf, offset, wire)
            self.leg.wrote(client, wire)

        def flush(self, flags: int) -> None:
            self.leg.flush()

        def trim(self, count: int, offset: int, flags: int) -> None:
            client, wire = self.leg.client(), command_flags(flags)
            client.trim(count, offset, wire)
            self.leg.wrote(client, wire)

        def zero(self, count: int, offset: int, flags: int) -> None:
            client, wire = self.leg.client(), zero_command_flags(flags)
            client.zero(count, offset, wire)
            self.leg.wrote(client, wire)

        def cache(self, count: int, offset: int, flags: int) -> None:
            self.leg.client().cache(count, offset)

        def extents(self, count: int, offset: int, flags: int, extents: Extents) -> None:
            position = offset
            for length, state in self.leg.client().block_status(count, offset, command_flags(flags)):
                extents.add(position, length, state & (P.STATE_HOLE | P.STATE_ZERO))
                position += length


PLUGIN = NbdPlugin

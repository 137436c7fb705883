"""mirror plugin: RAID-1 across NBD servers.

Writes, zeroes, trims and flushes go to every server in the mirror at once; a request is acknowledged
when every server answered and at least write-quorum of them succeeded.  Reads go to one server, in
turn.  A server that fails a request the others carried out, or whose connection breaks, is marked
degraded (one warning in the log) and is not used again until the mirror restarts: its data may be
stale, so it must be resynced from a healthy server before it rejoins (see docs/plugins/mirror.md).
A request that fails on every server is the request's fault (no space, bad range): its error is
returned and no server is marked.
"""

from __future__ import annotations

import errno
import itertools
import logging
import threading

from ..protocol import wire as P
from ..api.chain import EMULATE, NATIVE, NONE, Extents, Plugin, PluginHandle
from ..client import Command, NBDClient
from ..api.errors import ConfigError, NBDError
from ..api.params import Int, Param, String
from . import _legs
from .nbd import command_flags, zero_command_flags

log = logging.getLogger("nbdformats")


class MirrorPlugin(Plugin):
    """RAID-1 across NBD servers: writes to all, reads balanced, a failed server dropped with a warning."""

    name = "mirror"
    latency_bound = True

    server = Param(String(), repeat=True, required=True,
                   help="NBD URI of one copy (repeat): nbd://HOST/EXPORT, nbd+unix:///?socket=PATH")
    write_quorum = Param(Int(minimum=1), default=1,
                         help="servers that must succeed for a write to be acknowledged (default 1)")

    def config_complete(self) -> None:
        self.addresses = _legs.parse_servers(self.name, self.server)
        if self.write_quorum > len(self.addresses):
            raise ConfigError(f"mirror: write-quorum={self.write_quorum} but only {len(self.addresses)} servers")

    def get_ready(self) -> None:
        clients = _legs.probe(self.name, self.addresses)
        sizes = [c.size for c in clients]
        _legs.close_all(clients)
        if len(set(sizes)) > 1:
            log.warning("mirror: servers have different sizes %s: the mirror is %d bytes", sizes, min(sizes))
        self.size = min(sizes)
        self.degraded: dict[int, str] = {}  # server index -> why; shared by all connections
        self._lock = threading.Lock()
        self._turn = itertools.count()

    def mark_degraded(self, leg: int, reason: str) -> None:
        with self._lock:
            if leg in self.degraded:
                return
            self.degraded[leg] = reason
            left = len(self.addresses) - len(self.degraded)
        log.warning("mirror: server %d (%s) is degraded and no longer used: %s; %d of %d servers left. "
                    "Resync it from a healthy server before it rejoins.", leg, self.addresses[leg].describe(),
                    reason, left, len(self.addresses))

    def next_turn(self) -> int:
        return next(self._turn)

    class Handle(PluginHandle):
        def __init__(self, plugin: "MirrorPlugin", readonly: bool, export_name: str) -> None:
            self.plugin = plugin
            self.clients: dict[int, NBDClient] = {}
            for leg, address in enumerate(plugin.addresses):
                if leg in plugin.degraded:
                    continue
                try:
                    self.clients[leg] = _legs.connect(address)
                except NBDError as e:
                    plugin.mark_degraded(leg, str(e))
            if not self.clients:
                raise NBDError(errno.EIO, "mirror: no server is left")

        def close(self) -> None:
            _legs.close_all(self.clients.values())

        def _healthy(self) -> list[tuple[int, NBDClient]]:
            legs = []
            for leg, client in self.clients.items():
                if leg in self.plugin.degraded:
                    continue
                if client.failure is not None:
                    self.plugin.mark_degraded(leg, client.failure)
                    continue
                legs.append((leg, client))
            if not legs:
                raise NBDError(errno.EIO, "mirror: every server has failed")
            return legs

        # What every copy can do.
        def get_size(self) -> int:
            return self.plugin.size

        def block_size(self) -> tuple[int, int, int] | None:
            return _legs.combined_block_size(self.clients.values())

        def _all(self, name: str) -> bool:
            return all(getattr(client, name) for client in self.clients.values())

        def can_write(self) -> bool:
            return not any(client.read_only for client in self.clients.values())

        def can_flush(self) -> bool:
            return self._all("can_flush")

        def is_rotational(self) -> bool:
            return any(client.is_rotational for client in self.clients.values())

        def can_trim(self) -> bool:
            return self._all("can_trim")

        def can_zero(self) -> int:
            return NATIVE if self._all("can_zero") else EMULATE

        def can_fast_zero(self) -> bool:
            return self._all("can_zero") and self._all("can_fast_zero")

        def can_fua(self) -> int:
            if self._all("can_fua"):
                return NATIVE
            return EMULATE if self.can_flush() else NONE

        def can_multi_conn(self) -> bool:
            return self._all("can_multi_conn")

        def can_extents(self) -> bool:
            return self._all("can_block_status")

        def can_cache(self) -> int:
            return NATIVE if any(client.can_cache for client in self.clients.values()) else NONE

        # Writes: to every healthy copy.
        def _everywhere(self, type: int, offset: int, length: int, flags: int, payload: memoryview | None = None) -> None:
            legs = self._healthy()
            quorum = self.plugin.write_quorum
            name = P.COMMAND_NAMES[type]
            if len(legs) < quorum:
                raise NBDError(errno.EIO, f"mirror: {len(legs)} servers left, fewer than write-quorum={quorum}")
            sent = [(leg, client, client.submit_split(type, offset, length, flags, payload=payload))
                    for leg, client in legs]
            failed: list[tuple[int, NBDClient, Command]] = []
            for leg, client, commands in sent:
                for command in commands:
                    command.wait()
                failure = next((c for c in commands if c.error), None)
                if failure is not None:
                    failed.append((leg, client, failure))
            if not failed:
                return
            succeeded = len(sent) - len(failed)
            if succeeded == 0 and all(client.failure is None for _, client, _ in failed):
                failed[0][2].result()  # the same refusal everywhere: the request's fault, not a server's
            for leg, client, command in failed:
                self.plugin.mark_degraded(leg, client.failure or f"{name} failed: {command.message}")
            if succeeded < quorum:
                raise NBDError(errno.EIO, f"mirror: {name} succeeded on {succeeded} servers, "
                                          f"fewer than write-quorum={quorum}")

        def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
            self._everywhere(P.CMD_WRITE, offset, len(buf), command_flags(flags), buf)

        def zero(self, count: int, offset: int, flags: int) -> None:
            self._everywhere(P.CMD_WRITE_ZEROES, offset, count, zero_command_flags(flags))

        def trim(self, count: int, offset: int, flags: int) -> None:
            self._everywhere(P.CMD_TRIM, offset, count, command_flags(flags))

        def flush(self, flags: int) -> None:
            self._everywhere(P.CMD_FLUSH, 0, 0, 0)

        def cache(self, count: int, offset: int, flags: int) -> None:
            for _, client in self._healthy():
                if client.can_cache:
                    client.submit_split(P.CMD_CACHE, offset, count)  # advisory: not waited for

        # Reads: from one copy, the next one on failure.
        def _each_in_turn(self) -> list[tuple[int, NBDClient]]:
            legs = self._healthy()
            start = self.plugin.next_turn() % len(legs)
            return legs[start:] + legs[:start]

        def pread(self, buf: memoryview, offset: int, flags: int) -> None:
            failed: list[tuple[int, NBDClient, NBDError]] = []
            for leg, client in self._each_in_turn():
                try:
                    client.pread_into(buf, offset)
                except NBDError as e:
                    failed.append((leg, client, e))
                    continue
                for bad_leg, bad_client, error in failed:  # it failed where another copy succeeded
                    self.plugin.mark_degraded(bad_leg, bad_client.failure or f"READ failed: {error}")
                return
            for bad_leg, bad_client, _ in failed:
                if bad_client.failure is not None:
                    self.plugin.mark_degraded(bad_leg, bad_client.failure)
            raise failed[0][2]

        def extents(self, count: int, offset: int, flags: int, extents: Extents) -> None:
            error: NBDError | None = None
            for leg, client in self._each_in_turn():
                try:
                    status = client.block_status(count, offset, command_flags(flags))
                except NBDError as e:
                    if client.failure is not None:
                        self.plugin.mark_degraded(leg, client.failure)
                    error = error or e
                    continue
                position = offset
                for length, state in status:
                    extents.add(position, length, state & (P.STATE_HOLE | P.STATE_ZERO))
                    position += length
                return
            assert error is not None
            raise error


PLUGIN = MirrorPlugin

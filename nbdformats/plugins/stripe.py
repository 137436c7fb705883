"""stripe plugin: RAID-0 across NBD servers.

The disk is cut into stripes of stripe-size bytes dealt to the servers in turn: stripe k lives on
server k mod n at offset (k div n) * stripe-size.  Every server contributes as many bytes as the
smallest one, so the disk is n times the smallest server.  When that size is not a multiple of
stripe-size the last row holds n shorter stripes, one per server.  A request is split at stripe
boundaries and its pieces are sent to all servers at once (pipelined on one connection per server).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator

from ..protocol import wire as P
from ..api.chain import EMULATE, FLAG_REQ_ONE, NATIVE, NONE, Extents, Plugin, PluginHandle
from ..client import Command, NBDClient, wait_all
from ..api.errors import ConfigError
from ..api.params import Param, Size, String
from .nbd import command_flags, zero_command_flags
from . import _legs

log = logging.getLogger("nbdformats")

MAX_STATUS_PIECES = 256  # stripes asked about in one block status request (clients ask again for the rest)


@dataclass(frozen=True)
class Layout:
    """Where the bytes of the striped disk live (pure arithmetic, tested directly)."""

    legs: int  # number of servers
    stripe: int  # stripe size
    leg_size: int  # bytes used on each server (the smallest server's size)

    @property
    def size(self) -> int:
        return self.legs * self.leg_size

    @property
    def _full_rows(self) -> int:
        return self.leg_size // self.stripe

    def pieces(self, offset: int, count: int) -> Iterator[tuple[int, int, int, int]]:
        """(leg, offset on the leg, offset in the request, length) for [offset, offset + count), in order."""
        full = self._full_rows * self.legs * self.stripe  # bytes in complete rows
        tail = self.leg_size % self.stripe  # stripe size of the short last row
        position, end = offset, offset + count
        while position < end:
            if position < full:
                index, within = divmod(position, self.stripe)
                leg, leg_offset = index % self.legs, (index // self.legs) * self.stripe + within
                length = min(self.stripe - within, end - position, full - position)
            else:
                leg, within = divmod(position - full, tail)
                leg_offset = self._full_rows * self.stripe + within
                length = min(tail - within, end - position)
            yield leg, leg_offset, position - offset, length
            position += length

    def leg_ranges(self, offset: int, count: int) -> dict[int, tuple[int, int]]:
        """leg -> (offset, length) it holds of [offset, offset + count): one contiguous range per leg,
        because consecutive stripes of one leg are adjacent on it."""
        ranges: dict[int, tuple[int, int]] = {}
        for leg, leg_offset, _, length in self.pieces(offset, count):
            start, run = ranges.get(leg, (leg_offset, 0))
            assert start + run == leg_offset
            ranges[leg] = (start, run + length)
        return ranges


class StripePlugin(Plugin):
    """RAID-0 across NBD servers: requests split at stripe boundaries and sent to all servers at once."""

    name = "stripe"
    latency_bound = True

    server = Param(String(), repeat=True, required=True,
                   help="NBD URI of one server (repeat, in order): nbd://HOST/EXPORT, nbd+unix:///?socket=PATH")
    stripe_size = Param(Size(minimum=512), default=1024 * 1024, help="bytes per stripe (default 1M)")

    def config_complete(self) -> None:
        self.addresses = _legs.parse_servers(self.name, self.server)

    def get_ready(self) -> None:
        clients = _legs.probe(self.name, self.addresses)
        try:
            sizes = [c.size for c in clients]
            for index, client in enumerate(clients):
                if self.stripe_size % client.info.minimum:
                    raise ConfigError(f"stripe: stripe-size={self.stripe_size} is not a multiple of server "
                                      f"{index}'s minimum block size {client.info.minimum}")
            if len(set(sizes)) > 1:
                log.info("stripe: servers have different sizes %s: using %d bytes of each", sizes, min(sizes))
            self.layout = Layout(len(clients), self.stripe_size, min(sizes))
        finally:
            _legs.close_all(clients)

    class Handle(PluginHandle):
        def __init__(self, plugin: "StripePlugin", readonly: bool, export_name: str) -> None:
            self.layout = plugin.layout
            self.legs: list[NBDClient] = []
            try:
                for address in plugin.addresses:
                    self.legs.append(_legs.connect(address))
            except BaseException:
                _legs.close_all(self.legs)
                raise

        def close(self) -> None:
            _legs.close_all(self.legs)

        def get_size(self) -> int:
            return self.layout.size

        def block_size(self) -> tuple[int, int, int] | None:
            minimum, preferred, _ = _legs.combined_block_size(self.legs)  # type: ignore[misc]
            return minimum, preferred, 64 * 1024 * 1024  # requests are split, so any leg maximum will do

        def can_write(self) -> bool:
            return not any(leg.read_only for leg in self.legs)

        def can_flush(self) -> bool:
            return any(leg.can_flush for leg in self.legs)

        def is_rotational(self) -> bool:
            return any(leg.is_rotational for leg in self.legs)

        def can_trim(self) -> bool:
            return any(leg.can_trim for leg in self.legs)  # advisory: legs without it skip it

        def can_zero(self) -> int:
            return NATIVE if all(leg.can_zero for leg in self.legs) else EMULATE

        def can_fast_zero(self) -> bool:
            return all(leg.can_zero and leg.can_fast_zero for leg in self.legs)

        def can_fua(self) -> int:
            if all(leg.can_fua for leg in self.legs):
                return NATIVE
            return EMULATE if self.can_flush() else NONE

        def can_multi_conn(self) -> bool:
            return all(leg.can_multi_conn for leg in self.legs)

        def can_extents(self) -> bool:
            return any(leg.can_block_status for leg in self.legs)

        def can_cache(self) -> int:
            return NATIVE if any(leg.can_cache for leg in self.legs) else NONE

        def pread(self, buf: memoryview, offset: int, flags: int) -> None:
            legs = self.legs
            wait_all([legs[leg].submit(P.CMD_READ, leg_offset, length, into=buf[start:start + length])
                      for leg, leg_offset, start, length in self.layout.pieces(offset, len(buf))])

        def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
            legs, wire = self.legs, command_flags(flags)
            wait_all([legs[leg].submit(P.CMD_WRITE, leg_offset, length, wire, payload=buf[start:start + length])
                      for leg, leg_offset, start, length in self.layout.pieces(offset, len(buf))])

        def _per_leg(self, type: int, count: int, offset: int, flags: int, only_if: str | None = None) -> None:
            commands: list[Command] = []
            for leg, (leg_offset, length) in self.layout.leg_ranges(offset, count).items():
                client = self.legs[leg]
                if only_if is None or getattr(client, only_if):
                    commands.append(client.submit(type, leg_offset, length, flags))
            wait_all(commands)

        def trim(self, count: int, offset: int, flags: int) -> None:
            self._per_leg(P.CMD_TRIM, count, offset, command_flags(flags), only_if="can_trim")

        def zero(self, count: int, offset: int, flags: int) -> None:
            self._per_leg(P.CMD_WRITE_ZEROES, count, offset, zero_command_flags(flags))

        def cache(self, count: int, offset: int, flags: int) -> None:
            self._per_leg(P.CMD_CACHE, count, offset, 0, only_if="can_cache")

        def flush(self, flags: int) -> None:
            wait_all([leg.submit(P.CMD_FLUSH, 0, 0) for leg in self.legs if leg.can_flush])

        def extents(self, count: int, offset: int, flags: int, extents: Extents) -> None:
            pieces = []
            for leg, leg_offset, start, length in self.layout.pieces(offset, count):
                client = self.legs[leg]
                command = (client.submit(P.CMD_BLOCK_STATUS, leg_offset, length, command_flags(flags))
                           if client.can_block_status else None)
                pieces.append((client, command, offset + start, length))
                if len(pieces) == MAX_STATUS_PIECES or flags & FLAG_REQ_ONE:
                    break
            wait_all([command for _, command, _, _ in pieces if command is not None])
            for client, command, position, length in pieces:
                if command is None:
                    extents.add(position, length, 0)
                    continue
                end = position + length
                for extent_length, state in command.status.get(client.context_id, []):  # type: ignore[arg-type]
                    extents.add(position, min(extent_length, end - position), state & (P.STATE_HOLE | P.STATE_ZERO))
                    position += extent_length
                    if position >= end:
                        break
                if position < end:
                    return  # the leg described less than asked: stop here, the client asks again


PLUGIN = StripePlugin

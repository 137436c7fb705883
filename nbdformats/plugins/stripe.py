"""stripe plugin: RAID-0 across NBD servers.

The disk is cut into stripes of stripe-size bytes dealt to the servers in turn: stripe k lives on
server k mod n at offset (k div n) * stripe-size.  Every server contributes as many bytes as the
smallest one, so the disk is n times the smallest server.  When that size is not a multiple of
stripe-size the last row holds n shorter stripes, one per server.  A request is split at stripe
boundaries and its pieces are sent to all servers at once (pipelined on one connection per server).
A server that breaks its connection or does not answer in request-timeout= seconds fails the requests
that touch it with EIO; the next request to it connects again (with back-off, see _legs.Leg).
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass, replace
from typing import Iterable, Iterator

from ..protocol import wire as P
from ..api.chain import EMULATE, FLAG_REQ_ONE, NATIVE, NONE, Extents, Plugin, PluginHandle
from ..client import Command, NBDClient, wait_all
from ..api.errors import ConfigError, NBDError
from ..api.params import Param, Size, String
from .nbd import command_flags, zero_command_flags
from ._legs import (Leg, Offer, Timeouts, close_all, connect_timeout_param, open_all, parse_servers, error_text,
                    request_timeout_param)

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
    connect_timeout = connect_timeout_param()
    request_timeout = request_timeout_param()

    def config_complete(self) -> None:
        self.addresses = parse_servers(self.name, self.server)

    def legs(self, offers: list[Offer | None]) -> list[Leg]:
        return [Leg(self.name, f"server {index}", address, Timeouts.of(self), offer)
                for index, (address, offer) in enumerate(zip(self.addresses, offers))]

    def get_ready(self) -> None:
        legs = self.legs([None] * len(self.addresses))
        try:
            for leg, failure in zip(legs, open_all(legs)):
                if failure is not None:
                    raise ConfigError(f"stripe: cannot connect to {leg.describe()}: {error_text(failure)}")
            offers = [leg.offer for leg in legs if leg.offer is not None]
        finally:
            close_all(legs)
        for index, offer in enumerate(offers):
            if self.stripe_size % offer.block_size[0]:
                raise ConfigError(f"stripe: stripe-size={self.stripe_size} is not a multiple of server "
                                  f"{index}'s minimum block size {offer.block_size[0]}")
        sizes = [offer.size for offer in offers]
        if len(set(sizes)) > 1:
            log.info("stripe: servers have different sizes %s: using %d bytes of each", sizes, min(sizes))
        self.layout = Layout(len(offers), self.stripe_size, min(sizes))
        # Each connection's legs must keep what the servers offered at start-up: a server that comes back
        # smaller than the layout, or without a capability the stripe advertised, is not used.
        self.offers = [replace(offer, size=self.layout.leg_size) for offer in offers]
        self.offer = Offer.common(self.offers)

    class Handle(PluginHandle):
        def __init__(self, plugin: "StripePlugin", readonly: bool, export_name: str) -> None:
            self.layout = plugin.layout
            self.offer = plugin.offer  # what the stripe as a whole offers
            self.offers = plugin.offers  # what each leg offers
            self.legs = plugin.legs(list(plugin.offers))
            for leg, failure in zip(self.legs, open_all(self.legs)):
                if failure is not None:
                    close_all(self.legs)
                    raise NBDError(errno.EIO, f"stripe: cannot connect to {leg.describe()}: {error_text(failure)}")

        def close(self) -> None:
            close_all(self.legs)

        def get_size(self) -> int:
            return self.layout.size

        def block_size(self) -> tuple[int, int, int] | None:
            minimum, preferred, _ = self.offer.block_size
            return minimum, preferred, 64 * 1024 * 1024  # requests are split, so any leg maximum will do

        def can_write(self) -> bool:
            return not self.offer.has(P.TF_READ_ONLY)

        def can_flush(self) -> bool:
            return self._any(P.TF_SEND_FLUSH)

        def is_rotational(self) -> bool:
            return self.offer.has(P.TF_ROTATIONAL)

        def can_trim(self) -> bool:
            return self._any(P.TF_SEND_TRIM)  # advisory: legs without it skip it

        def can_zero(self) -> int:
            return NATIVE if self.offer.has(P.TF_SEND_WRITE_ZEROES) else EMULATE

        def can_fast_zero(self) -> bool:
            return self.offer.has(P.TF_SEND_WRITE_ZEROES) and self.offer.has(P.TF_SEND_FAST_ZERO)

        def can_fua(self) -> int:
            if self.offer.has(P.TF_SEND_FUA):
                return NATIVE
            return EMULATE if self.can_flush() else NONE

        def can_multi_conn(self) -> bool:
            return self.offer.has(P.TF_CAN_MULTI_CONN)

        def can_extents(self) -> bool:
            return any(offer.block_status for offer in self.offers)

        def can_cache(self) -> int:
            return NATIVE if self._any(P.TF_SEND_CACHE) else NONE

        def _any(self, flag: int) -> bool:
            return any(offer.has(flag) for offer in self.offers)

        def _clients(self, legs: Iterable[int]) -> dict[int, NBDClient]:
            """The connection to each of these legs; EIO at once if one is down."""
            return {leg: self.legs[leg].client() for leg in set(legs)}

        def _wrote(self, clients: dict[int, NBDClient], flags: int) -> None:
            for leg, client in clients.items():
                self.legs[leg].wrote(client, flags)

        def pread(self, buf: memoryview, offset: int, flags: int) -> None:
            pieces = list(self.layout.pieces(offset, len(buf)))
            clients = self._clients(leg for leg, _, _, _ in pieces)
            wait_all([clients[leg].submit(P.CMD_READ, leg_offset, length, into=buf[start:start + length])
                      for leg, leg_offset, start, length in pieces])

        def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
            pieces, wire = list(self.layout.pieces(offset, len(buf))), command_flags(flags)
            clients = self._clients(leg for leg, _, _, _ in pieces)
            wait_all([clients[leg].submit(P.CMD_WRITE, leg_offset, length, wire, payload=buf[start:start + length])
                      for leg, leg_offset, start, length in pieces])
            self._wrote(clients, wire)

        def _per_leg(self, type: int, count: int, offset: int, flags: int, only_if: int = 0) -> None:
            ranges = {leg: where for leg, where in self.layout.leg_ranges(offset, count).items()
                      if not only_if or self.offers[leg].has(only_if)}
            clients = self._clients(ranges)
            wait_all([clients[leg].submit(type, leg_offset, length, flags)
                      for leg, (leg_offset, length) in ranges.items()])
            if type != P.CMD_CACHE:
                self._wrote(clients, flags)

        def trim(self, count: int, offset: int, flags: int) -> None:
            self._per_leg(P.CMD_TRIM, count, offset, command_flags(flags), only_if=P.TF_SEND_TRIM)

        def zero(self, count: int, offset: int, flags: int) -> None:
            self._per_leg(P.CMD_WRITE_ZEROES, count, offset, zero_command_flags(flags))

        def cache(self, count: int, offset: int, flags: int) -> None:
            self._per_leg(P.CMD_CACHE, count, offset, 0, only_if=P.TF_SEND_CACHE)

        def flush(self, flags: int) -> None:
            legs = [leg for leg, offer in zip(self.legs, self.offers) if offer.has(P.TF_SEND_FLUSH)]
            flushes = [leg.start_flush() for leg in legs]
            wait_all(flush.command for flush in flushes)
            for leg, flush in zip(legs, flushes):
                leg.finish_flush(flush)

        def extents(self, count: int, offset: int, flags: int, extents: Extents) -> None:
            pieces = []
            for leg, leg_offset, start, length in self.layout.pieces(offset, count):
                client = self.legs[leg].client()
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

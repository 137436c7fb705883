"""What the stripe and mirror plugins share: their legs, NBD servers given as server=URI."""

from __future__ import annotations

import errno
import logging
from typing import Iterable

from ..client import Address, NBDClient, parse_uri
from ..api.errors import ConfigError, NBDError

log = logging.getLogger("nbdformats")


def parse_servers(plugin: str, uris: list[str]) -> list[Address]:
    addresses = []
    for uri in uris:
        try:
            addresses.append(parse_uri(uri))
        except ValueError as e:
            raise ConfigError(f"{plugin}: server={uri}: {e}") from None
    if not addresses:
        raise ConfigError(f"{plugin}: give at least one server=URI")
    return addresses


def probe(plugin: str, addresses: list[Address]) -> list[NBDClient]:
    """Connect to every leg at start-up (the caller closes them); a leg that cannot be reached stops the server."""
    clients: list[NBDClient] = []
    try:
        for index, address in enumerate(addresses):
            try:
                clients.append(NBDClient.connect(address))
            except OSError as e:
                raise ConfigError(f"{plugin}: cannot connect to server {index} ({address.describe()}): {e}") from None
        return clients
    except BaseException:
        close_all(clients)
        raise


def connect(address: Address) -> NBDClient:
    try:
        return NBDClient.connect(address)
    except OSError as e:
        raise NBDError(errno.EIO, f"cannot connect to {address.describe()}: {e}") from None


def close_all(clients: Iterable[NBDClient | None]) -> None:
    for client in clients:
        if client is not None:
            try:
                client.close()
            except OSError as e:
                log.debug("closing %s: %s", client.address.describe() if client.address else "leg", e)


def combined_block_size(clients: Iterable[NBDClient]) -> tuple[int, int, int] | None:
    """Constraints every leg accepts: the largest minimum and preferred size, the smallest maximum."""
    infos = [c.info for c in clients]
    if not infos:
        return None
    minimum = max(i.minimum for i in infos)
    preferred = max(max(i.preferred for i in infos), minimum)
    maximum = max(min(i.maximum for i in infos), minimum)
    return minimum, preferred, maximum

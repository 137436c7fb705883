"""What the nbd, stripe and mirror plugins share: their servers (legs), how long to wait for them, and
connections that are made again, with back-off, when they break."""

from __future__ import annotations

import errno
import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterable

from ..api.errors import ConfigError, NBDError
from ..api.params import Param, ParamType
from ..client import Address, Command, NBDClient, parse_uri
from ..protocol import wire as P

log = logging.getLogger("nbdformats")

FIRST_RECONNECT_DELAY = 1.0  # seconds between the first and second attempt to reach a server again
LONGEST_RECONNECT_DELAY = 60.0  # the delay doubles after each failed attempt, up to this
RETRY_DELAY = 1.0  # between the first connection's attempts (the nbd plugin's retry=, as nbdkit)

# Capabilities a server announces in its transmission flags, with the names messages give them.
CAPABILITY_NAMES = {P.TF_SEND_FLUSH: "flush", P.TF_SEND_FUA: "FUA", P.TF_SEND_TRIM: "trim",
                    P.TF_SEND_WRITE_ZEROES: "write zeroes", P.TF_SEND_FAST_ZERO: "fast zero",
                    P.TF_SEND_CACHE: "cache", P.TF_CAN_MULTI_CONN: "multi-conn"}
CAPABILITIES = sum(CAPABILITY_NAMES)


class Seconds(ParamType[float]):
    """A duration: a finite number of seconds from `minimum` to a day."""

    metavar = "SECONDS"

    def __init__(self, minimum: float) -> None:
        self.minimum = minimum

    def parse(self, text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a number of seconds") from None
        if not (math.isfinite(value) and self.minimum <= value <= 86400):
            raise ValueError(f"must be from {self.minimum:g} to 86400 seconds")
        return value


def connect_timeout_param() -> Param[float]:
    return Param(Seconds(minimum=0.01), default=10.0,
                 help="seconds to connect to a server and finish the handshake (default 10)")


def request_timeout_param() -> Param[float]:
    return Param(Seconds(minimum=0), default=30.0,
                 help="seconds a request waits for a server's reply before its connection is given up "
                      "(default 30; 0: no limit)")


@dataclass(frozen=True)
class Timeouts:
    connect: float
    request: float | None  # None: requests wait as long as the server takes

    @classmethod
    def of(cls, plugin: Any) -> "Timeouts":
        """From a plugin's connect-timeout= and request-timeout= parameters."""
        return cls(plugin.connect_timeout, plugin.request_timeout or None)


@dataclass(frozen=True)
class Offer:
    """What a plugin told its clients a server can do: a server connected again must still do it."""

    size: int
    flags: int  # transmission flags (P.TF_*)
    block_status: bool
    block_size: tuple[int, int, int]  # minimum, preferred, maximum

    @classmethod
    def of(cls, client: NBDClient) -> "Offer":
        info = client.info
        return cls(client.size, info.flags, client.can_block_status, (info.minimum, info.preferred, info.maximum))

    @classmethod
    def common(cls, offers: Iterable["Offer"]) -> "Offer":
        """What all these servers can do together: the smallest size, the capabilities every one has,
        read-only or rotational if any is, block sizes every one accepts."""
        offers = list(offers)
        capabilities = CAPABILITIES
        others = 0
        for offer in offers:
            capabilities &= offer.flags
            others |= offer.flags & (P.TF_READ_ONLY | P.TF_ROTATIONAL)
        minimum = max(o.block_size[0] for o in offers)
        preferred = max(max(o.block_size[1] for o in offers), minimum)
        maximum = max(min(o.block_size[2] for o in offers), minimum)
        return cls(min(o.size for o in offers), capabilities | others, all(o.block_status for o in offers),
                   (minimum, preferred, maximum))

    def has(self, flag: int) -> bool:
        return bool(self.flags & flag)

    def missing_from(self, client: NBDClient) -> str | None:
        """Why the server behind `client` does not keep this offer, or None if it does."""
        if client.size < self.size:
            return f"it has {client.size} bytes, fewer than {self.size}"
        lost = self.flags & CAPABILITIES & ~client.info.flags
        if lost:
            return "it no longer offers " + ", ".join(n for f, n in CAPABILITY_NAMES.items() if lost & f)
        if client.read_only and not self.has(P.TF_READ_ONLY):
            return "it is read-only now"
        if self.block_status and not client.can_block_status:
            return "it no longer answers block status"
        if client.info.minimum > self.block_size[0]:
            return f"its minimum block size grew from {self.block_size[0]} to {client.info.minimum}"
        return None


class ServerChanged(ConnectionError):
    """A server came back without what it offered before (smaller, read-only, fewer capabilities)."""


class Leg:
    """One NBD server as a plugin uses it: its connection, made again with back-off when it breaks.

    `client()` returns the working connection, or makes a new one if the last one broke.  While the
    server stays unreachable a new connection is tried at most once per delay (1 s, doubling up to 60 s)
    and requests fail at once with EIO in between, so nothing waits on a dead server for longer than
    connect-timeout.  A server connected again must keep `offer` (its size and capabilities).

    A broken connection must not lose acknowledged writes silently: when one breaks with writes not
    yet flushed, the next `flush()` fails with EIO, as a disk reports a lost write cache.
    """

    def __init__(self, plugin: str, name: str, address: Address, timeouts: Timeouts,
                 offer: Offer | None = None) -> None:
        self.plugin = plugin
        self.name = name  # as messages call it ("server 1")
        self.address = address
        self.timeouts = timeouts
        self.offer = offer  # set by the first connection if not given
        self._client: NBDClient | None = None
        self._connecting = threading.Lock()  # one new connection at a time
        self._next_attempt = 0.0  # time.monotonic() before which no new connection is tried
        self._delay = FIRST_RECONNECT_DELAY
        self.why_down = "not connected yet"  # why there is no working connection, when there is none
        self._writes_lock = threading.Lock()
        self._writes = 0  # writes acknowledged on the current connection without FUA...
        self._flushed = 0  # ... of which a flush covered the first this many
        self._lost_writes = False  # a connection broke before its writes were flushed

    def describe(self) -> str:
        return f"{self.name} ({self.address.describe()})"

    def _say(self, message: str) -> str:
        return f"{self.plugin}: {self.describe()}: {message}"

    def _connect(self) -> NBDClient:
        client = NBDClient.connect(self.address, timeout=self.timeouts.connect, request_timeout=self.timeouts.request)
        problem = None if self.offer is None else self.offer.missing_from(client)
        if problem:
            client.close()
            raise ServerChanged(f"the server is not the one it was: {problem}")
        return client

    def open(self, retries: int = 0) -> NBDClient:
        """The first connection: `retries` more attempts, one second apart, if it fails (raises OSError)."""
        for attempt in range(retries + 1):
            try:
                client = self._connect()
                break
            except OSError as e:
                if attempt == retries:
                    self.why_down = error_text(e)
                    raise
                log.debug(self._say(f"connecting failed ({error_text(e)}); retrying in {RETRY_DELAY:g}s"))
                time.sleep(RETRY_DELAY)
        if self.offer is None:
            self.offer = Offer.of(client)
        self._client = client
        return client

    def client(self) -> NBDClient:
        """The working connection, a new one if the last one broke (NBDError EIO if there is none)."""
        client = self._client
        if client is not None and client.failure is None:
            return client
        with self._connecting:
            client = self._client
            if client is not None and client.failure is None:
                return client  # another thread connected meanwhile
            lost = ""
            if client is not None:
                self._give_up(client)
                lost = f"{self.why_down}; "
            now = time.monotonic()
            if now < self._next_attempt:
                raise NBDError(errno.EIO, self._say(f"unreachable ({self.why_down}); next attempt in "
                                                    f"{self._next_attempt - now:.0f} s"))
            try:
                client = self._connect()
            except OSError as e:
                self.why_down = f"{lost}cannot connect: {error_text(e)}"
                self._next_attempt = now + self._delay
                self._delay = min(2 * self._delay, LONGEST_RECONNECT_DELAY)
                raise NBDError(errno.EIO, self._say(self.why_down)) from None
            self._delay = FIRST_RECONNECT_DELAY
            if self.offer is None:
                self.offer = Offer.of(client)
            self._client = client
            log.info(self._say("connected"))
            return client

    def may_try(self) -> bool:
        """Whether `client()` would use a connection or try to make one now, rather than fail at once."""
        client = self._client
        return (client is not None and client.failure is None) or time.monotonic() >= self._next_attempt

    def _give_up(self, client: NBDClient) -> None:
        """Forget a broken connection (with `_connecting` held)."""
        self.why_down = client.failure or "closed"
        with self._writes_lock:
            self._client = None
            if self._writes > self._flushed:
                self._lost_writes = True
                log.debug(self._say(f"the connection broke before {self._writes - self._flushed} writes were "
                                    "flushed"))
            self._writes = self._flushed = 0
        client.close()

    def disconnect(self) -> None:
        """Close the connection (the server keeps what it was sent); the next `client()` makes a new one."""
        with self._connecting:
            client, self._client = self._client, None
            with self._writes_lock:
                self._writes = self._flushed = 0
        if client is not None:
            client.close()

    def wrote(self, client: NBDClient, flags: int) -> None:
        """A write, zero or trim sent on `client` succeeded: unless FUA made it durable, a flush must follow."""
        if flags & P.CMD_FLAG_FUA:
            return
        with self._writes_lock:
            if client is self._client:
                self._writes += 1
            else:  # its connection broke before we heard of it
                self._lost_writes = True

    def forget_lost_writes(self) -> None:
        """The server's earlier content no longer matters (the mirror rebuilds it)."""
        with self._writes_lock:
            self._lost_writes = False

    def start_flush(self) -> "Flush":
        """Send FLUSH on the current connection; `finish_flush()` waits for it (flushes of several legs
        are then in flight at once)."""
        client = self.client()
        with self._writes_lock:
            covered = self._writes if client is self._client else 0
        return Flush(client, covered, client.submit(P.CMD_FLUSH, 0, 0))

    def finish_flush(self, flush: "Flush") -> None:
        """Wait for the FLUSH; EIO if writes were lost with a connection that broke since the last flush."""
        flush.command.result()
        with self._writes_lock:
            if flush.client is self._client:
                self._flushed = max(self._flushed, flush.covered)
            lost, self._lost_writes = self._lost_writes, False
        if lost:
            message = self._say("writes it acknowledged may be lost: its connection broke before they were flushed")
            log.warning(message)
            raise NBDError(errno.EIO, message)

    def flush(self) -> None:
        self.finish_flush(self.start_flush())


@dataclass(frozen=True)
class Flush:
    """A FLUSH in flight on one leg."""

    client: NBDClient
    covered: int  # the writes it makes durable (Leg's count)
    command: Command


def error_text(error: OSError) -> str:
    """An OSError as a message says it: its text without "[Errno N]"."""
    return error.strerror or str(error)


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


def open_all(legs: list[Leg]) -> list[OSError | None]:
    """Open every leg at once (a hung server then costs connect-timeout once, not once per leg): for
    each, None or why it could not be reached."""
    def attempt(leg: Leg) -> OSError | None:
        try:
            leg.open()
            return None
        except OSError as e:
            return e

    with ThreadPoolExecutor(len(legs)) as pool:
        return list(pool.map(attempt, legs))


def close_all(legs: Iterable[Leg]) -> None:
    for leg in legs:
        leg.disconnect()

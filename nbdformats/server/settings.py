"""What every connection needs to know about the server: the chain and the options that shape serving."""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from ..api.chain import Chain, ThreadModel
from ..protocol.handshake import HandshakePolicy
from .busypoll import DEFAULT_MAX_US
from .stats import StatsRecorder
from .workers import WorkerPool

if TYPE_CHECKING:
    from .connection import Connection


@dataclass
class ServerSettings:
    """What every connection needs to know about the server."""

    chain: Chain
    readonly: bool = False
    tls: str = "off"
    tls_context: ssl.SSLContext | None = None
    oldstyle: bool = False
    threads: int = 16
    busy_poll_us: int = DEFAULT_MAX_US  # --busy-poll: the longest a lone connection polls for a request
    handshake_timeout: float = 60.0
    # --mask-handshake, --no-sr, --no-mc: what the newstyle handshake offers.  The connection
    # passes it on: ServerHandshake(tls=settings.tls, policy=settings.handshake_policy).
    handshake_policy: HandshakePolicy = field(default_factory=HandshakePolicy)
    description: str = ""
    on_connection_closed: Callable[[Connection], None] | None = None
    stats: StatsRecorder | None = None  # --stats-json: times every request of every connection
    connections: set = field(default_factory=set)
    _pools: dict = field(default_factory=dict)
    # serialize_connections: a client is served only when the previous one has gone.
    one_connection_at_a_time: asyncio.Lock | None = None

    def pool(self, loop: asyncio.AbstractEventLoop, model: ThreadModel) -> WorkerPool:
        """The shared worker pool for a thread model: `-t` threads when parallel, else one."""
        key = "parallel" if model == ThreadModel.PARALLEL else "serial"
        if key not in self._pools:
            self._pools[key] = WorkerPool(loop, max(1, self.threads) if key == "parallel" else 1,
                                          name=f"nbdformats-{key}")
        return self._pools[key]

"""What every connection needs to know about the server: the chain and the options that shape serving."""

from __future__ import annotations

import ssl
import threading
from dataclasses import dataclass, field
from typing import Any

from ..api.chain import Chain
from ..protocol.handshake import HandshakePolicy
from .budget import SERVER_LIMIT, Budget
from .busypoll import DEFAULT_MAX_US
from .stats import StatsRecorder


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
    stats: StatsRecorder | None = None  # --stats-json: times every request of every connection
    connections: set[Any] = field(default_factory=set)  # live Connections (the server's thread adds and removes)
    budget: Budget = field(default_factory=lambda: Budget(SERVER_LIMIT))  # bytes in flight, server-wide
    # serialize_connections: a client is served only when the previous one has gone.
    one_connection_at_a_time: threading.Lock | None = None

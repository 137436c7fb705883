"""limit filter: limit the number of clients connected at once (nbdkit-limit-filter compatible).

Clients over the limit are refused before the handshake.
"""

from __future__ import annotations

import errno
from typing import Any

from ..api.chain import Filter
from ..api.errors import NBDError
from ..api.params import Int, Param
from ._connections import ConnectionTracker

TOO_MANY = "limit: too many clients connected, connection rejected"


class LimitFilter(Filter):
    """Limit the number of concurrent clients: limit=N (default 1, 0 = no limit)."""

    name = "limit"
    resize_passthrough = True
    limit = Param(Int(minimum=0), default=1, help="Most clients connected at once (0: no limit)")

    def get_ready(self) -> None:
        self.tracker = ConnectionTracker()

    def preconnect(self, client: Any, readonly: bool) -> None:
        if not self.tracker.connected(client, self.limit):
            raise NBDError(errno.EBUSY, TOO_MANY)

    def disconnected(self, client: Any) -> None:
        self.tracker.disconnected(client)


FILTER = LimitFilter

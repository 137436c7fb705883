"""limit filter: limit the number of clients connected at once (nbdkit-limit-filter compatible).

Clients over the limit are refused before the handshake; a client that slipped in
between (two connecting at once) is refused when it opens the export.
"""

from __future__ import annotations

import errno
from typing import Any

from ..core.chain import Filter, FilterHandle, Layer, current_client
from ..core.errors import NBDError
from ..core.params import Int, Param
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
        if self.limit and self.tracker.count() >= self.limit:
            raise NBDError(errno.EBUSY, TOO_MANY)

    class Handle(FilterHandle):
        filter: "LimitFilter"

        def __init__(self, filter: "LimitFilter", next: Layer, readonly: bool, export_name: str) -> None:
            super().__init__(filter, next, readonly, export_name)
            self.client = current_client()
            # Checked again here: clients can stall their handshake to get past preconnect together.
            if not filter.tracker.opened(self.client, filter.limit):
                raise NBDError(errno.EBUSY, TOO_MANY)

        def close(self) -> None:
            self.filter.tracker.closed(self.client)


FILTER = LimitFilter

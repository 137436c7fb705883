"""exitlast filter: exit when the last client disconnects (nbdkit-exitlast-filter compatible).

The server does not exit before the first client.  Connections are counted as connections,
not opens: unlike nbdkit 1.32, a client that asks NBD_OPT_INFO before NBD_OPT_GO is not cut
off between the two.
"""

from __future__ import annotations

import logging

from typing import Any

from ..api.chain import Filter, request_shutdown
from ._connections import ConnectionTracker

log = logging.getLogger("nbdformats.exitlast")


class ExitlastFilter(Filter):
    """Exit when the last client connection closes."""

    name = "exitlast"
    resize_passthrough = True

    def get_ready(self) -> None:
        self.tracker = ConnectionTracker(self._connection_ended)

    def _connection_ended(self, remaining: int) -> None:
        if remaining == 0:
            log.debug("exitlast: exiting on last client connection")
            request_shutdown()

    def preconnect(self, client: Any, readonly: bool) -> None:
        self.tracker.connected(client)

    def disconnected(self, client: Any) -> None:
        self.tracker.disconnected(client)


FILTER = ExitlastFilter

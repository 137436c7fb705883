"""noparallel filter: serialize requests or connections (nbdkit-noparallel-filter compatible).

serialize=requests: one request at a time per connection; all-requests: one at a time in the
whole server; connections: one client at a time (a second client waits in its handshake
until the first disconnects) and multi-conn is no longer advertised.
"""

from __future__ import annotations

import errno
import time

from ..core.chain import Filter, FilterHandle, Layer, ThreadModel, current_client
from ..core.errors import NBDError
from ..core.params import Enum, Param
from ._connections import ConnectionTracker, socket_gone, socket_identity

MODELS = {"requests": ThreadModel.SERIALIZE_REQUESTS, "all-requests": ThreadModel.SERIALIZE_ALL_REQUESTS,
          "connections": ThreadModel.SERIALIZE_CONNECTIONS}
WAIT_INTERVAL = 0.05  # seconds between looks at whether the connection in service has ended


class NoparallelFilter(Filter):
    """Disable parallelism: serialize=requests|all-requests|connections."""

    name = "noparallel"
    resize_passthrough = True
    serialize = Param(Enum(*MODELS), default="requests",
                      help="requests: one request at a time per connection; all-requests: one at a time "
                           "in the server; connections: one client at a time")

    def config_complete(self) -> None:
        self.thread_model = MODELS[self.serialize]  # the chain takes the strictest model
        # Waiting for the previous client happens in the opening thread, never on the event loop.
        self.blocking = self.serialize == "connections"

    def get_ready(self) -> None:
        self.tracker = ConnectionTracker()

    class Handle(FilterHandle):
        filter: "NoparallelFilter"

        def __init__(self, filter: "NoparallelFilter", next: Layer, readonly: bool, export_name: str) -> None:
            super().__init__(filter, next, readonly, export_name)
            self.client = current_client()
            if filter.serialize != "connections":
                return
            identity = socket_identity(self.client) if self.client is not None else None
            while not filter.tracker.opened(self.client, limit=1):
                if self.client is None or socket_gone(self.client, identity):
                    raise NBDError(errno.EBUSY, "noparallel: another client is connected (serialize=connections)")
                time.sleep(WAIT_INTERVAL)

        def can_multi_conn(self) -> bool:
            return False if self.filter.serialize == "connections" else self.next.can_multi_conn()

        def close(self) -> None:
            if self.filter.serialize == "connections":
                self.filter.tracker.closed(self.client)


FILTER = NoparallelFilter

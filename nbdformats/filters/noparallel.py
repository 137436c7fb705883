"""noparallel filter: serialize requests or connections (nbdkit-noparallel-filter compatible).

serialize=requests: one request at a time per connection; all-requests: one at a time in the
whole server; connections: one client at a time (the server holds a second client before its
handshake until the first disconnects, the serialize_connections thread model) and multi-conn is
no longer advertised.
"""

from __future__ import annotations

from ..api.chain import Filter, FilterHandle, ThreadModel
from ..api.params import Enum, Param

MODELS = {"requests": ThreadModel.SERIALIZE_REQUESTS, "all-requests": ThreadModel.SERIALIZE_ALL_REQUESTS,
          "connections": ThreadModel.SERIALIZE_CONNECTIONS}


class NoparallelFilter(Filter):
    """Disable parallelism: serialize=requests|all-requests|connections."""

    name = "noparallel"
    resize_passthrough = True
    serialize = Param(Enum(*MODELS), default="requests",
                      help="requests: one request at a time per connection; all-requests: one at a time "
                           "in the server; connections: one client at a time")

    def configured_thread_model(self) -> ThreadModel:
        return MODELS[self.serialize]

    def config_complete(self) -> None:
        self.thread_model = self.configured_thread_model()  # the chain, and so the server, takes the strictest

    class Handle(FilterHandle):
        filter: "NoparallelFilter"

        def can_multi_conn(self) -> bool:
            return False if self.filter.serialize == "connections" else self.next.can_multi_conn()


FILTER = NoparallelFilter

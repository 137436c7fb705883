"""blocksize-policy filter: advertise block size constraints and decide what happens to requests
that break them (nbdkit-blocksize-policy-filter compatible, including nbdkit 1.34's
blocksize-write-disconnect).

With blocksize-error-policy=error, a request smaller than the minimum, not aligned to it, or
(for reads and writes) larger than the maximum fails with EINVAL, as the NBD specification
asks, and the plugin never sees it.  Unlike nbdkit 1.32, blocksize-maximum is checked to be a
multiple of blocksize-minimum.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from typing import Any

from ..api.chain import Extents, Filter, FilterHandle, Layer, current_client
from ..api.errors import ConfigError, NBDError
from ..api.params import Enum, Param, Size

log = logging.getLogger("nbdformats.blocksize-policy")

MAX_LENGTH = 0xFFFFFFFF


def advertised(below: tuple[int, int, int] | None, minimum: int | None, preferred: int | None,
               maximum: int | None, disconnect: int | None) -> tuple[int, int, int] | None:
    """The (minimum, preferred, maximum) to advertise, as nbdkit computes it."""
    if minimum and preferred and maximum:
        return minimum, preferred, maximum
    if not (minimum or preferred or maximum):
        return below
    if below is None:  # the plugin has no constraints: fill in sensible defaults
        low = minimum or 1
        result = (low, preferred or max(4096, low),
                  maximum or ((disconnect - disconnect % low) if disconnect else MAX_LENGTH))
    else:
        result = (minimum or below[0], preferred or below[1], maximum or below[2])
    if not result[0] <= result[1] <= result[2]:
        raise NBDError(errno.EINVAL, f"blocksize-policy: computed block sizes are inconsistent: minimum "
                                     f"{result[0]}, preferred {result[1]}, maximum {result[2]}")
    return result


class BlocksizePolicyFilter(Filter):
    """Advertise block size constraints and reject (or allow) requests that break them."""

    name = "blocksize-policy"
    resize_passthrough = True
    blocksize_error_policy = Param(Enum("allow", "error"), default="allow",
                                   help="allow: pass bad requests to the plugin; error: fail them with EINVAL")
    blocksize_minimum = Param(Size(minimum=1, maximum=64 * 1024, power_of_two=True),
                              help="Advertised minimum block size (a power of 2, at most 64K)")
    blocksize_preferred = Param(Size(minimum=512, maximum=32 * 1024 * 1024, power_of_two=True),
                                help="Advertised preferred block size (a power of 2 between 512 and 32M)")
    blocksize_maximum = Param(Size(minimum=1, maximum=MAX_LENGTH),
                              help="Advertised maximum block size (4294967295 or a multiple of the minimum)")
    blocksize_write_disconnect = Param(Size(minimum=1, maximum=MAX_LENGTH),
                                       help="Drop the connection of a client that writes more than this at once")

    def config_complete(self) -> None:
        low, pref, high = self.blocksize_minimum, self.blocksize_preferred, self.blocksize_maximum
        if low and high and high != MAX_LENGTH and high % low:
            raise ConfigError("blocksize-policy: blocksize-maximum must be 4294967295 or a multiple of "
                              "blocksize-minimum")
        if low and pref and low > pref:
            raise ConfigError("blocksize-policy: blocksize-minimum must be <= blocksize-preferred")
        if pref and high and pref > high:
            raise ConfigError("blocksize-policy: blocksize-preferred must be <= blocksize-maximum")
        if low and self.blocksize_write_disconnect and self.blocksize_write_disconnect <= low:
            raise ConfigError("blocksize-policy: blocksize-write-disconnect must be larger than blocksize-minimum")

    class Handle(FilterHandle):
        filter: "BlocksizePolicyFilter"

        def __init__(self, filter: "BlocksizePolicyFilter", next: Layer, readonly: bool, export_name: str) -> None:
            super().__init__(filter, next, readonly, export_name)
            self.constraints = advertised(next.block_size(), filter.blocksize_minimum, filter.blocksize_preferred,
                                          filter.blocksize_maximum, filter.blocksize_write_disconnect)
            self.enforce = filter.blocksize_error_policy == "error" and self.constraints is not None
            self.client: Any = current_client()

        def block_size(self) -> tuple[int, int, int] | None:
            return self.constraints

        def _check(self, what: str, count: int, offset: int, has_data: bool) -> None:
            if not self.enforce:
                return
            minimum, _, maximum = self.constraints  # type: ignore[misc]
            if count < minimum:
                problem = f"count {count} is smaller than the minimum size {minimum}"
            elif has_data and count > maximum:
                problem = f"count {count} is larger than the maximum size {maximum}"
            elif count % minimum:
                problem = f"count {count} is not a multiple of the minimum size {minimum}"
            elif offset % minimum:
                problem = f"offset {offset} is not aligned to the minimum size {minimum}"
            else:
                return
            raise NBDError(errno.EINVAL, f"client {what} request rejected: {problem}")

        def _disconnect(self) -> None:
            """Drop the client's connection at once (as qemu does for oversized writes)."""
            log.error("disconnecting client due to oversize write request")
            if self.client is not None:
                try:
                    with socket.socket(fileno=os.dup(self.client.fileno())) as sock:
                        sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # already gone
            raise NBDError(errno.ESHUTDOWN, "disconnecting client due to oversize write request")

        def pread(self, buf: memoryview, offset: int, flags: int) -> None:
            self._check("pread", len(buf), offset, True)
            self.next.pread(buf, offset, flags)

        def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
            limit = self.filter.blocksize_write_disconnect
            if limit and len(buf) > limit:
                self._disconnect()
            self._check("pwrite", len(buf), offset, True)
            self.next.pwrite(buf, offset, flags)

        def zero(self, count: int, offset: int, flags: int) -> None:
            self._check("zero", count, offset, False)
            self.next.zero(count, offset, flags)

        def trim(self, count: int, offset: int, flags: int) -> None:
            self._check("trim", count, offset, False)
            self.next.trim(count, offset, flags)

        def cache(self, count: int, offset: int, flags: int) -> None:
            self._check("cache", count, offset, False)
            self.next.cache(count, offset, flags)

        def extents(self, count: int, offset: int, flags: int, extents: Extents) -> None:
            self._check("extents", count, offset, False)
            self.next.extents(count, offset, flags, extents)


FILTER = BlocksizePolicyFilter

"""Errors a plugin or filter raises.

`NBDError` fails one request (its errno goes back to the client); `ConfigError` stops the
server before it listens.  (A peer that breaks the protocol raises protocol.ProtocolError.)
"""

from __future__ import annotations

import errno as _errno


class NBDError(Exception):
    """A request failed; `errno` is sent to the client (mapped to an NBD error code)."""

    def __init__(self, errno: int | None = _errno.EIO, message: str = "") -> None:
        code = _errno.EIO if errno is None else errno  # an OSError's errno may be None
        super().__init__(message or _errno.errorcode.get(code, str(code)))
        self.errno = code


class ConfigError(Exception):
    """A bad command line or parameter: reported before the server starts."""

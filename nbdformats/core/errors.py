"""Errors that cross layer boundaries.

`NBDError` fails one request (its errno goes back to the client); `ProtocolError`
ends one connection; `ConfigError` stops the server before it listens.
"""

from __future__ import annotations

import errno as _errno


class NBDError(Exception):
    """A request failed; `errno` is sent to the client (mapped to an NBD error code)."""

    def __init__(self, errno: int = _errno.EIO, message: str = "") -> None:
        super().__init__(message or _errno.errorcode.get(errno, str(errno)))
        self.errno = errno


class ProtocolError(Exception):
    """The peer broke the protocol so badly that the connection must be dropped."""


class ConfigError(Exception):
    """A bad command line or parameter: reported before the server starts."""

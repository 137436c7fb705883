"""The `nbdkit` module of nbdkit Python plugin scripts, backed by nbdformats.

The python plugin installs this module as `sys.modules["nbdkit"]`, so a script's
`import nbdkit` finds the functions and constants of nbdkit's own embedded module
(nbdkit-python-plugin(3)) with the same names, values and errors.

Functions that need the current connection (`export_name`, `is_tls`, `peer_*`,
`disconnect`) find it through per-thread call state that the python plugin sets before
each callback; `set_error` records an errno there for the failing callback to return.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import re
import signal
import socket
import struct
import threading
from typing import Protocol

from .api import chain
from .api.params import parse_bool as _parse_bool
from .api.params import parse_size as _parse_size
from .api.params import read_secret

# nbdkit.THREAD_MODEL_* (NBDKIT_THREAD_MODEL_*).
THREAD_MODEL_SERIALIZE_CONNECTIONS = int(chain.ThreadModel.SERIALIZE_CONNECTIONS)
THREAD_MODEL_SERIALIZE_ALL_REQUESTS = int(chain.ThreadModel.SERIALIZE_ALL_REQUESTS)
THREAD_MODEL_SERIALIZE_REQUESTS = int(chain.ThreadModel.SERIALIZE_REQUESTS)
THREAD_MODEL_PARALLEL = int(chain.ThreadModel.PARALLEL)

# Request flags.
FLAG_MAY_TRIM = chain.FLAG_MAY_TRIM
FLAG_FUA = chain.FLAG_FUA
FLAG_REQ_ONE = chain.FLAG_REQ_ONE
FLAG_FAST_ZERO = chain.FLAG_FAST_ZERO

# Tri-state answers of can_fua, can_cache and (for C plugins) can_zero.
FUA_NONE = CACHE_NONE = ZERO_NONE = chain.NONE
FUA_EMULATE = CACHE_EMULATE = ZERO_EMULATE = chain.EMULATE
FUA_NATIVE = CACHE_NATIVE = ZERO_NATIVE = chain.NATIVE

# Extent types returned by extents().
EXTENT_HOLE = chain.EXTENT_HOLE
EXTENT_ZERO = chain.EXTENT_ZERO

logger = logging.getLogger("nbdformats.python")


class Connection(Protocol):
    """What the python plugin's handle offers these functions about its connection."""

    export_name: str

    def request_disconnect(self, force: bool) -> None: ...

    def peer_socket(self) -> socket.socket | None: ...

    def is_tls(self) -> bool: ...


class _CallState(threading.local):
    """Per-thread: the connection whose callback runs now and the errno set_error recorded."""

    connection: Connection | None = None
    error: int = 0


call_state = _CallState()


def debug(msg: str) -> None:
    """Log a debug message (shown when the server runs with -v)."""
    logger.debug("%s", msg)


def export_name() -> str:
    """The export name the client asked for (do not trust it: clients send what they like)."""
    connection = call_state.connection
    if connection is None:
        raise RuntimeError("nbdkit.export_name failed")
    return connection.export_name


def set_error(err: int) -> None:
    """Record errno `err` as the reason of the exception the callback is about to raise."""
    if not isinstance(err, int):
        raise TypeError("set_error expects an errno number (see the errno module)")
    call_state.error = err


def parse_size(text: str) -> int:
    """Parse "100M", "4k", "1G"... into bytes, as nbdkit_parse_size."""
    if not isinstance(text, str):
        raise TypeError("Expected string, got something else")
    try:
        return _parse_size(text)
    except ValueError:
        raise ValueError("Unable to parse string as size") from None


def parse_bool(text: str) -> bool:
    """Parse 1/true/yes/on and 0/false/no/off (any case), as nbdkit_parse_bool."""
    if not isinstance(text, str):
        raise TypeError("Expected string, got something else")
    return _parse_bool(text)


_RATIO_RE = re.compile(r"^\s*([^:/]+?)\s*[:/]\s*([^:/]+?)\s*$")


def parse_probability(what: str, text: str) -> float:
    """Parse "0.1", "1e-1", "10%", "1:10" or "1/10" (all one in ten), as nbdkit_parse_probability.

    The result is finite and >= 0 but may exceed 1 ("200%" is 2.0).
    """
    if not isinstance(what, str) or not isinstance(text, str):
        raise TypeError("Expected string, got something else")

    def number(part: str) -> float:
        try:
            return float(part)
        except ValueError:
            raise ValueError(f"{what}: could not parse probability {text!r}") from None

    stripped = text.strip()
    ratio = _RATIO_RE.match(stripped)
    if stripped.endswith("%"):
        value = number(stripped[:-1]) / 100
    elif ratio:
        denominator = number(ratio.group(2))
        if denominator == 0:
            raise ValueError(f"{what}: probability {text!r} divides by zero")
        value = number(ratio.group(1)) / denominator
    else:
        value = number(stripped)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{what}: probability {text!r} is out of range (must be finite and >= 0)")
    return value


def read_password(text: str) -> str:
    """nbdkit_read_password: the password itself, "+FILE", "-" (prompt) or "-FD"."""
    if not isinstance(text, str):
        raise TypeError("Expected string, got something else")
    # read_secret's errors name the file or descriptor, never the secret.
    return read_secret(text).reveal().decode("utf-8", "surrogateescape")


def shutdown() -> None:
    """Ask the server to shut down (cleanly, as on SIGTERM), as nbdkit_shutdown."""
    os.kill(os.getpid(), signal.SIGTERM)


def disconnect(force: bool = False) -> None:
    """Disconnect the current client: `force` drops it at once, else after in-flight requests."""
    connection = call_state.connection
    if connection is None:
        raise RuntimeError("nbdkit.disconnect: not called from a connection")
    connection.request_disconnect(bool(force))


def is_tls() -> bool:
    """True if the current connection negotiated TLS."""
    connection = call_state.connection
    if connection is None:
        raise RuntimeError("nbdkit.is_tls: not called from a connection")
    return connection.is_tls()


def _peer() -> socket.socket:
    connection = call_state.connection
    sock = connection.peer_socket() if connection is not None else None
    if sock is None:
        raise RuntimeError("the peer of this connection is unknown")
    return sock


def peer_name() -> object:
    """The client's address as socket.getpeername() gives it (a path or "" for Unix sockets)."""
    return _peer().getpeername()


def _peer_credentials() -> tuple[int, int, int]:
    sock = _peer()
    if sock.family != socket.AF_UNIX:
        raise RuntimeError("peer credentials are only known for Unix domain sockets")
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def peer_pid() -> int:
    return _peer_credentials()[0]


def peer_uid() -> int:
    return _peer_credentials()[1]


def peer_gid() -> int:
    return _peer_credentials()[2]


def take_error(default: int = errno.EIO) -> int:
    """The errno recorded by set_error in this thread (reset), or `default`."""
    err, call_state.error = call_state.error, 0
    return err or default

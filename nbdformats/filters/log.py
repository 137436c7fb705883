"""log filter: log every request to a file or a script, in nbdkit-log-filter's format.

Lines look like nbdkit's, so tools that parse its logs work unchanged::

    2020-08-06 02:07:23.080907 connection=1 Read id=1 offset=0x0 count=0x200 ...
    2020-08-06 02:07:23.080927 connection=1 ...Read id=1 return=0

Logged: Ready, Preconnect, ListExports, Connect, Read, Write, Zero, Trim, Extents, Cache,
Flush, Disconnect (nbdkit's Fork is not: the server does not tell filters when it forks).
Timestamps are UTC, as nbdkit's.  Differences: Connect has no tls= field (filters are not told
whether a connection uses TLS), and Preconnect always returns 0 (filters further down may
still refuse the client).  With logscript=, each line also runs the script (under bash) with
the fields as shell variables: $type (ENTER, LEAVE or PRINT), $act, $connection, $id,
$return, $error and the others ($offset, $count, ...); $extents and $exports are arrays.
"""

from __future__ import annotations

import datetime
import errno
import itertools
import logging
import shutil
import subprocess
import threading
from typing import Any, Callable, Sequence

from ..api.chain import (EXTENT_HOLE, EXTENT_ZERO, FLAG_FAST_ZERO, FLAG_FUA, FLAG_MAY_TRIM, FLAG_REQ_ONE, Export,
                         Extents, Filter, FilterHandle, Holes, Layer)
from ..api.errors import ConfigError, NBDError
from ..api.params import Bool, Param, Path, String

log = logging.getLogger("nbdformats.log")

SAFE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789%+-./:=@_")
SCRIPT_TIMEOUT = 60.0
Field = tuple[str, Any]  # (name, value); a list value is written as a shell array (...)


def shell_quote(text: str) -> str:
    """As nbdkit quotes strings in its logs: bare if safe, else in double quotes with \\ escapes."""
    if text and all(c in SAFE_CHARS for c in text):
        return text
    return '"' + "".join("\\" + c if c in '$`\\"' else c for c in text) + '"'


def extent_type(kind: int) -> str:
    return ",".join(name for bit, name in ((EXTENT_HOLE, "hole"), (EXTENT_ZERO, "zero")) if kind & bit)


def render(value: Any) -> str:
    if isinstance(value, list):
        return "(" + " ".join(render(v) for v in value) + ")"
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, str):
        return shell_quote(value)
    return str(value)


def error_name(e: BaseException) -> str:
    number = e.errno if isinstance(e, (NBDError, OSError)) and e.errno else errno.EIO
    return errno.errorcode.get(number, "EIO")


class LogFilter(Filter):
    """Log requests to a file (nbdkit's log format) or an external script."""

    name = "log"
    resize_passthrough = True
    logfile = Param(Path(kind=None), help="File the log is written to")
    logscript = Param(String(), help="Shell script run for each log line, with its fields as variables")
    logappend = Param(Bool(), default=False, help="Append to logfile instead of truncating it")

    def config_complete(self) -> None:
        if self.logscript is not None:
            self.shell = shutil.which("bash") or "/bin/sh"

    def get_ready(self) -> None:
        self.lock = threading.Lock()
        self.file = None
        if self.logfile is not None:
            try:
                self.file = open(self.logfile, "a" if self.logappend else "w", encoding="utf-8")
            except OSError as e:
                raise ConfigError(f"log: cannot open {self.logfile}: {e.strerror}") from None
        self.connections = itertools.count(1)
        self.preconnect_ids = itertools.count(1)
        self.list_ids = itertools.count(1)
        self.output("PRINT", "Ready", None, None, [("thread_model", int(self.final_thread_model))])

    def cleanup(self) -> None:
        if self.file is not None:
            self.file.close()

    def output(self, type: str, act: str, connection: int | None, id: int | None,
               fields: Sequence[Field]) -> None:
        """Write one log line (and run the script): type is ENTER, LEAVE or PRINT."""
        if self.file is None and self.logscript is None:
            return
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")
        parts = [stamp]
        if connection is not None:
            parts.append(f"connection={connection}")
        parts.append(("..." if type == "LEAVE" else "") + act)
        if id is not None:
            parts.append(f"id={id}")
        parts += [f"{name}={render(value)}" for name, value in fields]
        if type == "ENTER":
            parts.append("...")
        with self.lock:
            if self.file is not None:
                self.file.write(" ".join(parts) + "\n")
                self.file.flush()
            if self.logscript is not None:
                self.run_script(type, act, connection, id, fields)

    def run_script(self, type: str, act: str, connection: int | None, id: int | None,
                   fields: Sequence[Field]) -> None:
        variables: list[Field] = [("type", type), ("act", act)]
        if connection is not None:
            variables.append(("connection", connection))
        if id is not None:
            variables.append(("id", id))
        variables += fields
        assignments = "\n".join(f"{name}={render(value)}" for name, value in variables)
        try:
            subprocess.run([self.shell, "-c", assignments + "\n" + self.logscript], stdin=subprocess.DEVNULL,
                           timeout=SCRIPT_TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            log.warning("log: logscript failed: %s", e)

    def call(self, act: str, connection: int | None, id: int, fields: Sequence[Field],
             function: Callable[[], Any], result: Callable[[Any], Sequence[Field]] = lambda _: ()) -> Any:
        """Log the ENTER line, run `function`, log the LEAVE line with its result or error."""
        self.output("ENTER", act, connection, id, fields)
        try:
            value = function()
        except Exception as e:
            self.output("LEAVE", act, connection, id, [("return", -1), ("error", error_name(e))])
            raise
        self.output("LEAVE", act, connection, id, [*result(value), ("return", 0)])
        return value

    def new_connection(self) -> int:
        return next(self.connections)

    def preconnect(self, client: Any, readonly: bool) -> None:
        self.call("Preconnect", None, next(self.preconnect_ids), [("readonly", readonly)], lambda: None)

    def list_exports(self, next_list: Callable[[bool, bool], list[Export]], readonly: bool,
                     is_tls: bool) -> list[Export]:
        return self.call("ListExports", None, next(self.list_ids), [("readonly", readonly), ("tls", is_tls)],
                         lambda: next_list(readonly, is_tls),
                         lambda exports: [("exports", [e.name for e in exports])])

    class Handle(FilterHandle):
        filter: "LogFilter"

        def __init__(self, filter: "LogFilter", next: Layer, readonly: bool, export_name: str) -> None:
            super().__init__(filter, next, readonly, export_name)
            self.connection = filter.new_connection()
            self.ids = itertools.count(1)
            self.transactions = 0
            minimum, preferred, maximum = next.block_size() or (0, 0, 0)
            filter.output("PRINT", "Connect", self.connection, None, [
                ("export", export_name), ("size", hex(next.get_size())), ("minsize", hex(minimum)),
                ("prefsize", hex(preferred)), ("maxsize", hex(maximum)), ("write", next.can_write()),
                ("flush", next.can_flush()), ("rotational", next.is_rotational()), ("trim", next.can_trim()),
                ("zero", next.can_zero()), ("fua", next.can_fua()), ("extents", next.can_extents()),
                ("cache", next.can_cache()), ("fast_zero", next.can_fast_zero())])

        def _call(self, act: str, fields: Sequence[Field], function: Callable[[], Any],
                  result: Callable[[Any], Sequence[Field]] = lambda _: ()) -> Any:
            self.transactions += 1
            return self.filter.call(act, self.connection, next(self.ids), fields, function, result)

        def close(self) -> None:
            self.filter.output("PRINT", "Disconnect", self.connection, None, [("transactions", self.transactions)])

        def pread(self, buf: memoryview, offset: int, flags: int) -> None:
            self._call("Read", [("offset", hex(offset)), ("count", hex(len(buf)))],
                       lambda: self.next.pread(buf, offset, flags))

        def pread_sparse(self, buf: memoryview, offset: int, flags: int) -> Holes:
            return self._call("Read", [("offset", hex(offset)), ("count", hex(len(buf)))],
                              lambda: self.next.pread_sparse(buf, offset, flags))

        def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
            self._call("Write", [("offset", hex(offset)), ("count", hex(len(buf))), ("fua", bool(flags & FLAG_FUA))],
                       lambda: self.next.pwrite(buf, offset, flags))

        def zero(self, count: int, offset: int, flags: int) -> None:
            self._call("Zero", [("offset", hex(offset)), ("count", hex(count)), ("trim", bool(flags & FLAG_MAY_TRIM)),
                                ("fua", bool(flags & FLAG_FUA)), ("fast", bool(flags & FLAG_FAST_ZERO))],
                       lambda: self.next.zero(count, offset, flags))

        def trim(self, count: int, offset: int, flags: int) -> None:
            self._call("Trim", [("offset", hex(offset)), ("count", hex(count)), ("fua", bool(flags & FLAG_FUA))],
                       lambda: self.next.trim(count, offset, flags))

        def flush(self, flags: int) -> None:
            self._call("Flush", [], lambda: self.next.flush(flags))

        def cache(self, count: int, offset: int, flags: int) -> None:
            self._call("Cache", [("offset", hex(offset)), ("count", hex(count))],
                       lambda: self.next.cache(count, offset, flags))

        def extents(self, count: int, offset: int, flags: int, extents: Extents) -> None:
            # Ask below into a fresh list so the log shows exactly what this layer answered.
            inner = Extents(offset, extents.end)

            def described(_: Any) -> list[Field]:
                items: list[Any] = []
                for start, length, kind in inner:
                    items += [hex(start), hex(length), extent_type(kind)]
                return [("extents", items)]

            self._call("Extents", [("offset", hex(offset)), ("count", hex(count)),
                                   ("req_one", bool(flags & FLAG_REQ_ONE))],
                       lambda: self.next.extents(count, offset, flags, inner), described)
            for start, length, kind in inner:
                extents.add(start, length, kind)


FILTER = LogFilter

"""multi-conn filter: advertise, emulate or disable NBD_FLAG_CAN_MULTI_CONN
(nbdkit-multi-conn-filter compatible).

In emulate mode a flush on one connection (or a FUA write, turned into write + flush) is
replayed on every open connection to the plugin, so a client may spread its requests over
several connections and trust a flush on any of them.  Dirty tracking skips flushes that
cannot matter: `connection` (default) flushes only connections that wrote since their last
flush or read since another connection's write, `fast` tracks the whole image, `off` always
flushes.  With multi-conn-exportname=true only connections to the same export are grouped.
"""

from __future__ import annotations

import errno
import threading
from typing import Callable

from ..api.chain import EMULATE, FLAG_FUA, NATIVE, Filter, FilterHandle, Layer, ThreadModel
from ..api.errors import NBDError
from ..api.params import Bool, Enum, Param

WROTE, READ = 1, 2  # what may sit in a connection's cache since its last flush


class Group:
    """The open connections that share data (all of them, or those of one export)."""

    def __init__(self) -> None:
        self.handles: list["MultiConnFilter.Handle"] = []
        self.dirty = False  # some connection wrote since the last flush


class MultiConnFilter(Filter):
    """Emulate, pass through, disable or force the multi-conn flag."""

    name = "multi-conn"
    resize_passthrough = True
    multi_conn_mode = Param(Enum("auto", "emulate", "plugin", "disable", "unsafe"), default="auto",
                            help="auto: emulate unless the plugin has multi-conn; emulate: replay flushes on "
                                 "every connection; plugin: as the plugin says; disable: never; unsafe: always, "
                                 "without emulation")
    multi_conn_track_dirty = Param(Enum("connection", "conn", "fast", "off"), default="connection",
                                   help="Skip flushes of clean connections (connection), of a clean image (fast), "
                                        "or never (off)")
    multi_conn_exportname = Param(Bool(), default=False,
                                  help="true: only connections to the same export name share flushes")

    def get_ready(self) -> None:
        self.track = "connection" if self.multi_conn_track_dirty == "conn" else self.multi_conn_track_dirty
        self.mode = self.multi_conn_mode
        if self.mode == "auto" and self.final_thread_model == ThreadModel.SERIALIZE_CONNECTIONS:
            self.mode = "disable"  # one client at a time: nothing to coordinate
        self.lock = threading.Lock()
        self.groups: dict[str, Group] = {}

    class Handle(FilterHandle):
        filter: "MultiConnFilter"

        def __init__(self, filter: "MultiConnFilter", next: Layer, readonly: bool, export_name: str) -> None:
            super().__init__(filter, next, readonly, export_name)
            mode = filter.mode
            if mode == "auto":
                mode = "plugin" if next.can_multi_conn() else "emulate"
            if mode == "emulate" and not next.can_flush():
                raise NBDError(errno.EINVAL, "multi-conn: emulating multi-conn requires a plugin that can flush")
            self.mode = mode
            self.dirty = 0
            self.key = export_name if filter.multi_conn_exportname else ""
            with filter.lock:
                self.group = filter.groups.setdefault(self.key, Group())
                self.group.handles.append(self)

        def close(self) -> None:
            with self.filter.lock:
                self.group.handles.remove(self)
                if not self.group.handles:
                    del self.filter.groups[self.key]

        def can_fua(self) -> int:
            # Native FUA below is not enough when every connection must flush: emulate it (write + flush).
            fua = self.next.can_fua()
            return EMULATE if fua == NATIVE and self.mode == "emulate" else fua

        def can_multi_conn(self) -> bool:
            if self.mode == "plugin":
                return self.next.can_multi_conn()
            return self.mode in ("emulate", "unsafe")

        def _mark(self, wrote: bool) -> None:
            # No lock: a client must wait for a flush's reply before relying on it, so racing
            # requests cannot depend on what the flush sees.
            track = self.filter.track
            if track == "connection":
                self.dirty |= WROTE if wrote else READ
            if track in ("connection", "fast") and wrote:
                self.group.dirty = True

        def pread(self, buf: memoryview, offset: int, flags: int) -> None:
            self._mark(False)
            self.next.pread(buf, offset, flags)

        def cache(self, count: int, offset: int, flags: int) -> None:
            self._mark(False)
            self.next.cache(count, offset, flags)

        def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
            self._write(lambda f: self.next.pwrite(buf, offset, f), flags)

        def zero(self, count: int, offset: int, flags: int) -> None:
            self._write(lambda f: self.next.zero(count, offset, f), flags)

        def trim(self, count: int, offset: int, flags: int) -> None:
            self._write(lambda f: self.next.trim(count, offset, f), flags)

        def _write(self, call: Callable[[int], None], flags: int) -> None:
            # In emulate mode FUA means: write, then flush every connection.
            flush_after = bool(flags & FLAG_FUA) and self.mode == "emulate"
            if flush_after:
                flags &= ~FLAG_FUA
            if flush_after or not flags & FLAG_FUA:
                self._mark(True)
            call(flags)
            if flush_after:
                self.flush(0)

        def flush(self, flags: int) -> None:
            track, group = self.filter.track, self.group
            if self.mode == "emulate":
                with self.filter.lock:
                    for other in list(group.handles):
                        if track == "off" or other.dirty & WROTE or (
                                group.dirty and (track == "fast" or other.dirty & READ)):
                            other.next.flush(flags)
                            other.dirty = 0
                    group.dirty = False
                return
            if track != "off" and not group.dirty:
                return  # nothing written since the last flush anywhere
            self.next.flush(flags)
            if track == "connection":
                if self.next.can_multi_conn():
                    with self.filter.lock:
                        for other in group.handles:
                            other.dirty = 0
                        group.dirty = False
                else:
                    self.dirty = 0
            elif track == "fast":
                group.dirty = False


FILTER = MultiConnFilter

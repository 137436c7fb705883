"""The backend chain: filters stacked over one plugin, as in nbdkit.

Authors subclass `Plugin` (with a `Handle` per connection) or `Filter` (whose handle wraps
`next`, the layer below).  Every handle is wrapped in a `Layer`, nbdkit's "backend": it
caches get_size and the can_* answers for the connection and emulates what a layer lacks
(FUA by flush, WRITE_ZEROES by writes, CACHE by reads, extents as all data).  A filter's
`self.next` is the `Layer` below it.

Flags and tri-state values use nbdkit's numbers so nbdkit Python plugins port unchanged.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import select
import threading
import time
from contextvars import ContextVar
from dataclasses import dataclass
from enum import IntEnum
from types import MappingProxyType
from typing import Any, Callable, ClassVar, Iterable, Iterator, Mapping, Sequence

from ..protocol.wire import MAX_STRING
from .errors import ConfigError, NBDError
from .params import apply_params
from .zeroes import write_zeroes

# Request flags passed to pwrite/zero/trim/flush/extents/cache (nbdkit's NBDKIT_FLAG_*).
FLAG_MAY_TRIM = 1 << 0
FLAG_FUA = 1 << 1
FLAG_REQ_ONE = 1 << 2
FLAG_FAST_ZERO = 1 << 3

# can_fua / can_zero / can_cache answers (NBDKIT_FUA_*, NBDKIT_ZERO_*, NBDKIT_CACHE_*).
NONE = 0
EMULATE = 1
NATIVE = 2

# Extent types (NBD_STATE_HOLE, NBD_STATE_ZERO of base:allocation).
EXTENT_DATA = 0
EXTENT_HOLE = 1
EXTENT_ZERO = 2

# What pread_sparse returns: (start, length) ranges of the buffer that read as zeroes.
Holes = Sequence[tuple[int, int]]

MAX_REQUEST_SIZE = 64 * 1024 * 1024

# An emulated CACHE reads its range as nbdkit does, in pieces of up to MAX_REQUEST_SIZE into one
# buffer for the whole server (made on first use, used by one CACHE at a time: what is read is
# thrown away).  A plugin sees the same reads as under nbdkit (offsets and 64 MiB lengths).
_cache_scratch: list[memoryview] = []
_cache_scratch_lock = threading.Lock()


class ThreadModel(IntEnum):
    """How much concurrency a component allows (nbdkit's values; the chain takes the minimum)."""

    SERIALIZE_CONNECTIONS = 0
    SERIALIZE_ALL_REQUESTS = 1
    SERIALIZE_REQUESTS = 2
    PARALLEL = 3


@dataclass(frozen=True)
class Export:
    """One entry of list_exports()."""

    name: str
    description: str = ""
    # DEFAULT_EXPORT: "the default export", named by the chain with default_export() (asked once
    # per connection), as nbdkit_use_default_export does.
    is_default: bool = False


DEFAULT_EXPORT = Export("", is_default=True)


class Extents:
    """Extents a layer reports for [start, end), following nbdkit's rules.

    `add(offset, length, type)` must be called in ascending, contiguous order; the first
    extent must cover `start`.  Parts outside [start, end) are clipped, adjacent extents
    of the same type merged.
    """

    __slots__ = ("start", "end", "items", "_next")

    def __init__(self, start: int, end: int) -> None:
        self.start, self.end = start, end
        self.items: list[list[int]] = []  # [offset, length, type]
        self._next = start

    def add(self, offset: int, length: int, type: int) -> None:
        if length <= 0 or self._next >= self.end:
            return
        end = offset + length
        if end <= self._next:
            if self.items:
                raise NBDError(errno.EINVAL, "extents must be added in ascending order")
            return  # entirely before the range asked for
        if offset > self._next:
            raise NBDError(errno.EINVAL, f"extents must be contiguous (gap at {self._next})")
        end = min(end, self.end)
        if self.items and self.items[-1][2] == type:
            self.items[-1][1] += end - self._next
        else:
            self.items.append([self._next, end - self._next, type])
        self._next = end

    @property
    def covered(self) -> int:
        """How far (absolute offset) the extents reach so far."""
        return self._next

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        for offset, length, type in self.items:
            yield offset, length, type

    def __len__(self) -> int:
        return len(self.items)


class Component:
    """What plugins and filters share: typed parameters and lifecycle hooks."""

    name: ClassVar[str] = ""
    # Set per instance by a component that learns it from its configuration (python, noparallel).
    thread_model: ThreadModel = ThreadModel.PARALLEL
    # The thread model comes from the component's own code (a script's thread_model method):
    # --dump-plugin says has_thread_model=1, as nbdkit does for a plugin with a .thread_model callback.
    has_thread_model: ClassVar[bool] = False
    # The thread model of the whole chain (the strictest of its components), set by
    # Chain.get_ready() before get_ready() runs, as nbdkit passes it to .get_ready.
    final_thread_model: ThreadModel = ThreadModel.PARALLEL

    # Callbacks that mostly wait for another machine (network round trips) with the GIL
    # released: each connection then gets all -t threads at once, as nbdkit's do, so a client's
    # requests are in flight together.  Otherwise a connection starts with one thread and grows
    # only when requests really block (server/engine.py): threads contend for the GIL.
    latency_bound: ClassVar[bool] = False

    # Free-form parameters (the python plugin hands them to its script): undeclared key=value
    # pairs go to config(key, value) in command-line order instead of being refused.
    accepts_any_key: ClassVar[bool] = False

    # Debug flags the component reads (nbdkit's -D NAME.FLAG=N): flag -> what it shows.
    debug_flag_help: ClassVar[dict[str, str]] = {}
    # The values given with -D (flags not given are absent), set before configure() runs.
    # Read with self.debug_flags.get("flag", 0); see server/debugflags.py.
    debug_flags: Mapping[str, int] = MappingProxyType({})

    @classmethod
    def summary(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""

    def configure(self, pairs: Iterable[tuple[str, str]]) -> None:
        apply_params(self, pairs, f"{self.name}")
        self.config_complete()

    def config(self, key: str, value: str) -> None:
        """Receive an undeclared key=value pair (called only when accepts_any_key is True)."""
        raise ConfigError(f"{self.name}: unknown parameter {key!r}")

    def config_complete(self) -> None:
        """Check parameters together; raise ConfigError."""

    def configured_thread_model(self) -> ThreadModel:
        """The thread model as the parameters alone say (--dump-plugin asks before config_complete)."""
        return self.thread_model

    def get_ready(self) -> None:
        """Called once before the server listens (expensive set-up goes here)."""

    def cleanup(self) -> None:
        """Called once when the server exits."""

    def dump_plugin(self) -> None:
        """Print extra `key=value` lines for --dump-plugin (nbdkit's .dump_plugin).

        The parameters given on the command line were parsed; config_complete() has not run.
        """

    def preconnect(self, client: Any, readonly: bool) -> None:
        """A client connected (`client` is its socket), before the handshake.

        Raise (e.g. NBDError(errno.EPERM, "...")) to refuse the connection; the ip filter does.
        """

    def disconnected(self, client: Any) -> None:
        """A client whose preconnect() passed has gone, and its chain is closed (or never opened).

        Called on the server's event loop; with preconnect() it counts connections (exitlast,
        limit), which are not the same as opens: a client may open the chain for NBD_OPT_INFO
        and again for NBD_OPT_GO.
        """


def extents_aligned(below: Layer, count: int, offset: int, flags: int, align: int, extents: Extents) -> None:
    """The extents of the layer below in whole `align`-byte blocks from `offset` (aligned), as
    nbdkit_extents_aligned: a block of mixed extents gets the types they all share (data unless
    all are holes or zeroes).  For filters that serve whole blocks (swab, blocksize)."""
    found = Extents(offset, offset + count)
    below.extents(count, offset, flags, found)
    runs = list(found)
    for index, (start, length, kind) in enumerate(runs):
        end = start + length
        if end % align == 0:
            extents.add(start, length, kind)
            continue
        if end > offset + align:  # unaligned past the first block: keep the aligned part, stop
            extents.add(start, end - end % align - start, kind)
            return
        # A first extent shorter than a block: merge what follows until the block is covered.
        for _, more, more_kind in runs[index + 1:]:
            kind &= more_kind
            end += more
            if end >= offset + align:
                break
        while end < offset + align:
            more_found = Extents(end, offset + align)
            below.extents(offset + align - end, end, 0, more_found)
            if not len(more_found):
                raise NBDError(errno.EIO, "the layer below reported no extents")
            for _, more, more_kind in more_found:
                kind &= more_kind
                end += more
        extents.add(offset, align, kind)
        return


# The server installs a function here that stops it gracefully (like nbdkit_shutdown()).
_shutdown_hook: Callable[[], None] | None = None


def request_shutdown() -> None:
    """Ask the server to finish: it stops accepting, lets running requests finish and exits.

    Callable from any thread (plugins, filters such as exitwhen, nbdkit.shutdown()).
    """
    if _shutdown_hook is not None:
        _shutdown_hook()


def set_shutdown_hook(hook: Callable[[], None] | None) -> None:
    global _shutdown_hook
    _shutdown_hook = hook


# Whether the server's standard input and output carry the NBD connection (-s).
_stdio_in_use = False


def stdio_safe() -> bool:
    """Whether a component may read standard input or write standard output (nbdkit_stdio_safe()):
    false under -s, where they are the client's connection."""
    return not _stdio_in_use


def set_stdio_in_use(in_use: bool) -> None:
    global _stdio_in_use
    _stdio_in_use = in_use


# What sleep() watches: a pipe that becomes readable when the server stops, and the descriptor of
# the client whose request this thread runs (the engine sets it around each request).
_stopping_read, _stopping_write = os.pipe()
_request_client = threading.local()


def server_stopping() -> None:
    """The server is shutting down: every sleep() returns now (called once, by the server)."""
    os.write(_stopping_write, b"x")


def set_request_client(fd: int | None) -> None:
    """The descriptor whose hang-up ends this thread's sleeps (the engine's, around each request)."""
    _request_client.fd = fd


def sleep(seconds: float) -> None:
    """Sleep as nbdkit_nanosleep does: wake early, with NBDError(ESHUTDOWN), when the server shuts
    down or the client of the request being served hangs up, so a delayed request never holds a
    dead connection or the server's exit for the whole delay."""
    poller = select.poll()
    poller.register(_stopping_read, select.POLLIN)
    client = getattr(_request_client, "fd", None)
    if client is not None:
        poller.register(client, select.POLLRDHUP)
    deadline = time.monotonic() + seconds
    while (remaining := deadline - time.monotonic()) > 0:
        for fd, _ in poller.poll(remaining * 1000):
            raise NBDError(errno.ESHUTDOWN, "the server is shutting down" if fd == _stopping_read
                           else "the client hung up")


class PluginHandle:
    """One connection's view of a plugin.  Override what the plugin supports."""

    def get_size(self) -> int:
        raise NotImplementedError

    def block_size(self) -> tuple[int, int, int] | None:
        """(minimum, preferred, maximum) request sizes, or None for no constraints."""
        return None

    def export_description(self) -> str | None:
        """What NBD_INFO_DESCRIPTION tells a client of this export, or None (nbdkit's .export_description)."""
        return None

    def can_write(self) -> bool:
        return _overrides(self, "pwrite", PluginHandle)

    def can_flush(self) -> bool:
        return _overrides(self, "flush", PluginHandle)

    def is_rotational(self) -> bool:
        return False

    def can_trim(self) -> bool:
        return _overrides(self, "trim", PluginHandle)

    def can_zero(self) -> int:
        return NATIVE if _overrides(self, "zero", PluginHandle) else EMULATE

    def can_fast_zero(self) -> bool:
        # Emulated zeroing fails fast (ENOTSUP before writing anything), so it is "fast".
        return not _overrides(self, "zero", PluginHandle)

    def can_fua(self) -> int:
        return EMULATE if self.can_flush() else NONE

    def can_multi_conn(self) -> bool:
        return False

    def can_extents(self) -> bool:
        return _overrides(self, "extents", PluginHandle)

    def can_cache(self) -> int:
        return NATIVE if _overrides(self, "cache", PluginHandle) else NONE

    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        raise NotImplementedError

    def pread_sparse(self, buf: memoryview, offset: int, flags: int) -> Holes:
        """Read like pread, except that ranges known to read as zeroes may be left unfilled and
        returned instead, as (start, length) pairs relative to buf, in ascending order.

        The server asks this of large structured reads and sends the ranges as holes
        (NBD_REPLY_TYPE_OFFSET_HOLE).  Implement it only when finding the zero ranges is cheap
        (the memory plugin's page map, lseek SEEK_HOLE); by default it is pread with no holes.
        """
        self.pread(buf, offset, flags)
        return ()

    def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        raise NBDError(errno.EROFS, "read-only")

    def flush(self, flags: int) -> None:
        pass

    def trim(self, count: int, offset: int, flags: int) -> None:
        pass

    def zero(self, count: int, offset: int, flags: int) -> None:
        raise NBDError(errno.ENOTSUP, "zero not supported")

    def extents(self, count: int, offset: int, flags: int, extents: Extents) -> None:
        extents.add(offset, count, EXTENT_DATA)

    def cache(self, count: int, offset: int, flags: int) -> None:
        pass

    def can_resize(self) -> bool:
        return _overrides(self, "resize", PluginHandle)

    def resize(self, size: int) -> None:
        """Change the size of the disk (the NBD resize extension); get_size() returns the new size after."""
        raise NBDError(errno.EINVAL, "this export cannot be resized")

    def close(self) -> None:
        pass


def pread_sparse_by_extents(handle: "PluginHandle | FilterHandle", buf: memoryview, offset: int,
                            flags: int) -> Holes:
    """pread_sparse for a handle whose own extents are cheap: read the data extents, return the
    zero ones as holes.  A handle that knows its holes implements pread_sparse with it."""
    extents = Extents(offset, offset + len(buf))
    handle.extents(len(buf), offset, 0, extents)
    holes = []
    for start, length, kind in extents:
        if kind & EXTENT_ZERO:
            holes.append((start - offset, length))
        else:
            handle.pread(buf[start - offset:start - offset + length], start, flags)
    if extents.covered < offset + len(buf):  # extents may stop early: the rest is data
        handle.pread(buf[extents.covered - offset:], extents.covered, flags)
    return holes


def _overrides(handle: Any, method: str, base: type) -> bool:
    return getattr(type(handle), method) is not getattr(base, method)


class Plugin(Component):
    """Base class of plugins.  Subclasses set `name`, declare Params and define `Handle`."""

    Handle: ClassVar[type[PluginHandle]]
    # Buffers passed to pread/pwrite are aligned to this many bytes (e.g. 4096 for O_DIRECT).
    buffer_alignment: ClassVar[int] = 1

    def list_exports(self, readonly: bool, is_tls: bool) -> list[Export]:
        return [DEFAULT_EXPORT]

    def default_export(self, readonly: bool, is_tls: bool) -> str:
        return ""

    def open(self, readonly: bool, export_name: str) -> PluginHandle:
        return self.Handle(self, readonly, export_name)  # type: ignore[call-arg]


OpenNext = Callable[[bool, str], "Layer"]


class FilterHandle:
    """One connection's view of a filter.  By default every call goes to `self.next`."""

    def __init__(self, filter: "Filter", next: "Layer", readonly: bool, export_name: str) -> None:
        self.filter = filter
        self.next = next

    def get_size(self) -> int:
        return self.next.get_size()

    def block_size(self) -> tuple[int, int, int] | None:
        return self.next.block_size()

    def export_description(self) -> str | None:
        return self.next.export_description()

    def can_write(self) -> bool:
        return self.next.can_write()

    def can_flush(self) -> bool:
        return self.next.can_flush()

    def is_rotational(self) -> bool:
        return self.next.is_rotational()

    def can_trim(self) -> bool:
        return self.next.can_trim()

    def can_zero(self) -> int:
        # The layer below emulates if needed, so to us it is native unless it cannot zero.
        return NATIVE if self.next.can_zero() != NONE else NONE

    def can_fast_zero(self) -> bool:
        return self.next.can_fast_zero()

    def can_fua(self) -> int:
        # EMULATE passes up as nbdkit's filters pass it: the topmost layer answering EMULATE
        # turns FUA into a flush, and the layers below it never see FUA.
        return self.next.can_fua()

    def can_multi_conn(self) -> bool:
        return self.next.can_multi_conn()

    def can_extents(self) -> bool:
        return self.next.can_extents()

    def can_cache(self) -> int:
        return NATIVE if self.next.can_cache() != NONE else NONE

    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        self.next.pread(buf, offset, flags)

    def pread_sparse(self, buf: memoryview, offset: int, flags: int) -> Holes:
        """A read that may answer zero ranges as holes (see PluginHandle.pread_sparse).

        A filter that overrides pread but not this sees every read as a pread: sparse reads
        pass through only filters that do not touch reads, or that say how here.
        """
        return self.next.pread_sparse(buf, offset, flags)

    def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        self.next.pwrite(buf, offset, flags)

    def flush(self, flags: int) -> None:
        self.next.flush(flags)

    def trim(self, count: int, offset: int, flags: int) -> None:
        self.next.trim(count, offset, flags)

    def zero(self, count: int, offset: int, flags: int) -> None:
        self.next.zero(count, offset, flags)

    def extents(self, count: int, offset: int, flags: int, extents: Extents) -> None:
        self.next.extents(count, offset, flags, extents)

    def cache(self, count: int, offset: int, flags: int) -> None:
        self.next.cache(count, offset, flags)

    def can_resize(self) -> bool:
        # Only filters that say their size follows the layer below pass resizing through.
        return (self.filter.resize_passthrough or _overrides(self, "resize", FilterHandle)) and \
            self.next.can_resize()

    def resize(self, size: int) -> None:
        if not self.filter.resize_passthrough:
            raise NBDError(errno.EINVAL, f"the {self.filter.name} filter cannot follow a size change")
        self.next.resize(size)

    def close(self) -> None:
        pass


class Filter(Component):
    """Base class of filters.  Subclasses set `name`, declare Params and define `Handle`."""

    Handle: ClassVar[type[FilterHandle]] = FilterHandle
    # True when the filter's size is the size of the layer below and its state does not depend
    # on it, so NBD_CMD_RESIZE can pass through (cache, cow, rate, fua, nozero, log ...).
    resize_passthrough: ClassVar[bool] = False

    def list_exports(self, next_list: Callable[[bool, bool], list[Export]], readonly: bool,
                     is_tls: bool) -> list[Export]:
        return next_list(readonly, is_tls)

    def default_export(self, next_default: Callable[[bool, bool], str], readonly: bool,
                       is_tls: bool) -> str:
        return next_default(readonly, is_tls)

    def open_below(self, readonly: bool, export_name: str) -> "Layer":
        """Open the layers below this filter outside any connection (e.g. to list an archive's
        members in list_exports or check it at start-up); the caller closes the Layer.
        The Chain replaces this with the real opener."""
        raise RuntimeError(f"{self.name}: filter is not part of a Chain")

    @contextlib.contextmanager
    def below_if_available(self, readonly: bool = True, export_name: str = "") -> Iterator["Layer | None"]:
        """The layers below opened for a start-up check, or None when they cannot be opened yet
        (no default export, a server not up yet): then each connection checks instead."""
        try:
            below: Layer | None = self.open_below(readonly, export_name)
        except Exception:
            below = None
        try:
            yield below
        finally:
            if below is not None:
                below.close()

    def open(self, next_open: OpenNext, readonly: bool, export_name: str) -> FilterHandle:
        """Open the layer below (possibly with another readonly flag or export name), then ours."""
        below = next_open(readonly, export_name)
        try:
            return self.Handle(self, below, readonly, export_name)
        except BaseException:
            below.close()
            raise


class Layer:
    """A handle as seen from above: cached answers, emulation, and closing of the chain below.

    Data calls whose flags need no emulation go straight to the handle's bound methods.
    """

    def __init__(self, handle: PluginHandle | FilterHandle, readonly: bool) -> None:
        self.handle = handle
        self.readonly = readonly
        self._size = handle.get_size()
        if not 0 <= self._size < 1 << 63:  # sizes are signed 64-bit for every client we know
            raise NBDError(errno.EIO, f"the export's size {self._size} is not within 0 to 2^63-1")
        self._block_size = handle.block_size()
        self._can_write = (not readonly) and bool(handle.can_write())
        self._can_flush = bool(handle.can_flush())
        self._is_rotational = bool(handle.is_rotational())
        self._can_trim = self._can_write and bool(handle.can_trim())
        self._can_zero = int(handle.can_zero()) if self._can_write else NONE
        self._can_fast_zero = self._can_zero != NONE and bool(handle.can_fast_zero())
        can_fua = int(handle.can_fua()) if self._can_write else NONE
        if can_fua == EMULATE and not self._can_flush:
            can_fua = NONE
        self._can_fua = can_fua
        self._can_multi_conn = bool(handle.can_multi_conn())
        self._can_extents = bool(handle.can_extents())
        self._can_cache = int(handle.can_cache())
        self._can_resize = self._can_write and bool(handle.can_resize())
        self.pread = handle.pread  # type: ignore[method-assign]
        base = FilterHandle if isinstance(handle, FilterHandle) else PluginHandle
        if _overrides(handle, "pread", base) and not _overrides(handle, "pread_sparse", base):
            self.pread_sparse = self._pread_dense  # type: ignore[method-assign]
        else:
            self.pread_sparse = handle.pread_sparse  # type: ignore[method-assign]
        if can_fua != EMULATE:
            self.pwrite = handle.pwrite  # type: ignore[method-assign]
            self.trim = handle.trim  # type: ignore[method-assign]
        if self._can_zero == NATIVE and can_fua != EMULATE:
            self.zero = handle.zero  # type: ignore[method-assign]
        if self._can_extents:
            self.extents = handle.extents  # type: ignore[method-assign]
        if self._can_cache == NATIVE:
            self.cache = handle.cache  # type: ignore[method-assign]
        self.flush = handle.flush

    # Cached answers, as filters and the server ask for them.
    def get_size(self) -> int:
        return self._size

    def block_size(self) -> tuple[int, int, int] | None:
        return self._block_size

    def export_description(self) -> str | None:
        return self.handle.export_description()

    def can_write(self) -> bool:
        return self._can_write

    def can_flush(self) -> bool:
        return self._can_flush

    def is_rotational(self) -> bool:
        return self._is_rotational

    def can_trim(self) -> bool:
        return self._can_trim

    def can_zero(self) -> int:
        return self._can_zero

    def can_fast_zero(self) -> bool:
        return self._can_fast_zero

    def can_fua(self) -> int:
        return self._can_fua

    def can_multi_conn(self) -> bool:
        return self._can_multi_conn

    def can_extents(self) -> bool:
        return self._can_extents

    def can_cache(self) -> int:
        return self._can_cache

    def can_resize(self) -> bool:
        return self._can_resize

    def resize(self, size: int) -> None:
        """Resize through the chain, then take the new size from the handle."""
        self.handle.resize(size)
        self._size = self.handle.get_size()

    def refresh_size(self) -> int:
        self._size = self.handle.get_size()
        return self._size

    # Data calls with emulation; replaced in __init__ by the handle's own when none is needed.
    def pread(self, buf: memoryview, offset: int, flags: int) -> None:  # pragma: no cover
        self.handle.pread(buf, offset, flags)

    def pread_sparse(self, buf: memoryview, offset: int, flags: int) -> Holes:  # pragma: no cover
        return self.handle.pread_sparse(buf, offset, flags)

    def _pread_dense(self, buf: memoryview, offset: int, flags: int) -> Holes:
        """A filter that reads but says nothing of holes: it sees a pread, and there are none."""
        self.handle.pread(buf, offset, flags)
        return ()

    def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        self.handle.pwrite(buf, offset, flags & ~FLAG_FUA)
        if flags & FLAG_FUA:
            self.handle.flush(0)

    def trim(self, count: int, offset: int, flags: int) -> None:
        self.handle.trim(count, offset, flags & ~FLAG_FUA)
        if flags & FLAG_FUA:
            self.handle.flush(0)

    def zero(self, count: int, offset: int, flags: int) -> None:
        emulate_fua = flags & FLAG_FUA and self._can_fua == EMULATE
        if emulate_fua:
            flags &= ~FLAG_FUA
        if self._can_zero == NATIVE:
            self.handle.zero(count, offset, flags)
        elif self._can_zero == EMULATE:
            if flags & FLAG_FAST_ZERO:
                raise NBDError(errno.ENOTSUP, "fast zero is not possible: zeroes would be written")
            write_zeroes(self.handle.pwrite, count, offset, flags & FLAG_FUA)
        else:
            raise NBDError(errno.EOPNOTSUPP, "write zeroes is not supported")
        if emulate_fua:
            self.handle.flush(0)

    def extents(self, count: int, offset: int, flags: int, extents: Extents) -> None:
        extents.add(offset, count, EXTENT_DATA)

    def cache(self, count: int, offset: int, flags: int) -> None:
        if self._can_cache == EMULATE:
            with _cache_scratch_lock:
                if not _cache_scratch:
                    _cache_scratch.append(memoryview(bytearray(MAX_REQUEST_SIZE)))
                buf = _cache_scratch[0]
                while count > 0:
                    n = min(count, len(buf))
                    self.handle.pread(buf[:n], offset, 0)
                    offset += n
                    count -= n

    def close(self) -> None:
        try:
            self.handle.close()
        finally:
            below = getattr(self.handle, "next", None)
            if isinstance(below, Layer):
                below.close()


class Chain:
    """The configured filters (outermost first) and the plugin, shared by all connections."""

    def __init__(self, filters: list[Filter], plugin: Plugin) -> None:
        self.filters = filters
        self.plugin = plugin
        components: list[Component] = [*filters, plugin]
        self.thread_model = min(c.thread_model for c in components)
        self.latency_bound = any(c.latency_bound for c in components)
        self.buffer_alignment = plugin.buffer_alignment
        for index, f in enumerate(filters):
            f.open_below = functools.partial(self._open, index + 1)  # type: ignore[method-assign]

    def configure(self, pairs_by_component: dict[int, list[tuple[str, str]]]) -> None:
        components: list[Component] = [*self.filters, self.plugin]
        for index, component in enumerate(components):
            component.configure(pairs_by_component.get(index, []))
        # Configuring may settle a thread model (the python plugin asks its script).
        self.thread_model = min(c.thread_model for c in components)

    def preconnect(self, client: Any, readonly: bool) -> None:
        """Every component may refuse a new client before the handshake (outermost first)."""
        for component in [*self.filters, self.plugin]:
            component.preconnect(client, readonly)

    def disconnected(self, client: Any) -> None:
        for component in [*self.filters, self.plugin]:
            try:
                component.disconnected(client)
            except Exception:  # one component's bookkeeping must not stop the others'
                logging.getLogger("nbdformats").exception("%s: disconnected() failed", component.name)

    def get_ready(self) -> None:
        # Plugin first, then filters from the innermost out, as nbdkit does.
        for component in [*self.filters, self.plugin]:
            component.final_thread_model = self.thread_model
        self.plugin.get_ready()
        for f in reversed(self.filters):
            f.get_ready()

    def cleanup(self) -> None:
        for f in self.filters:
            f.cleanup()
        self.plugin.cleanup()

    def _list(self, index: int, readonly: bool, is_tls: bool, defaults: dict[int, str] | None) -> list[Export]:
        if index < len(self.filters):
            return self.filters[index].list_exports(
                lambda ro, tls: self._list(index + 1, ro, tls, defaults), readonly, is_tls)
        exports = []
        for export in self.plugin.list_exports(readonly, is_tls):
            if export.is_default:
                try:
                    export = Export(self._default(index, readonly, is_tls, defaults), export.description)
                except NBDError:
                    continue  # as nbdkit: no default export, nothing to list for it
            exports.append(export)
        return exports

    def list_exports(self, readonly: bool, is_tls: bool, defaults: dict[int, str] | None = None) -> list[Export]:
        exports = self._list(0, readonly, is_tls, defaults)
        for export in exports:  # as nbdkit_add_export: the protocol's strings are at most 4096 bytes
            for what, text in (("name", export.name), ("description", export.description or "")):
                length = len(text.encode("utf-8", "surrogateescape"))
                if length > MAX_STRING:
                    raise NBDError(errno.EINVAL, f"export {what} too long ({length} bytes, more than {MAX_STRING})")
        return exports

    def _default(self, index: int, readonly: bool, is_tls: bool, defaults: dict[int, str] | None = None) -> str:
        """The default export name of the layer at `index`; with a connection's `defaults`, each
        layer's answer is asked once per connection and kept there (nbdkit caches them so)."""
        if defaults is not None and index in defaults:
            return defaults[index]
        if index == len(self.filters):
            name = self.plugin.default_export(readonly, is_tls)
        else:
            name = self.filters[index].default_export(
                lambda ro, tls: self._default(index + 1, ro, tls, defaults), readonly, is_tls)
        if defaults is not None:
            defaults[index] = name
        return name

    def default_export(self, readonly: bool, is_tls: bool, defaults: dict[int, str] | None = None) -> str:
        return self._default(0, readonly, is_tls, defaults)

    def _open(self, index: int, readonly: bool, export_name: str, defaults: dict[int, str] | None = None) -> Layer:
        if not export_name and defaults is not None:
            # As nbdkit's backend_open: a layer asked for "" opens its own default export.
            export_name = self._default(index, readonly, bool(current_tls()), defaults)
        if index == len(self.filters):
            handle: PluginHandle | FilterHandle = self.plugin.open(readonly, export_name)
        else:
            handle = self.filters[index].open(
                lambda ro, name: self._open(index + 1, ro, name, defaults), readonly, export_name)
        try:
            return Layer(handle, readonly)
        except BaseException:
            handle.close()
            below = getattr(handle, "next", None)
            if isinstance(below, Layer):
                below.close()
            raise

    def open(self, readonly: bool, export_name: str, client: Any = None, tls: bool | None = None,
             defaults: dict[int, str] | None = None) -> Layer:
        """Open the whole chain for one connection; returns the top layer.

        `client` is the connection's socket and `tls` whether it negotiated TLS (what
        `current_client()` and `current_tls()` return while the plugin and filters open), so
        that filters can group connections by client and plugins can answer nbdkit.is_tls().
        `defaults` is the connection's cache of default export names: each layer opened with ""
        opens its own default export.
        """
        client_token = _current_client.set(client)
        tls_token = _current_tls.set(tls)
        try:
            return self._open(0, readonly, export_name, defaults)
        finally:
            _current_tls.reset(tls_token)
            _current_client.reset(client_token)


_current_client: ContextVar[Any] = ContextVar("nbdformats_current_client", default=None)
_current_tls: ContextVar[bool | None] = ContextVar("nbdformats_current_tls", default=None)


def current_client() -> Any:
    """The socket of the client whose connection is being opened, or None if unknown.

    Valid while `Plugin.open`, `Filter.open` and handle constructors run (the server passes
    it to `Chain.open`): use getpeername(), or SO_PEERCRED for Unix sockets.
    """
    return _current_client.get()


def current_tls() -> bool | None:
    """Whether the connection being opened negotiated TLS; None if unknown (outside a server).

    Valid while `Plugin.open`, `Filter.open` and handle constructors run, like current_client().
    """
    return _current_tls.get()

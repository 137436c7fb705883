"""cacheextents filter: remember the last block-status answer (nbdkit-cacheextents-filter compatible).

For plugins whose extents are slow to ask for but come many at a time (a remote disk), with clients
that ask one extent at a time while walking the disk (qemu-img convert, qemu-io map).  Each cache
miss asks the layer below for as much as it will say (FLAG_REQ_ONE cleared, up to the end of the
disk) and keeps that answer; requests whose offset falls inside it are answered from it.  Any
write, trim or zero, on any connection, forgets it.
"""

from __future__ import annotations

import logging
import threading

from ..api.chain import FLAG_REQ_ONE, Extents, Filter, FilterHandle, Layer

log = logging.getLogger(__name__)


class CacheextentsFilter(Filter):
    """Cache the last extents (block status) answer of the plugin; writes forget it."""

    name = "cacheextents"
    debug_flag_help = {"cache": "log each cache hit, miss and update"}

    def __init__(self) -> None:
        super().__init__()
        # As nbdkit: one cache for the whole server (the last answer, whichever connection asked),
        # so that one client's walk is answered from another's request.  Unlike nbdkit it also
        # records the export it describes, so a client of another export never sees it.
        self.lock = threading.Lock()
        self.cached: tuple[str, int, int, list[tuple[int, int, int]]] | None = None

    def forget(self) -> None:
        with self.lock:
            self.cached = None

    class Handle(FilterHandle):
        filter: "CacheextentsFilter"

        def __init__(self, filter: "CacheextentsFilter", next: Layer, readonly: bool, export_name: str) -> None:
            super().__init__(filter, next, readonly, export_name)
            self.export_name = export_name

        def extents(self, count: int, offset: int, flags: int, extents: Extents) -> None:
            f = self.filter
            debug = f.debug_flags.get("cache", 0)
            with f.lock:
                cached = f.cached
                if cached is not None and cached[0] == self.export_name and cached[1] <= offset < cached[2]:
                    if debug:
                        log.debug("cacheextents: returning from cache")
                    for start, length, kind in cached[3]:
                        extents.add(start, length, kind)
                    return
                if debug:
                    log.debug("cacheextents: cache miss")
                # Ask for everything the layer below is willing to say, as far as the end of the disk.
                found = Extents(offset, self.next.get_size())
                self.next.extents(count, offset, flags & ~FLAG_REQ_ONE, found)
                items = list(found)
                if items:
                    f.cached = (self.export_name, items[0][0], found.covered, items)
                    if debug:
                        for start, length, kind in items:
                            log.debug("cacheextents: updating cache with: offset=%d length=%d type=%x",
                                      start, length, kind)
            for start, length, kind in items:
                extents.add(start, length, kind)

        def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
            self.filter.forget()
            self.next.pwrite(buf, offset, flags)

        def trim(self, count: int, offset: int, flags: int) -> None:
            self.filter.forget()
            self.next.trim(count, offset, flags)

        def zero(self, count: int, offset: int, flags: int) -> None:
            self.filter.forget()
            self.next.zero(count, offset, flags)


FILTER = CacheextentsFilter

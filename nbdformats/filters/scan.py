"""scan filter: prefetch the whole disk in the background while clients are connected
(nbdkit-scan-filter compatible).

Each connection to the default export starts a thread that sends cache (prefetch) requests of
scan-size= bytes across the disk, from the start, skipping ahead past the client's reads
(scan-ahead=), resuming where the last connection stopped (scan-clock=), once or again and again
(scan-forever=).  It needs a parallel chain whose layer below caches natively: put
--filter=cache (or cow with cow-on-cache=true) after it for plugins that cannot.
"""

from __future__ import annotations

import logging
import threading

from ..api.chain import NATIVE, Filter, FilterHandle, Holes, Layer, ThreadModel
from ..api.params import Bool, Param, Size

log = logging.getLogger(__name__)
PASS_PAUSE = 1.0  # seconds between passes with scan-forever=true


class ScanFilter(Filter):
    """Prefetch the whole disk in the background, staying ahead of sequential reads."""

    name = "scan"
    scan_ahead = Param(Bool(), default=True, help="Skip ahead of the client's reads (false: prefetch in order)")
    scan_clock = Param(Bool(), default=True,
                       help="A new connection resumes where the last one stopped (false: from the start)")
    scan_forever = Param(Bool(), default=False, help="Start again at the end, as long as clients are connected")
    scan_size = Param(Size(minimum=512, maximum=32 * 1024 * 1024, power_of_two=True), default=2 * 1024 * 1024,
                      help="Size of each prefetch (a power of 2, 512 to 32M)")

    def __init__(self) -> None:
        self.clock = 0  # where scanning has got to, shared by all connections (scan-clock)
        self.clock_lock = threading.Lock()

    def advance_clock(self, offset: int) -> None:
        with self.clock_lock:
            self.clock = max(self.clock, offset)

    def starting_offset(self) -> int:
        with self.clock_lock:
            return self.clock if self.scan_clock else 0

    def reset_clock(self) -> None:
        with self.clock_lock:
            self.clock = 0

    class Handle(FilterHandle):
        filter: "ScanFilter"

        def __init__(self, filter: "ScanFilter", next: Layer, readonly: bool, export_name: str) -> None:
            super().__init__(filter, next, readonly, export_name)
            self.stop = threading.Event()
            self.client_reached = 0  # the end of the client's last read (scan-ahead)
            self.thread: threading.Thread | None = None
            reason = self._cannot_scan(export_name)
            if reason:
                log.warning("%s, not scanning", reason)
                return
            self.thread = threading.Thread(target=self._scan, name="scan", daemon=True)
            self.thread.start()

        def _cannot_scan(self, export_name: str) -> str:
            if export_name:
                return "not the default export"
            if self.filter.final_thread_model != ThreadModel.PARALLEL:
                return "the chain does not support the PARALLEL thread model"
            if self.next.can_cache() != NATIVE:
                return ("the layer below does not support NBD_CMD_CACHE; try adding --filter=cache after this "
                        "filter")
            return ""

        def _scan(self) -> None:
            size, step = self.next.get_size(), self.filter.scan_size
            while True:
                offset = self.filter.starting_offset()
                while offset < size:
                    if self.stop.is_set():
                        log.debug("exiting background thread on connection close")
                        return
                    if self.filter.scan_ahead:
                        offset = max(offset, self.client_reached)
                    self.filter.advance_clock(offset)
                    if offset < size:
                        try:
                            self.next.cache(min(step, size - offset), offset, 0)
                        except Exception as e:  # a prefetch is advice: its failure fails nothing
                            log.debug("prefetch at %d failed: %s", offset, e)
                    offset += step
                if not self.filter.scan_forever:
                    log.debug("finished scanning the plugin")
                    return
                self.filter.reset_clock()
                if self.stop.wait(PASS_PAUSE):  # nbdkit starts over at once: a spinning core for a cheap cache
                    return

        def pread(self, buf: memoryview, offset: int, flags: int) -> None:
            self._client_read(offset + len(buf))
            self.next.pread(buf, offset, flags)

        def pread_sparse(self, buf: memoryview, offset: int, flags: int) -> Holes:
            self._client_read(offset + len(buf))
            return self.next.pread_sparse(buf, offset, flags)

        def _client_read(self, end: int) -> None:
            if self.thread is not None:
                self.client_reached = max(self.client_reached, end)

        def close(self) -> None:
            if self.thread is not None:
                self.stop.set()
                self.thread.join()


FILTER = ScanFilter

"""xva filter: serve the disks of a XenServer/XCP-ng export (`xe vm-export`) without unpacking it.

    nbdformats --filter=xva file vm.xva [xva-disk=NAME|Ref:N|INDEX] [xva-verify=none|lazy|full]
    nbdformats --filter=xva --filter=gzip file vm.xva.gz

The tar is indexed once at start-up (headers only, see formats/xva/archive.py for the format); reads go
straight to the chunks' data in the archive, left-out chunks read as zeroes and are reported
as holes.  Every disk is an export; the export name selects one as xva-disk= does.
"""

from __future__ import annotations

import errno
import logging
from bisect import bisect_left
from typing import Callable

from ..api.chain import (EXTENT_DATA, EXTENT_HOLE, EXTENT_ZERO, FLAG_REQ_ONE, Export, Extents, Filter,
                          FilterHandle, Holes, Layer, OpenNext, pread_sparse_by_extents)
from ..api.errors import ConfigError, NBDError
from ..api.params import Enum, Param, String
from ..api.progress import progress
from ..api.zeroes import fill_zero
from ..formats.xva.archive import BAD, CHUNK_SIZE, GOOD, UNCHECKED, Archive, Chunk, Disk, XvaError, checksum, index
from ._layer_bytes import read_bytes

log = logging.getLogger("nbdformats.xva")

class XvaFilter(Filter):
    """Serve the disks of a XenServer/XCP-ng export (XVA) straight from the archive."""

    name = "xva"
    xva_disk = Param(String(), default="",
                     help="Disk served by default: its VDI name, Ref:N, or index (default: the VM's first disk)")
    xva_verify = Param(Enum("none", "lazy", "full"), default="lazy",
                       help="Chunk checksums: none; lazy: each chunk on its first read (EIO on a mismatch); "
                            "full: every chunk at start-up")

    archive: Archive
    default_disk: Disk

    def get_ready(self) -> None:
        try:
            below = self.open_below(True, "")
        except (NBDError, OSError) as e:
            raise ConfigError(f"xva: cannot open the archive: {e}") from None
        try:
            self.archive = self._index(below)
            try:
                self.default_disk = self.archive.select(self.xva_disk) if self.xva_disk else self.archive.disks[0]
            except LookupError as e:
                raise ConfigError(f"xva: xva-disk={self.xva_disk}: {e}") from None
            self._plan_checks(below)
        finally:
            below.close()

    def _index(self, below: Layer) -> Archive:
        try:
            return index(lambda offset, length: read_bytes(below, offset, length), below.get_size(),
                         with_checksums=self.xva_verify != "none")
        except XvaError as e:
            raise ConfigError(f"xva: {e}") from None
        except NBDError as e:
            raise ConfigError(f"xva: cannot read the archive: {e}") from None

    def _plan_checks(self, below: Layer) -> None:
        chunks = [chunk for disk in self.archive.disks for chunk in disk.chunks.values()]
        for chunk in chunks:
            if self.xva_verify == "none" or not chunk.algorithm:
                chunk.state = GOOD
        if self.xva_verify != "none" and all(chunk.state == GOOD for chunk in chunks):
            log.warning("xva: the export has no checksums: xva-verify=%s has nothing to check", self.xva_verify)
        if self.xva_verify == "full":
            self._verify_all(below)

    def _verify_all(self, below: Layer) -> None:
        todo = [(disk, chunk) for disk in self.archive.disks for chunk in disk.chunks.values()
                if chunk.state == UNCHECKED]
        total = sum(chunk.size for _, chunk in todo)
        log.info("xva: verifying the checksums of %d chunks (%d MiB)", len(todo), total >> 20)
        buffer = bytearray(CHUNK_SIZE)
        failed: list[str] = []
        with progress(total, "xva: verifying checksums") as bar:
            for disk, chunk in sorted(todo, key=lambda item: item[1].source):  # in archive order
                data = memoryview(buffer)[:chunk.size]
                try:
                    below.pread(data, chunk.source, 0)
                except NBDError as e:
                    raise ConfigError(f"xva: cannot read the archive: {e}") from None
                if not self.check(disk, chunk, data):
                    failed.append(f"{disk.label} chunk {chunk.number:08d}")
                bar.update(chunk.size)
        if failed:
            shown = ", ".join(failed[:5]) + (f" and {len(failed) - 5} more" if len(failed) > 5 else "")
            raise ConfigError(f"xva: {len(failed)} chunk(s) failed checksum verification: {shown}")
        log.info("xva: all %d checksums match", len(todo))

    def check(self, disk: Disk, chunk: Chunk, data: bytes | bytearray | memoryview) -> bool:
        """Compare a chunk's data with its checksum once; log a mismatch."""
        actual = checksum(chunk.algorithm, data)
        if actual == chunk.expected:
            chunk.state = GOOD
            return True
        chunk.state = BAD
        log.error("xva: %s: chunk %08d (disk offset %d, %d bytes) fails its %s checksum: expected %s, actual %s",
                  disk.label, chunk.number, chunk.offset, chunk.size, chunk.algorithm, chunk.expected or "(empty)",
                  actual)
        return False

    def list_exports(self, next_list: Callable[[bool, bool], list[Export]], readonly: bool,
                     is_tls: bool) -> list[Export]:
        return [Export(disk.export_name, f"{disk.vdi.name} ({disk.vdi.ref}, {disk.size} bytes) of VM "
                                         f"{self.archive.vm_name}") for disk in self.archive.disks]

    def default_export(self, next_default: Callable[[bool, bool], str], readonly: bool, is_tls: bool) -> str:
        return self.default_disk.export_name

    def open(self, next_open: OpenNext, readonly: bool, export_name: str) -> FilterHandle:
        # Our export names select disks; below is the one archive, read-only.
        return super().open(lambda _readonly, _name: next_open(True, ""), readonly, export_name)

    class Handle(FilterHandle):
        def __init__(self, filter: "XvaFilter", next: Layer, readonly: bool, export_name: str) -> None:
            super().__init__(filter, next, readonly, export_name)
            self.filter: XvaFilter = filter
            if next.get_size() != filter.archive.size:
                raise NBDError(errno.EIO, "xva: the archive changed size since the server started")
            try:
                self.disk = filter.archive.select(export_name) if export_name else filter.default_disk
            except LookupError as e:
                raise NBDError(errno.ENOENT, f"xva: {e}") from None

        def get_size(self) -> int:
            return self.disk.size

        def block_size(self) -> tuple[int, int, int] | None:
            return None  # the archive's alignment says nothing about the disk's

        def can_write(self) -> bool:
            return False

        def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
            raise NBDError(errno.EROFS, "xva: read-only (stack the cow filter on top to write)")

        def zero(self, count: int, offset: int, flags: int) -> None:
            raise NBDError(errno.EROFS, "xva: read-only")

        def trim(self, count: int, offset: int, flags: int) -> None:
            raise NBDError(errno.EROFS, "xva: read-only")

        def can_multi_conn(self) -> bool:
            return True  # read-only: every connection sees the same bytes

        def can_extents(self) -> bool:
            return True

        def pread(self, buf: memoryview, offset: int, flags: int) -> None:
            chunks = self.disk.chunks
            done, count = 0, len(buf)
            while done < count:
                slot, within = divmod(offset + done, CHUNK_SIZE)
                n = min(CHUNK_SIZE - within, count - done)
                chunk = chunks.get(slot)
                from_chunk = 0 if chunk is None else max(0, min(n, chunk.size - within))
                if chunk is not None and from_chunk:
                    target = buf[done:done + from_chunk]
                    if chunk.state == GOOD:
                        self.next.pread(target, chunk.source + within, 0)
                    else:
                        self._read_checked(chunk, target, within)
                if from_chunk < n:
                    fill_zero(buf[done + from_chunk:done + n])
                done += n

        def pread_sparse(self, buf: memoryview, offset: int, flags: int) -> Holes:
            return pread_sparse_by_extents(self, buf, offset, flags)  # left-out chunks are holes

        def _read_checked(self, chunk: Chunk, target: memoryview, within: int) -> None:
            """Read the whole chunk to check it (xva-verify=lazy, first read), then copy the part asked for."""
            if chunk.state != BAD:
                data = bytearray(chunk.size)
                self.next.pread(memoryview(data), chunk.source, 0)
                if self.filter.check(self.disk, chunk, data):
                    target[:] = memoryview(data)[within:within + len(target)]
                    return
            raise NBDError(errno.EIO, f"xva: {self.disk.label}: chunk {chunk.number:08d} "
                                      f"fails its {chunk.algorithm} checksum")

        def extents(self, count: int, offset: int, flags: int, extents: Extents) -> None:
            disk, slots = self.disk, self.disk.slots
            position, end = offset, min(offset + count, disk.size)
            i = bisect_left(slots, position // CHUNK_SIZE)
            while position < end:
                if i < len(slots) and slots[i] * CHUNK_SIZE <= position:
                    chunk = disk.chunks[slots[i]]
                    extents.add(position, chunk.offset + chunk.size - position, EXTENT_DATA)
                    position = chunk.offset + chunk.size
                    i += 1
                else:
                    next_data = slots[i] * CHUNK_SIZE if i < len(slots) else disk.size
                    extents.add(position, next_data - position, EXTENT_HOLE | EXTENT_ZERO)
                    position = next_data
                if flags & FLAG_REQ_ONE:
                    return

        def cache(self, count: int, offset: int, flags: int) -> None:
            chunks = self.disk.chunks
            end = min(offset + count, self.disk.size)
            while offset < end:
                slot, within = divmod(offset, CHUNK_SIZE)
                n = min(CHUNK_SIZE - within, end - offset)
                chunk = chunks.get(slot)
                if chunk is not None and within < chunk.size:
                    self.next.cache(min(n, chunk.size - within), chunk.source + within, 0)
                offset += n


FILTER = XvaFilter

"""archive filter: serve a member of any archive libarchive reads (tar.gz/bz2/xz/zst, cpio, 7z,
iso9660, rar, ar, zip, cab, lha, xar...).

libarchive only streams forward, so a member is unpacked on demand into a spill (memory for
small members, a sparse temporary file in $TMPDIR for large ones): a read near the start is
answered as soon as that far is unpacked, and every later read of an unpacked range comes
from the spill.  The spill is shared by all connections and freed when the last one closes;
all spills together keep to archive-memory-total= and archive-disk-total=.
libarchive reads the archive through the layer below (with seeking, so 7z and zip work).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import threading
from dataclasses import dataclass
from typing import Iterator

from libarchive import ffi
from libarchive.entry import ArchiveEntry
from libarchive.exception import ArchiveError as LibarchiveError

from ..api.chain import EMULATE, FilterHandle, Layer
from ..api.errors import NBDError
from ..api.params import Param, Secret, SecretValue, Size, String
from ._decompress import SourceHandle
from ._members import ArchiveError, Member, MemberFilter
from ._spill import Spill

log = logging.getLogger(__name__)

READ_BLOCK = 1 << 20  # bytes handed to libarchive per read callback
SEEK_SET, SEEK_CUR, SEEK_END = 0, 1, 2

_entry_sparse_count = ffi.libarchive.archive_entry_sparse_count
_entry_sparse_count.argtypes = [ctypes.c_void_p]
_entry_sparse_count.restype = ctypes.c_int


def is_sparse(entry: ArchiveEntry) -> bool:
    """Whether the entry has holes (GNU sparse tar): then the data may end before its size,
    the rest reading as zeroes.  libarchive counts no regions for an ordinary file."""
    return _entry_sparse_count(entry._entry_p) > 0


class LayerReader:
    """A libarchive read handle pulling the archive from a Layer.  `layer` may be replaced
    between calls (each connection reads through its own); libarchive only sees a position."""

    def __init__(self, layer: Layer, passphrase: SecretValue | None) -> None:
        self.layer = layer
        self.size = layer.get_size()
        self.position = 0
        self.error: BaseException | None = None  # what went wrong inside a callback
        self.buffer = ctypes.create_string_buffer(READ_BLOCK)
        self.view = memoryview(self.buffer).cast("B")
        self.ordinal = -1  # index of the current entry in the archive
        self.data_warning = ""  # what libarchive warned about the current entry's data
        # ctypes callbacks must outlive the archive handle.
        self._read_cb = ffi.READ_CALLBACK(self._read)
        self._seek_cb = ffi.SEEK_CALLBACK(self._seek)
        self.archive_p = ffi.read_new()
        try:
            if passphrase is not None:
                ffi.read_add_passphrase(self.archive_p, passphrase.reveal())
            ffi.get_read_filter_function("all")(self.archive_p)
            ffi.get_read_format_function("all")(self.archive_p)
            ffi.read_set_seek_callback(self.archive_p, self._seek_cb)
            self.call(ffi.read_open, None, ffi.NO_OPEN_CB, self._read_cb, ffi.NO_CLOSE_CB)
        except BaseException:
            self.close()
            raise

    def _read(self, archive_p: int, context: int, pointer: int) -> int:
        try:
            n = min(READ_BLOCK, self.size - self.position)
            if n > 0:
                self.layer.pread(self.view[:n], self.position, 0)
                self.position += n
            ctypes.cast(pointer, ctypes.POINTER(ctypes.c_void_p))[0] = ctypes.addressof(self.buffer)
            return max(n, 0)
        except BaseException as e:  # an exception must not cross into C: report it after the call
            self.error = e
            return -1

    def _seek(self, archive_p: int, context: int, offset: int, whence: int) -> int:
        base = {SEEK_SET: 0, SEEK_CUR: self.position, SEEK_END: self.size}.get(whence, 0)
        if not 0 <= base + offset <= self.size:
            return ffi.ARCHIVE_FATAL
        self.position = base + offset
        return self.position

    def call(self, function, *args):  # type: ignore[no-untyped-def]
        """Call a libarchive function on this handle; failures become ArchiveError."""
        if not self.archive_p:
            raise ArchiveError("the archive reader is closed")
        self.error = None
        try:
            return function(self.archive_p, *args)
        except LibarchiveError as e:
            if isinstance(self.error, NBDError):
                raise self.error from None
            reason = self.error or e.msg or "libarchive failed"
            raise ArchiveError(str(reason)) from None

    def next_entry(self) -> ArchiveEntry | None:
        if self.ordinal >= 0 and ffi.format_name(self.archive_p) == b"7-Zip":
            # libarchive < 3.7.5 fails to skip a 7z member whose size is a multiple of 64 KiB
            # ("Truncated 7-Zip file body", libarchive PR #2245): read through it instead.
            self.drain()
        entry = ArchiveEntry(self.archive_p)
        if self.call(ffi.read_next_header2, entry._entry_p) == ffi.ARCHIVE_EOF:
            return None
        self.ordinal += 1
        self.data_warning = ""
        return entry

    def read_block(self) -> tuple[int, int, int] | None:
        """The next (address, length, offset) of the current entry's data, None at its end.
        The address points into libarchive's buffer, valid until the next call."""
        buffer, length, offset = ctypes.c_void_p(), ctypes.c_size_t(), ctypes.c_longlong()
        status = self.call(ffi.read_data_block, ctypes.byref(buffer), ctypes.byref(length), ctypes.byref(offset))
        if status == ffi.ARCHIVE_WARN:
            # The data is wrong ("ZIP uncompressed data is wrong size", a bad CRC): libarchive
            # only warns, with the last block.  What it gave is not the member: fail at its end.
            self.data_warning = (ffi.error_string(self.archive_p) or b"libarchive warned").decode(errors="replace")
        if status == ffi.ARCHIVE_EOF or not length.value and self.data_warning:
            if self.data_warning:
                raise ArchiveError(self.data_warning)
            return None
        return buffer.value or 0, length.value, offset.value

    def drain(self) -> None:
        while self.read_block() is not None:
            pass

    def close(self) -> None:
        if self.archive_p:
            ffi.read_free(self.archive_p)
            self.archive_p = None

    def __del__(self) -> None:
        self.close()


class MemberBlocks:
    """A Producer for a Spill: one member's data, block by block as libarchive unpacks it
    (reading the archive through the layer each call is given)."""

    def __init__(self, reader: LayerReader, name: str, size: int) -> None:
        self.reader = reader
        self.name = name
        self.size = size
        self.position = 0  # end of the blocks produced so far

    def read(self, layer: Layer) -> tuple[int, ctypes.Array] | None:
        self.reader.layer = layer
        try:
            block = self.reader.read_block()
        except (ArchiveError, NBDError) as e:
            raise NBDError(errno.EIO, f"archive: unpacking {self.name!r} failed at byte {self.position}: "
                                      f"{e}") from None
        if block is None:
            return None  # the Spill checks the member is complete (or, if sparse, ends in a hole)
        address, length, offset = block
        if offset + length > self.size:
            # A corrupt or hostile archive (a decompression bomb): serve what its header
            # declares, unpack no further.
            log.warning("archive: %r unpacks to more than its declared size (%d bytes): the rest is ignored",
                        self.name, self.size)
            length = max(self.size - offset, 0)
            if not length:
                return None
        self.position = max(self.position, offset + length)
        return offset, (ctypes.c_char * length).from_address(address)  # libarchive's buffer

    def close(self) -> None:
        self.reader.close()


class Budget:
    """Bytes of members unpacked at once, for the whole server (None: no limit)."""

    def __init__(self, limit: int | None) -> None:
        self.limit, self.used = limit, 0

    def reserve(self, size: int) -> bool:
        if self.limit is not None and self.used + size > self.limit:
            return False
        self.used += size
        return True

    def release(self, size: int) -> None:
        self.used -= size

    def available(self) -> int | None:
        return None if self.limit is None else self.limit - self.used


@dataclass(eq=False)
class Unpacked:
    """A member being served: its size reserved in `budget`, and how many connections use it."""

    size: int
    budget: Budget
    connections: int = 0


class MemberHandle(SourceHandle):
    """A connection's view of an unpacked member; closing it may free the member."""

    def __init__(self, filter: "ArchiveFilter", next: Layer, unpacker: Spill) -> None:
        # The spill reads the archive through this connection's layer; reading ahead unpacks.
        super().__init__(filter, next, unpacker, next, cache_mode=EMULATE)
        self.archive_filter, self.unpacker = filter, unpacker

    def close(self) -> None:
        self.archive_filter.release(self.unpacker)


class ArchiveFilter(MemberFilter):
    """Serve a member of any archive libarchive reads, unpacking on demand (read-only)."""

    name = "archive"
    entry = Param(String(), key="archive-entry",
                  help="The member to serve, as `bsdtar tf` lists it. Without it every regular file is an "
                       "export selected by the client's export name")
    passphrase = Param(Secret(), key="archive-passphrase",
                       help="Passphrase of an encrypted archive (zip, 7z, rar): SECRET, +FILE, - or -FD")
    max_size = Param(Size(minimum=1), key="archive-max-size",
                     help="Refuse members larger than this (each is unpacked to memory or disk)")
    memory_limit = Param(Size(), key="archive-memory", default=64 << 20,
                         help="Members up to this size are unpacked into memory, larger ones into a sparse "
                              "temporary file in $TMPDIR (default 64M)")
    memory_total = Param(Size(), key="archive-memory-total", default=256 << 20,
                         help="Memory for all members unpacked at once; a member that does not fit goes to "
                              "a temporary file instead (default 256M)")
    disk_total = Param(Size(), key="archive-disk-total",
                       help="Temporary file space for all members unpacked at once; a member that fits "
                            "neither in memory nor here is refused (ENOMEM) until others are closed "
                            "(default: no limit but the disk's)")

    def get_ready(self) -> None:
        self.unpackers: dict[tuple[str, str], Spill] = {}  # by (export below, name asked for)
        self.users: dict[Spill, Unpacked] = {}
        self.memory = Budget(self.memory_total)
        self.disk = Budget(self.disk_total)
        self.lock = threading.Lock()
        super().get_ready()

    def cleanup(self) -> None:
        for unpacker in set(self.unpackers.values()):
            unpacker.close()

    def read_members(self, below: Layer) -> Iterator[Member]:
        """Regular files, each with the reader positioned at its data (valid until the next one)."""
        reader = LayerReader(below, self.passphrase)
        while (entry := reader.next_entry()) is not None:
            if entry.isfile and not entry.islnk:
                yield Member(entry.pathname, entry.size if entry.size is not None else -1, None,
                             (reader, reader.ordinal, is_sparse(entry)))

    def open_export(self, below: Layer, below_export: str, wanted: str, readonly: bool) -> FilterHandle:
        with self.lock:
            unpacker = self.unpackers.get((below_export, wanted))
            if unpacker is None:
                member = self.find_member(below, wanted)
                unpacker = self.unpackers.get((below_export, member.name))
                if unpacker is None:
                    unpacker = self.start_unpacking(below, member)
                    self.unpackers[(below_export, member.name)] = unpacker
                self.unpackers[(below_export, wanted)] = unpacker
            self.users[unpacker].connections += 1
        # Read-only; the spill reads the archive through this connection's layer; reading ahead unpacks.
        return MemberHandle(self, below, unpacker)

    def release(self, unpacker: Spill) -> None:
        """A connection to the member closed: the last one frees its spill and its budget."""
        with self.lock:
            unpacked = self.users[unpacker]
            unpacked.connections -= 1
            if unpacked.connections:
                return
            del self.users[unpacker]
            for key in [key for key, value in self.unpackers.items() if value is unpacker]:
                del self.unpackers[key]
            unpacked.budget.release(unpacked.size)
        unpacker.close()
        log.debug("archive: %s freed: no connection uses it", unpacker.what)

    def start_unpacking(self, below: Layer, member: Member) -> Spill:
        reader, ordinal, sparse = member.detail
        size = member.size
        if size < 0:
            raise NBDError(errno.ENOTSUP, f"archive: the archive does not record the size of {member.name!r} "
                                          "(a streamed archive?): it cannot be served")
        if self.max_size is not None and size > self.max_size:
            raise NBDError(errno.EFBIG, f"archive: {member.name!r} is {size} bytes, more than archive-max-size")
        if reader.ordinal != ordinal or not reader.archive_p:
            # find_member read on past this member: walk a fresh reader to it.
            reader = LayerReader(below, self.passphrase)
            while reader.ordinal < ordinal:
                if reader.next_entry() is None:
                    raise NBDError(errno.EIO, f"archive: {member.name!r} vanished from the archive")
        in_memory = size <= self.memory_limit and self.memory.reserve(size)
        budget = self.memory if in_memory else self.disk
        if not in_memory and not self.disk.reserve(size):
            raise NBDError(errno.ENOMEM, f"archive: no room to unpack {member.name!r} ({size} bytes) while other "
                                         f"connections use members: archive-memory-total={self.memory.limit} has "
                                         f"{self.memory.available()} bytes left, archive-disk-total={self.disk.limit} "
                                         f"{self.disk.available()}")
        log.debug("archive: unpacking %r (%s bytes) on demand into %s", member.name, size,
                  "memory" if in_memory else "a temporary file")
        spill = Spill(MemberBlocks(reader, member.name, size), size, f"archive: {member.name!r}",
                      in_memory=in_memory, sparse=sparse)
        self.users[spill] = Unpacked(size, budget)
        return spill


FILTER = ArchiveFilter

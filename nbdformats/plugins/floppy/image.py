"""The virtual disk, sans-IO: the tree laid out as FAT, and reads mapped onto it.

The layout (every directory's size and place, every file's clusters) is fixed at start-up;
a directory's entries are encoded when a request first reads its clusters, then kept
(FAT12/16's fixed root directory is encoded at start-up).  The FAT is generated per
request; file data comes from the host through `read_hosts`, called once per request with
the (path, file offset, buffer to fill) of every file whose clusters the request touches.
"""

from __future__ import annotations

import os
import threading
from array import array
from bisect import bisect_right
from collections import deque
from itertools import accumulate, repeat
from operator import floordiv
from typing import Callable

from ...api.chain import EXTENT_DATA, EXTENT_HOLE, EXTENT_ZERO
from ...api.zeroes import fill_zero
from ...formats.fat import FatError
from ...formats.fat.dirents import ATTR_DIRECTORY, ENTRY_SIZE, Times, dot_entries, file_entry, volume_label_entry
from ...formats.fat.layout import (BACKUP_BOOT_SECTOR, FSINFO_SECTOR, SECTOR, FatTable, LayoutError, Needs, boot_sector,
                     fsinfo_sector, mbr_sector, plan, with_boot_code)
from ...formats.fat.names import (LONG_NAME_UNITS_PER_SLOT, MAX_LONG_NAME, ShortNameAllocator, exact_short_name, fold,
                                  long_name_entries, short_name_checksum)
from .tree import DirNode, FileNode

MAX_DIRECTORY_ENTRIES = 65536  # spec section 6: a directory may not grow past 2 MiB
ReadHosts = Callable[[list[tuple[str, int, memoryview]]], None]
# (path, offset, length) -> (offset, length, is data) ranges of a host file, for its holes.
HostRanges = Callable[[str, int, int], list[tuple[int, int, bool]]]
SPARSE_CHECK_MIN = 1 << 20  # host files at least this big are asked for their holes


class _Directory:
    """A directory: what its entries are made of until they are encoded, then the entries.

    At start-up only what the layout needs is worked out (the entries' total size); the
    entries themselves (short names, long-name slots, times, first clusters) are encoded
    by `encode` from the columns kept here: the children's long names in FAT order (joined by
    "/", which no FAT long name holds: one string rather than one object per name), their
    attributes (ATTR_DIRECTORY for a subdirectory), sizes and times, the subdirectories
    in order, and the index (in _Files) of the first non-empty file (the others follow).
    """

    __slots__ = ("node", "parent", "cluster", "times", "names", "attributes", "sizes", "ctimes", "atimes", "mtimes",
                 "subdirs", "first_file", "length", "data")

    def __init__(self, node: DirNode, parent: "_Directory | None") -> None:
        self.node: DirNode | None = node
        self.parent = parent
        self.cluster = 0
        self.times = (node.ctime, node.atime, node.mtime)
        self.names = ""  # joined by "/"
        self.attributes = bytearray()
        self.sizes = array("I")
        self.ctimes = array("d")  # of each child
        self.atimes = array("d")
        self.mtimes = array("d")
        self.subdirs: list[_Directory] = []
        self.first_file = 0
        self.length = 0  # bytes of entries
        self.data: bytearray | None = None  # the entries, once encoded

    def encode(self, label: bytes | None, file_cluster: Callable[[int], int]) -> bytearray:
        """The entries (clusters are known by now); `file_cluster(i)` is file i's first cluster."""
        data = bytearray()
        allocator = ShortNameAllocator()
        times = Times(*self.times)
        if self.parent is None:
            if label is not None:
                data += volume_label_entry(label, times)
                allocator.reserve(label)
        else:
            # ".." of a first-level directory is 0, even on FAT32.
            parent = self.parent.cluster if self.parent.parent is not None else 0
            data += dot_entries(self.cluster, parent, times)
        names = self.names.split("/") if self.attributes else []
        assert len(names) == len(self.attributes)
        exact = [exact_short_name(name) if len(name) <= 12 else None for name in names]  # 8.3: 12 at most
        for short in exact:
            if short is not None:
                allocator.reserve(short)
        allocate = allocator.allocate
        subdirs = iter(self.subdirs)
        file_index = self.first_file
        for name, short, attribute, size, ctime, atime, mtime in zip(names, exact, self.attributes, self.sizes,
                                                                     self.ctimes, self.atimes, self.mtimes):
            if short is None:
                short = allocate(name)
                data += long_name_entries(name, short_name_checksum(short))
            if attribute == ATTR_DIRECTORY:
                cluster = next(subdirs).cluster
            elif size:
                cluster = file_cluster(file_index)
                file_index += 1
            else:
                cluster = 0
            data += file_entry(short, attribute, size, ctime, atime, mtime, cluster)
        assert len(data) == self.length, (len(data), self.length)
        return data


def _long_name_slots(name: str) -> int:
    """How many long-name entries `name` takes when it is not an exact 8.3 name (checked
    here, at start-up, rather than when its entries are encoded)."""
    units = len(name) if name.isascii() else len(name.encode("utf-16-le")) // 2
    if units == 0 or units > MAX_LONG_NAME:
        raise FatError(f"a long name must have 1 to {MAX_LONG_NAME} UTF-16 units: {name!r}")
    return -(-units // LONG_NAME_UNITS_PER_SLOT)


class _Files:
    """The non-empty files, in allocation order, held compactly (a tree of 100,000 files
    keeps no object per file): sizes, host names in one buffer, their host directories."""

    def __init__(self) -> None:
        self.sizes = array("Q")
        self.names = bytearray()  # os.fsencode()d host names, back to back
        self.name_ends = array("Q", [0])
        self.directory_of = array("I")  # index into `directories`
        self.directories: list[str] = []
        self._directory_index: dict[str, int] = {}
        self.generated: dict[int, bytes] = {}  # file index -> contents, for in-memory files
        self.generated_ids: dict[int, int] = {}  # id(FileNode) -> file index

    def add(self, nodes: list[FileNode]) -> int:
        """Add non-empty files (one directory's); returns the index of the first."""
        first = len(self.sizes)
        self.sizes.extend([node.size for node in nodes])
        host = [node for node in nodes if node.directory is not None]
        if len(host) < len(nodes):
            for index, node in enumerate(nodes, first):
                if node.directory is None:
                    self.generated[index] = node.source  # type: ignore[assignment]
                    self.generated_ids[id(node)] = index
        names = [node.source if node.directory is not None else "" for node in nodes]
        joined = "".join(names)  # type: ignore[arg-type]
        if joined.isascii():  # one encoding for the whole directory, lengths from the names
            self.names += joined.encode("ascii")
            ends = accumulate(map(len, names), initial=self.name_ends[-1])  # type: ignore[arg-type]
            next(ends)
            self.name_ends.extend(ends)
        else:
            for name in names:
                self.names += os.fsencode(name)  # type: ignore[arg-type]
                self.name_ends.append(len(self.names))
        directory_of = self.directory_of
        directories = [node.directory for node in nodes]
        if directories and directories[0] is not None and directories.count(directories[0]) == len(directories):
            directory_of.extend(repeat(self._index_of(directories[0]), len(directories)))  # the usual case
        else:
            last: str | None = None
            d = 0
            for directory in directories:
                if directory is not last:
                    last = directory
                    d = 0 if last is None else self._index_of(last)
                directory_of.append(d)
        return first

    def _index_of(self, directory: str) -> int:
        found = self._directory_index.get(directory)
        if found is None:
            found = self._directory_index[directory] = len(self.directories)
            self.directories.append(directory)
        return found

    def path(self, index: int) -> str:
        name = os.fsdecode(bytes(self.names[self.name_ends[index]:self.name_ends[index + 1]]))
        return f"{self.directories[self.directory_of[index]]}/{name}"


def _prepare_directory(directory: _Directory, label: bytes | None, files: _Files,
                       known: dict[int, _Directory] | None = None) -> list[_Directory]:
    """Work out what the layout needs of `directory` (the size of its entries, its non-empty
    files, added to `files`) and keep what its entries are made of; returns its subdirectories
    (to prepare next), reusing the ones in `known` (by id of their node).  The node's children
    are released: the columns kept in `directory` and `files` are all that remains of them."""
    node = directory.node
    assert node is not None
    children = node.children
    node.children = []
    names = [child.name for child in children]
    joined = "/".join(names)  # "/" is never in a FAT long name (windows_name maps it)
    if joined.isascii():
        keys = joined.upper().split("/") if names else []
    else:
        keys = [fold(name) for name in names]
    if keys != sorted(keys):
        order = sorted(range(len(children)), key=keys.__getitem__)
        children = [children[i] for i in order]
        names = [names[i] for i in order]
        joined = "/".join(names)
    entries = len(names) + (1 if directory.parent is None and label is not None else 0)
    if directory.parent is not None:
        entries += 2  # "." and ".."
    lengths = list(map(len, names))
    if joined.isascii() and max(lengths, default=0) <= MAX_LONG_NAME:  # then a character is a UTF-16 unit
        entries += sum([(length + LONG_NAME_UNITS_PER_SLOT - 1) // LONG_NAME_UNITS_PER_SLOT
                        for length in lengths if length > 12])  # never an exact 8.3 name
        entries += sum([1 for name, length in zip(names, lengths) if length <= 12 and exact_short_name(name) is None])
    else:
        for name in names:
            if len(name) > 12 or exact_short_name(name) is None:
                entries += _long_name_slots(name)
    if entries > MAX_DIRECTORY_ENTRIES:
        raise LayoutError(f"{node.origin} needs {entries} directory entries; a FAT "
                          f"directory holds at most {MAX_DIRECTORY_ENTRIES} (long names take several)")
    directory.names = joined
    directory.length = entries * ENTRY_SIZE
    # Columns (DirNode's size is 0, its attributes ATTR_DIRECTORY, which no file has).
    directory.attributes = bytearray([child.attributes for child in children])
    directory.sizes = array("I", [child.size for child in children])
    directory.ctimes = array("d", [child.ctime for child in children])
    directory.atimes = array("d", [child.atime for child in children])
    directory.mtimes = array("d", [child.mtime for child in children])
    subdirs: list[_Directory] = []
    for child in children:
        if type(child) is DirNode:
            sub = known.pop(id(child), None) if known else None
            subdirs.append(sub if sub is not None else _Directory(child, directory))
    nonempty = [child for child in children if child.size and type(child) is FileNode]
    directory.subdirs = subdirs
    directory.first_file = files.add(nonempty)
    directory.node = None  # the tree is not needed once prepared
    return subdirs


class TreeEncoder:
    """Prepares directories (see _prepare_directory) while the tree is being scanned
    (`complete` is tree.scan's `on_complete`), so that the whole tree of nodes never exists at
    once: a directory's nodes are released as soon as it is prepared.  The root is prepared
    last, by `finish`, so that files can still be added to it (FatImage takes the encoder
    instead of preparing the tree)."""

    def __init__(self, label: bytes | None) -> None:
        self.label = label
        self.files = _Files()
        self.directories: list[_Directory] = []  # prepared, the root's first once finished
        self._waiting: dict[int, _Directory] = {}  # id(DirNode) -> its _Directory, until prepared
        self._root: _Directory | None = None
        self._root_children: dict[int, _Directory] = {}

    def complete(self, node: DirNode) -> None:
        directory = self._waiting.pop(id(node), None)
        if directory is None:  # the root: parents complete before their children
            self._root = _Directory(node, None)
            self._root_children = {id(child): _Directory(child, self._root) for child in node.children
                                   if isinstance(child, DirNode)}
            self._waiting.update(self._root_children)
            return
        for sub in _prepare_directory(directory, self.label, self.files):
            self._waiting[id(sub.node)] = sub
        self.directories.append(directory)

    def finish(self, root: DirNode) -> list[_Directory]:
        """Every directory, prepared, the root first."""
        if self._root is None or self._root.node is not root or self._waiting:
            raise ValueError("the tree was not scanned through this encoder")
        _prepare_directory(self._root, self.label, self.files, self._root_children)
        if self._root_children:  # a subdirectory of the root was replaced after the scan
            raise ValueError("the root's subdirectories changed after the scan")
        return [self._root, *self.directories]


# Region kinds of the disk map.
_BYTES, _FAT, _DATA = range(3)


class FatImage:
    """The disk: partition table (optional), FAT file system, and where each byte comes from."""

    def __init__(self, root: DirNode, *, fat: str = "32", partition: str | None = None,
                 size: int | None = None, label: bytes | None = b"NBDKITFLOPY", serial: int = 0,
                 encoder: TreeEncoder | None = None) -> None:
        """Lay out the tree of `root`, which is consumed (its directories are emptied as
        they are prepared, so the tree and what its entries are made of are not both held
        whole).  With `encoder` (given to tree.scan, with the same label), the directories
        were prepared during the scan."""
        self.serial = serial
        if encoder is None:
            self._files = files = _Files()
            directories = self._prepare_tree(root, label, files)
        else:
            self._files = files = encoder.files
            directories = encoder.finish(root)
        root_dir = directories[0]
        needs = Needs([d.length for d in directories[1:]], files.sizes, root_dir.length)
        try:
            self.geometry = g = plan(fat, partition, size, needs)
        except LayoutError as e:
            if size is None:
                raise
            try:
                minimum = plan(fat, partition, None, needs).disk_size
            except LayoutError:
                raise e from None
            raise LayoutError(f"size={size}: {e}; these files need a disk of {minimum} bytes or more "
                              f"with these options") from None
        self.size = g.disk_size

        # Clusters, in order: directories (the root first on FAT32), then file data.
        self._label = label
        self._encoding = threading.Lock()
        self._allocate(directories if g.fat_bits == 32 else directories[1:])
        self.fat = FatTable(g, self._chain_ends, self._allocated_end)
        self._vbr = boot_sector(g, label or b"NO NAME    ", serial)
        self._mbr_code: bytes | None = None
        free = g.clusters - (self._allocated_end - 2)
        self._fsinfo = fsinfo_sector(free, self._allocated_end if free else 0xFFFFFFFF)
        # FAT12/16's root directory is a fixed region of its own: encoded now.
        self._root_region = self._encode(root_dir) if g.fat_bits != 32 else b""
        self._build_map()

    # -- Building ----------------------------------------------------------------------

    def _allocate(self, directories: list[_Directory]) -> None:
        """Consecutive clusters from cluster 2 for each directory, then for each file."""
        g = self.geometry
        cluster_size = g.cluster_size
        files = self._files
        # Objects are the directories in `_directories`, then the files: object
        # `len(_directories) + i` is file i.
        self._directories = directories
        sizes = array("Q", (directory.length for directory in directories))
        sizes.extend(files.sizes)
        self._sizes = sizes
        # Clusters per object: at least one per directory; files are not empty.
        clusters = [max(1, -(-directory.length // cluster_size)) for directory in directories]
        clusters += map(floordiv, map((cluster_size - 1).__add__, files.sizes), repeat(cluster_size))
        starts = array("I", accumulate(clusters, initial=2))
        self._allocated_end = starts[-1]
        self._chain_ends = array("I", map((-1).__add__, starts[1:]))  # the cluster before the next start
        del starts[-1]
        self._starts = starts
        for directory, start in zip(directories, starts):
            directory.cluster = start
        self._data_start = (g.hidden_sectors + g.data_start) * SECTOR
        first_file = len(directories)
        large = [first_file + i for i, size in enumerate(files.sizes)
                 if size >= SPARSE_CHECK_MIN and i not in files.generated]
        self._sparse_objects = array("I", large)
        self._sparse_starts = array("Q", ((starts[i] - 2) * cluster_size for i in large))
        self._sparse_ends = array("Q", ((starts[i] - 2) * cluster_size + sizes[i] for i in large))

    @staticmethod
    def _prepare_tree(root: DirNode, label: bytes | None, files: _Files) -> list[_Directory]:
        """Every directory prepared, breadth first from the root."""
        directories: list[_Directory] = []
        queue: deque[_Directory] = deque([_Directory(root, None)])
        while queue:
            directory = queue.popleft()
            queue.extend(_prepare_directory(directory, label, files))
            directories.append(directory)
        return directories

    def _encode(self, directory: _Directory) -> bytearray:
        """A directory's entries, encoded at the first read of its clusters and then kept
        (the columns they are made of are released)."""
        data = directory.data
        if data is not None:
            return data
        with self._encoding:  # connections read on threads of their own
            if directory.data is None:
                starts, first_file = self._starts, len(self._directories)
                directory.data = directory.encode(self._label, lambda index: starts[first_file + index])
                directory.names = ""
                directory.attributes = bytearray()
                directory.sizes = array("I")
                directory.ctimes = directory.atimes = directory.mtimes = array("d")
            return directory.data

    def _build_map(self) -> None:
        """The disk as consecutive regions (start, end, kind, payload); gaps read as zeros."""
        g = self.geometry
        base = g.hidden_sectors * SECTOR
        regions: list[tuple[int, int, int, object]] = []
        if g.partitioned:
            regions.append((0, SECTOR, _BYTES, mbr_sector(g, self.serial, self._mbr_code)))
        regions.append((base, base + SECTOR, _BYTES, bytes(self._vbr)))
        if g.fat_bits == 32:
            for sector, payload in ((FSINFO_SECTOR, self._fsinfo), (BACKUP_BOOT_SECTOR, bytes(self._vbr)),
                                    (BACKUP_BOOT_SECTOR + 1, self._fsinfo)):
                regions.append((base + sector * SECTOR, base + (sector + 1) * SECTOR, _BYTES, payload))
        fat_size = g.fat_sectors * SECTOR
        for copy in range(2):
            start = base + (g.reserved_sectors * SECTOR) + copy * fat_size
            regions.append((start, start + fat_size, _FAT, None))
        if g.root_sectors:
            start = base + g.root_start * SECTOR
            regions.append((start, start + len(self._root_region), _BYTES, bytes(self._root_region)))
        data_start = base + g.data_start * SECTOR
        data_end = data_start + (self._allocated_end - 2) * g.cluster_size
        if data_end > data_start:
            regions.append((data_start, data_end, _DATA, None))
        self._regions = regions
        self._region_starts = [r[0] for r in regions]
        # Extents: metadata and allocated clusters are data; free FAT entries and free
        # clusters are holes that read as zeroes.
        used_fat = -(-(self._allocated_end * g.fat_bits) // (8 * SECTOR)) * SECTOR
        extents = [(r[0], r[1] if r[2] != _FAT else r[0] + min(used_fat, fat_size)) for r in regions]
        self._extent_map = [e for e in extents if e[1] > e[0]]
        self._extent_starts = [e[0] for e in self._extent_map]

    # -- Boot code ---------------------------------------------------------------------

    def fs_sectors_of(self, node: FileNode) -> list[int]:
        """Sectors (from the start of the file system) holding a generated file, in order."""
        index = len(self._directories) + self._files.generated_ids[id(node)]
        g = self.geometry
        first = g.cluster_sector(self._starts[index])
        return list(range(first, first + -(-self._sizes[index] // SECTOR)))

    def replace_contents(self, node: FileNode, data: bytes) -> None:
        """New contents of the same size for a generated file (a patched ldlinux.sys)."""
        index = self._files.generated_ids[id(node)]
        if len(data) != self._files.sizes[index]:
            raise ValueError("replacement contents must keep the size")
        self._files.generated[index] = data

    def set_boot_code(self, code: bytes, keep: tuple[int, int], mbr_code: bytes | None) -> None:
        """Boot code for the volume boot record (our BPB, bytes keep[0]:keep[1], stays) and,
        on a partitioned disk, the MBR code (the partition is then marked active)."""
        self._vbr = with_boot_code(self._vbr, code, keep)
        self._mbr_code = mbr_code
        self._build_map()

    # -- Reading -----------------------------------------------------------------------

    def read(self, buf: memoryview, offset: int, read_hosts: ReadHosts) -> None:
        """Fill `buf` with the disk's bytes from `offset` (within the disk)."""
        host_reads: list[tuple[str, int, memoryview]] = []  # made in one go at the end
        end = offset + len(buf)
        position = offset
        regions, starts = self._regions, self._region_starts
        while position < end:
            index = bisect_right(starts, position) - 1
            if index < 0 or position >= regions[index][1]:
                # A gap between regions reads as zeros.
                stop = min(starts[index + 1] if index + 1 < len(starts) else end, end)
                fill_zero(buf[position - offset:stop - offset])
                position = stop
                continue
            start, stop, kind, payload = regions[index]
            stop = min(stop, end)
            view = buf[position - offset:stop - offset]
            if kind == _BYTES:
                data = payload[position - start:stop - start]  # type: ignore[index]
                view[:len(data)] = data
                if len(data) < len(view):
                    fill_zero(view[len(data):])
            elif kind == _FAT:
                view[:] = self.fat.read(position - start, len(view))
            else:
                self._read_data(view, position - start, host_reads)
            position = stop
        if host_reads:
            read_hosts(host_reads)

    def _read_data(self, view: memoryview, offset: int, host_reads: list[tuple[str, int, memoryview]]) -> None:
        """Allocated clusters from byte `offset` of the data region; the parts of host files
        are added to `host_reads`, for the caller to read."""
        cluster_size = self.geometry.cluster_size
        starts, sizes, directories, files = self._starts, self._sizes, self._directories, self._files
        while len(view):
            index = bisect_right(starts, offset // cluster_size + 2) - 1
            object_offset = offset - (starts[index] - 2) * cluster_size
            following = starts[index + 1] if index + 1 < len(starts) else self._allocated_end
            span = (following - starts[index]) * cluster_size - object_offset
            part = view[:span]
            filled = max(0, min(len(part), sizes[index] - object_offset))
            if filled:
                if index < len(directories):
                    part[:filled] = self._encode(directories[index])[object_offset:object_offset + filled]
                else:
                    generated = files.generated.get(index - len(directories))
                    if generated is None:  # a host file, read at request time
                        host_reads.append((files.path(index - len(directories)), object_offset, part[:filled]))
                    else:
                        part[:filled] = generated[object_offset:object_offset + filled]
            if filled < len(part):
                fill_zero(part[filled:])
            view = view[len(part):]
            offset += len(part)

    def extents(self, offset: int, count: int, host_ranges: HostRanges | None = None
                ) -> list[tuple[int, int, int]]:
        """(offset, length, type) covering offset..offset+count.

        With `host_ranges`, the holes of large sparse host files are holes of the disk too
        (so a copy skips them); smaller files are not worth a look.
        """
        out: list[tuple[int, int, int]] = []
        end = offset + count
        position = offset
        hole = EXTENT_HOLE | EXTENT_ZERO
        extent_map = self._extent_map
        index = max(0, bisect_right(self._extent_starts, position) - 1)
        while position < end:
            while index < len(extent_map) and extent_map[index][1] <= position:
                index += 1
            if index == len(extent_map):
                out.append((position, end - position, hole))
                break
            start, stop = extent_map[index]
            if position < start:
                n = min(start, end) - position
                out.append((position, n, hole))
            elif start == self._data_start and host_ranges is not None:
                n = min(stop, end) - position
                self._data_extents(position - start, n, host_ranges, out)
            else:
                n = min(stop, end) - position
                out.append((position, n, EXTENT_DATA))
            position += n
        return out

    def _data_extents(self, offset: int, count: int, host_ranges: HostRanges,
                      out: list[tuple[int, int, int]]) -> None:
        """Extents of data-region bytes offset..offset+count: data but for the holes of
        the large host files there."""
        starts, ends, objects = self._sparse_starts, self._sparse_ends, self._sparse_objects
        base = self._data_start
        end = offset + count
        position = offset
        k = max(0, bisect_right(starts, position) - 1)
        while position < end:
            if k < len(starts) and ends[k] <= position:
                k += 1
                continue
            if k == len(starts) or starts[k] >= end:
                out.append((base + position, end - position, EXTENT_DATA))
                return
            if position < starts[k]:
                out.append((base + position, starts[k] - position, EXTENT_DATA))
                position = starts[k]
            stop = min(ends[k], end)
            path = self._files.path(objects[k] - len(self._directories))
            for start, length, is_data in host_ranges(path, position - starts[k], stop - position):
                out.append((base + starts[k] + start, length, EXTENT_DATA if is_data else EXTENT_HOLE | EXTENT_ZERO))
            position = stop
            k += 1

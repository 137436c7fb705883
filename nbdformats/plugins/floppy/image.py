"""The virtual disk, sans-IO: the tree laid out as FAT, and reads mapped onto it.

Metadata (partition table, boot sectors, directories) is built once and kept; the FAT
is generated per request; file data comes from the host through `read_host`, called
with (path, file offset, buffer to fill) only when a request touches a file's clusters.
"""

from __future__ import annotations

from array import array
from bisect import bisect_right
from collections import deque
from typing import Callable

from ...api.chain import EXTENT_DATA, EXTENT_HOLE, EXTENT_ZERO
from ...api.zeroes import fill_zero
from ...formats.fat.dirents import ATTR_DIRECTORY, ENTRY_SIZE, Times, dot_entries, short_entry, volume_label_entry
from ...formats.fat.layout import (BACKUP_BOOT_SECTOR, FSINFO_SECTOR, SECTOR, FatTable, LayoutError, Needs, boot_sector,
                     fsinfo_sector, mbr_sector, plan, with_boot_code)
from ...formats.fat.names import ShortNameAllocator, exact_short_name, fold, long_name_entries, short_name_checksum
from .tree import DirNode, FileNode

MAX_DIRECTORY_ENTRIES = 65536  # spec section 6: a directory may not grow past 2 MiB
ReadHost = Callable[[str, int, memoryview], None]
# (path, offset, length) -> (offset, length, is data) ranges of a host file, for its holes.
HostRanges = Callable[[str, int, int], list[tuple[int, int, bool]]]
SPARSE_CHECK_MIN = 1 << 20  # host files at least this big are asked for their holes


class _Directory:
    """A directory's entries, encoded before clusters are known; `entry_offsets` holds the
    offset of each child's short entry so its first cluster can be filled in later."""

    __slots__ = ("node", "parent", "data", "children", "entry_offsets", "cluster")

    def __init__(self, node: DirNode, parent: "_Directory | None") -> None:
        self.node = node
        self.parent = parent
        self.data = bytearray()
        self.children: list[FileNode | DirNode] = []
        self.entry_offsets = array("I")
        self.cluster = 0


def _encode_directory(directory: _Directory, label: bytes | None) -> None:
    node = directory.node
    times = Times(node.ctime, node.atime, node.mtime)
    data = directory.data
    allocator = ShortNameAllocator()
    if directory.parent is None:
        if label is not None:
            data += volume_label_entry(label, times)
            allocator.reserve(label)
    else:
        data += dot_entries(0, 0, times)  # clusters filled in later
    children = sorted(node.children, key=lambda child: fold(child.name))
    exact = [exact_short_name(child.name) for child in children]
    for short in exact:
        if short is not None:
            allocator.reserve(short)
    for child, short in zip(children, exact):
        if short is None:
            short = allocator.allocate(child.name)
            data += long_name_entries(child.name, short_name_checksum(short))
        directory.entry_offsets.append(len(data))
        if isinstance(child, DirNode):
            attributes, size = ATTR_DIRECTORY, 0
        else:
            attributes, size = child.attributes, child.size
        data += short_entry(short, attributes, 0, size, Times(child.ctime, child.atime, child.mtime))
    directory.children = children
    if len(data) // ENTRY_SIZE > MAX_DIRECTORY_ENTRIES:
        raise LayoutError(f"{node.origin} needs {len(data) // ENTRY_SIZE} directory entries; a FAT "
                         f"directory holds at most {MAX_DIRECTORY_ENTRIES} (long names take several)")


def _set_cluster(data: bytearray, offset: int, cluster: int) -> None:
    data[offset + 20:offset + 22] = (cluster >> 16).to_bytes(2, "little")
    data[offset + 26:offset + 28] = (cluster & 0xFFFF).to_bytes(2, "little")


# Region kinds of the disk map.
_BYTES, _FAT, _DATA = range(3)


class FatImage:
    """The disk: partition table (optional), FAT file system, and where each byte comes from."""

    def __init__(self, root: DirNode, *, fat: str = "32", partition: str | None = None,
                 size: int | None = None, label: bytes | None = b"NBDKITFLOPY", serial: int = 0) -> None:
        self.serial = serial
        directories = self._encode_tree(root, label)
        root_dir = directories[0]
        files = [child for d in directories for child in d.children
                 if isinstance(child, FileNode) and child.size > 0]
        needs = Needs([len(d.data) for d in directories[1:]], [f.size for f in files], len(root_dir.data))
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
        self._allocate([*(directories if g.fat_bits == 32 else directories[1:]), *files])
        self._fill_clusters(directories)
        self.fat = FatTable(g, self._chain_ends, self._allocated_end)
        self._vbr = boot_sector(g, label or b"NO NAME    ", serial)
        self._mbr_code: bytes | None = None
        free = g.clusters - (self._allocated_end - 2)
        self._fsinfo = fsinfo_sector(free, self._allocated_end if free else 0xFFFFFFFF)
        self._root_region = root_dir.data if g.fat_bits != 32 else b""
        self._build_map()

    # -- Building ----------------------------------------------------------------------

    def _allocate(self, objects: list[_Directory | FileNode]) -> None:
        """Consecutive clusters from cluster 2 for each object, in order."""
        g = self.geometry
        cluster_size = g.cluster_size
        self._starts = array("I")
        self._sizes = array("Q")
        # What each object holds: bytes, or a host file (its name in `_directories[i]`).
        self._payloads: list[bytes | bytearray | str] = []
        self._directories: list[str | None] = []
        self._generated: dict[int, int] = {}  # id(FileNode) -> object index, for in-memory files
        self._chain_ends = array("I")
        next_cluster = 2
        for obj in objects:
            obj.cluster = next_cluster
            if isinstance(obj, _Directory):
                length = len(obj.data)
                self._payloads.append(obj.data)
                self._directories.append(None)
            else:
                length = obj.size
                if obj.directory is None:
                    self._generated[id(obj)] = len(self._payloads)
                self._payloads.append(obj.source)
                self._directories.append(obj.directory)
            self._starts.append(next_cluster)
            self._sizes.append(length)
            next_cluster += max(1, -(-length // cluster_size))
            self._chain_ends.append(next_cluster - 1)
        self._allocated_end = next_cluster
        self._data_start = (g.hidden_sectors + g.data_start) * SECTOR
        large = [i for i, size in enumerate(self._sizes)
                 if size >= SPARSE_CHECK_MIN and self._directories[i] is not None]
        self._sparse_objects = array("I", large)
        self._sparse_starts = array("Q", ((self._starts[i] - 2) * cluster_size for i in large))
        self._sparse_ends = array("Q", ((self._starts[i] - 2) * cluster_size + self._sizes[i] for i in large))

    @staticmethod
    def _encode_tree(root: DirNode, label: bytes | None) -> list[_Directory]:
        """Every directory encoded (clusters still 0), breadth first from the root."""
        directories: list[_Directory] = []
        queue: deque[_Directory] = deque([_Directory(root, None)])
        while queue:
            directory = queue.popleft()
            _encode_directory(directory, label)
            directories.append(directory)
            queue.extend(_Directory(child, directory) for child in directory.children
                         if isinstance(child, DirNode))
        return directories

    @staticmethod
    def _fill_clusters(directories: list[_Directory]) -> None:
        by_node = {id(d.node): d for d in directories}
        for directory in directories:
            if directory.parent is not None:
                # ".." of a first-level directory is 0, even on FAT32.
                parent = directory.parent.cluster if directory.parent.parent is not None else 0
                _set_cluster(directory.data, 0, directory.cluster)
                _set_cluster(directory.data, ENTRY_SIZE, parent)
            for child, offset in zip(directory.children, directory.entry_offsets):
                cluster = by_node[id(child)].cluster if isinstance(child, DirNode) else child.cluster
                _set_cluster(directory.data, offset, cluster)
            directory.children = []  # the tree is not needed once encoded

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
        index = self._generated[id(node)]
        g = self.geometry
        first = g.cluster_sector(self._starts[index])
        return list(range(first, first + -(-self._sizes[index] // SECTOR)))

    def replace_contents(self, node: FileNode, data: bytes) -> None:
        """New contents of the same size for a generated file (a patched ldlinux.sys)."""
        index = self._generated[id(node)]
        if len(data) != self._sizes[index]:
            raise ValueError("replacement contents must keep the size")
        self._payloads[index] = data

    def set_boot_code(self, code: bytes, keep: tuple[int, int], mbr_code: bytes | None) -> None:
        """Boot code for the volume boot record (our BPB, bytes keep[0]:keep[1], stays) and,
        on a partitioned disk, the MBR code (the partition is then marked active)."""
        self._vbr = with_boot_code(self._vbr, code, keep)
        self._mbr_code = mbr_code
        self._build_map()

    # -- Reading -----------------------------------------------------------------------

    def read(self, buf: memoryview, offset: int, read_host: ReadHost) -> None:
        """Fill `buf` with the disk's bytes from `offset` (within the disk)."""
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
                self._read_data(view, position - start, read_host)
            position = stop

    def _read_data(self, view: memoryview, offset: int, read_host: ReadHost) -> None:
        """Allocated clusters from byte `offset` of the data region."""
        cluster_size = self.geometry.cluster_size
        starts, sizes, payloads, directories = self._starts, self._sizes, self._payloads, self._directories
        while len(view):
            index = bisect_right(starts, offset // cluster_size + 2) - 1
            object_offset = offset - (starts[index] - 2) * cluster_size
            following = starts[index + 1] if index + 1 < len(starts) else self._allocated_end
            span = (following - starts[index]) * cluster_size - object_offset
            part = view[:span]
            filled = max(0, min(len(part), sizes[index] - object_offset))
            if filled:
                payload = payloads[index]
                directory = directories[index]
                if isinstance(payload, str):  # a host file's name, read at request time
                    read_host(f"{directory}/{payload}", object_offset, part[:filled])
                else:
                    part[:filled] = payload[object_offset:object_offset + filled]
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
            index = objects[k]
            name = self._payloads[index]
            assert isinstance(name, str)  # only host files have ranges to look up
            path = f"{self._directories[index]}/{name}"
            for start, length, is_data in host_ranges(path, position - starts[k], stop - position):
                out.append((base + starts[k] + start, length, EXTENT_DATA if is_data else EXTENT_HOLE | EXTENT_ZERO))
            position = stop
            k += 1

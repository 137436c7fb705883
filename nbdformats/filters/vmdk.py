"""vmdk filter: serve the disk of a VMDK, read-only.

    nbdformats --filter=vmdk file disk.vmdk                    # any subformat: extents found next to it
    nbdformats --filter=vmdk --filter=tar file vm.tar          # the same, inside an archive

monolithicSparse and streamOptimized (compressed grains) in one file; monolithicFlat and
twoGbMaxExtentSparse/Flat as a descriptor whose extent files lie next to it, found as parents
are (filters/_parents.py); a delta disk's parent by its parentFileNameHint, checked by its CID.
"""

from __future__ import annotations

from typing import Sequence

from ..api.chain import OpenNext
from ..formats.blockmap import Image
from ..formats.vmdk.descriptor import ExtentLine
from ..formats.vmdk.image import VmdkImage, read_descriptor
from ._parents import Location, OpenedFile
from ._vdisk import Chain, DiskImageFilter, cache_param, parent_param


class VmdkFilter(DiskImageFilter):
    """Serve the disk of a VMDK (sparse, streamOptimized, flat, split, delta), read-only."""

    name = "vmdk"
    vmdk_parent = parent_param("vmdk")
    vmdk_cache_size = cache_param("vmdk")

    def load(self, file: OpenedFile, where: Location, next_open: OpenNext) -> Image:
        name = file.name or "the image"
        descriptor, embedded = read_descriptor(file.read, file.size, name)
        if embedded is not None:  # the file is the disk's only extent
            return VmdkImage(descriptor, [(file.read, file.size)], embedded, self.cache_size, name)
        chain = Chain()  # the extents' headers are read once, here; connections open their own
        try:
            extents = self._open_extents(descriptor.extents, where, next_open, chain)
            return VmdkImage(descriptor, [(f.read, f.size) if f else None for f in extents], None,
                             self.cache_size, name)
        finally:
            chain.close()

    def data_files(self, image: Image, file: OpenedFile, where: Location, next_open: OpenNext,
                   chain: Chain) -> list[OpenedFile]:
        assert isinstance(image, VmdkImage)
        if image.embedded:  # the file itself
            return [file]
        # A ZERO extent reads no file: its place in the numbering holds the descriptor.
        return [f or file for f in self._open_extents(image.descriptor.extents, where, next_open, chain)]

    def _open_extents(self, lines: Sequence[ExtentLine], where: Location, next_open: OpenNext,
                      chain: Chain) -> list[OpenedFile | None]:
        opened: dict[str, OpenedFile] = {}
        found: list[OpenedFile | None] = []
        for line in lines:
            if not line.filename:
                found.append(None)
                continue
            if line.filename not in opened:
                extent, _ = self.siblings.open(where, line.filename, next_open, "the extent file")
                opened[line.filename] = chain.add(extent)
            found.append(opened[line.filename])
        return found


FILTER = VmdkFilter

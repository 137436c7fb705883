"""vdi filter: serve the disk inside a VirtualBox VDI image (static or dynamic), read-only.

    nbdformats --filter=vdi file disk.vdi
    nbdformats --filter=cow --filter=vdi file disk.vdi         # writable, through a temporary overlay
"""

from __future__ import annotations

from ..api.chain import OpenNext
from ..formats.blockmap import Image
from ..formats.vdi.image import VdiImage
from ._parents import Location, OpenedFile
from ._vdisk import DiskImageFilter


class VdiFilter(DiskImageFilter):
    """Serve the disk inside a VirtualBox VDI image (static or dynamic), read-only."""

    name = "vdi"

    def load(self, file: OpenedFile, where: Location, next_open: OpenNext) -> Image:
        return VdiImage(file.read, file.size)


FILTER = VdiFilter

"""vhdx filter: serve the disk inside a VHDX image, read-only.

    nbdformats --filter=vhdx file disk.vhdx
    nbdformats --filter=cow --filter=vhdx file disk.vhdx       # writable, through a temporary overlay

Fixed, dynamic and differencing disks (formats/vhdx/); an image whose log needs replaying is
refused; a differencing disk's parent is found through its parent locator (vhdx-parent=auto).
"""

from __future__ import annotations

from ..api.chain import OpenNext
from ..formats.blockmap import Image
from ..formats.vhdx.image import VhdxImage
from ._parents import Location, OpenedFile
from ._vdisk import DiskImageFilter, cache_param, parent_param


class VhdxFilter(DiskImageFilter):
    """Serve the disk inside a VHDX image (fixed, dynamic, differencing), read-only."""

    name = "vhdx"
    vhdx_parent = parent_param("vhdx")
    vhdx_cache_size = cache_param("vhdx")

    def load(self, file: OpenedFile, where: Location, next_open: OpenNext) -> Image:
        return VhdxImage(file.read, file.size, self.cache_size)


FILTER = VhdxFilter

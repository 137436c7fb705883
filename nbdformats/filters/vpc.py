"""vpc filter (also called vhd): serve the disk inside a VHD image, read-only.

    nbdformats --filter=vpc file disk.vhd
    nbdformats --filter=vpc --filter=zip file disk.vhd.zip     # every member an export: parents found
    nbdformats --filter=cow --filter=vpc file disk.vhd         # writable, through a temporary overlay

Fixed, dynamic and differencing disks (formats/vhd/); a differencing disk's parent is found
through its parent locators, next to it (vpc-parent=auto), as docs/filters/vpc.md says.
"""

from __future__ import annotations

from ..api.chain import OpenNext
from ..formats.blockmap import Image
from ..formats.vhd.image import VhdImage
from ._parents import Location, OpenedFile
from ._vdisk import DiskImageFilter, cache_param, parent_param


class VhdDecoder(DiskImageFilter):
    """The VHD decoder without parameters: vpc and vhd each declare theirs under their own name."""

    def load(self, file: OpenedFile, where: Location, next_open: OpenNext) -> Image:
        return VhdImage(file.read, file.size, self.cache_size)


class VpcFilter(VhdDecoder):
    """Serve the disk inside a VHD image (fixed, dynamic, differencing), read-only."""

    name = "vpc"
    vpc_parent = parent_param("vpc")
    vpc_cache_size = cache_param("vpc")


FILTER = VpcFilter

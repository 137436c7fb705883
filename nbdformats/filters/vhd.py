"""vhd filter: the vpc filter under the name of its format (qemu calls the format vpc)."""

from __future__ import annotations

from ._vdisk import cache_param, parent_param
from .vpc import VhdDecoder


class VhdFilter(VhdDecoder):
    """Serve the disk inside a VHD image (the vpc filter under another name)."""

    name = "vhd"
    vhd_parent = parent_param("vhd")
    vhd_cache_size = cache_param("vhd")


FILTER = VhdFilter

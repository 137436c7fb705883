"""vhd filter: the vpc filter under the name of its format (qemu calls the format vpc)."""

from __future__ import annotations

from .vpc import VpcFilter


class VhdFilter(VpcFilter):
    """Serve the disk inside a VHD image (the vpc filter under another name)."""

    name = "vhd"


FILTER = VhdFilter

"""FAT12/16/32 written from scratch: geometry and boot sectors (layout), directory entries and
timestamps (dirents), VFAT long and 8.3 short names (names).

Reference: Microsoft "FAT: General Overview of On-Disk Format" 1.03.
"""

from __future__ import annotations

from ..errors import FormatError


class FatError(FormatError):
    """Something FAT cannot hold: a name, a label, a size, too many entries."""

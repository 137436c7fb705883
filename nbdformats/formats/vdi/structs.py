"""The binary layouts of VDI (VirtualBox's src/VBox/Storage/VDICore.h; little-endian).

Only layouts and the constants that name their values live here; image.py holds the logic.
"""

from __future__ import annotations

import struct

# VDIPREHEADER: szFileInfo[64] ("<<< Oracle VM VirtualBox Disk Image >>>\n" and others),
# u32Signature, u32Version.
PREHEADER = struct.Struct("<64sII")
SIGNATURE = 0xBEDA107F
VERSION_1_1 = 0x00010001

# VDIHEADER1PLUS: cbHeader, u32Type, fFlags, szComment[256], offBlocks, offData, LegacyGeometry
# (cCylinders, cHeads, cSectors, cbSector), u32Dummy, cbDisk, cbBlock, cbBlockExtra, cBlocks,
# cBlocksAllocated, uuidCreate, uuidModify, uuidLinkage, uuidParentModify, LCHSGeometry.
HEADER = struct.Struct("<III256sII16sIQIIII16s16s16s16s16s")
HEADER_1_0_SIZE = HEADER.size - 16  # VDIHEADER1, without the LCHS geometry

# VDI_IMAGE_TYPE: "NORMAL = 1 (dynamically growing), FIXED (preallocated), UNDO, DIFF".
TYPE_NORMAL, TYPE_FIXED, TYPE_UNDO, TYPE_DIFF = 1, 2, 3, 4

# The block map: one 32-bit block index per block of the disk, or "VDI_IMAGE_BLOCK_FREE
# ((VDIIMAGEBLOCKPOINTER)~0): Block marked as free is not allocated in image file, read from
# this block may returns any random data" and "VDI_IMAGE_BLOCK_ZERO ((VDIIMAGEBLOCKPOINTER)~1):
# Block marked as zero is not allocated in image file, read from this block returns zeroes".
BLOCK_ENTRY = 4
BLOCK_FREE = 0xFFFFFFFF
BLOCK_ZERO = 0xFFFFFFFE

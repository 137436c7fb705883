"""The binary layouts of VMDK's hosted sparse extents (VMware "Virtual Disk Format 1.1"; every
number little-endian; sizes and offsets in 512-byte sectors).

Only layouts and the constants that name their bits live here; descriptor.py and image.py hold
the logic that reads them.
"""

from __future__ import annotations

import struct

SECTOR = 512
SPARSE_MAGIC = b"KDMV"  # "#define SPARSE_MAGICNUMBER 0x564d444b /* 'V' 'M' 'D' 'K' */"
COWD_MAGIC = b"COWD"  # ESX's older sparse format (VMFSSPARSE), not read here
DESCRIPTOR_SIGNATURE = b"# Disk DescriptorFile"

# "typedef struct SparseExtentHeader": magicNumber, version, flags, capacity, grainSize,
# descriptorOffset, descriptorSize, numGTEsPerGT, rgdOffset, gdOffset, overHead,
# uncleanShutdown, singleEndLineChar, nonEndLineChar, doubleEndLineChar1, doubleEndLineChar2,
# compressAlgorithm, pad[433].
SPARSE_HEADER = struct.Struct("<4sIIQQQQIQQQBccccH433x")
FLAG_VALID_NEWLINE_TEST = 1 << 0
FLAG_REDUNDANT_GRAIN_TABLE = 1 << 1
FLAG_ZEROED_GRAIN_GTE = 1 << 2  # qemu's VMDK4_FLAG_ZERO_GRAIN: a grain table entry of 1 is a zero grain
FLAG_COMPRESSED = 1 << 16  # "bit 16: the grains are compressed"
FLAG_MARKERS = 1 << 17  # "bit 17: there are markers in the virtual disk"
COMPRESSION_NONE, COMPRESSION_DEFLATE = 0, 1
# "If the value of gdOffset is GD_AT_END (0xffffffffffffffff), the grain directory is at the end
# of the file, and the footer ... holds the real header."
GD_AT_END = 0xFFFFFFFFFFFFFFFF
ZEROED_GRAIN = 1

# Stream-optimized markers: "typedef struct Marker { SectorType val; uint32 size; uint32 type; }"
# padded to a sector; a grain marker is val = the grain's LBA and size = its compressed bytes,
# followed by the data.
MARKER = struct.Struct("<QII")
GRAIN_MARKER = struct.Struct("<QI")
MARKER_EOS, MARKER_GT, MARKER_GD, MARKER_FOOTER = 0, 1, 2, 3
# The end of a streamOptimized file: footer marker, footer (a header), end-of-stream marker.
FOOTER_AREA = 3 * SECTOR

GRAIN_TABLE_ENTRY = 4  # "uint32" grain directory and grain table entries, in sectors
CID_NONE = 0xFFFFFFFF  # parentCID of a disk without a parent

"""The binary layouts of qcow2 (qemu's docs/interop/qcow2.txt; every number is big-endian).

Only layouts and the constants that name their bits live here; header.py, snapshots.py and
image.py hold the logic that reads them.
"""

from __future__ import annotations

import struct

MAGIC = b"QFI\xfb"

# "For version 2, the header is exactly 72 bytes in length": magic, version,
# backing_file_offset, backing_file_size, cluster_bits, size, crypt_method, l1_size,
# l1_table_offset, refcount_table_offset, refcount_table_clusters, nb_snapshots, snapshots_offset.
HEADER_V2 = struct.Struct(">4sIQIIQIIQQIIQ")
# "For version 3 or higher, the header length is at least 104 bytes": incompatible_features,
# compatible_features, autoclear_features, refcount_order, header_length.
HEADER_V3 = struct.Struct(">QQQII")
HEADER_V3_LENGTH = HEADER_V2.size + HEADER_V3.size  # 104
COMPRESSION_TYPE_OFFSET = 104  # one byte: "0: zlib, 1: zstd"

# incompatible_features bits
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2

CRYPT_NONE, CRYPT_AES, CRYPT_LUKS = 0, 1, 2
COMPRESSION_ZLIB, COMPRESSION_ZSTD = 0, 1

# "Directly after the image header, optional sections called header extensions": type, length,
# then the data padded to a multiple of 8.
EXTENSION = struct.Struct(">II")
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_NAMES = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_ENCRYPTION = 0x0537BE77
EXT_DATA_FILE = 0x44415441
# "Full disk encryption header pointer": offset and length of the LUKS header in the image.
ENCRYPTION_POINTER = struct.Struct(">QQ")
# A feature name table entry: type (0 incompatible, 1 compatible, 2 autoclear), bit, name[46].
FEATURE_NAME = struct.Struct(">BB46s")

# Snapshot table entry: l1_table_offset, l1_size, id_str_size, name_size, date_sec,
# date_nsec, vm_clock_nsec, vm_state_size, extra_data_size; then the extra data (whose bytes
# 8-15 are the snapshot's "virtual disk size"), the id, the name, padding to 8.
SNAPSHOT = struct.Struct(">QIHHIIQII")
SNAPSHOT_EXTRA = struct.Struct(">QQ")  # vm_state_size_large, disk_size

# L1 and L2 entries (64 bits each; an extended L2 entry adds a 64-bit subcluster bitmap).
L1_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00  # "Bits 9-55 of the offset into the image file"
L2_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
L2_COMPRESSED = 1 << 62
L2_ZERO = 1 << 0  # "If set to 1, the cluster reads as all zeros" (not with extended L2)
ENTRY = 8
EXTENDED_ENTRY = 16
SUBCLUSTERS = 32  # "standard data clusters are divided into 32 subclusters"
COMPRESSED_SECTOR = 512  # compressed sizes count 512-byte sectors

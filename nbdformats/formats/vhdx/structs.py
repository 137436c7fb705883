"""The binary layouts of VHDX ([MS-VHDX]: "all fields ... are stored in little-endian format";
GUIDs in Microsoft's mixed-endian layout, uuid.UUID(bytes_le=...)).

Only layouts and the constants that name their values live here; image.py holds the logic.
"""

from __future__ import annotations

import struct
import uuid

KiB, MiB = 1 << 10, 1 << 20

# 2.1 "File Type Identifier": Signature "vhdxfile", Creator (512 bytes of UTF-16), at offset 0.
FILE_SIGNATURE = b"vhdxfile"
# 2.2 "the header section ... two headers at 64 KB and 128 KB, ... two region tables at 192 KB and
# 256 KB"; each header is 4 KB, each region table 64 KB, both checksummed with CRC-32C over the
# whole structure with the Checksum field set to zero.
HEADER_OFFSETS = (64 * KiB, 128 * KiB)
HEADER_SIZE = 4 * KiB
REGION_TABLE_OFFSETS = (192 * KiB, 256 * KiB)
REGION_TABLE_SIZE = 64 * KiB
CHECKSUM_AT = 4  # the Checksum field of headers, region tables and log entries

# 2.2.2 Header: Signature "head", Checksum, SequenceNumber, FileWriteGuid, DataWriteGuid,
# LogGuid, LogVersion, Version, LogLength, LogOffset.
HEADER = struct.Struct("<4sIQ16s16s16sHHIQ")
HEADER_SIGNATURE = b"head"
VERSION = 1

# 2.2.3 Region Table Header: Signature "regi", Checksum, EntryCount ("MUST be less than or equal
# to 2047"), Reserved; each entry: Guid, FileOffset, Length, Required (bit 0).
REGION_TABLE_HEADER = struct.Struct("<4sIII")
REGION_TABLE_SIGNATURE = b"regi"
REGION_ENTRY = struct.Struct("<16sQII")
MAX_ENTRIES = 2047
BAT_REGION = uuid.UUID("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_REGION = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E")

# 2.6.1 Metadata Table Header: Signature "metadata", Reserved, EntryCount, Reserved2 (20 bytes);
# each entry: ItemId, Offset (from the region's start), Length, flags (IsUser bit 0, IsVirtualDisk
# bit 1, IsRequired bit 2), Reserved2.
METADATA_TABLE_HEADER = struct.Struct("<8sHH20x")
METADATA_SIGNATURE = b"metadata"
METADATA_ENTRY = struct.Struct("<16sIIII")
METADATA_TABLE_SIZE = 64 * KiB
IS_REQUIRED = 1 << 2

# 2.6.2 Known metadata items.
FILE_PARAMETERS = uuid.UUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VIRTUAL_DISK_SIZE = uuid.UUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
PAGE_83_DATA = uuid.UUID("BECA12AB-B2E6-4523-93EF-C309E000C746")
LOGICAL_SECTOR_SIZE = uuid.UUID("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
PHYSICAL_SECTOR_SIZE = uuid.UUID("CDA348C7-445D-4471-9CC9-E9885251C556")
PARENT_LOCATOR = uuid.UUID("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
KNOWN_ITEMS = {FILE_PARAMETERS, VIRTUAL_DISK_SIZE, PAGE_83_DATA, LOGICAL_SECTOR_SIZE, PHYSICAL_SECTOR_SIZE,
               PARENT_LOCATOR}

# 2.6.2.1 File Parameters: BlockSize, then LeaveBlocksAllocated (bit 0) and HasParent (bit 1).
FILE_PARAMETERS_ITEM = struct.Struct("<II")
HAS_PARENT = 1 << 1
UINT32 = struct.Struct("<I")
UINT64 = struct.Struct("<Q")

# 2.6.2.6 Parent Locator Header: LocatorType, Reserved, KeyValueCount; each entry: KeyOffset,
# ValueOffset (from the item's start), KeyLength, ValueLength; keys and values UTF-16 (LE).
PARENT_LOCATOR_HEADER = struct.Struct("<16sHH")
PARENT_LOCATOR_ENTRY = struct.Struct("<IIHH")
VHDX_LOCATOR_TYPE = uuid.UUID("B04AEFB7-D19E-4A81-B789-25B8E9445913")

# 2.5 BAT entries: State (bits 0-2), Reserved, FileOffsetMB (bits 20-63).
BAT_ENTRY = 8
STATE_MASK = 0x7
OFFSET_SHIFT = 20
# 2.5.1.1 "Payload BAT Entry States" (5 is 0.95's PAYLOAD_BLOCK_UNMAPPED, read as qemu reads it).
PAYLOAD_NOT_PRESENT, PAYLOAD_UNDEFINED, PAYLOAD_ZERO, PAYLOAD_UNMAPPED = 0, 1, 2, 3
PAYLOAD_UNMAPPED_V095, PAYLOAD_FULLY_PRESENT, PAYLOAD_PARTIALLY_PRESENT = 5, 6, 7
# 2.5.1.2 "Sector Bitmap BAT Entry States".
SB_BLOCK_PRESENT = 6
# 2.5 "chunk ratio = (2^23 * LogicalSectorSize) / BlockSize": a sector bitmap block (1 MiB)
# covers 2^23 sectors.
SECTORS_PER_BITMAP = 1 << 23
SECTOR_BITMAP_SIZE = 1 * MiB

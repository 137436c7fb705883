"""The binary layouts of VHD ("Virtual Hard Disk Image Format Specification", Microsoft, 2006;
"All values in the file format ... are stored in big-endian format").

Only layouts and the constants that name their values live here; image.py holds the logic.
"""

from __future__ import annotations

import struct

FOOTER_COOKIE = b"conectix"
DYNAMIC_COOKIE = b"cxsparse"

# "Hard Disk Footer Format": Cookie, Features, File Format Version, Data Offset, Time Stamp,
# Creator Application, Creator Version, Creator Host OS, Original Size, Current Size, Disk Geometry
# (cylinders 2 bytes, heads 1, sectors per track 1), Disk Type, Checksum, Unique Id, Saved State,
# Reserved (427 bytes).
FOOTER = struct.Struct(">8sIIQI4sI4sQQHBBII16sB427x")
FOOTER_CHECKSUM_AT = 64  # the Checksum field's offset, excluded from its own sum

# "Dynamic Disk Header Format": Cookie, Data Offset, Table Offset, Header Version, Max Table
# Entries, Block Size, Checksum, Parent Unique ID, Parent Time Stamp, Reserved, Parent Unicode Name
# (512 bytes of UTF-16BE), Parent Locator Entries (8 x 24 bytes), Reserved (256 bytes).
DYNAMIC_HEADER = struct.Struct(">8sQQIIII16sI4x512s192s256x")
DYNAMIC_CHECKSUM_AT = 36
# A parent locator entry: Platform Code, Platform Data Space, Platform Data Length, Reserved,
# Platform Data Offset.
LOCATOR = struct.Struct(">4sIIIQ")
LOCATORS = 8

# "Disk Type": "2 Fixed hard disk, 3 Dynamic hard disk, 4 Differencing hard disk".
FIXED, DYNAMIC, DIFFERENCING = 2, 3, 4
# Platform codes of parent locators: "W2ru: Unicode pathname (UTF-16) on Windows relative to the
# differencing disk pathname", "W2ku: Absolute Unicode (UTF-16) pathname on Windows";
# "MacX: File URL with UTF-8 encoding conforming to RFC 2396".
PLATFORM_W2RU, PLATFORM_W2KU, PLATFORM_MACX = b"W2ru", b"W2ku", b"MacX"

BAT_ENTRY = 4  # "The BAT is ... an array of 32-bit [big-endian] sector offsets"
UNUSED = 0xFFFFFFFF  # "Unused table entries are initialized to 0xFFFFFFFF"
SECTOR = 512

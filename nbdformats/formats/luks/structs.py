"""The binary layouts of LUKS headers (LUKS1 On-Disk Format Specification 1.2.3, big-endian
fields; LUKS2 On-Disk Format Specification 1.1.x, binary header then JSON metadata)."""

from __future__ import annotations

import struct

MAGIC = b"LUKS\xba\xbe"
MAGIC_SECONDARY = b"SKUL\xba\xbe"  # LUKS2 second header copy
SECTOR = 512

# LUKS1 "struct phdr": magic, version, cipher-name, cipher-mode, hash-spec, payload-offset
# (sectors), key-bytes, mk-digest, mk-digest-salt, mk-digest-iter, uuid; then 8 keyslots.
LUKS1_HEADER = struct.Struct(">6sH32s32s32sII20s32sI40s")
# A LUKS1 keyslot: active, iterations, salt, key-material-offset (sectors), stripes.
LUKS1_KEYSLOT = struct.Struct(">II32sII")
LUKS1_KEYSLOTS = 8
LUKS1_HEADER_SIZE = LUKS1_HEADER.size + LUKS1_KEYSLOTS * LUKS1_KEYSLOT.size  # 592
LUKS1_KEY_ENABLED = 0x00AC71F3
LUKS1_KEY_DISABLED = 0x0000DEAD

# LUKS2 binary header: magic, version, hdr_size, seqid, label[48], checksum_alg[32], salt[64],
# uuid[40], subsystem[48], hdr_offset, padding[184], csum[64], padding[7*512].
LUKS2_HEADER = struct.Struct(">6sHQQ48s32s64s40s48sQ184s64s")
LUKS2_BINARY_SIZE = 4096
LUKS2_CHECKSUM = (448, 512)  # csum[64], zeroed while the checksum is computed
# "The secondary header offset ... must be one of these values" (the JSON area sizes).
LUKS2_HEADER_SIZES = tuple(1 << n for n in range(14, 23))  # 16 KiB .. 4 MiB

"""The qcow2 header and its extensions, checked field by field (sans-IO).

`read_header(read, file_size)` reads the first cluster through a `read(offset, length)`
callable.  Every offset and size is hostile until checked: against 2^63-1, against the size
of the file that holds the image, and against qemu's own limits (quoted from
docs/interop/qcow2.txt and block/qcow2.h), so a damaged header is an error naming its field,
never a huge allocation or a read far past the end.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import check_size
from ..readers import Reader
from .errors import Qcow2Error, Qcow2UnsupportedError
from .structs import (COMPRESSION_TYPE_OFFSET, COMPRESSION_ZLIB, COMPRESSION_ZSTD, CRYPT_AES, CRYPT_LUKS, CRYPT_NONE,
                      ENCRYPTION_POINTER, ENTRY, EXT_BACKING_FORMAT, EXT_DATA_FILE, EXT_ENCRYPTION, EXT_END,
                      EXT_FEATURE_NAMES, EXTENDED_ENTRY, EXTENSION, FEATURE_NAME, HEADER_V2, HEADER_V3,
                      HEADER_V3_LENGTH, INCOMPAT_COMPRESSION, INCOMPAT_DATA_FILE, INCOMPAT_EXTL2, INCOMPAT_KNOWN,
                      MAGIC)

# qemu's limits: "Must not be less than 9", "an implementation limit of 2 MB as the maximum
# cluster size", "if the image has Extended L2 Entries then cluster_bits must be at least 14".
MIN_CLUSTER_BITS, MAX_CLUSTER_BITS, MIN_EXTENDED_L2_CLUSTER_BITS = 9, 21, 14
MAX_L1_ENTRIES = (32 << 20) // ENTRY  # "an implementation limit of 32 MB as the maximum L1 table size"
MAX_REFCOUNT_ORDER = 6  # "This value may not exceed 6 (i.e. refcount_bits = 64)"
MAX_BACKING_NAME = 1023  # "Must not be longer than 1023 bytes"
MAX_BACKING_FORMAT = 15  # qemu keeps the format name in char[16]
MAX_SNAPSHOTS = 65536  # QCOW_MAX_SNAPSHOTS
MAX_ENCRYPTION_HEADER = 64 << 20  # qemu's LUKS header is ~2 MiB (8 keyslots of 4000 stripes)


@dataclass(frozen=True)
class Header:
    version: int
    cluster_bits: int
    size: int  # the virtual disk's size
    crypt_method: int
    l1_size: int  # entries of the active L1 table
    l1_offset: int
    snapshot_count: int
    snapshots_offset: int
    incompatible: int
    compression_type: int
    header_length: int
    backing_file: str | None
    backing_format: str | None  # the "Backing file format name" extension, e.g. "qcow2" or "raw"
    encryption: tuple[int, int] | None  # (offset, length) of the LUKS header in the image

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible & INCOMPAT_EXTL2)

    @property
    def l2_entries(self) -> int:
        """Entries per L2 table: "cluster_size / sizeof(uint64_t)", halved for extended entries."""
        return self.cluster_size // (EXTENDED_ENTRY if self.extended_l2 else ENTRY)

    def l1_entries_needed(self, disk_size: int) -> int:
        """L1 entries that map a disk of `disk_size` bytes (each maps l2_entries clusters)."""
        span = self.l2_entries << self.cluster_bits
        return -(-disk_size // span)


def check_table(offset: int, entries: int, entry_size: int, field: str, cluster_size: int, file_size: int) -> None:
    """A table of `entries` entries at `offset`: cluster-aligned and inside the file."""
    check_size(offset, f"{field} offset", error=Qcow2Error)
    if offset % cluster_size:
        raise Qcow2Error(f"{field} offset {offset:#x} is not aligned to the {cluster_size}-byte cluster size")
    end = offset + entries * entry_size
    if end > file_size:
        raise Qcow2Error(f"{field} ({entries} entries at offset {offset:#x}) ends at {end}, past the end of the "
                         f"file ({file_size} bytes)")


def _text(data: bytes, field: str) -> str:
    if b"\0" in data:
        raise Qcow2Error(f"the {field} contains a NUL byte")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise Qcow2Error(f"the {field} is not UTF-8: {data!r}") from None


def read_header(read: Reader, file_size: int) -> Header:
    """Parse and check the header of a qcow2 image of `file_size` bytes."""
    if file_size < HEADER_V2.size:
        raise Qcow2Error(f"not a qcow2 image: the file has only {file_size} bytes, the header needs {HEADER_V2.size}")
    fixed = read(0, min(HEADER_V3_LENGTH, file_size))
    (magic, version, backing_offset, backing_size, cluster_bits, size, crypt_method, l1_size, l1_offset,
     _refcount_table_offset, _refcount_table_clusters, snapshot_count, snapshots_offset) = HEADER_V2.unpack_from(fixed)
    if magic != MAGIC:
        raise Qcow2Error(f"not a qcow2 image (magic {magic!r}, not {MAGIC!r})")
    if version not in (2, 3):
        raise Qcow2UnsupportedError(f"qcow2 version {version} is not supported (only 2 and 3)")
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise Qcow2Error(f"cluster_bits is {cluster_bits}, not {MIN_CLUSTER_BITS} to {MAX_CLUSTER_BITS} "
                         f"(clusters of 512 bytes to 2 MiB)")
    cluster_size = 1 << cluster_bits
    incompatible, header_length, compression_type = 0, HEADER_V2.size, COMPRESSION_ZLIB
    if version == 3:
        if len(fixed) < HEADER_V3_LENGTH:
            raise Qcow2Error(f"the file ends at {file_size} bytes, inside the {HEADER_V3_LENGTH}-byte version 3 header")
        incompatible, _compatible, _autoclear, refcount_order, header_length = HEADER_V3.unpack_from(fixed, HEADER_V2.size)
        if refcount_order > MAX_REFCOUNT_ORDER:
            raise Qcow2Error(f"refcount_order is {refcount_order}, more than {MAX_REFCOUNT_ORDER}")
        if header_length < HEADER_V3_LENGTH or header_length % 8 or header_length > cluster_size:
            raise Qcow2Error(f"header_length is {header_length}: a version 3 header has at least "
                             f"{HEADER_V3_LENGTH} bytes, a multiple of 8, within the first {cluster_size}-byte cluster")
    first_cluster = read(0, min(cluster_size, file_size))
    if len(first_cluster) < header_length:
        raise Qcow2Error(f"the file ends at {file_size} bytes, inside the {header_length}-byte header")
    if header_length > COMPRESSION_TYPE_OFFSET:
        compression_type = first_cluster[COMPRESSION_TYPE_OFFSET]

    extension_end = backing_offset if backing_offset else cluster_size
    extensions = _read_extensions(first_cluster, header_length, min(extension_end, len(first_cluster)))

    _check_features(incompatible, extensions.feature_names)
    # "If the incompatible bit "Compression type" is set: the field must be present and non-zero".
    if incompatible & INCOMPAT_COMPRESSION and compression_type == COMPRESSION_ZLIB:
        raise Qcow2Error("the compression type bit is set but compression_type is 0 (zlib)")
    if compression_type not in (COMPRESSION_ZLIB, COMPRESSION_ZSTD):
        raise Qcow2UnsupportedError(f"compression_type {compression_type} is not supported (0 zlib, 1 zstd)")
    if compression_type != COMPRESSION_ZLIB and not incompatible & INCOMPAT_COMPRESSION:
        raise Qcow2Error(f"compression_type is {compression_type} but the compression type bit is not set")
    if incompatible & INCOMPAT_EXTL2 and cluster_bits < MIN_EXTENDED_L2_CLUSTER_BITS:
        raise Qcow2Error(f"extended L2 entries need clusters of at least 16 KiB; cluster_bits is {cluster_bits}")

    check_size(size, "size (the virtual disk size)", error=Qcow2Error)
    if crypt_method == CRYPT_AES:
        raise Qcow2UnsupportedError("AES-encrypted qcow2 (crypt_method 1, insecure and deprecated by qemu) is not "
                                    "supported; convert it with qemu-img to LUKS encryption")
    if crypt_method not in (CRYPT_NONE, CRYPT_LUKS):
        raise Qcow2UnsupportedError(f"crypt_method {crypt_method} is not supported (0 none, 2 LUKS)")
    if crypt_method == CRYPT_LUKS and extensions.encryption is None:
        raise Qcow2Error("crypt_method is 2 (LUKS) but the image has no full disk encryption header extension")
    if crypt_method != CRYPT_LUKS and extensions.encryption is not None:
        raise Qcow2Error(f"a full disk encryption header extension with crypt_method {crypt_method}")
    if extensions.encryption is not None:
        encryption_offset, encryption_length = extensions.encryption
        check_size(encryption_length, "the encryption header length", MAX_ENCRYPTION_HEADER, Qcow2Error)
        check_table(encryption_offset, encryption_length, 1, "the LUKS encryption header", cluster_size, file_size)

    if l1_size > MAX_L1_ENTRIES:
        raise Qcow2Error(f"l1_size is {l1_size} entries, more than qemu's limit of {MAX_L1_ENTRIES} (32 MiB)")
    check_table(l1_offset, l1_size, ENTRY, "the L1 table", cluster_size, file_size)
    if snapshot_count > MAX_SNAPSHOTS:
        raise Qcow2Error(f"nb_snapshots is {snapshot_count}, more than {MAX_SNAPSHOTS}")
    if snapshot_count:
        check_table(snapshots_offset, 0, 0, "the snapshot table", cluster_size, file_size)

    header = Header(version, cluster_bits, size, crypt_method, l1_size, l1_offset, snapshot_count, snapshots_offset,
                    incompatible, compression_type, header_length,
                    _backing_name(first_cluster, backing_offset, backing_size, cluster_size),
                    extensions.backing_format, extensions.encryption)
    needed = header.l1_entries_needed(size)
    if l1_size < needed:
        raise Qcow2Error(f"l1_size is {l1_size} entries, too small for the {size}-byte disk (it needs {needed})")
    if header.backing_file is not None and incompatible & INCOMPAT_DATA_FILE:
        raise Qcow2Error("backing files are incompatible with external data files")
    return header


@dataclass
class _Extensions:
    backing_format: str | None = None
    encryption: tuple[int, int] | None = None
    feature_names: dict[tuple[int, int], str] | None = None


def _read_extensions(cluster: bytes, start: int, end: int) -> _Extensions:
    """The header extensions between the header and `end` (the backing file name or the end of
    the first cluster): each "type, length, data padded to a multiple of 8"."""
    found = _Extensions()
    seen = set()
    offset = start
    while offset + EXTENSION.size <= end:
        kind, length = EXTENSION.unpack_from(cluster, offset)
        offset += EXTENSION.size
        if kind == EXT_END:
            break
        if length > end - offset:
            raise Qcow2Error(f"header extension {kind:#010x} at offset {offset - EXTENSION.size} has length {length}, "
                             f"past the end of the header area ({end})")
        if kind in seen and kind in (EXT_BACKING_FORMAT, EXT_ENCRYPTION, EXT_DATA_FILE, EXT_FEATURE_NAMES):
            raise Qcow2Error(f"header extension {kind:#010x} appears twice")
        seen.add(kind)
        data = cluster[offset:offset + length]
        if kind == EXT_BACKING_FORMAT:
            if length > MAX_BACKING_FORMAT:
                raise Qcow2Error(f"the backing file format name has {length} bytes, more than {MAX_BACKING_FORMAT}")
            found.backing_format = _text(data, "backing file format name")
        elif kind == EXT_ENCRYPTION:
            if length != ENCRYPTION_POINTER.size:
                raise Qcow2Error(f"the full disk encryption header extension has {length} bytes, "
                                 f"not {ENCRYPTION_POINTER.size}")
            found.encryption = ENCRYPTION_POINTER.unpack(data)
        elif kind == EXT_FEATURE_NAMES:
            found.feature_names = {
                (kind_, bit): name.rstrip(b"\0").decode("ascii", "replace")
                for kind_, bit, name in FEATURE_NAME.iter_unpack(data[:length - length % FEATURE_NAME.size])}
        elif kind == EXT_DATA_FILE:
            name = _text(data, "external data file name")
            raise Qcow2UnsupportedError(f"the image keeps its data in an external data file ({name!r}), which is not "
                                        "supported: convert it with qemu-img convert -O qcow2")
        offset += -(-length // 8) * 8
    return found


def _check_features(incompatible: int, names: dict[tuple[int, int], str] | None) -> None:
    if incompatible & INCOMPAT_DATA_FILE:
        raise Qcow2UnsupportedError("the image keeps its data in an external data file (incompatible feature bit 2), "
                                    "which is not supported: convert it with qemu-img convert -O qcow2")
    unknown = incompatible & ~INCOMPAT_KNOWN
    if unknown:
        bits = [bit for bit in range(64) if unknown >> bit & 1]
        described = ", ".join(f"bit {bit}" + (f" ({names[(0, bit)]})" if names and (0, bit) in names else "")
                              for bit in bits)
        raise Qcow2UnsupportedError(f"unknown incompatible features: {described}")


def _backing_name(cluster: bytes, offset: int, length: int, cluster_size: int) -> str | None:
    """The backing file name: "Must not be longer than 1023 bytes", stored in the first cluster."""
    if not offset:
        return None
    if length > MAX_BACKING_NAME or length == 0:
        raise Qcow2Error(f"backing_file_size is {length}, not 1 to {MAX_BACKING_NAME}")
    if offset + length > cluster_size:
        raise Qcow2Error(f"the backing file name (offset {offset}, {length} bytes) is not inside the first "
                         f"{cluster_size}-byte cluster")
    if offset + length > len(cluster):
        raise Qcow2Error(f"the file ends before the backing file name at offset {offset}")
    return _text(cluster[offset:offset + length], "backing file name")

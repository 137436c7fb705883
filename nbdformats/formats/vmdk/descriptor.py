"""The VMDK descriptor: a text file, or text embedded in a sparse extent (Virtual Disk Format 1.1,
"The Descriptor File").

    # Disk DescriptorFile
    version=1
    CID=fffffffe
    parentCID=ffffffff
    createType="twoGbMaxExtentSparse"
    # Extent description
    RW 4192256 SPARSE "disk-s001.vmdk"
    RW 2048 FLAT "disk-flat.vmdk" 0

"The extent descriptions ... access, size in sectors, type of extent, filename, offset"; a delta
disk also has "parentFileNameHint" and "parentCID", which "must match the CID of the parent".
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import MAX_SIZE, check_size
from ..parents import ParentLink, split_path
from .errors import VmdkError
from .structs import CID_NONE, SECTOR

MAX_DESCRIPTOR = 1 << 20  # text; qemu refuses descriptors over 1 MiB too
MAX_EXTENTS = 4096
EXTENT_LINE = re.compile(r'^(RW|RDONLY|NOACCESS)\s+(\d+)\s+(\w+)(?:\s+"([^"]*)"(?:\s+(\d+))?)?\s*$')
KEY_VALUE = re.compile(r'^([\w.]+)\s*=\s*"?([^"]*)"?\s*$')
# Extent types: FLAT and VMFS hold the data as is, SPARSE is a hosted sparse extent, ZERO has
# no file; VMFSSPARSE (ESX's COWD), VMFSRDM and VMFSRAW (raw devices) are not read here.
FLAT_TYPES = ("FLAT", "VMFS")
SPARSE_TYPES = ("SPARSE",)
ZERO_TYPES = ("ZERO",)


@dataclass(frozen=True)
class ExtentLine:
    sectors: int
    kind: str  # FLAT, SPARSE or ZERO (VMFS is read as FLAT)
    filename: str  # "" for ZERO
    offset: int  # FLAT: the first sector of the data in its file


@dataclass(frozen=True)
class Descriptor:
    create_type: str
    cid: int
    extents: tuple[ExtentLine, ...]
    parent: ParentLink | None

    @property
    def size(self) -> int:
        return sum(extent.sectors for extent in self.extents) * SECTOR


def _hex(values: dict[str, str], key: str, default: int) -> int:
    text = values.get(key)
    if text is None:
        return default
    try:
        return int(text, 16)
    except ValueError:
        raise VmdkError(f"the descriptor's {key}={text!r} is not a hexadecimal number") from None


def parse_descriptor(text: bytes) -> Descriptor:
    """The descriptor's extents and parent link; `text` is the file or the embedded area."""
    if len(text) > MAX_DESCRIPTOR:
        raise VmdkError(f"the descriptor is {len(text)} bytes, more than {MAX_DESCRIPTOR}")
    values: dict[str, str] = {}
    extents: list[ExtentLine] = []
    total = 0
    for number, raw in enumerate(text.split(b"\0", 1)[0].decode("utf-8", "replace").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        extent = EXTENT_LINE.match(line)
        if extent:
            access, sectors_text, kind, filename, offset_text = extent.groups()
            sectors, offset = int(sectors_text), int(offset_text or 0)
            total += sectors
            check_size(total * SECTOR, f"the disk's size at line {number} of the descriptor", MAX_SIZE, VmdkError)
            check_size(offset * SECTOR, f"the extent offset at line {number} of the descriptor", MAX_SIZE, VmdkError)
            if access == "NOACCESS":
                raise VmdkError(f"line {number} of the descriptor: NOACCESS extents are not supported")
            kind = "FLAT" if kind in FLAT_TYPES else kind
            if kind not in FLAT_TYPES + SPARSE_TYPES + ZERO_TYPES:
                raise VmdkError(f"line {number} of the descriptor: extent type {kind} is not supported "
                                "(FLAT, VMFS, SPARSE and ZERO are)")
            if kind != "ZERO" and not filename:
                raise VmdkError(f"line {number} of the descriptor: a {kind} extent without a file name")
            extents.append(ExtentLine(sectors, kind, filename or "", offset))
            if len(extents) > MAX_EXTENTS:
                raise VmdkError(f"the descriptor has more than {MAX_EXTENTS} extents")
            continue
        pair = KEY_VALUE.match(line)
        if pair:
            values[pair.group(1)] = pair.group(2)
    if not extents:
        raise VmdkError("the descriptor has no extents")
    parent_cid = _hex(values, "parentCID", CID_NONE)
    parent = None
    if parent_cid != CID_NONE:
        hint = values.get("parentFileNameHint")
        if not hint:
            raise VmdkError(f"the descriptor has parentCID={parent_cid:08x} but no parentFileNameHint")
        name, path = split_path(hint, windows="\\" in hint)
        parent = ParentLink((name,) if name else (), (path,) if path else (), (f"{parent_cid:08x}",),
                            "parentFileNameHint")
    return Descriptor(values.get("createType", ""), _hex(values, "CID", CID_NONE), tuple(extents), parent)

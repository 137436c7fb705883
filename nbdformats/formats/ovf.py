"""The OVF descriptor (DMTF DSP0243, "Open Virtualization Format Specification") and its manifest.

    <References><File ovf:id="file1" ovf:href="disk1.vmdk" ovf:size="..." [ovf:compression="gzip"]/>
    <DiskSection><Disk ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:capacity="16"
                       ovf:capacityAllocationUnits="byte * 2^30" ovf:format="...vmdk.html#streamOptimized"/>
    <VirtualSystem ovf:id="vm"><Name>vm</Name><OperatingSystemSection ...><Description>...</Description>

Parsed with defusedxml: no entity expansion, no external entities.  The manifest (.mf) lists
"SHA1(file)= hex" or "SHA256(file)= hex" lines ("the manifest file shall contain SHA digests for
all distinct files referenced in the References element of the OVF descriptor").
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass

import defusedxml.ElementTree as SafeElementTree
from defusedxml import DefusedXmlException

from .errors import FormatError, check_size

OVF_NAMESPACES = ("http://schemas.dmtf.org/ovf/envelope/1", "http://schemas.dmtf.org/ovf/envelope/2")
MAX_DESCRIPTOR = 16 << 20
MANIFEST_LINE = re.compile(r"^(SHA1|SHA256|SHA512)\s*\((.+)\)\s*=\s*([0-9A-Fa-f]+)\s*$")
# DSP0243 9.2: "ovf:capacityAllocationUnits ... byte * 2^20" and the like.
UNITS = re.compile(r"^\s*byte(?:\s*\*\s*(\d+)\s*\^\s*(\d+))?\s*$")


class OvfError(FormatError):
    """An OVF descriptor or manifest that cannot be used: the message names the element or line."""


@dataclass(frozen=True)
class OvfDisk:
    disk_id: str
    href: str  # the file holding it, relative to the descriptor
    capacity: int  # bytes
    format: str  # a URI: "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"
    compression: str  # "" or "gzip"
    chunked: bool  # ovf:chunkSize: the file is split into numbered pieces


@dataclass(frozen=True)
class Ovf:
    vm_name: str
    os_description: str
    disks: tuple[OvfDisk, ...]


def _attribute(element: ElementTree.Element, name: str) -> str | None:
    """An attribute in the OVF namespace (or without one, as some writers put them)."""
    for namespace in OVF_NAMESPACES:
        value = element.get(f"{{{namespace}}}{name}")
        if value is not None:
            return value
    return element.get(name)


def _children(element: ElementTree.Element, tag: str) -> list[ElementTree.Element]:
    return [child for child in element.iter() if child.tag.rsplit("}", 1)[-1] == tag]


def _capacity(disk: ElementTree.Element, disk_id: str) -> int:
    value, units = _attribute(disk, "capacity") or "", _attribute(disk, "capacityAllocationUnits") or "byte"
    match = UNITS.match(units)
    if not value.isdigit() or match is None:
        raise OvfError(f"disk {disk_id!r}: capacity {value!r} in units {units!r} is not a number of bytes")
    factor = int(match.group(1)) ** int(match.group(2)) if match.group(1) else 1
    return check_size(int(value) * factor, f"disk {disk_id!r}: the capacity", error=OvfError)


def parse_ovf(text: bytes) -> Ovf:
    if len(text) > MAX_DESCRIPTOR:
        raise OvfError(f"the OVF descriptor is {len(text)} bytes, more than {MAX_DESCRIPTOR}")
    try:
        root = SafeElementTree.fromstring(text)
    except (ElementTree.ParseError, DefusedXmlException, ValueError) as e:
        raise OvfError(f"the OVF descriptor is not valid XML: {e}") from None
    files = {}
    for element in _children(root, "File"):
        file_id, href = _attribute(element, "id"), _attribute(element, "href")
        if not file_id or not href:
            raise OvfError("a File element without ovf:id or ovf:href")
        files[file_id] = element
    disks = []
    for disk in _children(root, "Disk"):
        disk_id = _attribute(disk, "diskId") or "?"
        file_ref = _attribute(disk, "fileRef")
        if file_ref is None:
            continue  # "a disk with no fileRef ... is blank": nothing to serve
        if file_ref not in files:
            raise OvfError(f"disk {disk_id!r} refers to file {file_ref!r}, which References does not list")
        element = files[file_ref]
        disks.append(OvfDisk(disk_id, _attribute(element, "href") or "", _capacity(disk, disk_id),
                             _attribute(disk, "format") or "", _attribute(element, "compression") or "",
                             _attribute(element, "chunkSize") is not None))
    if not disks:
        raise OvfError("the OVF descriptor lists no disk with a file")
    systems = _children(root, "VirtualSystem")
    name = ""
    os_description = ""
    if systems:
        names = [child for child in systems[0] if child.tag.rsplit("}", 1)[-1] == "Name"]
        name = (names[0].text or "").strip() if names else (_attribute(systems[0], "id") or "")
        for section in _children(systems[0], "OperatingSystemSection"):
            descriptions = _children(section, "Description")
            os_description = (descriptions[0].text or "").strip() if descriptions else ""
    return Ovf(name, os_description, tuple(disks))


def parse_manifest(text: bytes) -> dict[str, tuple[str, str]]:
    """file name -> (algorithm, lowercase hex digest)."""
    entries = {}
    for number, line in enumerate(text.decode("utf-8", "replace").splitlines(), 1):
        if not line.strip():
            continue
        match = MANIFEST_LINE.match(line)
        if match is None:
            raise OvfError(f"line {number} of the manifest is not 'SHA256(file)= digest': {line[:80]!r}")
        algorithm, name, digest = match.groups()
        entries[name] = (algorithm, digest.lower())
    return entries

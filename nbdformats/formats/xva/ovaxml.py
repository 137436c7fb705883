"""ova.xml, the VM description at the start of an XVA.

It is one XML-RPC value (xen-api ocaml/xapi/export.ml): a struct with `version` (export
metadata) and `objects`, an array of {class, id, snapshot} where `id` is the export's own
reference ("Ref:N") and `snapshot` the object's database record.  A disk is a VDI record
(name_label, virtual_size, uuid); VBD records tie VDIs to the VM with a `userdevice` (the
disk's position).  Each VDI with data has a tar directory named after its id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from xml.etree.ElementTree import Element, ParseError

import defusedxml
import defusedxml.ElementTree

from ..errors import FormatError, check_size

MAX_DEPTH = 64  # XML-RPC nesting in real files is about 6 deep


class OvaXmlError(FormatError):
    """ova.xml is not a description we understand; the message says why."""


@dataclass(frozen=True, slots=True)
class Vdi:
    ref: str  # "Ref:N": also the tar directory holding the disk's chunks
    name: str  # name_label
    virtual_size: int
    uuid: str = ""


@dataclass(frozen=True, slots=True)
class VmDescription:
    vm_name: str
    vdis: dict[str, Vdi]  # by ref
    userdevices: dict[str, int]  # VDI ref -> position of the VM's disk (0 for xvda)
    export_version: str = ""  # version.export_vsn: 0 before inline checksums


def _value(element: Element, depth: int = 0) -> Any:
    """An XML-RPC <value> as Python: struct -> dict, array -> list, any scalar -> its text."""
    if depth > MAX_DEPTH:
        raise OvaXmlError("XML-RPC values nested too deeply")
    typed = next(iter(element), None)
    if typed is None:
        return element.text or ""  # untyped <value>text</value> is a string
    if typed.tag == "struct":
        result: dict[str, Any] = {}
        for member in typed.findall("member"):
            name, value = member.find("name"), member.find("value")
            if name is None or value is None:
                raise OvaXmlError("XML-RPC struct member without name or value")
            result[name.text or ""] = _value(value, depth + 1)
        return result
    if typed.tag == "array":
        data = typed.find("data")
        return [_value(v, depth + 1) for v in (data if data is not None else typed).findall("value")]
    return typed.text or ""  # string, int, i4, i8, double, boolean, dateTime.iso8601, nil


def _truthy(value: Any) -> bool:
    return str(value).strip().lower() in ("1", "true")


def parse(data: bytes) -> VmDescription:
    try:
        root = defusedxml.ElementTree.fromstring(data)
    except (ParseError, defusedxml.DefusedXmlException) as e:
        raise OvaXmlError(f"ova.xml is not valid (safe) XML: {e}") from None
    if root.tag != "value":
        raise OvaXmlError(f"ova.xml: expected an XML-RPC <value>, found <{root.tag}> "
                          "(an XVA version 1 description is not supported)")
    top = _value(root)
    objects = top.get("objects") if isinstance(top, dict) else None
    if not isinstance(objects, list):
        raise OvaXmlError("ova.xml has no 'objects' array")
    version = top.get("version")
    export_version = str(version.get("export_vsn", "")) if isinstance(version, dict) else ""

    by_class: dict[str, list[tuple[str, dict]]] = {}
    for obj in objects:
        if not isinstance(obj, dict) or not isinstance(obj.get("snapshot"), dict):
            raise OvaXmlError("ova.xml: an object is not a {class, id, snapshot} struct")
        by_class.setdefault(str(obj.get("class", "")).lower(), []).append((str(obj.get("id", "")),
                                                                           obj["snapshot"]))

    vms = by_class.get("vm", [])
    # The exported VM comes first; snapshots exported with it are flagged is_a_snapshot.
    main_vm = next((vm for vm in vms if not _truthy(vm[1].get("is_a_snapshot"))), vms[0] if vms else None)
    vm_name = str(main_vm[1].get("name_label", "")) if main_vm else ""

    vdis: dict[str, Vdi] = {}
    for ref, record in by_class.get("vdi", []):
        size_text = str(record.get("virtual_size", "")).strip()
        try:
            size = int(size_text)
        except ValueError:
            raise OvaXmlError(f"ova.xml: VDI {ref} has no valid virtual_size ({size_text!r})") from None
        check_size(size, f"ova.xml: the virtual_size of VDI {ref}", error=OvaXmlError)
        vdis[ref] = Vdi(ref, str(record.get("name_label", "")), size, str(record.get("uuid", "")))

    userdevices: dict[str, int] = {}
    for _, record in by_class.get("vbd", []):
        if main_vm is None or record.get("VM") != main_vm[0] or str(record.get("type", "")).lower() != "disk":
            continue
        device = str(record.get("userdevice", "")).strip()
        if device.isdigit() and record.get("VDI") in vdis:
            userdevices[str(record["VDI"])] = int(device)
    return VmDescription(vm_name, vdis, userdevices, export_version)

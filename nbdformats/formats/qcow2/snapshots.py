"""The internal snapshot table: each snapshot's id, name, L1 table and disk size (sans-IO)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import check_size
from ..readers import Reader, WindowedReader
from .errors import Qcow2Error
from .header import MAX_L1_ENTRIES, Header, check_table
from .structs import ENTRY, SNAPSHOT, SNAPSHOT_EXTRA

MAX_EXTRA_DATA = 1024  # QCOW_MAX_SNAPSHOT_EXTRA_DATA
MAX_TABLE_SIZE = 64 << 20  # QCOW_MAX_SNAPSHOTS_SIZE: the whole table


@dataclass(frozen=True)
class Snapshot:
    id: str
    name: str
    l1_offset: int
    l1_size: int
    disk_size: int  # "Virtual disk size of the snapshot in bytes" (the image's size when absent)


def read_snapshots(read: Reader, header: Header, file_size: int) -> list[Snapshot]:
    """Every entry of the snapshot table, in table order."""
    table = WindowedReader(read, file_size, 64 << 10)
    snapshots = []
    offset = header.snapshots_offset
    for index in range(header.snapshot_count):
        if offset - header.snapshots_offset > MAX_TABLE_SIZE:
            raise Qcow2Error(f"the snapshot table is larger than {MAX_TABLE_SIZE} bytes")
        where = f"snapshot table entry {index} (offset {offset:#x})"
        fixed = _read_within(table, offset, SNAPSHOT.size, where, file_size)
        l1_offset, l1_size, id_size, name_size, _sec, _nsec, _clock, _vm_state, extra_size = SNAPSHOT.unpack(fixed)
        if extra_size > MAX_EXTRA_DATA:
            raise Qcow2Error(f"{where}: {extra_size} bytes of extra data, more than {MAX_EXTRA_DATA}")
        variable = _read_within(table, offset + SNAPSHOT.size, extra_size + id_size + name_size, where, file_size)
        disk_size = header.size
        if extra_size >= SNAPSHOT_EXTRA.size:
            _vm_state_large, disk_size = SNAPSHOT_EXTRA.unpack_from(variable)
            check_size(disk_size, f"{where}: the disk size", error=Qcow2Error)
        snapshot_id = variable[extra_size:extra_size + id_size].decode("utf-8", "replace")
        name = variable[extra_size + id_size:].decode("utf-8", "replace")
        if l1_size > MAX_L1_ENTRIES:
            raise Qcow2Error(f"{where}: l1_size is {l1_size} entries, more than {MAX_L1_ENTRIES}")
        check_table(l1_offset, l1_size, ENTRY, f"the L1 table of snapshot {name!r}", header.cluster_size, file_size)
        snapshots.append(Snapshot(snapshot_id, name, l1_offset, l1_size, disk_size))
        offset += -(-(SNAPSHOT.size + len(variable)) // 8) * 8
    return snapshots


def _read_within(read: Reader, offset: int, length: int, where: str, file_size: int) -> bytes:
    if offset + length > file_size:
        raise Qcow2Error(f"{where} ends at {offset + length}, past the end of the file ({file_size} bytes)")
    return read(offset, length)


def find_snapshot(snapshots: list[Snapshot], wanted: str) -> Snapshot:
    """The snapshot whose id is `wanted`, else the one so named (qemu's order: id first)."""
    for key in (lambda s: s.id, lambda s: s.name):
        for snapshot in snapshots:
            if key(snapshot) == wanted:
                return snapshot
    listed = ", ".join(f"{s.id} ({s.name!r})" for s in snapshots) or "none"
    raise Qcow2Error(f"no snapshot with id or name {wanted!r} (snapshots: {listed})")

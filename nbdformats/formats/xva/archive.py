"""The disks of an XVA: which tar member holds which MiB of which disk.

From xen-api's ocaml/xapi/stream_vdi.ml (the exporter and importer):

- Each disk is a tar directory named after its VDI id, holding chunks `%08d` of
  chunk_size = 1 MiB, "the last one may be shorter" (it ends at virtual_size).
- "Read all clusters and check if they are filled with zeros": an all-zero chunk is left
  out, except the first and the last, so a missing number is a MiB of zeroes.
- The number is a counter, not an offset: to keep firewalls from closing an idle export,
  xapi writes a zero-length chunk that takes a number without advancing the offset, and
  the importer adds (number - last number - 1) chunk sizes of zeroes before each chunk.
  A disk's bytes are therefore placed by walking its chunks in number order.
- Each chunk may be followed by `%08d.checksum` (SHA-1, lowercase hex) or `%08d.xxhash`
  (XXH64, `%016X`) of its data.
- The disk's size is the VDI's virtual_size in ova.xml, not the sum of its chunks.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

import xxhash

from .. import tar
from ..errors import FormatError
from ..readers import Reader, WindowedReader
from . import ovaxml

CHUNK_SIZE = 1 << 20
MAX_OVA_XML_SIZE = 64 << 20
MAX_CHECKSUM_SIZE = 128

# Chunk.state: checksums are checked at most once per chunk.
UNCHECKED, GOOD, BAD = 0, 1, 2

_CHUNK_NAME = re.compile(r"(\d+)(\.checksum|\.xxhash)?")
_ALGORITHMS = {".checksum": "sha1", ".xxhash": "xxhash"}
_COMPRESSED_MAGIC = {b"\x1f\x8b": "gzip", b"\x28\xb5\x2f\xfd": "zstd", b"\xfd7zXZ\x00": "xz",
                     b"BZh": "bzip2"}


class XvaError(FormatError):
    """Not an XVA, or a damaged one; the message says what and where."""


@dataclass(slots=True, eq=False)
class Chunk:
    number: int  # from the member's name
    offset: int  # on the disk
    source: int  # of its data in the archive
    size: int
    algorithm: str = ""  # "sha1", "xxhash", or "" when the export has no checksum for it
    expected: str = ""  # lowercase hex from the checksum member
    state: int = UNCHECKED


@dataclass(eq=False)
class Disk:
    vdi: ovaxml.Vdi
    index: int  # position among the archive's disks (the VM's device order first)
    export_name: str = ""
    chunks: dict[int, Chunk] = field(default_factory=dict)  # by slot (disk offset // CHUNK_SIZE)
    slots: list[int] = field(default_factory=list)  # sorted keys of `chunks`

    @property
    def size(self) -> int:
        return self.vdi.virtual_size

    @property
    def label(self) -> str:
        return f"disk {self.index} {self.vdi.name!r} ({self.vdi.ref})"


@dataclass(eq=False)
class Archive:
    size: int  # of the tar
    vm_name: str
    disks: list[Disk]

    def select(self, text: str) -> Disk:
        """A disk by "Ref:N", by VDI name, or by index; raises LookupError listing the disks."""
        for disk in self.disks:
            if text in (disk.vdi.ref, disk.export_name):
                return disk
        named = [d for d in self.disks if d.vdi.name == text]
        if len(named) > 1:
            raise LookupError(f"disk name {text!r} is ambiguous ({', '.join(d.vdi.ref for d in named)}): "
                              "select it by Ref:N")
        if named:
            return named[0]
        if text.isdigit() and int(text) < len(self.disks):
            return self.disks[int(text)]
        listing = "; ".join(d.label for d in self.disks)
        raise LookupError(f"no disk {text!r} in the XVA (select by name, Ref:N or index: {listing})")


def checksum(algorithm: str, data: bytes | bytearray | memoryview) -> str:
    if algorithm == "sha1":
        return hashlib.sha1(data).hexdigest()
    return format(xxhash.xxh64_intdigest(data), "016x")


def _not_a_tar(first_bytes: bytes, error: tar.TarError) -> XvaError:
    for magic, kind in _COMPRESSED_MAGIC.items():
        if first_bytes.startswith(magic):
            hint = f" (put --filter={kind} after --filter=xva)" if kind != "bzip2" else ""
            return XvaError(f"the archive is {kind}-compressed, not a tar{hint}")
    return XvaError(f"not an XVA: {error}")


def index(read: Reader, size: int, with_checksums: bool) -> Archive:
    """Scan the tar once: parse ova.xml and place every chunk of every disk.

    `with_checksums` reads the checksum members too (cheap: they sit next to the headers).
    """
    # A chunk's checksum header, checksum and the next chunk's header are adjacent: with a
    # 16 KiB window, indexing costs one read of the layer below per chunk.
    read_ahead = WindowedReader(read, size, 16384)
    ova_data: bytes | None = None
    directories: dict[str, dict[int, tar.TarEntry]] = {}  # in archive order
    checksums: dict[str, dict[int, tuple[str, str]]] = {}
    end = 0  # of the last member
    try:
        for entry in tar.walk(read_ahead, size):
            end = entry.next_header
            name = entry.name.removeprefix("./")
            directory, _, base = name.rpartition("/")
            match = _CHUNK_NAME.fullmatch(base)
            if entry.kind != "file" or not (name == "ova.xml" or directory and match):
                continue  # not ours to serve
            if entry.sparse_map is not None:
                raise XvaError(f"{name} is a sparse tar member: not something xapi writes")
            if name == "ova.xml":
                if entry.size > MAX_OVA_XML_SIZE:
                    raise XvaError(f"ova.xml is implausibly large ({entry.size} bytes)")
                ova_data = read_ahead(entry.data_offset, entry.size)
                continue
            assert match is not None  # a chunk: only those are left
            number, suffix = int(match.group(1)), match.group(2)
            if suffix is None:
                chunks = directories.setdefault(directory, {})
                if number in chunks:
                    raise XvaError(f"duplicate chunk {name} (tar headers at offsets "
                                   f"{chunks[number].header_offset} and {entry.header_offset})")
                chunks[number] = entry
            elif with_checksums:
                if entry.size > MAX_CHECKSUM_SIZE:
                    raise XvaError(f"checksum member {name} is implausibly large ({entry.size} bytes)")
                sums = checksums.setdefault(directory, {})
                if number in sums:
                    raise XvaError(f"chunk {directory}/{match.group(1)} has more than one checksum member")
                text = read_ahead(entry.data_offset, entry.size).decode("ascii", "replace").strip().lower()
                sums[number] = (_ALGORITHMS[suffix], text)
    except tar.TarError as e:
        if end == 0:  # the first header already failed
            raise _not_a_tar(read(0, min(size, 8)), e) from None
        raise XvaError(str(e)) from None
    if end == 0:
        raise XvaError("not an XVA: " + ("the file is empty" if size == 0 else "the tar archive is empty"))
    if end + tar.BLOCK > size:
        # Strict on purpose: a tar cut at a member boundary would otherwise lose its last
        # chunks silently (they would read as zeroes).
        raise XvaError(f"truncated tar: no end-of-archive marker after the last member (offset {end})")
    if ova_data is None:
        raise XvaError("not an XVA: the archive has no ova.xml")
    try:
        description = ovaxml.parse(ova_data)
    except ovaxml.OvaXmlError as e:
        raise XvaError(str(e)) from None
    disks = [_place_chunks(directory, chunks, checksums.get(directory, {}), description)
             for directory, chunks in directories.items()]
    if not disks:
        raise XvaError("the XVA holds no disk data (a metadata-only export?)")
    # The VM's disks in device order (xvda first), then any others in archive order.
    disks.sort(key=lambda d: description.userdevices.get(d.vdi.ref, 1 << 62))
    _name_disks(disks)
    return Archive(size, description.vm_name, disks)


def _place_chunks(directory: str, members: dict[int, tar.TarEntry], sums: dict[int, tuple[str, str]],
                  description: ovaxml.VmDescription) -> Disk:
    vdi = description.vdis.get(directory)
    if vdi is None:
        raise XvaError(f"the archive has chunks in {directory}/ but ova.xml has no VDI {directory}")
    disk = Disk(vdi, 0)
    position, last = 0, -1
    for number in sorted(members):
        member = members[number]
        position += (number - last - 1) * CHUNK_SIZE  # left-out all-zero chunks
        last = number
        name = f"{directory}/{number:08d}"
        if position >= vdi.virtual_size or position + member.size > vdi.virtual_size:
            raise XvaError(f"chunk {name} ({member.size} bytes at disk offset {position}) lies past the "
                           f"end of the disk (virtual_size {vdi.virtual_size})")
        if member.size not in (0, CHUNK_SIZE) and position + member.size != vdi.virtual_size:
            raise XvaError(f"chunk {name} is {member.size} bytes: chunks must be 1 MiB "
                           "(only the last one, ending at virtual_size, may be shorter)")
        if member.size:  # zero-length chunks are xapi's keep-alives: a number, no data
            algorithm, expected = sums.get(number, ("", ""))
            disk.chunks[position // CHUNK_SIZE] = Chunk(number, position, member.data_offset, member.size,
                                                         algorithm, expected)
            position += member.size
    disk.slots = sorted(disk.chunks)
    return disk


def _name_disks(disks: list[Disk]) -> None:
    """Export names: the VDI name where it identifies the disk, else its Ref:N."""
    names = [d.vdi.name for d in disks]
    refs = {d.vdi.ref for d in disks}
    for index, disk in enumerate(disks):
        disk.index = index
        name = disk.vdi.name
        unique = name and names.count(name) == 1 and name not in refs and not name.startswith("Ref:")
        disk.export_name = name if unique else disk.vdi.ref

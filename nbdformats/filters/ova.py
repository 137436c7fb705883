"""ova filter: serve the disks of an OVA (or of an unpacked OVF directory), each an export.

    nbdformats --filter=ova file vm.ova                        # the first disk is the default export
    nbdformats --filter=ova file vm.ova ova-verify=true        # check the manifest's digests first
    nbdformats --filter=ova file dir=/srv/vm ova-ovf=vm.ovf    # an unpacked OVF directory

The OVF descriptor (formats/ovf.py) lists the disks; each is named by its file's href, and
NBD_OPT_LIST and NBD_INFO_DESCRIPTION give the disk, the VM's name and its operating system.
Disks are VMDKs (streamOptimized, as VMware and VirtualBox export them, or monolithicSparse),
read in place in the tar; files with ovf:compression="gzip" are decompressed with random access
(formats/deflate_index.py).  Read-only: `--filter=cow` on top makes a disk writable.
"""

from __future__ import annotations

import errno
import hashlib
import logging
from dataclasses import dataclass
from typing import Callable

from ..api.chain import Export, Filter, FilterHandle, Layer, OpenNext
from ..api.errors import ConfigError, NBDError
from ..api.params import Bool, Param, String
from ..api.progress import progress
from ..formats.blockmap import LayeredDisk
from ..formats.deflate_index import DeflateIndex
from ..formats.errors import FormatError
from ..formats.ovf import Ovf, OvfDisk, OvfError, parse_manifest, parse_ovf
from ..formats.tar import TarError, walk
from ..formats.vmdk.image import VmdkImage, read_descriptor
from ._members import normalize
from ._parents import Location, OpenedFile, ParentError, Siblings, layer_file, sibling_export
from ._vdisk import DEFAULT_CACHE, Chain, DiskHandle

log = logging.getLogger(__name__)

VMDK_FORMATS = ("http://www.vmware.com/interfaces/specifications/vmdk.html",
                "http://www.vmware.com/specifications/vmdk.html")
HASH_CHUNK = 4 << 20


@dataclass
class Member:
    """A file of the OVA: where its bytes lie in the tar (None: an export of the layer below)."""

    name: str
    offset: int | None
    size: int


@dataclass
class OvaDisk:
    ovf: OvfDisk
    member: Member
    image: VmdkImage
    gzip: DeflateIndex | None  # the decompressed file, for ovf:compression="gzip"
    description: str


class OvaFilter(Filter):
    """Serve the disks of an OVA (or an unpacked OVF directory), each an export named by its file."""

    name = "ova"
    ova_verify = Param(Bool(), default=False, help="Check the manifest's SHA1/SHA256 digests of every file at "
                                                   "start-up (refuse to start on a mismatch)")
    ova_ovf = Param(String(), help="An unpacked OVF directory (file dir=DIR): the descriptor's file name")

    disks: list[OvaDisk]
    ovf: Ovf

    def get_ready(self) -> None:
        self.siblings = Siblings(self.name, self.open_below)
        chain = Chain()
        try:
            self._load(chain)
        except (FormatError, MemoryError) as e:
            raise ConfigError(f"ova: {e}") from None
        except NBDError as e:
            raise ConfigError(f"ova: cannot read the OVA: {e}") from None
        finally:
            chain.close()

    # -- start-up: the archive, the descriptor, the disks --------------------------------------
    def _load(self, chain: Chain) -> None:
        archive: Layer | None = None
        self.members: dict[str, Member] = {}
        if self.ova_ovf is not None:
            ovf_file = self._open(sibling_export("", self.ova_ovf, "the OVF descriptor"), chain, None)
        else:
            archive = self.open_below(True, "")
            chain.add(layer_file("", archive, archive.close))
            self.members = self._index(archive)
            names = [name for name in self.members if name.lower().endswith(".ovf")]
            if not names:
                raise OvfError("the archive holds no .ovf descriptor (is it an OVA?)")
            ovf_file = self._open(names[0], chain, archive)
        self.ovf = parse_ovf(ovf_file.read(0, ovf_file.size))
        self.disks = [self._disk(disk, chain, archive) for disk in self.ovf.disks]
        hrefs = [disk.member.name for disk in self.disks]
        if len(set(hrefs)) != len(hrefs):
            raise OvfError("two disks of the OVF descriptor name the same file")
        if self.ova_verify:
            self._verify(ovf_file.name.rsplit(".", 1)[0] + ".mf", ovf_file, chain, archive)

    def _index(self, archive: Layer) -> dict[str, Member]:
        tar = layer_file("", archive)
        members: dict[str, Member] = {}
        try:
            for entry in walk(tar.read, tar.size):
                if entry.kind == "file" and entry.sparse_map is None:
                    name = normalize(entry.name)
                    members.setdefault(name, Member(name, entry.data_offset, entry.size))
        except TarError as e:
            raise OvfError(f"the OVA is not a readable tar archive: {e}") from None
        return members

    def _open(self, name: str, chain: Chain, archive: Layer | None) -> OpenedFile:
        """A file of the OVA: a member of the tar `archive`, read in place, or (an unpacked
        directory) an export of the layer below, opened into `chain`."""
        if archive is None:
            file, _ = self.siblings.open(Location(), name, self.open_below, "the file")
            return chain.add(file)
        member = self.members.get(name)
        if member is None:
            raise OvfError(f"{name!r} is not in the archive")
        return member_file(archive, member)

    def _disk(self, disk: OvfDisk, chain: Chain, archive: Layer | None) -> OvaDisk:
        where = f"disk {disk.disk_id!r} ({disk.href})"
        if disk.chunked:
            raise OvfError(f"{where}: the file is split into chunks (ovf:chunkSize), which is not supported")
        if disk.compression not in ("", "identity", "gzip"):
            raise OvfError(f"{where}: unsupported ovf:compression={disk.compression!r} (gzip is supported)")
        if not disk.format.startswith(VMDK_FORMATS):
            raise OvfError(f"{where}: unsupported disk format {disk.format!r} (VMDK is supported)")
        name = sibling_export("", disk.href, f"{where}: the file")
        file = self._open(name, chain, archive)
        gzip = None
        if disk.compression == "gzip":
            gzip = DeflateIndex(file.read, 0, file.size, None, raw=False, name=f"{disk.href} (gzip)")
            gzip.build()
            file = decompressed(file, gzip)
        descriptor, embedded = read_descriptor(file.read, file.size, disk.href)
        if embedded is None:
            raise OvfError(f"{where}: a VMDK descriptor file with separate extents is not supported in an OVA")
        image = VmdkImage(descriptor, [(file.read, file.size)], embedded, DEFAULT_CACHE, disk.href)
        if image.parent is not None:
            raise OvfError(f"{where}: a delta disk (it has a parent) is not supported in an OVA")
        if image.size != disk.capacity:
            log.warning("ova: %s: the OVF gives a capacity of %d bytes, the VMDK %d: serving the VMDK's",
                        where, disk.capacity, image.size)
        member = self.members.get(name, Member(name, None, file.size))
        os_part = f", {self.ovf.os_description}" if self.ovf.os_description else ""
        description = f"{disk.disk_id} of VM {self.ovf.vm_name or '(unnamed)'}{os_part}, {image.size} bytes"
        return OvaDisk(disk, member, image, gzip, description)

    def _verify(self, manifest_name: str, ovf_file: OpenedFile, chain: Chain, archive: Layer | None) -> None:
        try:
            manifest_file = self._open(manifest_name, chain, archive)
        except (OvfError, ParentError):
            raise OvfError(f"ova-verify=true, but the OVA has no manifest {manifest_name!r}") from None
        entries = parse_manifest(manifest_file.read(0, manifest_file.size))
        listed = {ovf_file.name, *(disk.member.name for disk in self.disks)}
        missing = sorted(name for name in listed if name not in entries)
        if missing:
            raise OvfError(f"the manifest has no digest for {', '.join(missing)}")
        files = [self._open(sibling_export("", name, "a file the manifest names"), chain, archive) for name in entries]
        failed = []
        with progress(sum(file.size for file in files), "ova: verifying the manifest") as bar:
            for file in files:
                algorithm, expected = entries[file.name]
                digest = hashlib.new(algorithm.lower())
                for start in range(0, file.size, HASH_CHUNK):
                    digest.update(file.read(start, HASH_CHUNK))
                    bar.update(min(HASH_CHUNK, file.size - start))
                if digest.hexdigest() != expected:
                    failed.append(f"{file.name} ({algorithm} {digest.hexdigest()}, the manifest says {expected})")
        if failed:
            raise OvfError(f"the manifest's digests do not match: {'; '.join(failed)}")
        log.info("ova: the manifest's %d digests match", len(files))

    # -- exports -------------------------------------------------------------------------------
    def select(self, export_name: str) -> OvaDisk:
        if not export_name:
            return self.disks[0]
        for disk in self.disks:
            if normalize(export_name) in (disk.member.name, disk.ovf.disk_id):
                return disk
        raise NBDError(errno.ENOENT, f"ova: no disk {export_name!r}; the disks are "
                                     f"{', '.join(d.member.name for d in self.disks)}")

    def list_exports(self, next_list: Callable[[bool, bool], list[Export]], readonly: bool,
                     is_tls: bool) -> list[Export]:
        return [Export(disk.member.name, disk.description) for disk in self.disks]

    def default_export(self, next_default: Callable[[bool, bool], str], readonly: bool, is_tls: bool) -> str:
        return self.disks[0].member.name

    def open(self, next_open: OpenNext, readonly: bool, export_name: str) -> FilterHandle:
        disk = self.select(export_name)
        # Our export names select disks: below is the one archive, or the disk's file of the directory.
        below = next_open(True, disk.member.name if self.ova_ovf is not None else "")
        try:
            file = layer_file(disk.member.name, below) if self.ova_ovf is not None else member_file(below, disk.member)
            if disk.gzip is not None:
                file = decompressed(file, disk.gzip)
            return DiskHandle(self, below, LayeredDisk(disk.image, [file.read], [file.read_into]), Chain(),
                              disk.description)
        except BaseException:
            below.close()
            raise


def member_file(archive: Layer, member: Member) -> OpenedFile:
    """A member's bytes, where they lie in the tar."""
    whole = layer_file(member.name, archive)
    start, size = member.offset or 0, member.size

    def read(offset: int, length: int) -> bytes:
        return whole.read(start + offset, max(0, min(length, size - offset)))

    def read_into(buf: memoryview, offset: int) -> None:
        whole.read_into(buf, start + offset)

    return OpenedFile(member.name, size, read, read_into)


def decompressed(file: OpenedFile, index: DeflateIndex) -> OpenedFile:
    """The uncompressed bytes of a gzip file, through its shared index and this file's reader."""
    size = index.size or 0

    def read(offset: int, length: int) -> bytes:
        buf = bytearray(max(0, min(length, size - offset)))
        index.read_into(memoryview(buf), offset, file.read)
        return bytes(buf)

    def read_into(buf: memoryview, offset: int) -> None:
        index.read_into(buf, offset, file.read)

    return OpenedFile(file.name, size, read, read_into, file.close)


FILTER = OvaFilter

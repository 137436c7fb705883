"""The floppy plugin: parameters, start-up (scan, lay out, make bootable) and requests."""

from __future__ import annotations

import errno
import logging
import os
import time
import zlib
from typing import TYPE_CHECKING

from ...api.chain import Extents, Plugin, PluginHandle
from ...api.errors import ConfigError, NBDError
from ...api.params import Enum, Param, Path, Size, String
from ...formats.fat.dirents import ATTR_ARCHIVE, ATTR_HIDDEN, ATTR_READ_ONLY, ATTR_SYSTEM
from ...formats.fat.layout import SECTOR, LayoutError, bpb_end
from ...formats.fat.names import volume_label
from .._sparse import data_and_holes
from .image import FatImage, TreeEncoder
from .tree import DirNode, FileNode, TreeError, add_file, scan

if TYPE_CHECKING:
    from . import syslinux  # imported when booting is asked for

try:
    from ._hostio import read_files as _read_files  # the GIL released: see _hostio.c
except ImportError:  # not built: os.open and os.preadv, file by file
    _read_files = None  # type: ignore[assignment]

log = logging.getLogger("nbdformats.floppy")

FLOPPY_1440K = 1440 * 1024
# JMP SHORT and JMP NEAR: a boot sector starts with one and must jump past our BPB.
_JMP_SHORT, _JMP_NEAR = 0xEB, 0xE9


def read_host(path: str, offset: int, view: memoryview) -> None:
    """Fill `view` from the host file at `offset` (the file is opened per request, so
    nothing stays open and a replaced file is seen as it is now)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as e:
        raise NBDError(e.errno or errno.EIO, f"{path}: {e.strerror}") from None
    try:
        while len(view):
            n = os.preadv(fd, [view], offset)
            if n == 0:
                raise _shorter(path)
            view = view[n:]
            offset += n
    except OSError as e:
        raise NBDError(e.errno or errno.EIO, f"{path}: {e.strerror}") from None
    finally:
        os.close(fd)


def _shorter(path: str) -> NBDError:
    return NBDError(errno.EIO, f"{path}: the file is shorter than when the server started")


def read_hosts(reads: list[tuple[str, int, memoryview]]) -> None:
    """read_host for each (path, offset, view) of a request: with the C extension all of them
    with the GIL released once (see _hostio.c), else one by one."""
    if _read_files is None:
        for path, offset, view in reads:
            read_host(path, offset, view)
        return
    failed = _read_files(reads)
    if failed is not None:
        index, error = failed
        path = reads[index][0]
        raise _shorter(path) if not error else NBDError(error, f"{path}: {os.strerror(error)}")


def host_ranges(path: str, offset: int, length: int) -> list[tuple[int, int, bool]]:
    """Data and hole ranges of a host file (SEEK_DATA/SEEK_HOLE); all data if unknown."""
    everything = [(offset, length, True)]
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return everything  # the read will report the error
    try:
        return list(data_and_holes(fd, offset, offset + length))
    except OSError:
        return everything
    finally:
        os.close(fd)


def _check_label(text: str) -> None:
    volume_label(text)


def _jump_target(code: bytes) -> int | None:
    if code[0] == _JMP_SHORT:
        return 2 + code[1] if code[1] < 0x80 else None
    if code[0] == _JMP_NEAR:
        return (3 + int.from_bytes(code[1:3], "little")) & 0xFFFF
    return None


class FloppyPlugin(Plugin):
    """A FAT disk made from directories; files are read from the host at request time."""

    name = "floppy"

    dir = Param(Path("dir"), required=True, repeat=True, magic=True,
                help="Directory whose files the disk holds; repeat to merge several (later ones win)")
    label = Param(String(), default="NBDKITFLOPY", check=_check_label,
                  help="Volume label, at most 11 characters (upper-cased); empty for none")
    size = Param(Size(minimum=SECTOR), help="Total disk size (default: just big enough)")
    fat = Param(Enum("32", "16", "12", "auto"), default="32",
                help="FAT type; auto picks by size as mkfs.fat does")
    partition = Param(Enum("mbr", "none"),
                      help="mbr: one FAT partition at sector 2048; none: a bare file system "
                           "(default: none for FAT12, mbr otherwise)")
    boot = Param(Enum("none", "syslinux"), default="none",
                 help="syslinux: make the disk boot SYSLINUX (BIOS), configured by syslinux.cfg")
    boot_sector = Param(Path("file"),
                        help="A 512-byte boot sector whose code boots the volume (our BPB is kept)")

    def config_complete(self) -> None:
        if self.boot != "none" and self.boot_sector is not None:
            raise ConfigError("floppy: boot= and boot-sector= cannot be used together")

    def get_ready(self) -> None:
        label = volume_label(self.label)
        # Directories are prepared (their layout worked out, their entries left to encode at
        # the first read) as the scan completes them, so a big tree is never held whole; not
        # with boot=syslinux, which adds files to the tree after the scan.
        encoder = TreeEncoder(label) if self.boot != "syslinux" else None
        try:
            root = scan(self.dir, log.warning, encoder.complete if encoder is not None else None)
        except (TreeError, LayoutError) as e:
            raise ConfigError(f"floppy: {e}") from None
        boot_files = self._add_syslinux(root) if self.boot == "syslinux" else None
        boot_code = self._read_boot_sector() if self.boot_sector is not None else None
        serial = zlib.crc32("\0".join(self.dir).encode(errors="surrogateescape") + self.label.encode())
        try:
            image = FatImage(root, fat=self.fat, partition=self.partition, size=self.size,
                             label=label, serial=serial, encoder=encoder)
        except LayoutError as e:
            raise ConfigError(f"floppy: {e}") from None
        if boot_files is not None or boot_code is not None:
            self._make_bootable(image, boot_files, boot_code)
        self.image = image
        g = image.geometry
        log.info("floppy: FAT%d, %d clusters of %d bytes, %d bytes%s", g.fat_bits, g.clusters,
                 g.cluster_size, image.size, " (MBR)" if g.partitioned else "")

    def _make_bootable(self, image: FatImage, boot_files: tuple[FileNode, syslinux.SyslinuxFiles] | None,
                       boot_code: bytes | None) -> None:
        from . import syslinux
        try:
            if boot_files is not None:
                ldlinux, files = boot_files
                patched, boot_sector = syslinux.patch(files.ldlinux_sys, files.boot_sector,
                                                      image.fs_sectors_of(ldlinux))
                image.replace_contents(ldlinux, patched)
                image.set_boot_code(boot_sector, syslinux.KEEP_BPB, self._mbr_code(image))
            elif boot_code is not None:
                target = _jump_target(boot_code)
                end = bpb_end(image.geometry.fat_bits)
                if target is None or target < end:
                    raise ConfigError(
                        f"floppy: boot-sector={self.boot_sector}: its code must start with a jump past "
                        f"the FAT{image.geometry.fat_bits} BPB (to offset {end:#x} or later)")
                image.set_boot_code(boot_code, (3, end), self._mbr_code(image))
        except syslinux.SyslinuxError as e:
            raise ConfigError(f"floppy: {e}") from None

    def _read_boot_sector(self) -> bytes:
        try:
            with open(self.boot_sector, "rb") as f:
                code = f.read(SECTOR + 1)
        except OSError as e:
            raise ConfigError(f"floppy: boot-sector={self.boot_sector}: {e.strerror}") from None
        if len(code) != SECTOR:
            raise ConfigError(f"floppy: boot-sector={self.boot_sector}: a boot sector is {SECTOR} bytes, "
                              f"this file is {'larger' if len(code) > SECTOR else f'{len(code)} bytes'}")
        return code

    @staticmethod
    def _mbr_code(image: FatImage) -> bytes | None:
        from . import syslinux
        return syslinux.mbr_code() if image.geometry.partitioned else None

    @staticmethod
    def _add_syslinux(root: DirNode) -> tuple[FileNode, syslinux.SyslinuxFiles]:
        """ldlinux.sys and ldlinux.c32 in the root directory (replacing any from the host)."""
        from . import syslinux
        blank = FatImage(DirNode("", "", 0, 0, 0), fat="12", size=FLOPPY_1440K, label=None)
        buf = bytearray(blank.size)
        blank.read(memoryview(buf), 0, read_hosts)
        try:
            files = syslinux.installer_files(bytes(buf))
        except syslinux.SyslinuxError as e:
            raise ConfigError(f"floppy: {e}") from None
        now = time.time()
        attributes = ATTR_READ_ONLY | ATTR_HIDDEN | ATTR_SYSTEM | ATTR_ARCHIVE  # as the installer sets
        ldlinux = FileNode("ldlinux.sys", files.ldlinux_sys, len(files.ldlinux_sys), now, now, now, attributes)
        module = FileNode("ldlinux.c32", files.ldlinux_c32, len(files.ldlinux_c32), now, now, now, attributes)
        for node in (ldlinux, module):
            replaced = add_file(root, node)
            if replaced is not None:
                log.warning("floppy: boot=syslinux replaces %s with SYSLINUX's own %s",
                            replaced.origin, node.name)
        return ldlinux, files

    class Handle(PluginHandle):
        def __init__(self, plugin: "FloppyPlugin", readonly: bool, export_name: str) -> None:
            self.image = plugin.image

        def get_size(self) -> int:
            return self.image.size

        def can_multi_conn(self) -> bool:
            return True  # read-only: every connection sees the same bytes

        def pread(self, buf: memoryview, offset: int, flags: int) -> None:
            self.image.read(buf, offset, read_hosts)

        def extents(self, count: int, offset: int, flags: int, extents: Extents) -> None:
            for start, length, kind in self.image.extents(offset, count, host_ranges):
                extents.add(start, length, kind)

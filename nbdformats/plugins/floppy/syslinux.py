"""SYSLINUX on the virtual FAT: the installer's files, patched for where they land.

Debian ships SYSLINUX's FAT boot sector and ldlinux.sys only inside the `syslinux`
installer, so `installer_files` runs it once on a scratch floppy image and takes its
output: the boot sector, ldlinux.sys (boot image + 2 ADV sectors) and the matching
ldlinux.c32.  `patch` then does what the installer's syslinux_patch() does
(libinstall/syslxmod.c, syslinux 6): ldlinux.sys learns the disk sectors it occupies
through a patch area found by its magic number, and the boot sector the first one.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass

from ...formats.fat.layout import SECTOR

LDLINUX_MAGIC = 0x3EB202FE
# struct patch_area: magic, instance, data_sectors, adv_sectors, dwords, checksum,
# maxtransfer, epaoffset.
_PATCH_AREA = struct.Struct("<IIHHIIHH")
# struct ext_patch_area: advptroffset, diroffset, dirlen, subvoloffset, subvollen,
# secptroffset, secptrcnt, sect1ptr0, sect1ptr1, raidpatch.
_EXT_PATCH_AREA = struct.Struct("<10H")
_EXTENT = struct.Struct("<QH")  # struct syslinux_extent, packed
LOAD_ADDRESS = 0x8000  # where the boot sector loads ldlinux.sys
# The installer replaces bytes 0..10 (jump, OEM name) and 0x5A..0x1FD (code) of the
# volume boot record and keeps the BPB between them (FAT_bsHead, FAT_bsCode).
KEEP_BPB = (11, 0x5A)
MBR_CODE_PATHS = ("/usr/lib/syslinux/mbr/mbr.bin", "/usr/lib/SYSLINUX/mbr.bin")
TIMEOUT = 60


class SyslinuxError(Exception):
    """SYSLINUX cannot be installed (installer missing, unexpected files)."""


@dataclass(frozen=True)
class SyslinuxFiles:
    boot_sector: bytes
    ldlinux_sys: bytes
    ldlinux_c32: bytes


def _patch_area(image: bytes | bytearray) -> int:
    """Offset of the patch area: the first 32-bit-aligned LDLINUX_MAGIC."""
    magic = LDLINUX_MAGIC.to_bytes(4, "little")
    position = image.find(magic)
    while position >= 0 and position % 4:
        position = image.find(magic, position + 1)
    if position < 0:
        raise SyslinuxError("ldlinux.sys has no patch area (LDLINUX_MAGIC not found)")
    return position


def generate_extents(sectors: list[int], count: int) -> list[tuple[int, int]]:
    """(lba, length) runs of consecutive sectors, as generate_extents() in syslxmod.c:
    a run also ends before 64 KiB or where the load address crosses a 64 KiB boundary."""
    extents: list[tuple[int, int]] = []
    address = base = LOAD_ADDRESS
    lba = length = 0
    for sector in sectors:
        if length:
            extra = (length + 1) * SECTOR
            if sector == lba + length and extra < 65536 and \
                    ((address ^ (base + extra - 1)) & 0xFFFF0000) == 0:
                length += 1
                address += SECTOR
                continue
            extents.append((lba, length))
        base, lba, length = address, sector, 1
        address += SECTOR
    if length:
        extents.append((lba, length))
    if len(extents) > count:
        raise SyslinuxError(f"ldlinux.sys is in {len(extents)} pieces; SYSLINUX can load {count}")
    return extents


def patch(ldlinux_sys: bytes, boot_sector: bytes, sectors: list[int]) -> tuple[bytes, bytes]:
    """(ldlinux.sys, boot sector) patched for ldlinux.sys at `sectors` (from the start of
    the file system; the boot code adds the BPB's hidden sectors)."""
    image = bytearray(ldlinux_sys)
    boot = bytearray(boot_sector)
    area = _patch_area(image)
    _, _, _, _, dwords, _, _, ext_offset = _PATCH_AREA.unpack_from(image, area)
    image_length = dwords * 4
    total = -(-image_length // SECTOR) + 2  # the boot image and two ADV sectors
    if len(sectors) < total or len(image) < total * SECTOR:
        raise SyslinuxError(f"ldlinux.sys needs {total} sectors, got {len(sectors)}")
    (adv_offset, _, _, _, _, extents_offset, extents_count, sect1_low, sect1_high,
     _) = _EXT_PATCH_AREA.unpack_from(image, ext_offset)
    struct.pack_into("<I", boot, sect1_low, sectors[0] & 0xFFFFFFFF)
    struct.pack_into("<I", boot, sect1_high, sectors[0] >> 32)
    rest = sectors[1:total]
    struct.pack_into("<HHI", image, area + 8, total - 2, 2, dwords)
    image[extents_offset:extents_offset + extents_count * _EXTENT.size] = bytes(extents_count * _EXTENT.size)
    for i, (lba, length) in enumerate(generate_extents(rest[:total - 3], extents_count)):
        _EXTENT.pack_into(image, extents_offset + i * _EXTENT.size, lba, length)
    struct.pack_into("<QQ", image, adv_offset, rest[total - 3], rest[total - 2])
    # The dwords of the boot image sum to LDLINUX_MAGIC with the checksum included.
    struct.pack_into("<I", image, area + 16, 0)
    total_sum = sum(struct.unpack_from(f"<{dwords}I", image))
    struct.pack_into("<I", image, area + 16, (LDLINUX_MAGIC - total_sum) & 0xFFFFFFFF)
    return bytes(image), bytes(boot)


def sect1_offsets(ldlinux_sys: bytes) -> tuple[int, int]:
    """Where in the boot sector the first sector's number goes (both halves)."""
    area = _patch_area(ldlinux_sys)
    ext_offset = _PATCH_AREA.unpack_from(ldlinux_sys, area)[7]
    fields = _EXT_PATCH_AREA.unpack_from(ldlinux_sys, ext_offset)
    return fields[7], fields[8]


def _run(cmd: list[str], cwd: str) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, timeout=TIMEOUT,
                              env=dict(os.environ, MTOOLS_SKIP_CHECK="1"))
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SyslinuxError(f"{cmd[0]} failed: {e}") from None
    if proc.returncode != 0:
        raise SyslinuxError(f"{' '.join(cmd)} exited {proc.returncode}: "
                            f"{proc.stderr.decode(errors='replace').strip()[-500:]}")


def installer_files(blank_floppy: bytes) -> SyslinuxFiles:
    """Run `syslinux --install` on `blank_floppy` (an empty FAT image) in a scratch
    directory and take the boot sector, ldlinux.sys and ldlinux.c32 it writes."""
    syslinux = shutil.which("syslinux", path="/usr/bin:/bin:/usr/sbin:" + os.environ.get("PATH", ""))
    mcopy = shutil.which("mcopy", path="/usr/bin:/bin:" + os.environ.get("PATH", ""))
    if syslinux is None or mcopy is None:
        raise SyslinuxError("boot=syslinux needs the SYSLINUX installer and mtools "
                            "(Debian: apt-get install syslinux syslinux-common mtools)")
    with tempfile.TemporaryDirectory(prefix="nbdformats-syslinux-") as scratch:
        image = os.path.join(scratch, "floppy.img")
        with open(image, "wb") as f:
            f.write(blank_floppy)
        _run([syslinux, "--install", image], scratch)
        for name in ("ldlinux.sys", "ldlinux.c32"):
            _run([mcopy, "-n", "-i", image, f"::{name}", os.path.join(scratch, name)], scratch)
        with open(image, "rb") as f:
            boot_sector = f.read(SECTOR)
        with open(os.path.join(scratch, "ldlinux.sys"), "rb") as f:
            ldlinux_sys = f.read()
        with open(os.path.join(scratch, "ldlinux.c32"), "rb") as f:
            ldlinux_c32 = f.read()
    low, high = sect1_offsets(ldlinux_sys)
    if min(low, high) < KEEP_BPB[1] or max(low, high) + 4 > 510:
        raise SyslinuxError("unexpected SYSLINUX boot sector (sector pointer inside the BPB)")
    return SyslinuxFiles(boot_sector, ldlinux_sys, ldlinux_c32)


def mbr_code() -> bytes:
    """SYSLINUX's MBR code (440 bytes): boots the active partition."""
    for path in MBR_CODE_PATHS:
        try:
            with open(path, "rb") as f:
                code = f.read()
        except OSError:
            continue
        if len(code) <= 440:
            return code
    raise SyslinuxError("a bootable partitioned disk needs SYSLINUX's mbr.bin "
                        f"({' or '.join(MBR_CODE_PATHS)}; Debian: apt-get install syslinux-common), "
                        "or use partition=none")

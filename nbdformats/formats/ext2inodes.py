"""ext2/3/4 inodes that hold nothing but their metadata, written straight into an image.

An empty regular file, a fifo, a socket or a device node has no blocks: its inode is all there
is.  linuxdisk writes the inodes of a large directory's such entries itself (mke2fs -d costs time
growing with the square of the number of hard links it meets, and staging them takes one each):
its bytes in the inode table, a bit in the group's inode bitmap, the free counts, and with
metadata_csum (ext4's default) the checksums of the inode, the bitmap, the group descriptor and
the superblock, a lazily initialized group's bitmap and unused-inode count.  Not with inline_data,
nor with uninit_bg's CRC-16 descriptor checksums (Geometry.parse says None).  The inode is the one
mke2fs -d writes (e2fsprogs 1.47 misc/create_inode.c, lib/ext2fs/alloc.c ext2fs_write_new_inode):
mode, owner, times in seconds from the source, one link, an empty extent tree for a regular file
where extents are on, and for inodes over 128 bytes i_extra_isize 32 and i_crtime the build time.
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .crc32c import crc32c_le, crc32c_rows
from .ext2dir import INCOMPAT_INLINE_DATA, RO_COMPAT_METADATA_CSUM, checksum_seed

INCOMPAT_EXTENTS = 0x0040
INCOMPAT_64BIT = 0x0080
RO_COMPAT_GDT_CSUM = 0x0010
GOOD_OLD_INODE_SIZE = 128
EXTRA_ISIZE = 32  # sizeof(struct ext2_inode_large) - 128 in e2fsprogs 1.47
EXTENTS_FL = 0x80000
BG_INODE_UNINIT = 0x0001
FILE_TYPES = {stat.S_IFREG: 1, stat.S_IFCHR: 3, stat.S_IFBLK: 4, stat.S_IFIFO: 5, stat.S_IFSOCK: 6}


@dataclass(frozen=True)
class Geometry:
    block_size: int
    inodes_per_group: int
    inode_size: int
    first_ino: int
    groups: int
    gdt_offset: int  # byte offset of the primary group descriptor table
    desc_size: int  # 32, or 64 with the 64bit feature
    extents: bool  # regular files get an (empty) extent tree header, as mke2fs gives them
    csum_seed: int | None  # with metadata_csum: inodes, bitmaps, descriptors, superblock checksummed

    @classmethod
    def parse(cls, sb: bytes) -> "Geometry | None":
        """From the superblock; None where these inodes cannot be written this way (inline data,
        or uninit_bg's CRC-16 group descriptor checksums)."""
        blocks_count, = struct.unpack_from("<I", sb, 0x04)
        first_data_block, log_block_size, _, blocks_per_group, _, inodes_per_group = \
            struct.unpack_from("<IIIIII", sb, 0x14)
        rev_level, = struct.unpack_from("<I", sb, 0x4C)
        first_ino, inode_size = struct.unpack_from("<IH", sb, 0x54) if rev_level else (11, 128)
        incompat, ro_compat = struct.unpack_from("<II", sb, 0x60)
        metadata_csum = bool(ro_compat & RO_COMPAT_METADATA_CSUM)
        if incompat & INCOMPAT_INLINE_DATA or ro_compat & RO_COMPAT_GDT_CSUM and not metadata_csum:
            return None
        if inode_size < GOOD_OLD_INODE_SIZE or GOOD_OLD_INODE_SIZE < inode_size < GOOD_OLD_INODE_SIZE + EXTRA_ISIZE:
            return None
        desc_size = 32
        if incompat & INCOMPAT_64BIT:
            desc_size, = struct.unpack_from("<H", sb, 0xFE)
            blocks_count |= struct.unpack_from("<I", sb, 0x150)[0] << 32
            if desc_size < 64:
                return None
        seed = checksum_seed(sb) if metadata_csum else None
        block_size = 1024 << log_block_size
        groups = -(-(blocks_count - first_data_block) // blocks_per_group)
        return cls(block_size, inodes_per_group, inode_size, first_ino, groups,
                   (first_data_block + 1) * block_size, desc_size, bool(incompat & INCOMPAT_EXTENTS), seed)


def inode_bytes(st: os.stat_result, size: int, now: int, extents: bool = False) -> bytes:
    """The inode mke2fs -d writes for a metadata-only entry with this lstat (checksum fields 0)."""
    kind = stat.S_IFMT(st.st_mode)
    block = [0] * 15
    flags = 0
    if kind in (stat.S_IFCHR, stat.S_IFBLK):
        major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
        if major < 256 and minor < 256:
            block[0] = major * 256 + minor
        else:
            block[1] = (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)
    elif kind == stat.S_IFREG and extents:  # an extent header: magic 0xF30A, 0 entries, room for 4, depth 0
        flags = EXTENTS_FL
        block[0], block[1] = 0xF30A, 4
    uid, gid = st.st_uid, st.st_gid
    def seconds(ns: int) -> int:  # time_t's low 32 bits, as mke2fs stores it
        return (ns // 1_000_000_000) & 0xFFFFFFFF
    # mode, uid, size, atime, ctime, mtime, dtime, gid, links, blocks, flags, osd1, i_block[15],
    # generation, file_acl, size_high, faddr, osd2 (blocks_hi, file_acl_high, uid_high, gid_high, checksum_lo)
    base = struct.pack("<HHIIIIIHHIII15IIIII4xHHH2x",
                       st.st_mode & 0xFFFF, uid & 0xFFFF, 0, seconds(st.st_atime_ns), seconds(st.st_ctime_ns),
                       seconds(st.st_mtime_ns), 0, gid & 0xFFFF, 1, 0, flags, 0, *block, 0, 0, 0, 0,
                       uid >> 16, gid >> 16, 0)
    assert len(base) == GOOD_OLD_INODE_SIZE
    if size == GOOD_OLD_INODE_SIZE:
        return base
    extra = struct.pack("<HHIIIII", EXTRA_ISIZE, 0, 0, 0, 0, now & 0xFFFFFFFF, 0)
    return base + extra + bytes(size - len(base) - len(extra))


def _checksum_inodes(g: "Geometry", numbers: list[int], inodes: bytearray) -> None:
    """ext2fs_inode_csum for each inode (all with generation 0), at once: lo half at 0x7C, hi at 0x82."""
    assert g.csum_seed is not None
    rows = np.zeros((len(numbers), 8 + g.inode_size), dtype=np.uint8)
    rows[:, :4] = np.array(numbers, dtype="<u4").view(np.uint8).reshape(-1, 4)
    rows[:, 8:] = np.frombuffer(bytes(inodes), dtype=np.uint8).reshape(-1, g.inode_size)
    crcs = crc32c_rows(g.csum_seed, rows).tolist()
    for k, crc in enumerate(crcs):
        struct.pack_into("<H", inodes, k * g.inode_size + 0x7C, crc & 0xFFFF)
        if g.inode_size > GOOD_OLD_INODE_SIZE:
            struct.pack_into("<H", inodes, k * g.inode_size + 0x82, crc >> 16)


def allocate(geometry: Geometry, pread: Callable[[int, int], bytes], pwrite: Callable[[bytes, int], None],
             entries: list[os.stat_result], near: int, now: int) -> list[int]:
    """Write an inode for each of `entries` into free inodes, starting in the group of inode
    `near` (as ext2fs_new_inode does), marking them in the bitmaps and the free counts of their
    groups and the superblock (with metadata_csum: the checksums of all these, and the groups'
    lazily initialized inode bitmaps and unused inode counts).  Returns their numbers, in order."""
    g = geometry
    size = g.desc_size
    gdt = bytearray(pread(g.groups * size, g.gdt_offset))
    numbers: list[int] = []
    first_group = (near - 1) // g.inodes_per_group if near else 0
    for k in range(g.groups):
        if len(numbers) == len(entries):
            break
        group = (first_group + k) % g.groups
        at = group * size
        bitmap_block, table_block, _, free_inodes, _, bg_flags = struct.unpack_from("<4xIIHHHH", gdt, at)
        unused, = struct.unpack_from("<H", gdt, at + 0x1C)
        if size >= 64:
            bitmap_block |= struct.unpack_from("<I", gdt, at + 0x24)[0] << 32
            table_block |= struct.unpack_from("<I", gdt, at + 0x28)[0] << 32
            free_inodes |= struct.unpack_from("<H", gdt, at + 0x2E)[0] << 16
            unused |= struct.unpack_from("<H", gdt, at + 0x32)[0] << 16
        if not free_inodes:
            continue
        if bg_flags & BG_INODE_UNINIT and g.csum_seed is not None:  # a bitmap never written: all free
            bitmap = bytearray(g.inodes_per_group // 8) + b"\xff" * (g.block_size - g.inodes_per_group // 8)
        else:
            bitmap = bytearray(pread(g.inodes_per_group // 8, bitmap_block * g.block_size))
        base = group * g.inodes_per_group + 1
        taken: list[int] = []  # indexes in the group
        for index in range(g.inodes_per_group):
            if len(numbers) + len(taken) == len(entries):
                break
            if base + index < g.first_ino or bitmap[index >> 3] & (1 << (index & 7)):
                continue
            taken.append(index)
        if not taken:
            continue
        for index in taken:
            bitmap[index >> 3] |= 1 << (index & 7)
        first_entry = len(numbers)
        inodes = bytearray(b"".join(inode_bytes(entries[first_entry + n], g.inode_size, now, g.extents)
                                    for n in range(len(taken))))
        if g.csum_seed is not None:
            _checksum_inodes(g, [base + index for index in taken], inodes)
        # Contiguous runs of inodes are written at once.
        run_start, run_length = 0, 1
        for n in range(1, len(taken) + 1):
            if n < len(taken) and taken[n] == taken[run_start] + run_length:
                run_length += 1
                continue
            pwrite(bytes(inodes[run_start * g.inode_size:(run_start + run_length) * g.inode_size]),
                   table_block * g.block_size + taken[run_start] * g.inode_size)
            run_start, run_length = n, 1
        pwrite(bytes(bitmap), bitmap_block * g.block_size)
        free_inodes -= len(taken)
        unused = min(unused, g.inodes_per_group - 1 - taken[-1])
        struct.pack_into("<H", gdt, at + 0x0E, free_inodes & 0xFFFF)
        if g.csum_seed is not None:
            struct.pack_into("<H", gdt, at + 0x12, bg_flags & ~BG_INODE_UNINIT)
            struct.pack_into("<H", gdt, at + 0x1C, unused & 0xFFFF)
            csum = crc32c_le(g.csum_seed, bytes(bitmap[:g.inodes_per_group // 8]))
            struct.pack_into("<H", gdt, at + 0x1A, csum & 0xFFFF)
            if size >= 0x3C:
                struct.pack_into("<H", gdt, at + 0x3A, csum >> 16)
        if size >= 64:
            struct.pack_into("<H", gdt, at + 0x2E, free_inodes >> 16)
            if g.csum_seed is not None:
                struct.pack_into("<H", gdt, at + 0x32, unused >> 16)
        if g.csum_seed is not None:  # the descriptor's own: over it with bg_checksum 0, seeded with the group
            struct.pack_into("<H", gdt, at + 0x1E, 0)
            crc = crc32c_le(crc32c_le(g.csum_seed, struct.pack("<I", group)), bytes(gdt[at:at + size]))
            struct.pack_into("<H", gdt, at + 0x1E, crc & 0xFFFF)
        numbers += [base + index for index in taken]
    if len(numbers) < len(entries):
        raise ValueError(f"no room for {len(entries)} more inodes")
    pwrite(bytes(gdt), g.gdt_offset)
    superblock = bytearray(pread(1024, 1024))
    sb_free, = struct.unpack_from("<I", superblock, 0x10)
    struct.pack_into("<I", superblock, 0x10, sb_free - len(entries))
    if g.csum_seed is not None:
        struct.pack_into("<I", superblock, 0x3FC, crc32c_le(0xFFFFFFFF, bytes(superblock[:0x3FC])))
    pwrite(bytes(superblock), 1024)
    return numbers

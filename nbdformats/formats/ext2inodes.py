"""ext2/ext3 inodes that hold nothing but their metadata, written straight into an image.

An empty regular file, a fifo, a socket or a device node has no blocks: its inode is all there
is.  linuxdisk writes the inodes of a large directory's such entries itself (mke2fs -d costs time
growing with the square of the number of hard links it meets, and staging them takes one each);
only on filesystems without group descriptor or metadata checksums, with 32-byte group
descriptors (ext2 and ext3 as e2fsprogs makes them by default), where an inode is its bytes in
the inode table, a bit in the group's inode bitmap and the free counts.  The inode is the one
mke2fs -d writes (e2fsprogs 1.47 misc/create_inode.c, lib/ext2fs/alloc.c ext2fs_write_new_inode):
mode, owner, times in seconds from the source, one link, and for 256-byte inodes
i_extra_isize 32 and i_crtime the build time.
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass

INCOMPAT_64BIT = 0x0080
RO_COMPAT_GDT_CSUM = 0x0010
RO_COMPAT_METADATA_CSUM = 0x0400
INCOMPAT_INLINE_DATA = 0x8000
GOOD_OLD_INODE_SIZE = 128
EXTRA_ISIZE = 32  # sizeof(struct ext2_inode_large) - 128 in e2fsprogs 1.47
FILE_TYPES = {stat.S_IFREG: 1, stat.S_IFCHR: 3, stat.S_IFBLK: 4, stat.S_IFIFO: 5, stat.S_IFSOCK: 6}


@dataclass(frozen=True)
class Geometry:
    block_size: int
    inodes_per_group: int
    inode_size: int
    first_ino: int
    groups: int
    gdt_offset: int  # byte offset of the primary group descriptor table

    @classmethod
    def parse(cls, sb: bytes) -> "Geometry | None":
        """From the superblock; None where these inodes cannot be written this way."""
        blocks_count, = struct.unpack_from("<I", sb, 0x04)
        first_data_block, log_block_size, _, blocks_per_group, _, inodes_per_group = \
            struct.unpack_from("<IIIIII", sb, 0x14)
        rev_level, = struct.unpack_from("<I", sb, 0x4C)
        first_ino, inode_size = struct.unpack_from("<IH", sb, 0x54) if rev_level else (11, 128)
        incompat, ro_compat = struct.unpack_from("<II", sb, 0x60)
        if incompat & (INCOMPAT_64BIT | INCOMPAT_INLINE_DATA) or ro_compat & (RO_COMPAT_GDT_CSUM |
                                                                              RO_COMPAT_METADATA_CSUM):
            return None
        if inode_size not in (128, 256) and inode_size < GOOD_OLD_INODE_SIZE + EXTRA_ISIZE:
            return None
        block_size = 1024 << log_block_size
        groups = -(-(blocks_count - first_data_block) // blocks_per_group)
        return cls(block_size, inodes_per_group, inode_size, first_ino, groups,
                   (first_data_block + 1) * block_size)


def inode_bytes(st: os.stat_result, size: int, now: int) -> bytes:
    """The inode mke2fs -d writes for a metadata-only entry with this lstat."""
    kind = stat.S_IFMT(st.st_mode)
    block = [0] * 15
    if kind in (stat.S_IFCHR, stat.S_IFBLK):
        major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
        if major < 256 and minor < 256:
            block[0] = major * 256 + minor
        else:
            block[1] = (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)
    uid, gid = st.st_uid, st.st_gid
    def seconds(ns: int) -> int:  # time_t's low 32 bits, as mke2fs stores it
        return (ns // 1_000_000_000) & 0xFFFFFFFF
    # mode, uid, size, atime, ctime, mtime, dtime, gid, links, blocks, flags, osd1, i_block[15],
    # generation, file_acl, size_high, faddr, osd2 (blocks_hi, file_acl_high, uid_high, gid_high, checksum_lo)
    base = struct.pack("<HHIIIIIHHIII15IIIII4xHHH2x",
                       st.st_mode & 0xFFFF, uid & 0xFFFF, 0, seconds(st.st_atime_ns), seconds(st.st_ctime_ns),
                       seconds(st.st_mtime_ns), 0, gid & 0xFFFF, 1, 0, 0, 0, *block, 0, 0, 0, 0,
                       uid >> 16, gid >> 16, 0)
    assert len(base) == GOOD_OLD_INODE_SIZE
    if size == GOOD_OLD_INODE_SIZE:
        return base
    extra = struct.pack("<HHIIIII", EXTRA_ISIZE, 0, 0, 0, 0, now & 0xFFFFFFFF, 0)
    return base + extra + bytes(size - len(base) - len(extra))


def allocate(geometry: Geometry, pread: Callable[[int, int], bytes], pwrite: Callable[[bytes, int], None],
             entries: list[os.stat_result], near: int, now: int) -> list[int]:
    """Write an inode for each of `entries` into free inodes, starting in the group of inode
    `near` (as ext2fs_new_inode does), marking them in the bitmaps and the free counts of their
    groups and the superblock.  Returns their numbers, in order."""
    g = geometry
    gdt = bytearray(pread(g.groups * 32, g.gdt_offset))
    numbers: list[int] = []
    first_group = (near - 1) // g.inodes_per_group if near else 0
    for k in range(g.groups):
        if len(numbers) == len(entries):
            break
        group = (first_group + k) % g.groups
        bitmap_block, table_block, _, free_inodes = struct.unpack_from("<4xIIHH", gdt, group * 32)
        if not free_inodes:
            continue
        bitmap = bytearray(pread(g.inodes_per_group // 8, bitmap_block * g.block_size))
        base = group * g.inodes_per_group + 1
        table_start = table_block * g.block_size
        taken: list[tuple[int, int]] = []  # (index in group, entry)
        for index in range(g.inodes_per_group):
            if len(numbers) + len(taken) == len(entries):
                break
            if base + index < g.first_ino or bitmap[index >> 3] & (1 << (index & 7)):
                continue
            taken.append((index, len(numbers) + len(taken)))
        if not taken:
            continue
        for index, _ in taken:
            bitmap[index >> 3] |= 1 << (index & 7)
        # Contiguous runs of inodes are written at once.
        run_start, run = taken[0][0], bytearray()
        for position, (index, entry) in enumerate(taken):
            if index != run_start + len(run) // g.inode_size:
                pwrite(bytes(run), table_start + run_start * g.inode_size)
                run_start, run = index, bytearray()
            run += inode_bytes(entries[entry], g.inode_size, now)
        pwrite(bytes(run), table_start + run_start * g.inode_size)
        pwrite(bytes(bitmap), bitmap_block * g.block_size)
        struct.pack_into("<H", gdt, group * 32 + 14, free_inodes - len(taken))
        numbers += [base + index for index, _ in taken]
    if len(numbers) < len(entries):
        raise ValueError(f"no room for {len(entries)} more inodes")
    pwrite(bytes(gdt), g.gdt_offset)
    sb_free, = struct.unpack("<I", pread(4, 1024 + 0x10))
    pwrite(struct.pack("<I", sb_free - len(entries)), 1024 + 0x10)
    return numbers

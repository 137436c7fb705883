"""Reading a VDI: static (fixed) and dynamic (normal) images (sans-IO, over `read(offset, length)`).

After the pre-header and header, the block map gives each block of the disk its index among the
image's blocks, stored from offData on: block i's data is at "offData + index * (cbBlockExtra +
cbBlock) + cbBlockExtra" (VirtualBox's VDI.cpp); qemu ignores cbBlockExtra, so an image where it
is not 0 (VirtualBox writes 0) is refused rather than read one way or the other.  Free and zero
blocks read as zeroes (a
dynamic image has no parent: a differencing image's parent is named only by UUID, in
VirtualBox's own configuration).
"""

from __future__ import annotations

import uuid
from typing import Iterator, Sequence

import numpy as np

from ..blockmap import Kind, Run, block_spans, read_exact
from ..errors import FormatError, check_size
from ..readers import Reader
from .structs import (BLOCK_ENTRY, BLOCK_FREE, BLOCK_ZERO, HEADER, HEADER_1_0_SIZE, PREHEADER, SIGNATURE,
                      TYPE_DIFF, TYPE_FIXED, TYPE_NORMAL, VERSION_1_1)

MAX_BLOCK_SIZE = 256 << 20  # VirtualBox and qemu write 1 MiB blocks; refuse absurd ones


class VdiError(FormatError):
    """A corrupt, truncated or unsupported VDI: the message names the field."""


class VdiImage:
    """A checked VDI and its block map, shared by all connections."""

    def __init__(self, read: Reader, file_size: int) -> None:
        head = read_exact(read, 0, PREHEADER.size + HEADER.size, "the VDI header", VdiError)
        _info, signature, version = PREHEADER.unpack_from(head)
        if signature != SIGNATURE:
            raise VdiError(f"not a VDI: the signature is {signature:#x}, not {SIGNATURE:#x}")
        if version != VERSION_1_1:
            raise VdiError(f"unsupported VDI version {version >> 16}.{version & 0xFFFF} (1.1 is supported)")
        (header_size, image_type, _flags, _comment, blocks_offset, data_offset, _geometry, _dummy, disk_size,
         block_size, block_extra, blocks, _allocated, create, _modify, linkage, parent, _lchs) = \
            HEADER.unpack_from(head, PREHEADER.size)
        if header_size < HEADER_1_0_SIZE:
            raise VdiError(f"the header size cbHeader is {header_size}, less than a version 1.1 header's")
        if image_type == TYPE_DIFF or linkage != bytes(16) or parent != bytes(16):
            raise VdiError("a differencing VDI: its parent is named only by UUID, in VirtualBox's own "
                           "configuration, so it cannot be found (convert the chain with VBoxManage clonemedium)")
        if image_type not in (TYPE_NORMAL, TYPE_FIXED):
            raise VdiError(f"unsupported image type u32Type={image_type} (1 dynamic and 2 fixed are supported)")
        if block_size < 512 or block_size & (block_size - 1) or block_size > MAX_BLOCK_SIZE:
            raise VdiError(f"the block size cbBlock is {block_size}, not a power of two from 512 to {MAX_BLOCK_SIZE}")
        if block_extra:  # VirtualBox skips it before each block's data, qemu does not: they disagree
            raise VdiError(f"the block extra size cbBlockExtra is {block_extra}, not 0: unsupported (VirtualBox "
                           "writes 0; readers disagree on where the data of such blocks starts)")
        check_size(disk_size, "the disk size cbDisk", blocks * block_size, VdiError,
                   f"what its {blocks} blocks of {block_size} bytes hold")
        check_size(blocks_offset + blocks * BLOCK_ENTRY, f"the end of the block map (offBlocks {blocks_offset}, "
                   f"{blocks} blocks)", file_size, VdiError, f"the file's size, {file_size}")
        check_size(data_offset, "the data offset offData", file_size, VdiError, f"the file's size, {file_size}")
        self.size = disk_size
        self.identity = str(uuid.UUID(bytes_le=create))
        self.parent = None
        self.block_size = block_size
        self.data_offset, self.file_size = data_offset, file_size
        self.blocks = np.frombuffer(read_exact(read, blocks_offset, blocks * BLOCK_ENTRY, "the block map",
                                               VdiError), dtype="<u4")

    def runs(self, offset: int, length: int, files: Sequence[Reader]) -> Iterator[Run]:
        end = min(offset + length, self.size)
        for block, within, position, run_end in block_spans(offset, end, self.block_size):
            index = int(self.blocks[block])
            if index == BLOCK_FREE:
                yield Run(position, run_end - position, Kind.PARENT)
            elif index == BLOCK_ZERO:
                yield Run(position, run_end - position, Kind.ZERO)
            else:
                start = self.data_offset + index * self.block_size
                check_size(start + self.block_size, f"the end of block {block} (block map entry {index})",
                           self.file_size, VdiError, f"the file's size, {self.file_size}")
                yield Run(position, run_end - position, Kind.DATA, start + within)

    def decompress(self, run: Run, files: Sequence[Reader]) -> bytes:
        raise VdiError("VDI has no compressed blocks")

"""split plugin: several files concatenated into one disk (nbdkit-split-plugin compatible)."""

from __future__ import annotations

import bisect
import errno
import os
from dataclasses import dataclass
from typing import Iterator

from ..api.chain import (EXTENT_DATA, EXTENT_HOLE, EXTENT_ZERO, FLAG_REQ_ONE, NATIVE, Extents, Holes, Plugin, PluginHandle,
                         pread_sparse_by_extents)
from ..api.params import Param, Path
from ._sparse import data_and_holes, seeks_holes


@dataclass
class Piece:
    fd: int
    offset: int  # where the file starts on the disk
    size: int
    seeks_holes: bool  # the filesystem answers SEEK_DATA/SEEK_HOLE


class SplitPlugin(Plugin):
    """Files concatenated into one disk, in the order given."""

    name = "split"
    file = Param(Path("file"), required=True, repeat=True, magic=True,
                 help="A file to concatenate (repeat for each; bare arguments work too)")

    class Handle(PluginHandle):
        def __init__(self, plugin: "SplitPlugin", readonly: bool, export_name: str) -> None:
            mode = os.O_RDONLY if readonly else os.O_RDWR
            self.pieces: list[Piece] = []
            try:
                offset = 0
                for path in plugin.file:
                    fd = os.open(path, mode | os.O_CLOEXEC | os.O_NOCTTY)
                    size = os.fstat(fd).st_size
                    self.pieces.append(Piece(fd, offset, size, seeks_holes(fd)))
                    offset += size
            except BaseException:
                self.close()
                raise
            self.size = offset
            self.starts = [piece.offset for piece in self.pieces]

        def get_size(self) -> int:
            return self.size

        def can_cache(self) -> int:
            return NATIVE

        def _pieces(self, count: int, offset: int) -> Iterator[tuple[Piece, int, int]]:
            """(piece, offset in its file, length) covering [offset, offset + count)."""
            index = bisect.bisect_right(self.starts, offset) - 1
            end = offset + count
            while offset < end:
                piece = self.pieces[index]
                length = min(end, piece.offset + piece.size) - offset
                if length > 0:
                    yield piece, offset - piece.offset, length
                    offset += length
                index += 1

        def pread(self, buf: memoryview, offset: int, flags: int) -> None:
            done = 0
            for piece, at, length in self._pieces(len(buf), offset):
                view = buf[done:done + length]
                while view:
                    n = os.preadv(piece.fd, [view], at)
                    if n == 0:
                        raise OSError(errno.EIO, "split: unexpected end of file (was a file truncated?)")
                    view, at = view[n:], at + n
                done += length

        def pread_sparse(self, buf: memoryview, offset: int, flags: int) -> Holes:
            return pread_sparse_by_extents(self, buf, offset, flags)  # holes from SEEK_DATA/SEEK_HOLE

        def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
            done = 0
            for piece, at, length in self._pieces(len(buf), offset):
                view = buf[done:done + length]
                while view:
                    n = os.pwritev(piece.fd, [view], at)
                    view, at = view[n:], at + n
                done += length

        def cache(self, count: int, offset: int, flags: int) -> None:
            for piece, at, length in self._pieces(count, offset):
                os.posix_fadvise(piece.fd, at, length, os.POSIX_FADV_WILLNEED)

        def extents(self, count: int, offset: int, flags: int, extents: Extents) -> None:
            for piece, at, length in self._pieces(count, offset):
                runs = data_and_holes(piece.fd, at, at + length) if piece.seeks_holes else [(at, length, True)]
                for start, run, is_data in runs:
                    extents.add(piece.offset + start, run, EXTENT_DATA if is_data else EXTENT_HOLE | EXTENT_ZERO)
                if flags & FLAG_REQ_ONE:
                    return  # one file's answer is enough, as nbdkit stops at file boundaries

        def close(self) -> None:
            for piece in self.pieces:
                os.close(piece.fd)
            self.pieces = []


PLUGIN = SplitPlugin

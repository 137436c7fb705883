"""What the floppy, linuxdisk, split and partitioning plugins share: the data and holes of a sparse host file."""

from __future__ import annotations

import errno
import os
from typing import Iterator


def seeks_holes(fd: int) -> bool:
    """Whether the file's filesystem answers SEEK_DATA/SEEK_HOLE (so data_and_holes works)."""
    try:
        os.lseek(fd, 0, os.SEEK_DATA)
    except OSError as e:
        return e.errno == errno.ENXIO  # ENXIO: the file is one hole; other errors: no hole support
    return True


def data_and_holes(fd: int, start: int, end: int) -> Iterator[tuple[int, int, bool]]:
    """(offset, length, is data) ranges covering [start, end) of the open file `fd`, from
    SEEK_DATA/SEEK_HOLE; lseek's other errors (a filesystem without them) are raised."""
    position = start
    while position < end:
        try:
            data = min(os.lseek(fd, position, os.SEEK_DATA), end)
        except OSError as e:
            if e.errno != errno.ENXIO:  # ENXIO: only a hole is left
                raise
            data = end
        if data > position:
            yield position, data - position, False
            position = data
            continue
        hole = min(os.lseek(fd, position, os.SEEK_HOLE), end)
        yield position, hole - position, True
        position = hole

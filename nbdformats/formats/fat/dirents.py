"""FAT directory entries and timestamps, sans-IO (FAT spec 1.03, sections 6 and 7)."""

from __future__ import annotations

import struct
import time
from functools import lru_cache

ENTRY_SIZE = 32
ATTR_READ_ONLY = 0x01
ATTR_HIDDEN = 0x02
ATTR_SYSTEM = 0x04
ATTR_VOLUME_ID = 0x08
ATTR_DIRECTORY = 0x10
ATTR_ARCHIVE = 0x20

# DIR_Name, DIR_Attr, DIR_NTRes, DIR_CrtTimeTenth, DIR_CrtTime, DIR_CrtDate, DIR_LstAccDate,
# DIR_FstClusHI, DIR_WrtTime, DIR_WrtDate, DIR_FstClusLO, DIR_FileSize.
_ENTRY = struct.Struct("<11sBBBHHHHHHHI")

# FAT dates count years from 1980 in 7 bits: 1980-01-01 00:00:00 to 2107-12-31 23:59:58.
_FIRST = (0 << 9 | 1 << 5 | 1, 0, 0)
_LAST = (127 << 9 | 12 << 5 | 31, 23 << 11 | 59 << 5 | 29, 100)


def fat_timestamp(seconds: float) -> tuple[int, int, int]:
    """(date, time, tenths) of a POSIX time in local time, as FAT stores it.

    Time has 2-second resolution; `tenths` (0-199, creation times only) carries the odd
    second and the hundredths.  Times outside FAT's range are clamped.
    """
    try:
        whole = int(seconds // 1)
    except (OverflowError, ValueError):
        return _FIRST if seconds < 0 else _LAST
    date, clock, tenths, in_range = _fat_date_time(whole)
    return date, clock, tenths + int((seconds - whole) * 100) if in_range else tenths


@lru_cache(maxsize=4096)  # the files of one tree tend to share their seconds
def _fat_date_time(seconds: int) -> tuple[int, int, int, bool]:
    """(date, time, tenths of the odd second, whether in range) of whole seconds."""
    try:
        t = time.localtime(seconds)
    except (OverflowError, OSError, ValueError):
        return (*(_FIRST if seconds < 0 else _LAST), False)
    if t.tm_year < 1980:
        return (*_FIRST, False)
    if t.tm_year > 2107:
        return (*_LAST, False)
    second = min(t.tm_sec, 59)
    return ((t.tm_year - 1980) << 9 | t.tm_mon << 5 | t.tm_mday,
            t.tm_hour << 11 | t.tm_min << 5 | second // 2, second % 2 * 100, True)


class Times:
    """Creation, access and modification times of an entry, converted once."""

    __slots__ = ("created", "accessed", "modified")

    def __init__(self, ctime: float, atime: float, mtime: float) -> None:
        self.created = fat_timestamp(ctime)
        self.accessed = fat_timestamp(atime)[0]
        self.modified = fat_timestamp(mtime)


def short_entry(short_name: bytes, attributes: int, cluster: int, size: int, times: Times) -> bytes:
    created_date, created_time, tenths = times.created
    modified_date, modified_time, _ = times.modified
    return _ENTRY.pack(short_name, attributes, 0, tenths, created_time, created_date, times.accessed,
                       cluster >> 16, modified_time, modified_date, cluster & 0xFFFF, size)


def file_entry(short_name: bytes, attributes: int, size: int, ctime: float, atime: float, mtime: float,
               cluster: int = 0) -> bytes:
    """A short entry from POSIX times: `short_entry` without building a `Times` (this runs
    once per file of a tree)."""
    try:
        whole = int(ctime // 1)
        created_date, created_time, tenths, in_range = _fat_date_time(whole)
        modified_date, modified_time, _, _ = _fat_date_time(int(mtime // 1))
        accessed = _fat_date_time(int(atime // 1))[0]
    except (OverflowError, ValueError):  # infinite or NaN: fat_timestamp clamps
        created_date, created_time, tenths = fat_timestamp(ctime)
        modified_date, modified_time, _ = fat_timestamp(mtime)
        accessed = fat_timestamp(atime)[0]
    else:
        if in_range:
            tenths += int((ctime - whole) * 100)
    return _ENTRY.pack(short_name, attributes, 0, tenths, created_time, created_date, accessed,
                       cluster >> 16, modified_time, modified_date, cluster & 0xFFFF, size)


def dot_entries(own_cluster: int, parent_cluster: int, times: Times) -> bytes:
    """"." and ".." at the start of every directory but the root.

    ".." holds cluster 0 when the parent is the root directory, even on FAT32 where the
    root has a real cluster (spec section 6.7; nbdkit 1.32 gets this wrong).
    """
    return (short_entry(b".          ", ATTR_DIRECTORY, own_cluster, 0, times)
            + short_entry(b"..         ", ATTR_DIRECTORY, parent_cluster, 0, times))


def volume_label_entry(label: bytes, times: Times) -> bytes:
    """The root-directory entry that names the volume (what `mlabel`/Windows show)."""
    return short_entry(label, ATTR_VOLUME_ID, 0, 0, times)

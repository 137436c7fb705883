"""VFAT names, sans-IO: host names to FAT long names, 8.3 short names, long-name slots.

FAT keeps two names per file: an 8.3 "short" name (OEM characters, upper case) and, when
that is not the real name, a VFAT long name of up to 255 UTF-16 units stored in extra
32-byte directory slots just before the short entry (Microsoft "FAT: General Overview of
On-Disk Format" 1.03, section 7, and its basis-name generation algorithm).
"""

from __future__ import annotations

import re
import struct
from functools import lru_cache

from . import FatError

MAX_LONG_NAME = 255  # UTF-16 units
LONG_NAME_UNITS_PER_SLOT = 13
ATTR_LONG_NAME = 0x0F
LAST_LONG_ENTRY = 0x40
# LDIR_Ord, LDIR_Name1 (5 units), LDIR_Attr, LDIR_Type (0), LDIR_Chksum, LDIR_Name2 (6 units),
# LDIR_FstClusLO (0), LDIR_Name3 (2 units).
_LONG_ENTRY = struct.Struct("<B10sBxB12s2x4s")

# Characters Windows refuses in any file name.  Windows' own tools for foreign file systems
# (WSL, Cygwin, the SMB "catia" mapping) store them as U+F000 + the character, so a name
# keeps its length and maps back one to one.
_FORBIDDEN_IN_LONG_NAMES = '"*/:<>?\\|' + "".join(chr(c) for c in range(32))
_FORBIDDEN_RE = re.compile("[" + re.escape(_FORBIDDEN_IN_LONG_NAMES) + "]")
_PRIVATE_USE_BASE = 0xF000

# Valid in a short name besides A-Z and 0-9 ("FAT" spec 1.03, section 6.1, DIR_Name).
# Everything else in a long name ("+,;=[]", non-ASCII) becomes "_" in the basis name.
_SHORT_NAME_SPECIALS = "$%'-_@~`!(){}^#&"
_SHORT_CHAR = "[A-Z0-9" + re.escape(_SHORT_NAME_SPECIALS) + "]"
_NOT_SHORT_RE = re.compile("[^A-Z0-9. " + re.escape(_SHORT_NAME_SPECIALS) + "]")
_EXACT_SHORT_RE = re.compile(f"({_SHORT_CHAR}{{1,8}})(?:\\.({_SHORT_CHAR}{{1,3}}))?")


def decode_host_name(name: str) -> str:
    """The Unicode name of a host file whose name came from os.fsdecode().

    Names that are not UTF-8 (surrogate-escaped by Python) are read as Latin-1, byte by
    byte, rather than failing: every byte stays a distinct character.
    """
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("latin-1")


def _private_use(match: re.Match) -> str:
    return chr(_PRIVATE_USE_BASE + ord(match.group()))


def windows_name(name: str) -> str:
    """Map characters FAT long names cannot hold as Windows does (U+F000 + character).

    Trailing dots and spaces, which Win32 silently strips, are mapped the same way.
    """
    if not _FORBIDDEN_RE.search(name) and not name.endswith((".", " ")):
        return name
    mapped = _FORBIDDEN_RE.sub(_private_use, name)
    kept = mapped.rstrip(". ")
    return kept + "".join(chr(_PRIVATE_USE_BASE + ord(c)) for c in mapped[len(kept):])


def kept_as_they_are(joined: str) -> bool:
    """Whether names joined by "/" (which no host name holds) are all plain ASCII that
    decode_host_name and windows_name keep as they are: a whole directory checked at once
    (false may be said of names that are kept; they are then looked at one by one)."""
    if not (joined.isascii() and joined.isprintable()):  # control characters are not printable
        return False
    for c in '"*:<>?\\|':  # the printable ASCII characters of _FORBIDDEN_IN_LONG_NAMES but "/"
        if c in joined:
            return False
    return not ("./" in joined or " /" in joined or joined.endswith((".", " ")))


def fold(name: str) -> str:
    """The case-insensitive key FAT compares names by (upper case, character by character)."""
    if name.isascii():
        return name.upper()
    return "".join(u if len(u := c.upper()) == 1 else c for c in name)


def exact_short_name(name: str) -> bytes | None:
    """The 11-byte short name if `name` is already a valid upper-case 8.3 name, else None."""
    match = _EXACT_SHORT_RE.fullmatch(name)
    if match is None:
        return None
    return (match.group(1).ljust(8) + (match.group(2) or "").ljust(3)).encode("ascii")


def basis_name(name: str) -> tuple[str, str, bool]:
    """The spec's basis name: (primary part <= 8 chars, extension <= 3 chars, lossy).

    `lossy` is true when characters were replaced or dropped, so the short name alone
    does not give the long name back (a numeric tail is then required).
    """
    text, replaced = _NOT_SHORT_RE.subn("_", name.upper())
    lossy = replaced > 0
    if " " in text:  # spaces are stripped
        text, lossy = text.replace(" ", ""), True
    stripped = text.lstrip(".")  # so are leading periods
    if len(stripped) != len(text):
        lossy = True
    last_dot = stripped.rfind(".")
    primary_source = stripped if last_dot < 0 else stripped[:last_dot]
    primary = primary_source.split(".", 1)[0]
    if "." in primary_source or len(primary) > 8:
        lossy = True
    primary = primary[:8]
    ext_source = "" if last_dot < 0 else stripped[last_dot + 1:]
    if len(ext_source) > 3:
        lossy = True
    ext = ext_source[:3]
    if not primary:
        primary, lossy = "_", True
    return primary, ext, lossy


_ROTATE_RIGHT = bytes(((total & 1) << 7) | (total >> 1) for total in range(256))


@lru_cache(maxsize=1 << 16)  # directories of a tree tend to repeat short names (README~1TXT ...)
def short_name_checksum(short_name: bytes) -> int:
    """ChkSum() of the spec: the rotate-right-and-add of the 11 short-name bytes."""
    total = 0
    rotate = _ROTATE_RIGHT
    for byte in short_name:
        total = (rotate[total] + byte) & 0xFF
    return total


class ShortNameAllocator:
    """Unique short names within one directory.

    Call `reserve` for every name that is already exact 8.3 first, then `allocate` for
    the others: a name equal to its basis ignoring case ("readme.txt") gets the plain
    basis when free, every other name the basis with the first free numeric tail ~N.
    """

    def __init__(self) -> None:
        self.used: set[bytes] = set()
        self._next_tail: dict[tuple[str, str], int] = {}

    def reserve(self, short_name: bytes) -> None:
        self.used.add(short_name)

    def allocate(self, long_name: str) -> bytes:
        primary, ext, lossy = basis_name(long_name)
        if not lossy:
            plain = (primary.ljust(8) + ext.ljust(3)).encode("ascii")
            if plain not in self.used:
                self.used.add(plain)
                return plain
        key = (primary, ext)
        number = self._next_tail.get(key, 1)
        while True:
            tail = f"~{number}"
            candidate = (primary[:8 - len(tail)] + tail).ljust(8) + ext.ljust(3)
            number += 1
            short = candidate.encode("ascii")
            if short not in self.used:
                self.used.add(short)
                self._next_tail[key] = number
                return short


def long_name_slots(long_name: str) -> int:
    """How many 32-byte long-name entries `long_name` takes."""
    units = len(long_name.encode("utf-16-le")) // 2
    return -(-units // LONG_NAME_UNITS_PER_SLOT)


def long_name_entries(long_name: str, checksum: int) -> bytes:
    """The long-name entries for `long_name`, in on-disk order (last part first).

    Each holds 13 UTF-16 units (in three pieces of 5, 6 and 2); the name ends with a
    0x0000 unit unless it fills the last entry exactly, and the rest is 0xFFFF.
    """
    encoded = long_name.encode("utf-16-le")
    units = len(encoded) // 2
    if units == 0 or units > MAX_LONG_NAME:
        raise FatError(f"a long name must have 1 to {MAX_LONG_NAME} UTF-16 units: {long_name!r}")
    count = -(-units // LONG_NAME_UNITS_PER_SLOT)
    if units % LONG_NAME_UNITS_PER_SLOT:
        encoded += b"\0\0"
    padded = encoded.ljust(count * 26, b"\xff")
    pack = _LONG_ENTRY.pack
    return b"".join([
        pack(sequence | (LAST_LONG_ENTRY if sequence == count else 0), padded[start:start + 10],
             ATTR_LONG_NAME, checksum, padded[start + 10:start + 22], padded[start + 22:start + 26])
        for sequence, start in zip(range(count, 0, -1), range((count - 1) * 26, -1, -26))])

_LABEL_CHARACTERS = "A-Z, 0-9, space and " + "".join(sorted(_SHORT_NAME_SPECIALS))


def volume_label(text: str) -> bytes | None:
    """The 11-byte volume label for `text` (upper-cased as Windows does), None if empty."""
    if not text:
        return None
    if len(text) > 11:
        raise FatError(f"a FAT volume label holds at most 11 characters, this one has {len(text)}")
    upper = text.upper()
    for c in upper:
        if not (c.isascii() and (c.isalnum() or c in " " + _SHORT_NAME_SPECIALS)):
            raise FatError(f"{c!r} cannot be stored in a FAT volume label (allowed: {_LABEL_CHARACTERS})")
    if upper.startswith(" "):
        raise FatError("a FAT volume label cannot start with a space")
    return upper.ljust(11).encode("ascii")

"""How an image names its parent (a VMDK delta's parentFileNameHint, a VHD's parent locators,
a VHDX's parent locator), in one form for the code that finds the parent."""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass

from .errors import FormatError

WINDOWS_ABSOLUTE = re.compile(r"^([A-Za-z]:|\\\\|/)")


@dataclass(frozen=True)
class ParentLink:
    """`relative`: names relative to the child's directory ("/"-separated), most trusted first;
    `absolute`: the absolute paths the image also records (for messages: they name another
    machine's files); `identities`: what the parent's own identity must be one of;
    `what`: the field the names come from, for messages."""

    relative: tuple[str, ...]
    absolute: tuple[str, ...]
    identities: tuple[str, ...]
    what: str


def split_path(path: str, windows: bool) -> tuple[str | None, str | None]:
    """(relative name, absolute path): one of them, from a path as an image records it.  Windows
    paths ("..\\base.vhd", "C:\\vms\\base.vhd", "\\\\?\\d:\\base.vhdx") use backslashes."""
    if windows:
        if WINDOWS_ABSOLUTE.match(path):
            return None, path
        path = path.replace("\\", "/")
    elif path.startswith("/"):
        return None, path
    path = posixpath.normpath(path)
    if path in ("", "."):
        raise FormatError(f"the parent's name {path!r} names no file")
    return path, None

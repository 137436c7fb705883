"""The tree to serve: host directories scanned and merged (only metadata; no file data).

Several directories merge into one tree: a later directory's file replaces an earlier
one of the same name (FAT compares names without case), directories merge, and a file
meeting a directory is an error.  Symbolic links are followed only when they resolve
inside one of the served directories; devices, sockets and FIFOs are skipped.
"""

from __future__ import annotations

import os
import stat
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from .dirents import ATTR_ARCHIVE
from .names import decode_host_name, fold, windows_name

MAX_FILE_SIZE = 0xFFFFFFFF  # DIR_FileSize is 32 bits


class TreeError(ValueError):
    """The directories cannot be served (a clash, a file too large)."""


@dataclass(eq=False, slots=True)
class FileNode:
    name: str  # the FAT long name
    source: str | bytes  # a host path read at request time, or the contents themselves
    size: int
    ctime: float
    atime: float
    mtime: float
    attributes: int = ATTR_ARCHIVE

    @property
    def origin(self) -> str:
        return self.source if isinstance(self.source, str) else f"(generated {self.name})"


@dataclass(eq=False, slots=True)
class DirNode:
    name: str
    origin: str  # the host directory (the last one merged), for messages
    ctime: float
    atime: float
    mtime: float
    children: dict[str, "FileNode | DirNode"] = field(default_factory=dict)  # by fold(name)


Warn = Callable[[str], None]


def _inside(path: str, roots: list[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


def _kind(mode: int) -> str:
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    return "not a regular file"


def scan(directories: list[str], warn: Warn) -> DirNode:
    """Merge `directories` (later ones win) into one tree of metadata."""
    roots = [os.path.realpath(d) for d in directories]
    last = os.stat(roots[-1])
    root = DirNode("", directories[-1], last.st_ctime, last.st_atime, last.st_mtime)
    # Breadth-first with a FIFO: for any directory, the host directories merged into it
    # are visited in the order of `directories`, so later ones win at every depth.
    pending: deque[tuple[DirNode, str, str, tuple[str, ...]]] = deque(
        (root, real, shown, (real,)) for real, shown in zip(roots, directories))
    while pending:
        node, real_dir, shown_dir, chain = pending.popleft()
        _merge(node, real_dir, shown_dir, chain, roots, warn, pending)
    return root


def _merge(node: DirNode, real_dir: str, shown_dir: str, chain: tuple[str, ...], roots: list[str],
           warn: Warn, pending: deque) -> None:
    try:
        with os.scandir(real_dir) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as e:
        warn(f"skipping directory {shown_dir}: {e.strerror}")
        return
    seen_here: set[str] = set()
    for entry in entries:
        shown = os.path.join(shown_dir, entry.name)
        name = windows_name(decode_host_name(entry.name))
        try:
            if entry.is_symlink():
                target = os.path.realpath(entry.path)
                if not _inside(target, roots):
                    warn(f"skipping symbolic link {shown}: it points outside the served directories")
                    continue
                st = os.stat(target)
                real = target
            else:
                st = entry.stat(follow_symlinks=False)
                real = entry.path
        except OSError as e:
            warn(f"skipping {shown}: {e.strerror}")
            continue
        key = fold(name)
        if key in seen_here:
            warn(f"skipping {shown}: FAT names ignore case and another name in {shown_dir} "
                 f"already gives {name!r}")
            continue
        existing = node.children.get(key)
        if stat.S_ISDIR(st.st_mode):
            if any(c == real or c.startswith(real.rstrip("/") + "/") for c in chain):
                warn(f"skipping symbolic link {shown}: it loops back to {real}")
                continue
            if isinstance(existing, FileNode):
                raise TreeError(f"{existing.origin} is a file but {shown} is a directory: "
                                f"they cannot be merged")
            if not os.access(real, os.R_OK | os.X_OK):
                warn(f"skipping directory {shown}: permission denied")
                continue
            seen_here.add(key)
            if existing is None:
                child = DirNode(name, shown, st.st_ctime, st.st_atime, st.st_mtime)
                node.children[key] = child
            else:
                child = existing
                child.name, child.origin = name, shown
                child.ctime, child.atime, child.mtime = st.st_ctime, st.st_atime, st.st_mtime
            pending.append((child, real, shown, chain + (real,)))
        elif stat.S_ISREG(st.st_mode):
            if isinstance(existing, DirNode):
                raise TreeError(f"{existing.origin} is a directory but {shown} is a file: "
                                f"they cannot be merged")
            if st.st_size > MAX_FILE_SIZE:
                raise TreeError(f"{shown} is {st.st_size} bytes: FAT cannot hold files of 4 GiB "
                                f"or more (at most {MAX_FILE_SIZE} bytes)")
            if not os.access(real, os.R_OK):
                warn(f"skipping {shown}: permission denied")
                continue
            seen_here.add(key)
            node.children[key] = FileNode(name, real, st.st_size, st.st_ctime, st.st_atime,
                                          st.st_mtime)
        else:
            warn(f"skipping {shown}: {_kind(st.st_mode)} cannot be stored in FAT")

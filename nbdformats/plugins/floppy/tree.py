"""The tree to serve: host directories scanned and merged (only metadata; no file data).

Several directories merge into one tree: a later directory's file replaces an earlier
one of the same name (FAT compares names without case), directories merge, and a file
meeting a directory is an error.  Symbolic links are followed only when they resolve
inside one of the served directories; devices, sockets and FIFOs are skipped.
"""

from __future__ import annotations

import errno
import os
import stat
from stat import S_IRUSR, S_ISDIR, S_ISLNK, S_ISREG
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from itertools import repeat
from dataclasses import dataclass, field
from typing import Callable, ClassVar, NamedTuple

from ...api.progress import progress
from ...formats.fat.dirents import ATTR_ARCHIVE, ATTR_DIRECTORY
from ...formats.fat.names import decode_host_name, fold, kept_as_they_are, windows_name

MAX_FILE_SIZE = 0xFFFFFFFF  # DIR_FileSize is 32 bits
# Links to directories can multiply a tree without any loop (two links to one directory in
# each of 30 nested directories make 2**30 copies): bound what links bring in.
MAX_ENTRIES_THROUGH_LINKS = 1_000_000
# Directories listed and lstat'ed ahead of the scan, on a thread, by the C extension.
LOOKAHEAD = 4
READERS = 1  # threads reading them

try:
    from ._hostio import list_and_stat as _list_and_stat  # the GIL released: see _hostio.c
except ImportError:  # not built: os.listdir and os.lstat, on the scan's own thread
    _list_and_stat = None  # type: ignore[assignment]

# A host directory as read: names (sorted), then per name its st_mode, st_uid, st_size,
# st_ctime, st_atime, st_mtime, and the errno of a failed lstat (0 if none).
Listing = tuple[list[str], list[int], list[int], list[int], list[float], list[float], list[float], list[int]]


class TreeError(ValueError):
    """The directories cannot be served (a clash, a file too large)."""


class FileNode(NamedTuple):
    """A file: a tuple, so that a directory of them is made at C speed (see _merge_entries);
    compared and looked up by identity only (id()), never by value."""

    name: str  # the FAT long name
    source: str | bytes  # the host file's name in `directory`, or the contents themselves
    size: int
    ctime: float
    atime: float
    mtime: float
    attributes: int = ATTR_ARCHIVE
    directory: str | None = None  # the real host directory (shared by its files), None if generated

    @property
    def origin(self) -> str:
        if self.directory is None:
            return f"(generated {self.name})"
        return os.path.join(self.directory, self.source)  # type: ignore[arg-type]


# FileNodes from columns without a Python call per file: tuple.__new__(FileNode, fields).
_file_node = partial(tuple.__new__, FileNode)


@dataclass(eq=False, slots=True)
class DirNode:
    name: str
    origin: str  # the host directory (the last one merged), for messages
    ctime: float
    atime: float
    mtime: float
    children: list["FileNode | DirNode"] = field(default_factory=list)
    # As FileNode's, for the columns of directory entries.
    size: ClassVar[int] = 0
    attributes: ClassVar[int] = ATTR_DIRECTORY


Warn = Callable[[str], None]


def add_file(directory: DirNode, node: FileNode) -> FileNode | DirNode | None:
    """Put `node` in `directory`, replacing (and returning) any entry of the same FAT name."""
    key = fold(node.name)
    for i, child in enumerate(directory.children):
        if fold(child.name) == key:
            directory.children[i] = node
            return child
    directory.children.append(node)
    return None


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


def scan(directories: list[str], warn: Warn, on_complete: Callable[[DirNode], None] | None = None) -> DirNode:
    """Merge `directories` (later ones win) into one tree of metadata.

    `on_complete(node)` is called for each directory as soon as every host directory merged
    into it has been read (so its children are final), parents before their children: a
    caller can encode and release directories while the rest of the tree is scanned.
    """
    roots = [os.path.realpath(d) for d in directories]
    last = os.stat(roots[-1])
    root = DirNode("", directories[-1], last.st_ctime, last.st_atime, last.st_mtime)
    # Breadth-first with a FIFO: for any directory, the host directories merged into it
    # are visited in the order of `directories`, so later ones win at every depth.
    pending: deque[tuple[DirNode, str, str, tuple[str, ...], bool]] = deque(
        (root, real, shown, (real,), False) for real, shown in zip(roots, directories))
    through_links = 0
    remaining = {id(root): len(roots)}  # host directories still to merge into each node
    # With the C extension, the next LOOKAHEAD directories of the queue are read on a thread
    # (system calls without the GIL) while this one merges the current one.
    reader = ThreadPoolExecutor(READERS, thread_name_prefix="floppy-scan") if _list_and_stat is not None else None
    ahead: deque[Future[Listing]] = deque()  # listings of pending[0], pending[1] ...
    try:
        with progress(None, "floppy: scanning", unit="entries") as bar:  # big trees take a while
            while pending:
                if reader is not None:
                    while len(ahead) < min(LOOKAHEAD, len(pending)):
                        ahead.append(reader.submit(_list_and_stat, pending[len(ahead)][1]))
                node, real_dir, shown_dir, chain, via_link = pending.popleft()
                queued = len(pending)
                try:
                    listing = ahead.popleft().result() if ahead else _read_directory(real_dir)
                except OSError as e:
                    warn(f"skipping directory {shown_dir}: {e.strerror}")
                    count = 0
                else:
                    count = _merge_entries(node, real_dir, shown_dir, chain, via_link, roots, warn, pending,
                                           listing)
                for i in range(queued, len(pending)):
                    child = id(pending[i][0])
                    remaining[child] = remaining.get(child, 0) + 1
                remaining[id(node)] -= 1
                if not remaining[id(node)]:
                    # Breadth first, every merge into a node is queued before the first of them runs.
                    del remaining[id(node)]
                    if on_complete is not None:
                        on_complete(node)
                bar.update(count)
                if via_link:
                    through_links += count
                    if through_links > MAX_ENTRIES_THROUGH_LINKS:
                        raise TreeError(f"symbolic links to directories bring more than "
                                        f"{MAX_ENTRIES_THROUGH_LINKS} entries into the tree (last: {shown_dir}); "
                                        "do links multiply it?")
    finally:
        if reader is not None:
            reader.shutdown(wait=True, cancel_futures=True)
    return root


def _read_directory(real_dir: str) -> Listing:
    """A listing by os.listdir and os.lstat (what _hostio.list_and_stat gives)."""
    # lstat() relative to the directory: no walk of the whole path per entry.
    dir_fd = os.open(real_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        names = os.listdir(dir_fd)
        names.sort()
        lstat = os.lstat
        try:
            stats = [lstat(name, dir_fd=dir_fd) for name in names]
            errors = [0] * len(names)
        except OSError:  # some entry went: each on its own
            stats, errors = [], []
            for name in names:
                try:
                    stats.append(lstat(name, dir_fd=dir_fd))
                    errors.append(0)
                except OSError as e:
                    stats.append(_NO_STAT)
                    errors.append(e.errno or errno.EIO)
    finally:
        os.close(dir_fd)
    return (names, [st.st_mode for st in stats], [st.st_uid for st in stats], [st.st_size for st in stats],
            [st.st_ctime for st in stats], [st.st_atime for st in stats], [st.st_mtime for st in stats], errors)


_NO_STAT = os.stat_result((0,) * 10)


def _shown(host_name: str, real_dir: str, shown_dir: str) -> str:
    """How to name a file of the directory being merged in a message."""
    return os.path.join(real_dir if real_dir == shown_dir else shown_dir, host_name)


def _merge_entries(node: DirNode, real_dir: str, shown_dir: str, chain: tuple[str, ...], via_link: bool,
                   roots: list[str], warn: Warn, pending: deque, listing: Listing) -> int:
    """Merge one host directory, as read, into `node`; returns how many entries it had."""
    names, modes, uids, sizes, ctimes, atimes, mtimes, errors = listing
    if names != sorted(names):  # the C extension sorts by bytes: not Python's order for names not UTF-8
        order = sorted(range(len(names)), key=names.__getitem__)
        listing = tuple([column[i] for i in order] for column in listing)  # type: ignore[assignment]
        names, modes, uids, sizes, ctimes, atimes, mtimes, errors = listing
    # The FAT long names and the keys they are compared by, for the whole directory at once
    # when its names need no mapping (plain ASCII: the usual tree).
    joined = "/".join(names)
    if kept_as_they_are(joined):
        fat_names = names
        keys = joined.upper().split("/") if names else []
    else:
        fat_names = [windows_name(decode_host_name(name)) for name in names]
        keys = [fold(name) for name in fat_names]
    children = node.children
    uid = os.getuid()  # access() checks the real user, as here
    if not children and len(set(keys)) == len(keys) and not any(errors) and all(map(S_ISREG, modes)) \
            and all(map(S_IRUSR.__and__, modes)) and uids.count(uid) == len(uids) \
            and max(sizes, default=0) <= MAX_FILE_SIZE:
        # Nothing merged here before, no clash of names, and only our own readable regular
        # files (the usual leaf directory): taken in bulk, as the loop below would.
        children.extend(map(_file_node, zip(fat_names, names, sizes, ctimes, atimes, mtimes,
                                             repeat(ATTR_ARCHIVE), repeat(real_dir))))
        return len(names)
    # Entries already there come from an earlier directory merged into this one.
    earlier = {fold(child.name): i for i, child in enumerate(children)}
    seen_here: set[str] = set()
    append = children.append
    for index, (host_name, name, key) in enumerate(zip(names, fat_names, keys)):
        if errors[index]:
            warn(f"skipping {os.path.join(shown_dir, host_name)}: {os.strerror(errors[index])}")
            continue
        mode, owner, size = modes[index], uids[index], sizes[index]
        ctime, atime, mtime = ctimes[index], atimes[index], mtimes[index]
        is_link = S_ISLNK(mode)
        if is_link:
            try:
                target = os.path.realpath(os.path.join(real_dir, host_name))
                if not _inside(target, roots):
                    warn(f"skipping symbolic link {os.path.join(shown_dir, host_name)}: it points "
                         f"outside the served directories")
                    continue
                st = os.stat(target)
            except OSError as e:
                warn(f"skipping {os.path.join(shown_dir, host_name)}: {e.strerror}")
                continue
            mode, owner, size = st.st_mode, st.st_uid, st.st_size
            ctime, atime, mtime = st.st_ctime, st.st_atime, st.st_mtime
            real_parent, real_name = os.path.split(target)
        else:
            real_parent, real_name = real_dir, host_name
        if key in seen_here:
            warn(f"skipping {os.path.join(shown_dir, host_name)}: FAT names ignore case and another "
                 f"name in {shown_dir} already gives {name!r}")
            continue
        position = earlier.get(key) if earlier else None
        if S_ISREG(mode):
            existing = children[position] if position is not None else None
            if isinstance(existing, DirNode):
                raise TreeError(f"{existing.origin} is a directory but {_shown(host_name, real_dir, shown_dir)} "
                                f"is a file: they cannot be merged")
            if size > MAX_FILE_SIZE:
                raise TreeError(f"{_shown(host_name, real_dir, shown_dir)} is {size} bytes: FAT cannot hold "
                                f"files of 4 GiB or more (at most {MAX_FILE_SIZE} bytes)")
            # Our own file with its owner's read bit is readable (a POSIX ACL cannot take
            # that from its owner): no access() call for the usual tree of one's own files.
            if not (owner == uid and mode & S_IRUSR) and \
                    not os.access(os.path.join(real_dir, host_name), os.R_OK):
                warn(f"skipping {_shown(host_name, real_dir, shown_dir)}: permission denied")
                continue
            seen_here.add(key)
            file = FileNode(name, real_name, size, ctime, atime, mtime, ATTR_ARCHIVE, real_parent)
            if existing is None:
                append(file)
            else:
                children[position] = file  # type: ignore[index]
        elif S_ISDIR(mode):
            existing = children[position] if position is not None else None
            shown = os.path.join(shown_dir, host_name)
            real = os.path.join(real_parent, real_name)
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
                child = DirNode(name, shown, ctime, atime, mtime)
                children.append(child)
            else:
                child = existing
                child.name, child.origin = name, shown
                child.ctime, child.atime, child.mtime = ctime, atime, mtime
            pending.append((child, real, shown, chain + (real,), via_link or is_link))
        else:
            warn(f"skipping {os.path.join(shown_dir, host_name)}: {_kind(mode)} cannot be "
                 f"stored in FAT")
    return len(names)

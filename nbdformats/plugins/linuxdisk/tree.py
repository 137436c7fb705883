"""Walking the source directories: checks, statistics and, for several dirs, the merged staging tree.

`mke2fs -d` copies exactly one directory.  Several `dir=` are merged into a staging
directory that mke2fs then reads: later sources win for files, directories merge, and a
directory meeting a non-directory at the same path is an error naming both.  Every
non-directory is hard-linked into the staging tree (no data copied, owners, modes, times,
xattrs and hard links carried by the inode itself); only when the kernel refuses the link
(another filesystem, or protected_hardlinks for a file we do not own) is it copied,
sparse-aware, with its metadata.  Staged directories get their source's metadata.  A large
directory's non-directories are staged in shards (ShardedDirectory), which the plugin undoes in
the built filesystem; where the plugin can write inodes itself (formats/ext2inodes.py), those that are
nothing but their inode are not staged at all (ShardedDirectory.direct).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
from dataclasses import dataclass, field

from ...api.errors import ConfigError
from .._sparse import data_and_holes

log = logging.getLogger(__name__)

FICLONE = 0x40049409  # <linux/fs.h> _IOW(0x94, 9, int): share the extents (btrfs, xfs, bcachefs)
LINK_FALLBACK_ERRNOS = (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EACCES)


SHARD_SIZE = 200  # entries per shard: mke2fs -d fills a directory this small quickly
LINK_MAX = 65000  # EXT4_LINK_MAX: a directory's link count (2 + subdirectories) must stay under it


@dataclass
class ShardedDirectory:
    """A large directory staged as shards (subdirectories of SHARD_SIZE entries), because mke2fs -d
    adds entries to a directory in time quadratic in its size; the plugin moves them back."""

    relative: str  # its path in the tree ("" for the top)
    shards: list[tuple[str, list[str]]]  # (shard name, the names staged in it)
    links: int  # its link count once the shards are gone: 2 + its subdirectories
    # Entries that are nothing but their metadata (see _Walker.direct), not staged: the plugin
    # writes their inodes into the image itself.  (name, lstat)
    direct: list[tuple[str, os.stat_result]] = field(default_factory=list)


@dataclass
class TreeStats:
    allocated: int = 0  # bytes allocated to every inode once (what `du -s` counts)
    inodes: int = 0  # distinct inodes below (and including) the top directory
    linked: int = 0  # staging: entries hard-linked
    copied: int = 0  # staging: entries recreated because the link was refused
    copied_bytes: int = 0
    metadata_lost: list[str] = field(default_factory=list)  # staging: owner/xattr not reproduced
    sharded: list[ShardedDirectory] = field(default_factory=list)  # staging: directories staged in shards
    slow_directories: list[tuple[str, int]] = field(default_factory=list)  # large ones that could not be


class _Walker:
    """Walks one or several source trees in step; stages the merged tree when `staging` is set."""

    def __init__(self, sources: list[str], staging: str | None, large: int | None = None,
                 shards: bool = False, direct: bool = False) -> None:
        self.sources = sources
        self.staging = staging
        self.large = large  # directories of this many entries or more: staged in shards (scan: stop)
        self.shards = shards  # whether they can be (else they are only reported as slow)
        # Whether the plugin can write inodes itself (formats/ext2inodes.py): then a large
        # directory's entries that are nothing but their metadata are not staged at all.
        self.direct = direct
        self.stats = TreeStats()
        self.seen_inodes: set[tuple[int, int]] = set()  # only inodes with several links
        self.copied_inodes: dict[tuple[int, int], str] = {}  # source inode -> its staged copy

    def walk(self) -> TreeStats:
        # Iterative (deep trees must not hit the recursion limit); a directory's metadata is
        # applied after its children are staged, because adding them changes its mtime.
        stack: list[tuple[str, list[str], bool]] = [("", list(self.sources), False)]
        while stack:
            relative, dirs, done = stack.pop()
            if done:
                self._finish_directory(relative, dirs[-1])
                continue
            self._count(os.stat(dirs[-1]))  # stat: a top-level dir= may be a symlink
            stack.append((relative, dirs, True))
            if self.staging is not None and relative:
                os.mkdir(os.path.join(self.staging, relative), 0o700)
            listing = self._merged_listing(relative, dirs)
            items = sorted(listing.items())
            shard_of: dict[str, str] = {}
            if self.large is not None and len(listing) >= self.large:
                if self.shards:
                    shard_of = self._shard(relative, listing, items, dirs[-1])
                else:
                    self.stats.slow_directories.append((dirs[-1], len(listing)))
            prefix = relative + "/" if relative else ""  # (os.path.join per entry costs 0.3 s in 100,000)
            for name, kind in items:
                if kind[0] == "dir":
                    stack.append((prefix + name, kind[1], False))
                else:
                    shard = shard_of.get(name)
                    if shard == DIRECT:
                        self._count(kind[2])  # not staged: the plugin writes its inode
                    else:
                        self._entry(prefix + name if shard is None else f"{prefix}{shard}/{name}", kind[1],
                                    kind[2])
        return self.stats

    def _shard(self, relative: str, listing: dict[str, tuple], items: list[tuple[str, tuple]],
               source: str) -> dict[str, str]:
        """Stage the non-directories of a large directory (`items`: its listing, sorted) in shards;
        name -> its shard.  Not if debugfs cannot take the directory's path in a command."""
        assert self.staging is not None and self.large is not None  # only called when staging
        movable = [(name, kind) for name, kind in items if kind[0] != "dir"]
        subdirectories = sum(1 for kind in listing.values() if kind[0] == "dir")
        if not relative and not (listing.get("lost+found", ("",))[0] == "dir"):
            subdirectories += 1  # mke2fs makes /lost+found
        direct: list[tuple[str, os.stat_result]] = []
        staged: list[str] = []
        for name, kind in movable:
            if self.direct and _metadata_only(kind[1], kind[2]):
                direct.append((name, kind[2]))
            else:
                staged.append(name)
        count = -(-len(staged) // SHARD_SIZE)
        if not scriptable(relative) or len(movable) < self.large or 2 + subdirectories + count >= LINK_MAX:
            self.stats.slow_directories.append((source, len(listing)))
            return {}
        movable_names = staged
        shards = []
        for k in range(count):
            n = 0  # a name of the directory's own is never taken
            while (shard := f".linuxdisk-shard-{k:05d}-{n}-".ljust(255, "x")) in listing:
                n += 1
            os.mkdir(os.path.join(self.staging, relative, shard), 0o700)
            shards.append((shard, movable_names[k::count]))
        self.stats.sharded.append(ShardedDirectory(relative, shards, 2 + subdirectories, direct))
        self.stats.inodes += count
        self.stats.allocated += count * 8192  # a shard's blocks, until the build frees them
        placed = {name: shard for shard, names in shards for name in names}
        placed.update((name, DIRECT) for name, _ in direct)
        return placed

    def _merged_listing(self, relative: str, dirs: list[str]) -> dict[str, tuple]:
        """name -> ("dir", [source dirs, in order]) or ("other", path, stat) of the winner."""
        merged: dict[str, tuple] = {}
        for directory in dirs:
            try:
                with os.scandir(directory) as entries:
                    listing = [(e.name, e.path, e.is_dir(follow_symlinks=False)) for e in entries]
            except OSError as e:
                raise ConfigError(f"linuxdisk: cannot read directory {directory}: {e.strerror}") from None
            for name, path, is_dir in listing:
                earlier = merged.get(name)
                if earlier is not None and (earlier[0] == "dir") != is_dir:
                    earlier_path = earlier[1][-1] if earlier[0] == "dir" else earlier[1]
                    raise ConfigError(
                        f"linuxdisk: cannot merge {earlier_path} ({_kind(earlier_path)}) with "
                        f"{path} ({_kind(path)}): a directory and a non-directory at the same place")
                if is_dir:
                    merged[name] = ("dir", (earlier[1] if earlier else []) + [path])
                else:
                    merged[name] = ("other", path, None)
        if self.staging is None and self.large is not None and len(merged) >= self.large:
            raise _LargeDirectory  # scan() stops (the tree is to be staged in shards) before an lstat per entry
        for name, kind in merged.items():
            if kind[0] == "other":
                merged[name] = ("other", kind[1], os.lstat(kind[1]))
        return merged

    def _count(self, st: os.stat_result) -> None:
        if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
            key = (st.st_dev, st.st_ino)
            if key in self.seen_inodes:
                return
            self.seen_inodes.add(key)
        self.stats.inodes += 1
        self.stats.allocated += st.st_blocks * 512

    def _entry(self, relative: str, path: str, st: os.stat_result) -> None:
        # mke2fs reports an unreadable file by its base name only, after building for a while.
        if stat.S_ISREG(st.st_mode) and not os.access(path, os.R_OK):
            raise ConfigError(f"linuxdisk: cannot read {path}: permission denied")
        self._count(st)
        if self.staging is None:
            return
        target = self.staging + "/" + relative
        try:
            os.link(path, target, follow_symlinks=False)
            self.stats.linked += 1
        except OSError as e:
            if e.errno not in LINK_FALLBACK_ERRNOS:
                raise ConfigError(f"linuxdisk: cannot stage {path}: {e.strerror}") from None
            self._copy(path, target, st)

    # -- the fallback: recreate the entry in the staging tree ------------------------------

    def _copy(self, path: str, target: str, st: os.stat_result) -> None:
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and key in self.copied_inodes:
            os.link(self.copied_inodes[key], target)  # keep the source's hard link
            return
        try:
            if stat.S_ISREG(st.st_mode):
                self.stats.copied_bytes += _copy_file_data(path, target)
            elif stat.S_ISLNK(st.st_mode):
                os.symlink(os.readlink(path), target)
            else:  # fifo, socket, device node
                os.mknod(target, st.st_mode, st.st_rdev)
        except OSError as e:
            hint = " (device nodes need root, or TMPDIR on the same filesystem)" if e.errno == errno.EPERM else ""
            raise ConfigError(f"linuxdisk: cannot copy {path} into the staging directory: "
                              f"{e.strerror}{hint}") from None
        self._copy_metadata(path, target, st)
        self.stats.copied += 1
        if st.st_nlink > 1:
            self.copied_inodes[key] = target

    def _copy_metadata(self, source: str, target: str, st: os.stat_result) -> None:
        is_link = stat.S_ISLNK(st.st_mode)
        try:
            os.chown(target, st.st_uid, st.st_gid, follow_symlinks=False)
        except PermissionError:
            self.stats.metadata_lost.append(f"{source}: owner {st.st_uid}:{st.st_gid}")
        if not is_link:  # chown cleared set-id bits, so the mode comes after it
            os.chmod(target, stat.S_IMODE(st.st_mode))
        try:
            for name in os.listxattr(source, follow_symlinks=False):
                os.setxattr(target, name, os.getxattr(source, name, follow_symlinks=False),
                            follow_symlinks=False)
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EACCES):
                raise
            self.stats.metadata_lost.append(f"{source}: extended attributes ({e.strerror})")
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)

    def _finish_directory(self, relative: str, winner: str) -> None:
        if self.staging is not None:
            self._copy_metadata(winner, os.path.join(self.staging, relative), os.stat(winner))


def _copy_file_data(source: str, target: str) -> int:
    """Copy a regular file keeping its holes; returns the bytes copied.  The kernel moves the
    data (FICLONE shares extents where the filesystem can; sendfile copies without user space)."""
    with open(source, "rb") as src, open(target, "xb") as dst:
        sfd, dfd = src.fileno(), dst.fileno()
        try:
            fcntl.ioctl(dfd, FICLONE, sfd)
            return 0
        except OSError:
            pass
        size = os.fstat(sfd).st_size
        copied = 0
        for start, length, is_data in data_and_holes(sfd, 0, size):
            if not is_data:
                continue
            os.lseek(dfd, start, os.SEEK_SET)
            offset, end = start, start + length
            while offset < end:
                sent = os.sendfile(dfd, sfd, offset, end - offset)
                if sent == 0:
                    raise OSError(errno.EIO, f"{source} shrank while being copied")
                offset += sent
            copied += length
        os.ftruncate(dfd, size)
        return copied


DIRECT = ""  # _shard's answer for an entry not staged (see ShardedDirectory.direct)
_METADATA_ONLY = (stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK)


def _metadata_only(path: str, st: os.stat_result) -> bool:
    """An entry that is nothing but its inode's metadata: an empty regular file, a fifo, a socket or
    a device node, with one link (hard links are mke2fs's to keep) and no xattrs."""
    kind = stat.S_IFMT(st.st_mode)
    if st.st_nlink != 1 or not (kind == stat.S_IFREG and st.st_size == 0 or kind in _METADATA_ONLY):
        return False
    try:
        return not os.listxattr(path, follow_symlinks=False)
    except OSError:
        return False


def _kind(path: str) -> str:
    mode = os.lstat(path).st_mode
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISREG, "a file"), (stat.S_ISLNK, "a symlink"),
                       (stat.S_ISFIFO, "a fifo"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "a device node"


def scriptable(path: str) -> bool:
    """Whether debugfs takes `path` in a double-quoted command argument."""
    return not any(c in path for c in '"\\\n\r')


class _LargeDirectory(Exception):
    pass


def scan(directory: str, large: int | None = None) -> TreeStats | None:
    """Statistics of one tree mke2fs will copy as it is; fails on what it could not read.  None
    as soon as a directory of `large` entries or more is found (stage the tree in shards)."""
    try:
        return _Walker([directory], None, large).walk()
    except _LargeDirectory:
        return None


def stage(sources: list[str], staging: str, large: int | None = None, shards: bool = False,
          direct: bool = False) -> TreeStats:
    """Build the merged tree of `sources` (later wins) in the empty directory `staging`.
    Directories of `large` entries or more are staged in shards if `shards`, and listed in
    `slow_directories` if they are not; with `direct`, their metadata-only entries are left to
    the plugin (ShardedDirectory.direct)."""
    stats = _Walker(sources, staging, large, shards, direct).walk()
    if stats.copied:
        log.warning("linuxdisk: %d entries (%d bytes of data) were copied, not hard-linked, into the staging "
                    "directory %s: put TMPDIR on the same filesystem as the dir= sources to avoid copies",
                    stats.copied, stats.copied_bytes, os.path.dirname(staging))
    for what in stats.metadata_lost[:10]:
        log.warning("linuxdisk: not reproduced in the merged tree: %s", what)
    return stats

"""linuxdisk plugin: a GPT disk holding an ext2/3/4 filesystem made from one or more directories.

The filesystem is built once at start-up by e2fsprogs' `mke2fs -d` into an anonymous temp
file (O_TMPFILE: nothing is left behind, even on a crash).  The disk is served as three
regions: the protective MBR and primary GPT padded to 1 MiB and the backup GPT are small
in-memory buffers, the partition in between is read straight from the temp file with
preadv into the client's buffer.  Several `dir=` are merged through a staging tree of
hard links (see tree.py).  A directory of LARGE_DIRECTORY entries or more is staged too, in
shards that mke2fs fills quickly (but for its entries that are nothing but an inode,
which are written into the image directly); then its blocks are written anew holding all those
entries, the shards dropped by debugfs, and e2fsck -D indexes it (_unshard).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import stat
import subprocess
import tempfile
import threading
import time
import uuid
from functools import partial

from ...api.chain import EXTENT_DATA, EXTENT_HOLE, EXTENT_ZERO, NATIVE, Extents, Plugin, PluginHandle
from ...api.errors import ConfigError, NBDError
from ...api.params import Bool, Enum, Param, ParamType, Path, RelativeSize, String
from ...api.progress import progress
from ...formats import ext2dir, ext2inodes, gpt
from .._sparse import data_and_holes
from . import tree
from .tree import TreeStats

log = logging.getLogger(__name__)

SECTOR = gpt.SECTOR
PARTITION_START = 2048 * SECTOR  # 1 MiB alignment, as nbdkit and partitioning tools do
JOURNAL_ALLOWANCE = 32 << 20  # nbdkit adds this for ext3/ext4 to its estimate
INODE_SIZE = 256  # mke2fs.conf's default inode_size: room each inode takes in the inode tables
RESERVED_INODES = 11  # EXT2_GOOD_OLD_FIRST_INO: inodes 1-10 are reserved, 11 is lost+found
DEFAULT_TMPDIR = "/var/tmp"  # large files do not belong in /tmp (often RAM), as nbdkit
# mke2fs -d adds each entry by looking its name up in the directory and then finding room for it,
# both by reading the whole directory: a directory of n entries costs time in n squared.  Directories
# this large are staged in shards that mke2fs fills quickly, and their entries moved back into place
# (see _unshard).
LARGE_DIRECTORY = 4000
SUBPROCESS_TIMEOUT = 3600


class Uuid(ParamType):
    metavar = "UUID"

    def parse(self, text: str) -> uuid.UUID:
        try:
            return uuid.UUID(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a UUID (e.g. 2a7f33c4-3b2c-4d0e-9a1b-6f3c5d2e1f00)") from None


def _check_label(label: str) -> None:
    if len(label.encode()) > 16:  # s_volume_name[16] in the ext2 superblock
        raise ValueError("an ext2/3/4 label is at most 16 bytes")


def estimate_size(stats: TreeStats, fs_type: str) -> int:
    """nbdkit's estimate (du plus 20% for metadata, at least 1 MiB, 32 MiB more for a journal),
    counting the inode tables too so that trees of many small files fit."""
    estimate = max((stats.allocated + stats.inodes * INODE_SIZE) * 6 // 5, 1 << 20)
    if fs_type != "ext2":
        estimate += JOURNAL_ALLOWANCE
    return _round_up(estimate, SECTOR)


def inodes_needed(stats: TreeStats) -> int:
    """Inodes the tree needs (the top directory becomes the root inode), with 10% to spare."""
    needed = stats.inodes - 1 + RESERVED_INODES
    return needed + needed // 10


def find_program(name: str) -> str:
    """`name` looked up in PATH, then in /usr/sbin and /sbin (not in a normal user's PATH on Debian)."""
    if os.sep in name:
        if os.access(name, os.X_OK) and not os.path.isdir(name):
            return name
        raise ConfigError(f"linuxdisk: {name} is not an executable program (install e2fsprogs)")
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if found is None:
        raise ConfigError(f"linuxdisk: {name} was not found in PATH, /usr/sbin or /sbin: "
                          "install e2fsprogs (or give mke2fs=/path/to/mke2fs)")
    return found


def _round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def _human(n: int) -> str:
    if n < 1024:
        return f"{n} bytes"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024:
            break
    return f"{value:.1f} {unit}"


class LinuxDiskPlugin(Plugin):
    """A GPT disk with an ext2/3/4 filesystem built from directories (mke2fs -d)."""

    name = "linuxdisk"
    dirs = Param(Path("dir"), key="dir", required=True, repeat=True, magic=True,
                 help="Directory whose contents become the filesystem; several are merged (later wins)")
    label = Param(String(), check=_check_label, help="Filesystem label (at most 16 bytes); also the GPT partition name")
    fs_type = Param(Enum("ext2", "ext3", "ext4"), key="type", default="ext2", help="Filesystem type")
    size = Param(RelativeSize(),
                 help="Filesystem size: SIZE exactly, or +SIZE for at least SIZE free (default: just enough)")
    uuid = Param(Uuid(), help="Filesystem UUID; the GPT GUIDs are derived from it (default: random)")
    partition = Param(Enum("gpt", "none"), default="gpt",
                      help="gpt: a partitioned disk; none: the bare filesystem")
    writable = Param(Bool(), default=False,
                     help="Accept writes (into the temporary image: they are lost when the server exits)")
    mke2fs = Param(String(), default="mke2fs", help="The mke2fs program to run")

    def get_ready(self) -> None:
        program = find_program(self.mke2fs)
        tmpdir = os.environ.get("TMPDIR") or DEFAULT_TMPDIR
        if not os.path.isdir(tmpdir):
            raise ConfigError(f"linuxdisk: the temporary directory {tmpdir} does not exist (set TMPDIR)")
        staging = None
        try:
            stats = tree.scan(self.dirs[0], LARGE_DIRECTORY) if len(self.dirs) == 1 else None
            if stats is not None:
                source = self.dirs[0]
            else:  # a merge, or a large directory to stage in shards (they need dir_index)
                shards, direct = _probe_features(program, self.fs_type, tmpdir)
                staging = source = tempfile.mkdtemp(prefix="linuxdisk-merge-", dir=tmpdir)
                stats = tree.stage(self.dirs, staging, LARGE_DIRECTORY, shards, direct)
            for path, count in stats.slow_directories:
                log.warning("linuxdisk: %s holds %d entries: mke2fs -d reads the whole directory to add each "
                            "entry, so the build takes time growing with the square of that count (minutes for "
                            "100,000 entries); spread them over subdirectories if you can", path, count)
            self.fd: int | None = self._build_filesystem(program, source, stats, tmpdir)
        finally:
            if staging is not None:
                if getattr(self, "fd", None) is not None:
                    # Built: the staging tree (a hard link per entry) goes away while we serve;
                    # cleanup() waits for it.  A thread does not survive the fork of a server
                    # that detaches, so the child takes over what is left.
                    self._remove_staging(staging)
                    os.register_at_fork(after_in_child=partial(self._remove_staging, staging, after_fork=True))
                else:
                    shutil.rmtree(staging, ignore_errors=True)
        self._lay_out()
        if self.writable:
            log.warning("linuxdisk: writable=true: writes go to a temporary image and are LOST when the "
                        "server exits")

    def _remove_staging(self, staging: str, after_fork: bool = False) -> None:
        if after_fork and (self._staging_removal is None or not os.path.exists(staging)):
            return
        self._staging_removal: threading.Thread | None = threading.Thread(
            target=shutil.rmtree, args=(staging,), kwargs={"ignore_errors": True}, name="linuxdisk-staging-removal",
            daemon=True)
        self._staging_removal.start()

    def _build_filesystem(self, program: str, source: str, stats: TreeStats, tmpdir: str) -> int:
        estimate = estimate_size(stats, self.fs_type)
        exact = self.size is not None and not self.size[0]
        if self.size is None:
            fs_size = estimate
        else:
            fs_size = _round_up(self.size[1] + (estimate if self.size[0] else 0), SECTOR)
        fd, path = _anonymous_file(tmpdir)
        try:
            os.ftruncate(fd, fs_size)
            command = [program, "-q", "-F", "-t", self.fs_type]
            if self.label is not None:
                command += ["-L", self.label]
            if self.uuid is not None:
                command += ["-U", str(self.uuid)]
            default_inodes = _default_inodes(program, self.fs_type, path, fd)
            if default_inodes is not None and default_inodes < inodes_needed(stats):
                command += ["-N", str(inodes_needed(stats))]
            command += ["-d", source, path]
            log.debug("linuxdisk: %s", " ".join(command))
            returncode, errors = _run_with_progress(command, fd, stats.allocated,
                                                    f"linuxdisk: building {self.fs_type}")
            if returncode == 0 and stats.sharded:
                _unshard(path, fd, stats.sharded)
            if returncode != 0:
                dirs = ", ".join(self.dirs)
                if exact and fs_size < estimate:
                    raise ConfigError(
                        f"linuxdisk: size={self.size[1]} is too small for {dirs}: about {_human(estimate)} is "
                        f"needed (use size={estimate} or more, or size=+FREE); mke2fs: {errors}")
                raise ConfigError(f"linuxdisk: mke2fs failed building a {_human(fs_size)} {self.fs_type} from "
                                  f"{dirs}: {errors}")
        except BaseException:
            os.close(fd)
            raise
        finally:
            if not path.startswith("/proc/"):
                os.unlink(path)
        self.fs_size = fs_size
        log.info("linuxdisk: built a %s %s from %s (%d inodes)", _human(fs_size), self.fs_type,
                 ", ".join(self.dirs), stats.inodes)
        return fd

    def _lay_out(self) -> None:
        """head (memory) | filesystem (temp file) | tail (memory)."""
        if self.partition == "none":
            self.fs_start, self.head, self.head_data = 0, bytearray(), 0
            self.tail = bytearray()
        else:
            fs_sectors = self.fs_size // SECTOR
            total = gpt.disk_sectors(PARTITION_START // SECTOR, fs_sectors)
            if self.uuid is not None:  # reproducible: the same uuid= gives the same disk
                disk_guid = uuid.uuid5(self.uuid, "linuxdisk disk")
                partition_guid = uuid.uuid5(self.uuid, "linuxdisk partition")
            else:
                disk_guid, partition_guid = uuid.uuid4(), uuid.uuid4()
            partition = gpt.Partition(PARTITION_START // SECTOR, PARTITION_START // SECTOR + fs_sectors - 1,
                                      gpt.LINUX_FILESYSTEM, partition_guid, self.label or "",
                                      gpt.ATTR_LEGACY_BIOS_BOOTABLE)  # as nbdkit: syslinux's gptmbr boots it
            primary, backup = gpt.build(total, disk_guid, [partition])
            self.fs_start = PARTITION_START
            self.head = bytearray(PARTITION_START)
            self.head[:len(primary)] = primary
            self.head_data = len(primary)  # the rest of the head reads as a hole until written
            self.tail = bytearray(backup)
        self.fs_end = self.fs_start + self.fs_size
        self.disk_size = self.fs_end + len(self.tail)

    def cleanup(self) -> None:
        removal = getattr(self, "_staging_removal", None)
        if removal is not None:
            removal.join()
            self._staging_removal = None
        fd = getattr(self, "fd", None)
        if fd is not None:
            os.close(fd)
            self.fd = None

    class Handle(PluginHandle):
        def __init__(self, plugin: "LinuxDiskPlugin", readonly: bool, export_name: str) -> None:
            self.plugin = plugin
            assert plugin.fd is not None  # built by get_ready(), closed only at cleanup
            self.fd: int = plugin.fd
            self.fs_start, self.fs_end = plugin.fs_start, plugin.fs_end

        def get_size(self) -> int:
            return self.plugin.disk_size

        def can_write(self) -> bool:
            return self.plugin.writable

        def can_multi_conn(self) -> bool:
            return True  # one image shared by all connections

        def can_fua(self) -> int:
            return NATIVE  # the image is temporary: a write is as durable as it will ever be

        def flush(self, flags: int) -> None:
            pass  # see can_fua

        def pread(self, buf: memoryview, offset: int, flags: int) -> None:
            end = offset + len(buf)
            if offset >= self.fs_start and end <= self.fs_end:  # the common case: one preadv
                self._read_fs(buf, offset - self.fs_start)
                return
            for piece, start, region in self._split(offset, end):
                if region == "fs":
                    self._read_fs(buf[piece], start)
                else:
                    data = self.plugin.head if region == "head" else self.plugin.tail
                    buf[piece] = data[start:start + len(buf[piece])]

        def _read_fs(self, buf: memoryview, offset: int) -> None:
            done, count = 0, len(buf)
            while done < count:
                n = os.preadv(self.fd, [buf[done:]], offset + done)
                if n == 0:
                    raise NBDError(errno.EIO, "short read from the filesystem image")
                done += n

        def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
            for piece, start, region in self._split(offset, offset + len(buf)):
                if region == "fs":
                    done, data = 0, buf[piece]
                    try:
                        while done < len(data):
                            done += os.pwritev(self.fd, [data[done:]], start + done)
                    except OSError as e:
                        raise NBDError(e.errno, f"write to the filesystem image failed: {e.strerror}") from None
                elif region == "head":
                    self.plugin.head[start:start + len(buf[piece])] = buf[piece]
                    self.plugin.head_data = len(self.plugin.head)
                else:
                    self.plugin.tail[start:start + len(buf[piece])] = buf[piece]

        def _split(self, offset: int, end: int) -> list[tuple[slice, int, str]]:
            """The parts of [offset, end): (slice of the request, offset in the region, region)."""
            parts = []
            for region_start, region_end, region in ((0, self.fs_start, "head"), (self.fs_start, self.fs_end, "fs"),
                                                     (self.fs_end, self.plugin.disk_size, "tail")):
                lo, hi = max(offset, region_start), min(end, region_end)
                if lo < hi:
                    parts.append((slice(lo - offset, hi - offset), lo - region_start, region))
            return parts

        def extents(self, count: int, offset: int, flags: int, extents: Extents) -> None:
            end = offset + count
            head_data = self.plugin.head_data
            if offset < self.fs_start:
                extents.add(0, head_data, EXTENT_DATA)
                extents.add(head_data, self.fs_start - head_data, EXTENT_HOLE | EXTENT_ZERO)
            # mke2fs leaves free space as holes in the image.
            try:
                for start, length, is_data in data_and_holes(self.fd, max(offset, self.fs_start) - self.fs_start,
                                                              min(end, self.fs_end) - self.fs_start):
                    extents.add(self.fs_start + start, length, EXTENT_DATA if is_data else EXTENT_HOLE | EXTENT_ZERO)
            except OSError as e:
                raise NBDError(e.errno, f"extents: {e.strerror}") from None
            if end > self.fs_end:
                extents.add(self.fs_end, self.plugin.disk_size - self.fs_end, EXTENT_DATA)


def _anonymous_file(directory: str) -> tuple[int, str]:
    """A temp file with no name (O_TMPFILE) and the path mke2fs can open it by; where the
    filesystem lacks O_TMPFILE, a named one the caller unlinks right after the build."""
    try:
        fd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        return fd, f"/proc/self/fd/{fd}"
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise ConfigError(f"linuxdisk: cannot create a temporary file in {directory}: {e.strerror} "
                              "(set TMPDIR)") from None
    fd, path = tempfile.mkstemp(prefix="linuxdisk", dir=directory)
    return fd, path


def _unshard(image: str, fd: int, sharded: list[tree.ShardedDirectory]) -> None:
    """Move the entries of directories staged in shards back into them, and remove the shards.

    debugfs tells the inode numbers of each directory and its shards (`ls -p`) and where their
    blocks are (`stat`).  The inodes of the entries not staged (ShardedDirectory.direct) are
    written into free inodes (formats/ext2inodes.py).  The entries are read from the shards'
    blocks, and the directory's blocks are written anew, linear (formats/ext2dir.py), holding its
    own entries but the shards', every entry of every shard and the directly written ones (debugfs
    adding them one by one with `ln` took seconds for 100,000).  debugfs drops each shard whole
    (link count 0, `kill_file` frees its inode and blocks) and gives the directory the blocks it
    needs (`expand_dir`); the inodes keep the link counts mke2fs gave them, so hard links stay
    right.  `e2fsck -fyD` then gives the directory its hashed index (htree); it must find nothing
    but that to do, and `e2fsck -fn` checks the result: the build fails rather than serve a
    filesystem these steps got wrong.
    """
    e2fsck, debugfs = find_program("e2fsck"), find_program("debugfs")
    def run(argv: list[str], script: bytes = b"") -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(argv, input=script, capture_output=True, pass_fds=(fd,),
                              env=dict(os.environ, LC_ALL="C", DEBUGFS_PAGER="__none__"),
                              timeout=SUBPROCESS_TIMEOUT)
    def commands(script: bytes, writable: bool = False) -> list[bytes]:
        """The output of each command of a debugfs script (it echoes "debugfs: COMMAND" before each)."""
        result = run([debugfs, *(["-w"] if writable else []), "-f", "/dev/stdin", image], script)
        errors = [line for line in result.stderr.decode(errors="replace").splitlines()
                  if line.strip() and not line.startswith("debugfs ")]
        if result.returncode != 0 or errors:
            raise ConfigError(f"linuxdisk: debugfs failed while moving the entries of a large directory out of "
                              f"its shards: {' / '.join(errors[:3]) or _last_lines(result.stdout)}")
        return re.split(rb"^debugfs: [^\n]*\n", result.stdout, flags=re.M)[1:]

    superblock = os.pread(fd, 1024, ext2dir.SUPERBLOCK_OFFSET)
    sb = ext2dir.Superblock.parse(superblock)
    tops = [os.fsencode("/" + directory.relative) for directory in sharded]
    directories: list[int] = []
    shard_inodes: list[dict[bytes, int]] = []
    for directory, listing in zip(sharded, commands(b"".join(b'ls -p "%s"\n' % top for top in tops))):
        found: dict[bytes, int] = {}  # "ls -p" lines: /inode/mode/uid/gid/name/size/
        for match in re.finditer(rb"^/(\d+)/\d+/\d+/\d+/(\.|\.linuxdisk-shard-[^/\n]*)/\d*/$", listing, re.M):
            found[match.group(2)] = int(match.group(1))  # a shard's name is 255 bytes: no other name holds one
        missing = [shard for shard, _ in directory.shards if os.fsencode(shard) not in found]
        if b"." not in found or missing:
            raise ConfigError(f"linuxdisk: debugfs does not list {missing[:1] or '.'} in /{directory.relative}")
        directories.append(found.pop(b"."))
        shard_inodes.append(found)
    everything = directories + [number for found in shard_inodes for number in found.values()]
    layout = dict(zip(everything, (_directory_layout(text, sb.block_size) for text in
                                   commands(b"".join(b"stat <%d>\n" % number for number in everything)))))

    def read(number: int) -> list[tuple[int, int, bytes]]:
        blocks = layout[number][2]
        data = b"".join(os.pread(fd, sb.block_size, block * sb.block_size) for block in blocks)
        return [item for k in range(len(blocks))
                for item in ext2dir.entries(data[k * sb.block_size:(k + 1) * sb.block_size], sb.block_size)]

    script = bytearray()
    contents = []
    for directory, number, found in zip(sharded, directories, shard_inodes):
        shard_numbers = set(found.values())
        own = read(number)
        if [name for _, _, name in own[:2]] != [b".", b".."]:
            raise ConfigError(f"linuxdisk: /{directory.relative} does not begin with . and ..")
        kept = [item for item in own[2:] if item[0] not in shard_numbers]
        if len(own) - 2 - len(kept) != len(shard_numbers):
            raise ConfigError(f"linuxdisk: /{directory.relative} does not hold each of its shards once")
        moved: list[tuple[int, int, bytes]] = []
        if directory.direct:  # written before debugfs opens the image for writing (it reads the bitmaps then)
            geometry = ext2inodes.Geometry.parse(superblock)
            if geometry is None:
                raise ConfigError("linuxdisk: the filesystem mke2fs made has checksums the probe did not show "
                                  "(please report)")
            try:
                numbers = ext2inodes.allocate(geometry, lambda length, offset: os.pread(fd, length, offset),
                                              lambda data, offset: _pwrite_all(fd, data, offset),
                                              [st for _, st in directory.direct], number, int(time.time()))
            except ValueError as e:  # -N gave mke2fs room for every entry: not expected
                raise ConfigError(f"linuxdisk: writing the inodes of /{directory.relative}: {e} (please report)")
            moved += [(inode, ext2inodes.FILE_TYPES[stat.S_IFMT(st.st_mode)], os.fsencode(name))
                      for inode, (name, st) in zip(numbers, directory.direct)]
        for shard, names in directory.shards:
            entries = read(found[os.fsencode(shard)])[2:]
            if sorted(name for _, _, name in entries) != sorted(map(os.fsencode, names)):
                raise ConfigError(f"linuxdisk: the shard {shard} of /{directory.relative} does not hold "
                                  "the entries staged in it (please report)")
            moved += entries
        generation = layout[number][1]
        data = ext2dir.pack(own[:2] + kept + moved, sb, number, generation, min_blocks=len(layout[number][2]))
        contents.append((number, data))
        for shard_number in shard_numbers:
            script += b"sif <%d> links_count 0\nkill_file <%d>\n" % (shard_number, shard_number)
        script += b"expand_dir <%d>\n" % number * (len(data) // sb.block_size - len(layout[number][2]))
        script += b"sif <%d> links_count %d\n" % (number, directory.links)
    commands(bytes(script), writable=True)
    grown = commands(b"".join(b"stat <%d>\n" % number for number, _ in contents))
    for (number, data), text in zip(contents, grown):
        blocks = _directory_layout(text, sb.block_size)[2]
        if len(blocks) * sb.block_size != len(data):
            raise ConfigError(f"linuxdisk: debugfs expand_dir gave inode {number} {len(blocks)} blocks, "
                              f"not {len(data) // sb.block_size}")
        for k, block in enumerate(blocks):
            _pwrite_all(fd, data[k * sb.block_size:(k + 1) * sb.block_size], block * sb.block_size)

    indexed = run([e2fsck, "-fyD", image])
    unexpected = [line for line in indexed.stdout.decode(errors="replace").splitlines()
                  if line.strip() and not _E2FSCK_ROUTINE.fullmatch(line)]
    if indexed.returncode not in (0, 1) or unexpected:  # 1: directories were optimized
        raise ConfigError(f"linuxdisk: e2fsck -fD found more to do than indexing directories after the entries "
                          f"of a large directory were moved out of its shards (please report): "
                          f"{' / '.join(unexpected[:3]) or _last_lines(indexed.stdout + indexed.stderr)}")
    checked = run([e2fsck, "-fn", image])
    if checked.returncode != 0:
        raise ConfigError(f"linuxdisk: the filesystem is not clean after moving entries out of the shards "
                          f"of a large directory (please report): {_last_lines(checked.stdout)}")


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


# What e2fsck -fyD prints when all it does is index directories (and, on ext4, make the extent
# tree of a directory the index shrank shorter).
_E2FSCK_ROUTINE = re.compile(r"Pass \d[A-Z]?: .*|.*\*\*\*\*\* FILE SYSTEM WAS MODIFIED \*\*\*\*\*|"
                             r"\S.*: \d+/\d+ files \(.*\), \d+/\d+ blocks|"
                             r"Inode \d+ extent tree \(at level \d+\) could be (shorter|narrower)\.  Optimize\? yes")
INDEX_FL, INLINE_DATA_FL = 0x1000, 0x10000000  # i_flags: a hashed index, data inside the inode


def _directory_layout(stat_text: bytes, block_size: int) -> tuple[int, int, list[int]]:
    """(size, generation, its blocks in order) of a linear directory, from debugfs `stat`."""
    text = stat_text.decode(errors="replace")
    size = re.search(r"\bSize: (\d+)", text)
    generation = re.search(r"\bGeneration: (\d+)", text)
    flags = re.search(r"\bFlags: 0x([0-9a-fA-F]+)", text)
    if not (size and generation and flags and "Type: directory" in text):
        raise ConfigError(f"linuxdisk: cannot read debugfs stat: {text[:200]!r}")
    if int(flags.group(1), 16) & (INDEX_FL | INLINE_DATA_FL):
        raise ConfigError("linuxdisk: a directory made by mke2fs -d is indexed or inline (please report)")
    mapped: dict[int, int] = {}
    listing = text.split("EXTENTS:", 1)[-1] if "EXTENTS:" in text else text.split("BLOCKS:", 1)[-1]
    for first, last, uninit, start, _ in re.findall(r"\((\d+)(?:-(\d+))?(\[u\])?\):(\d+)(?:-(\d+))?", listing):
        if uninit:
            raise ConfigError("linuxdisk: a directory has uninitialized blocks (please report)")
        for k in range(int(first), int(last or first) + 1):
            mapped[k] = int(start) + k - int(first)
    count = int(size.group(1)) // block_size
    if int(size.group(1)) % block_size or sorted(mapped) != list(range(count)):
        raise ConfigError(f"linuxdisk: a directory's blocks are not what its size says (please report)")
    return int(size.group(1)), int(generation.group(1)), [mapped[k] for k in range(count)]


def _probe_features(program: str, fs_type: str, tmpdir: str) -> tuple[bool, bool]:
    """Whether mke2fs gives this type the dir_index feature (a hashed index for directories), and
    whether formats/ext2inodes.py can write its inodes (all three types by default):
    asked of a small filesystem made and thrown away (mke2fs.conf and MKE2FS_CONFIG decide)."""
    fd, path = _anonymous_file(tmpdir)
    try:
        os.ftruncate(fd, 64 << 20)
        env = dict(os.environ, LC_ALL="C")
        made = subprocess.run([program, "-q", "-F", "-t", fs_type, path], capture_output=True, pass_fds=(fd,),
                              env=env, timeout=SUBPROCESS_TIMEOUT)
        features = subprocess.run([find_program("debugfs"), "-R", "features", path], capture_output=True,
                                  pass_fds=(fd,), env=env, timeout=SUBPROCESS_TIMEOUT)
        if made.returncode != 0 or "dir_index" not in features.stdout.decode(errors="replace").split():
            return False, False
        return True, ext2inodes.Geometry.parse(os.pread(fd, 1024, ext2dir.SUPERBLOCK_OFFSET)) is not None
    finally:
        os.close(fd)
        if not path.startswith("/proc/"):
            os.unlink(path)


def _last_lines(output: bytes) -> str:
    return " / ".join(output.decode(errors="replace").strip().splitlines()[-3:])


def _default_inodes(program: str, fs_type: str, path: str, fd: int) -> int | None:
    """How many inodes mke2fs would make on this image (a dry run, -n: nothing is written)."""
    result = subprocess.run([program, "-n", "-F", "-t", fs_type, path], capture_output=True, pass_fds=(fd,),
                            env=dict(os.environ, LC_ALL="C"), timeout=60)
    match = re.search(rb"blocks and (\d+) inodes", result.stdout)
    return int(match.group(1)) if match else None


def _run_with_progress(command: list[str], fd: int, expected: int, description: str) -> tuple[int, str]:
    """Run mke2fs (which has no progress output of its own); on a terminal, show how much of
    the expected data the image already holds.  Returns (exit status, its messages)."""
    with tempfile.TemporaryFile() as messages, progress(expected, description) as bar:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=messages, stderr=messages,
                                   pass_fds=(fd,), env=dict(os.environ, LC_ALL="C"))
        try:
            while True:
                try:
                    process.wait(0.2)
                    break
                except subprocess.TimeoutExpired:
                    bar.set(min(os.fstat(fd).st_blocks * 512, expected))
        except BaseException:
            process.kill()
            process.wait()
            raise
        messages.seek(0)
        text = messages.read().decode(errors="replace").strip()
    return process.returncode, " / ".join(text.splitlines()[-3:])


PLUGIN = LinuxDiskPlugin

"""Files next to an image: its parent (a backing file, a delta disk's parent) and a VMDK's extents.

The rule (issue 23, shared by the image decoders): `auto` resolves the name the image records
next to the image.  For a member of an archive that is another member of the same archive, for
a file of `file dir=` another file of the directory: another export of the layer below, its name
taken relative to the image's own export name.  A name that leaves the archive or directory
("../", an absolute path), a chain that loops, or a file that is not there is a clear error;
nothing outside is opened.  `none` reads what the parent would give as zeroes.  A path given
by the operator (`NAME-parent=/srv/base.vmdk`) is opened as a local file, and the parents it
names in turn are resolved in its directory, confined to it in the same way.
"""

from __future__ import annotations

import errno
import os
import posixpath
import stat
from dataclasses import dataclass, field
from typing import Callable, Protocol

from ..api.chain import Layer
from ..api.errors import NBDError
from ..api.syscalls import open_beneath
from ..formats.blockmap import ReadInto
from ..formats.errors import FormatError
from ..formats.parents import ParentLink
from ..formats.readers import Reader
from ._layer_bytes import READ_CHUNK, read_bytes

MAX_CHAIN = 64  # parents above a disk: VMware snapshot chains stop at 32, ours refuse a runaway one
PROBE_NAME = "\0nbdformats: no such export"  # a name no layer below can have


class ParentError(FormatError):
    """A parent or extent that cannot be opened: missing, outside the archive or directory, a loop."""


@dataclass
class OpenedFile:
    """One file of a disk: its name in its namespace, its size and how to read it."""

    name: str
    size: int
    read: Reader
    read_into: ReadInto
    close: Callable[[], None] = field(default=lambda: None)


class Namespace(Protocol):
    """Where the files next to an image are found."""

    key: str  # tells namespaces apart in caches

    def open(self, name: str, what: str) -> OpenedFile:
        """The file called `name` (a normalized relative path); ParentError if it is not there."""
        ...


def layer_file(name: str, layer: Layer, close: Callable[[], None] = lambda: None) -> OpenedFile:
    size = layer.get_size()

    def read(offset: int, length: int) -> bytes:
        return read_bytes(layer, offset, max(0, min(length, size - offset)))

    def read_into(buf: memoryview, offset: int) -> None:
        for start in range(0, len(buf), READ_CHUNK):
            layer.pread(buf[start:start + READ_CHUNK], offset + start, 0)

    return OpenedFile(name, size, read, read_into, close)


class ExportNamespace:
    """The exports of the layer below: the members of an archive, the files of `file dir=`."""

    key = "export"

    def __init__(self, open_below: Callable[[bool, str], Layer], component: str) -> None:
        self.open_below, self.component = open_below, component
        self._names_select_exports: bool | None = None

    def open(self, name: str, what: str) -> OpenedFile:
        if not self.names_select_exports():
            explicit = f", or give {self.component}-parent=PATH" if "parent" in what else ""
            raise ParentError(f"{what} {name!r} is a file next to the image, but the layer below serves one file "
                              "whatever the export name: serve the directory (file dir=DIR) or the whole archive "
                              f"(without tar-entry=/zip-entry=) and name the image as the export{explicit}")
        try:
            layer = self.open_below(True, name)
        except NBDError as e:
            if e.errno in (errno.ENOENT, errno.EPERM, errno.EINVAL):
                raise ParentError(f"{what} {name!r} is not there ({e})") from None
            raise
        return layer_file(name, layer, layer.close)

    def names_select_exports(self) -> bool:
        """Whether the layer below opens another file for another export name: a plugin serving
        one file (file FILE, tar-entry=) gives the same bytes whatever the name, which must never
        be read as a parent.  Such a layer accepts a name no real one can have."""
        if self._names_select_exports is None:
            try:
                self.open_below(True, PROBE_NAME).close()
                self._names_select_exports = False
            except (NBDError, OSError):
                self._names_select_exports = True
        return self._names_select_exports


class DirectoryNamespace:
    """The files of a local directory (a parent the operator named by path, and its own parents)."""

    def __init__(self, directory: str) -> None:
        self.directory = os.path.realpath(directory)
        self.key = f"dir:{self.directory}"

    def open(self, name: str, what: str) -> OpenedFile:
        dir_fd = os.open(self.directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fd = open_beneath(dir_fd, self.directory, name, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as e:
            reason = "it leads outside the directory" if e.errno in (errno.EXDEV, errno.ELOOP) else e.strerror
            raise ParentError(f"{what} {name!r} in {self.directory}: {reason}") from None
        finally:
            os.close(dir_fd)
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise ParentError(f"{what} {name!r} in {self.directory} is not a regular file")
        size = info.st_size

        def read(offset: int, length: int) -> bytes:
            return os.pread(fd, max(0, min(length, size - offset)), offset)

        def read_into(buf: memoryview, offset: int) -> None:
            if os.preadv(fd, [buf], offset) != len(buf):
                raise NBDError(errno.EIO, f"{name}: short read at {offset} (the file shrank)")

        return OpenedFile(name, size, read, read_into, lambda: os.close(fd))


def local_file(path: str, what: str) -> tuple[OpenedFile, DirectoryNamespace]:
    """A file the operator named by path, and the namespace of its directory."""
    namespace = DirectoryNamespace(os.path.dirname(os.path.abspath(path)))
    return namespace.open(os.path.basename(path), what), namespace


def next_to(image_name: str, relative: str, what: str) -> str:
    """`relative` (a name an image records) taken from the directory of `image_name`, refused if it
    leaves the archive or directory."""
    name = posixpath.normpath(posixpath.join(posixpath.dirname(image_name.lstrip("/")), relative))
    if name == ".." or name.startswith("../") or posixpath.isabs(relative):
        raise ParentError(f"{what} {relative!r} leads outside the archive or directory of {image_name or 'the image'}:"
                          " refused")
    return name


def open_parent(link: ParentLink, image_name: str, namespace: Namespace, component: str) -> OpenedFile:
    """The parent a link names, next to the image: its relative names tried in order."""
    if not link.relative:
        shown = ", ".join(repr(path) for path in link.absolute) or "nothing"
        raise ParentError(f"the image names its parent only by the absolute path {shown} ({link.what}), which is not "
                          f"opened: give {component}-parent=PATH (or {component}-parent=none)")
    missing = []
    for relative in link.relative:
        name = next_to(image_name, relative, f"the parent ({link.what})")
        try:
            return namespace.open(name, f"the parent ({link.what})")
        except ParentError as e:
            missing.append(str(e))
    raise ParentError("; ".join(missing))

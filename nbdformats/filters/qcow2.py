"""qcow2 filter: serve the disk inside a qcow2 image, read-only (writes: --filter=cow on top).

The image is read through the layer below, so it may sit in a tar, zip or compressed file or
on a web server.  Versions 2 and 3, zlib and zstd compressed clusters, extended L2 entries
(subclusters), internal snapshots (snapshot=), LUKS encryption (the luks filter's passphrase
parameters) and backing files:

- backing=auto (the default) resolves the backing file name next to the image, as qemu does,
  but never outside where the image is, by the rules every image decoder shares
  (filters/_parents.py): over the file plugin (file=PATH) or the curl plugin (url=URL)
  directly, a file in the same directory (a URL under the same one); otherwise the name is an
  export of the layer below, relative to the image's own export name, so that
  `--filter=qcow2 --filter=tar file box.tar` (every member an export) finds a sibling member
  and `file dir=DIR` a sibling file.  Absolute names, `../` out of the archive or directory,
  loops and missing files are errors.
- backing=none reads what the backing file would give as zeroes (nbdkit's qcow2dec does so).
- backing=PATH or a URI (http(s)://, nbd://, nbd+unix://) names the top image's backing
  file; its own backing files are found next to it.

Unallocated and zero clusters are holes: extents report them (as qemu's block status does)
and sparse reads leave them unfilled.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from ..api.chain import EXTENT_ZERO, Extents, Filter, FilterHandle, Layer, OpenNext
from ..api.errors import ConfigError, NBDError
from ..api.params import Param, Size, String
from ..formats.errors import FormatError
from ..formats.luks.errors import LuksError
from ..formats.luks.unlock import KdfBudgetError
from ..formats.qcow2.image import ByteCache, Cipher, Disk, Qcow2Disk, Qcow2Image, luks_header_reader, open_image
from ..formats.qcow2.structs import MAGIC
from ..formats.readers import Reader
from ._format_errors import nbd_error
from ._layer_bytes import READ_CHUNK
from ._parents import MAX_CHAIN, Location, OpenedFile, Siblings, layer_file
from ._vdisk import Chain, DiskHandle
from .luks import KEYSLOTS_FLAG, LuksKeys

log = logging.getLogger(__name__)


class ChainError(FormatError):
    """A chain of backing files that cannot be read (a loop, an unsupported backing format), or an
    encrypted image without a passphrase."""


class LayerDisk:
    """A raw backing file: the layer's bytes, its holes and extents as they are."""

    def __init__(self, layer: Layer) -> None:
        self.layer = layer
        self.size = layer.get_size()

    def read_into(self, buf: memoryview, offset: int) -> list[tuple[int, int]]:
        holes: list[tuple[int, int]] = []
        for start in range(0, len(buf), READ_CHUNK):
            piece = buf[start:start + READ_CHUNK]
            holes.extend((start + s, n) for s, n in self.layer.pread_sparse(piece, offset + start, 0))
        return holes

    def allocation(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        if not self.layer.can_extents():
            return [(offset, length, False)]
        found = Extents(offset, offset + length)
        self.layer.extents(length, offset, 0, found)
        return [(o, n, bool(kind & EXTENT_ZERO)) for o, n, kind in found] or [(offset, length, False)]


class Qcow2Filter(LuksKeys, Filter):
    """Decode a qcow2 image read-only: v2/v3, compressed, subclusters, backing files, snapshots, LUKS."""

    name = "qcow2"
    debug_flag_help = KEYSLOTS_FLAG
    backing = Param(String(), default="auto",
                    help="auto: the backing file next to the image (a sibling member of the archive, a sibling "
                         "file or URL); none: read as zeroes what the backing file would give; PATH or URI "
                         "(http(s)://, nbd://): the top image's backing file")
    snapshot = Param(String(), help="Serve this internal snapshot (by id, else by name, as qemu-img snapshot -l "
                                    "lists them) instead of the current disk")
    cache_size = Param(Size(minimum=1 << 20), key="qcow2-cache-size", default=64 << 20,
                       help="Memory for decoded L2 tables and decompressed clusters, all images together "
                            "(default 64M)")

    def dump_plugin(self) -> None:
        # nbdkit's qcow2dec lists the compression types it decodes.
        print(f"{self.name}_deflate=yes")
        print(f"{self.name}_zstd=yes")

    def prepare(self) -> None:
        """What get_ready does except checking the default export (the image filter calls it)."""
        if self.passphrase is not None or self.keyfile is not None:
            self.check_one_passphrase()
        self.prepare_keys()
        self._cache = ByteCache(self.cache_size)
        self._images: dict[tuple[Any, ...], Qcow2Image] = {}
        self._lock = threading.Lock()
        self.siblings = Siblings(self.name, self.open_below, param="backing")

    def get_ready(self) -> None:
        self.prepare()
        self.check_default_export()

    def check_default_export(self) -> None:
        """Open the default export's image (and its backing files, its LUKS volume) at start-up,
        so that a bad image or passphrase stops the server before it listens."""
        try:
            below = self.open_below(True, "")
        except (NBDError, OSError) as e:
            log.debug("%s: cannot open the layer below at start-up (%s); checking at connection", self.name, e)
            return
        chain = Chain()
        try:
            self.open_disk(below, "", self.open_below, chain)
        except KdfBudgetError as e:
            raise ConfigError(self.budget_message(e)) from None
        except (FormatError, NBDError) as e:
            raise ConfigError(f"{self.name}: {e}") from None
        finally:
            chain.close()
            below.close()

    def cleanup(self) -> None:
        if hasattr(self, "siblings"):
            self.siblings.cleanup()

    def open(self, next_open: OpenNext, readonly: bool, export_name: str) -> FilterHandle:
        below = next_open(True, export_name)  # decoded data is read-only
        chain = Chain()
        try:
            disk = self.open_disk(below, export_name, next_open, chain)
            return DiskHandle(self, below, disk, chain)
        except BaseException as e:
            chain.close()
            below.close()
            if isinstance(e, (FormatError, MemoryError)):
                raise nbd_error(e, f"{self.name}: ") from None
            raise

    # The chain of images ------------------------------------------------------------------
    def open_disk(self, below: Layer, export_name: str, next_open: OpenNext, chain: Chain) -> Qcow2Disk:
        """The disk `below` holds, with its backing files opened (into `chain`, closed by the caller)."""
        top = self.siblings.location_of(below, export_name)
        seen: list[tuple[bytes, str]] = []
        return self._qcow2_disk(layer_file(top.name, below), top, next_open, chain, seen, snapshot=self.snapshot)

    def _qcow2_disk(self, file: OpenedFile, where: Location, next_open: OpenNext, chain: Chain,
                    seen: list[tuple[bytes, str]], snapshot: str | None = None) -> Qcow2Disk:
        identity = file.read(0, 4096) + file.size.to_bytes(8, "big")
        for earlier, described in seen:
            if earlier == identity:
                raise ChainError(f"the backing file of {seen[-1][1]} is {described} again: a backing loop "
                                 "(give backing=PATH or backing=none)")
        if len(seen) > MAX_CHAIN:
            raise ChainError(f"more than {MAX_CHAIN} backing files")
        seen.append((identity, where.describe()))
        image = self._image(where, snapshot, file.read, file.size)
        cipher = self._cipher(image, file.read) if image.header.encryption else None
        backing: Disk | None = None
        name = image.header.backing_file
        if name is not None and self.backing != "none":
            if self.backing != "auto" and len(seen) == 1:
                backing_file, backing_where = self.siblings.open_explicit(self.backing)
            else:
                backing_file, backing_where = self.siblings.open(where, name, next_open, "the backing file")
            chain.add(backing_file)
            if self._is_qcow2(image.header.backing_format, backing_file):
                backing = self._qcow2_disk(backing_file, backing_where, next_open, chain, seen)
            else:
                assert backing_file.layer is not None  # the siblings are whole layers
                backing = LayerDisk(backing_file.layer)
        return Qcow2Disk(image, file.read, file.read_into, backing, cipher)

    def _image(self, where: Location, snapshot: str | None, read: Reader, size: int) -> Qcow2Image:
        key = (where.export, where.value, snapshot, size)
        with self._lock:
            image = self._images.get(key)
        if image is None:
            image = open_image(read, size, self._cache, snapshot)
            with self._lock:
                image = self._images.setdefault(key, image)
        return image

    def _cipher(self, image: Qcow2Image, read: Reader) -> Cipher:
        if self.passphrase is None:
            raise ChainError("the image is encrypted (LUKS): give passphrase= or keyfile=")
        luks_read, length = luks_header_reader(read, image.header)
        try:
            return self.unlock_volume(luks_read, length).cipher
        except KdfBudgetError:
            raise
        except LuksError as e:
            raise ChainError(f"the LUKS encryption header: {e}") from None

    def _is_qcow2(self, declared: str | None, file: OpenedFile) -> bool:
        if declared in ("qcow2", "raw"):
            return declared == "qcow2"
        if declared is not None:
            raise ChainError(f"backing file format {declared!r} is not supported (qcow2 or raw)")
        return file.size >= len(MAGIC) and file.read(0, len(MAGIC)) == MAGIC


FILTER = Qcow2Filter

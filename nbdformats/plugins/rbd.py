"""rbd plugin: a Ceph RBD image (or a snapshot of one) through librbd, as rbd-nbd serves it.

Uses Ceph's own Python bindings (Debian's python3-rados and python3-rbd; a virtualenv reaches
them when made with --system-site-packages).  All connections share one librbd image handle,
so a flush on any connection covers every write (multi-conn), and librbd orders overlapping
requests.  The handle is opened read-only at start-up (checking pool, namespace, image and
snapshot) and read-write when the first writable connection arrives.

librbd's exclusive lock is honoured: while another client holds it explicitly (rbd-nbd
--exclusive, `exclusive=true` here) writes fail with EROFS instead of taking it; with
`exclusive=true` this server takes the lock at start-up and keeps it.  Extents come from
librbd's diff iteration, so unallocated ranges are reported as holes.
"""

from __future__ import annotations

import contextlib
import errno
import threading
from typing import Any, Iterator

from ..api.chain import EXTENT_DATA, EXTENT_HOLE, EXTENT_ZERO, Extents, Plugin, PluginHandle
from ..api.errors import ConfigError, NBDError
from ..api.params import Bool, Int, Param, Path, String


# What a failed connect usually means, by librados' errno.
CONNECT_HINTS = {
    errno.ENOENT: " (no key for this client: check id= and keyring=)",
    errno.EACCES: " (key refused: check id= and keyring=)",
    errno.EPERM: " (key refused: check id= and keyring=)",
    errno.ETIMEDOUT: " (no monitor answered: check conf= and that the cluster is up)",
}


def _bindings() -> tuple[Any, Any]:
    try:
        import rados
        import rbd
    except ImportError as e:
        raise ConfigError(
            f"rbd: Ceph's Python bindings are missing ({e}): apt-get install python3-rados python3-rbd; "
            "a virtualenv must be made with --system-site-packages from the same python3") from None
    return rados, rbd


class RBDPlugin(Plugin):
    """A Ceph RBD image or snapshot, read-write (snapshots read-only), through librbd."""

    name = "rbd"
    latency_bound = True  # so a connection's requests wait for the cluster together

    pool = Param(String(), default="rbd", help="The pool holding the image")
    image = Param(String(), required=True, magic=True, help="The image name")
    snapshot = Param(String(), help="Serve this snapshot of the image (read-only)")
    namespace = Param(String(), default="", help="RADOS namespace of the image within the pool")
    conf = Param(Path("file"), help="ceph.conf to read (default: $CEPH_CONF, /etc/ceph/ceph.conf ...)")
    id = Param(String(), default="admin", help="Ceph client id (the NAME of client.NAME)")
    keyring = Param(Path("file"), help="Keyring holding the client's key (default: from ceph.conf)")
    exclusive = Param(Bool(), default=False,
                      help="Take the image's exclusive lock at start-up and keep it: other clients cannot write")
    timeout = Param(Int(0, 86400), default=30,
                    help="Whole seconds before a request to an unresponsive cluster fails (0: wait for ever)")

    def config_complete(self) -> None:
        if self.exclusive and self.snapshot:
            raise ConfigError("rbd: exclusive=true is for writing; a snapshot is read-only")
        if self.id.startswith("client."):
            self.id = self.id[len("client."):]

    @property
    def spec(self) -> str:
        namespace = f"{self.namespace}/" if self.namespace else ""
        snapshot = f"@{self.snapshot}" if self.snapshot else ""
        return f"{self.pool}/{namespace}{self.image}{snapshot}"

    def get_ready(self) -> None:
        rados, self.rbd = _bindings()
        self.lock = threading.Lock()
        self.writable_image: Any = None
        self.write_refusal = ""  # why the image could not be opened for writing
        options = {}
        if self.keyring:
            options["keyring"] = self.keyring
        if self.timeout:  # Ceph takes whole seconds here
            seconds = str(self.timeout)
            options.update(rados_osd_op_timeout=seconds, rados_mon_op_timeout=seconds,
                           client_mount_timeout=seconds)
        try:
            self.cluster = rados.Rados(rados_id=self.id, conffile=self.conf or "", conf=options)
        except rados.Error as e:
            raise ConfigError(f"rbd: bad Ceph configuration: {e}") from None
        try:
            self.cluster.connect(timeout=self.timeout)
        except rados.Error as e:
            self.cluster.shutdown()
            hint = CONNECT_HINTS.get(getattr(e, "errno", 0) or 0, "")
            raise ConfigError(f"rbd: cannot connect to the Ceph cluster as client.{self.id}{hint}: {e}") from None
        try:
            try:
                self.ioctx = self.cluster.open_ioctx(self.pool)
            except rados.ObjectNotFound:
                raise ConfigError(f"rbd: pool {self.pool!r} does not exist") from None
            self.ioctx.set_namespace(self.namespace)
            self.readonly_image = self._open(read_only=True)
            if self.exclusive:
                self.writable_image = self._open(read_only=False)
                try:
                    self.writable_image.lock_acquire(self.rbd.RBD_LOCK_MODE_EXCLUSIVE)
                except self.rbd.Error as e:
                    raise ConfigError(f"rbd: cannot take the exclusive lock of {self.spec} "
                                      f"(another client holds it?): {e}") from None
        except BaseException:
            self.cleanup()
            raise

    def _open(self, read_only: bool) -> Any:
        rbd = self.rbd
        try:
            return rbd.Image(self.ioctx, self.image, snapshot=self.snapshot, read_only=read_only)
        except rbd.ImageNotFound:
            image = self.spec.split("@")[0]
            if self.snapshot and self._image_exists():
                raise ConfigError(f"rbd: image {image} has no snapshot {self.snapshot!r}") from None
            raise ConfigError(f"rbd: image {image} does not exist") from None
        except rbd.Error as e:
            raise ConfigError(f"rbd: cannot open {self.spec}: {e}") from None

    def _image_exists(self) -> bool:
        return self.image in self.rbd.RBD().list(self.ioctx)

    def image_for(self, writable: bool) -> Any:
        """The shared handle: read-write once any connection wanted to write, else read-only."""
        with self.lock:
            if writable and self.writable_image is None and not self.snapshot and not self.write_refusal:
                try:
                    self.writable_image = self._open(read_only=False)
                except ConfigError as e:  # e.g. a client with read-only caps
                    self.write_refusal = str(e)
            return self.writable_image if self.writable_image is not None else self.readonly_image

    def cleanup(self) -> None:
        for attr in ("writable_image", "readonly_image", "ioctx"):
            handle = getattr(self, attr, None)
            if handle is not None:
                with contextlib.suppress(Exception):
                    handle.close()
                setattr(self, attr, None)
        cluster = getattr(self, "cluster", None)
        if cluster is not None:
            cluster.shutdown()
            self.cluster = None

    @contextlib.contextmanager
    def errors(self, what: str) -> Iterator[None]:
        """librbd's exceptions as NBDError (their errno goes to the client)."""
        try:
            yield
        except (self.rbd.Error, OSError) as e:
            code = getattr(e, "errno", None) or errno.EIO
            raise NBDError(abs(code), f"rbd {what} {self.spec}: {e}") from None

    class Handle(PluginHandle):
        def __init__(self, plugin: "RBDPlugin", readonly: bool, export_name: str) -> None:
            self.plugin = plugin
            self.image = plugin.image_for(writable=not readonly)
            with plugin.errors("size"):
                self.size = self.image.size()

        def get_size(self) -> int:
            return self.size

        def block_size(self) -> tuple[int, int, int]:
            return 1, 4096, 32 * 1024 * 1024

        def can_write(self) -> bool:
            return self.image is self.plugin.writable_image

        def can_multi_conn(self) -> bool:
            return True  # one librbd handle for all connections: a flush covers every write

        def can_fast_zero(self) -> bool:
            return True  # librbd discards whole objects and writes zeroes only in partial ones

        def pread(self, buf: memoryview, offset: int, flags: int) -> None:
            with self.plugin.errors("read"):
                data = self.image.read(offset, len(buf))
            if len(data) != len(buf):
                raise NBDError(errno.EIO, f"rbd read {self.plugin.spec}: {len(data)} of {len(buf)} bytes at {offset}")
            buf[:] = data

        def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
            with self.plugin.errors("write"):
                self.image.write(buf.tobytes(), offset)  # the binding takes bytes only

        def flush(self, flags: int) -> None:
            with self.plugin.errors("flush"):
                self.image.flush()

        def trim(self, count: int, offset: int, flags: int) -> None:
            with self.plugin.errors("discard"):
                self.image.discard(offset, count)

        def zero(self, count: int, offset: int, flags: int) -> None:
            with self.plugin.errors("write zeroes"):
                self.image.write_zeroes(offset, count)

        def extents(self, count: int, offset: int, flags: int, extents: Extents) -> None:
            allocated: list[tuple[int, int, bool]] = []
            with self.plugin.errors("diff"):
                self.image.diff_iterate(offset, count, None,
                                        lambda start, length, exists: allocated.append((start, length, exists)))
            position, end = offset, offset + count
            for start, length, exists in sorted(allocated):
                stop = min(start + length, end)
                start = max(start, position)
                if stop <= start:
                    continue
                if start > position:
                    extents.add(position, start - position, EXTENT_HOLE | EXTENT_ZERO)
                extents.add(start, stop - start, EXTENT_DATA if exists else EXTENT_HOLE | EXTENT_ZERO)
                position = stop
            if position < end:
                extents.add(position, end - position, EXTENT_HOLE | EXTENT_ZERO)


PLUGIN = RBDPlugin

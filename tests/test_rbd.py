"""rbd plugin against a real single-node Ceph (tests/ceph/up.sh).

Images are filled and checked with Ceph's own `rbd import` / `rbd export`; the server is driven
with nbdcopy, nbdinfo and libnbd.
Needs: ceph-mon ceph-mgr ceph-osd ceph-common python3-rados python3-rbd (installed by up.sh),
libnbd-bin, python3-libnbd, qemu-utils, xz-utils.
"""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from pathlib import Path

import nbd
import pytest

from conftest import nbdcopy_to_file, nbdinfo_json, random_file, run, serve, sha256_file
from fixtures.ceph import Ceph, ceph  # noqa: F401  (the session fixture)
from fixtures.filterchain import make_chain
from fixtures.luks import qemu_luks1, qemu_read_plain, qemu_write_plain
from nbdformats.api.errors import ConfigError

MiB = 1024 * 1024
HOLE = 3  # NBD_STATE_HOLE | NBD_STATE_ZERO


def connect(uri: str) -> nbd.NBD:
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


def test_imported_image_reads_back_byte_for_byte(ceph: Ceph, tmp: Path) -> None:
    source = random_file(tmp / "src.img", 8 * MiB + 4096, seed=11)
    with ceph.image(create=False) as name:
        ceph.rbd("import", "--no-progress", str(source), f"{ceph.pool}/{name}")
        with serve("rbd", f"pool={ceph.pool}", f"image={name}", f"conf={ceph.conf}") as srv:
            info = nbdinfo_json(srv.uri)["exports"][0]
            assert info["export-size"] == source.stat().st_size
            assert info["can_multi_conn"] and info["can_flush"] and info["can_trim"] and info["can_zero"]
            nbdcopy_to_file(srv.uri, tmp / "copy.img")
    assert sha256_file(tmp / "copy.img") == sha256_file(source)


def test_writes_come_back_from_rbd_export(ceph: Ceph, tmp: Path) -> None:
    data = random_file(tmp / "data.img", 16 * MiB, seed=12)
    with ceph.image("16M") as name:
        with serve("rbd", name) as srv:  # image is the bare argument, pool defaults to rbd
            run(["nbdcopy", "--connections=4", str(data), srv.uri])  # multi-conn writers
            h = connect(srv.uri)
            h.pwrite(b"Z" * 5000, 3 * MiB - 100)  # unaligned, across two sectors' worth of objects
            h.flush()
            h.shutdown()
        ceph.rbd("export", "--no-progress", f"{ceph.pool}/{name}", str(tmp / "export.img"))
    expected = bytearray(data.read_bytes())
    expected[3 * MiB - 100:3 * MiB + 4900] = b"Z" * 5000
    assert (tmp / "export.img").read_bytes() == bytes(expected)


def test_sparse_image_holes_in_the_map_zero_and_trim(ceph: Ceph, tmp: Path) -> None:
    with ceph.image("32M") as name:
        with serve("rbd", f"image={name}") as srv:
            assert [(e["offset"], e["length"], e["type"]) for e in nbdinfo_json(srv.uri, "--map")] == \
                [(0, 32 * MiB, HOLE)]
            h = connect(srv.uri)
            h.pwrite(b"a" * MiB, 4 * MiB)
            h.pwrite(b"b" * 4096, 20 * MiB + 8192)
            h.flush()
            extents = [(e["offset"], e["length"], e["type"]) for e in nbdinfo_json(srv.uri, "--map")]
            # RADOS reports an object's data from its start to its length: [20M, 20M + 8192) counts.
            assert extents == [(0, 4 * MiB, HOLE), (4 * MiB, MiB, 0), (5 * MiB, 15 * MiB, HOLE),
                               (20 * MiB, 12288, 0), (20 * MiB + 12288, 12 * MiB - 12288, HOLE)]
            # Zeroing the whole 4 MiB object and trimming it leave holes again; data reads as zero.
            h.zero(4 * MiB, 4 * MiB)
            h.trim(4 * MiB, 20 * MiB)
            h.flush()
            assert h.pread(MiB, 4 * MiB) == bytes(MiB)
            assert [(e["offset"], e["length"], e["type"]) for e in nbdinfo_json(srv.uri, "--map")] == \
                [(0, 32 * MiB, HOLE)]
            h.shutdown()
        # Ceph agrees: nothing is allocated.
        assert "0 B" in ceph.rbd("du", f"{ceph.pool}/{name}").splitlines()[-1]


def test_snapshot_is_served_read_only(ceph: Ceph, tmp: Path) -> None:
    before = random_file(tmp / "before.img", 4 * MiB, seed=13)
    with ceph.image(create=False) as name:
        spec = f"{ceph.pool}/{name}"
        ceph.rbd("import", "--no-progress", str(before), spec)
        ceph.rbd("snap", "create", f"{spec}@monday")
        with serve("rbd", f"image={name}") as srv:
            h = connect(srv.uri)
            h.pwrite(b"after" * 1000, 0)
            h.flush()
            h.shutdown()
        with serve("rbd", f"image={name}", "snapshot=monday") as srv:
            info = nbdinfo_json(srv.uri)["exports"][0]
            assert info["is_read_only"] is True
            nbdcopy_to_file(srv.uri, tmp / "snap.img")
            h = connect(srv.uri)
            with pytest.raises(nbd.Error):
                h.pwrite(b"x", 0)
            h.shutdown()
    assert sha256_file(tmp / "snap.img") == sha256_file(before)


def test_startup_errors_are_clear(ceph: Ceph, tmp: Path) -> None:
    bogus = tmp / "bogus.keyring"
    bogus.write_text("[client.admin]\n\tkey = AQBvaBVhAAAAABAAmbm+RXkkN0Op7gQx8CFaXw==\n")
    nowhere = tmp / "nowhere.conf"  # monitors on ports nobody listens on
    nowhere.write_text(re.sub(r"mon host = .*", "mon host = [v2:127.0.0.1:9,v1:127.0.0.1:7]",
                              Path(ceph.conf).read_text()))
    with ceph.image("4M") as name:
        cases = [
            ([("image", "no-such-image")], "image rbd/no-such-image does not exist"),
            ([("pool", "no-such-pool"), ("image", name)], "pool 'no-such-pool' does not exist"),
            ([("image", name), ("snapshot", "nope")], f"image rbd/{name} has no snapshot 'nope'"),
            ([("image", name), ("id", "nobody")], "no key for this client"),
            ([("image", name), ("keyring", str(bogus)), ("timeout", "5")], "cannot connect"),
            ([("image", name), ("snapshot", "s"), ("exclusive", "true")], "snapshot is read-only"),
            ([("image", name), ("conf", str(nowhere)), ("timeout", "1")], "no monitor answered"),
        ]
        for params, message in cases:
            with pytest.raises(ConfigError, match=message):
                make_chain([], "rbd", params)
        proc = run([sys.executable, "-m", "nbdformats", "rbd", "image=no-such-image"], check=False, timeout=60)
        assert proc.returncode != 0 and b"image rbd/no-such-image does not exist" in proc.stderr


def test_exclusive_lock_is_honoured(ceph: Ceph, tmp: Path) -> None:
    with ceph.image("8M") as name:
        # Another client takes the lock explicitly (as rbd-nbd --exclusive does) and keeps it.
        holder = subprocess.Popen(
            [sys.executable, "-c", "import rados, rbd, sys\n"
             "c = rados.Rados(conffile=''); c.connect(); io = c.open_ioctx(sys.argv[1])\n"
             "img = rbd.Image(io, sys.argv[2]); img.lock_acquire(rbd.RBD_LOCK_MODE_EXCLUSIVE)\n"
             "print('locked', flush=True); sys.stdin.read()\n", ceph.pool, name],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            assert holder.stdout.readline() == b"locked\n"
            with serve("rbd", f"image={name}") as srv:
                h = connect(srv.uri)
                assert h.pread(4096, 0) == bytes(4096)  # reading needs no lock
                with pytest.raises(nbd.Error) as failure:
                    h.pwrite(b"x" * 4096, 0)
                assert failure.value.errno == "EPERM"  # EROFS travels as NBD_EPERM
                h.shutdown()
            with pytest.raises(ConfigError, match="cannot take the exclusive lock"):
                make_chain([], "rbd", [("image", name), ("exclusive", "true")])
        finally:
            holder.communicate(b"", timeout=30)
        # Now ours holds it: a second writer is refused, and our writes go through.
        with serve("rbd", f"image={name}", "exclusive=true") as srv:
            other = run([sys.executable, "-c", "import rados, rbd, sys\n"
                         "c = rados.Rados(conffile=''); c.connect(); io = c.open_ioctx(sys.argv[1])\n"
                         "img = rbd.Image(io, sys.argv[2])\n"
                         "try:\n    img.write(b'y' * 512, 0)\nexcept rbd.ReadOnlyImage:\n    print('refused')\n",
                         ceph.pool, name], timeout=60)
            assert other.stdout == b"refused\n"
            h = connect(srv.uri)
            h.pwrite(b"mine" * 1024, 0)
            h.flush()
            assert h.pread(4, 0) == b"mine"
            h.shutdown()


def test_namespace_id_and_keyring_and_read_only_caps(ceph: Ceph, tmp: Path) -> None:
    if "nbdtest" not in ceph.rbd("namespace", "ls", ceph.pool).split():
        ceph.rbd("namespace", "create", f"{ceph.pool}/nbdtest")
    writer, reader = tmp / "writer.keyring", tmp / "reader.keyring"
    ceph.ceph("auth", "get-or-create", "client.nbdtest-rw", "mon", "profile rbd",
              "osd", f"profile rbd pool={ceph.pool} namespace=nbdtest", "-o", str(writer))
    ceph.ceph("auth", "get-or-create", "client.nbdtest-ro", "mon", "profile rbd",
              "osd", f"profile rbd-read-only pool={ceph.pool} namespace=nbdtest", "-o", str(reader))
    name = f"disk-{uuid.uuid4().hex[:8]}"
    spec = f"{ceph.pool}/nbdtest/{name}"
    ceph.rbd("create", "--size", "4M", spec)
    try:
        with serve("rbd", f"pool={ceph.pool}", "namespace=nbdtest", f"image={name}",
                   "id=nbdtest-rw", f"keyring={writer}") as srv:
            h = connect(srv.uri)
            h.pwrite(b"namespaced" * 100, MiB)
            h.flush()
            h.shutdown()
        # A client with read-only caps gets a read-only disk rather than an error.
        with serve("rbd", f"pool={ceph.pool}", "namespace=nbdtest", f"image={name}",
                   "id=client.nbdtest-ro", f"keyring={reader}") as srv:
            assert nbdinfo_json(srv.uri)["exports"][0]["is_read_only"] is True
            assert connect(srv.uri).pread(10, MiB) == b"namespaced"
        ceph.rbd("export", "--no-progress", spec, str(tmp / "ns.img"))
        assert (tmp / "ns.img").read_bytes()[MiB:MiB + 1000] == b"namespaced" * 100
    finally:
        ceph.rbd("rm", "--no-progress", spec)


def test_filters_over_rbd_luks_xz_cache(ceph: Ceph, tmp: Path) -> None:
    plain = random_file(tmp / "plain.img", 4 * MiB, seed=14)
    luks = qemu_luks1(tmp / "luks.img", "rbd secret", "4M")
    qemu_write_plain(luks, "rbd secret", plain)
    compressed = tmp / "disk.xz"
    compressed.write_bytes(run(["xz", "-c", "-1", "--block-size=1MiB", str(plain)]).stdout)
    with ceph.image(create=False) as luks_image, ceph.image(create=False) as xz_image:
        ceph.rbd("import", "--no-progress", str(luks), f"{ceph.pool}/{luks_image}")
        ceph.rbd("import", "--no-progress", str(compressed), f"{ceph.pool}/{xz_image}")
        with serve("--filter=xz", "rbd", f"image={xz_image}") as srv:
            nbdcopy_to_file(srv.uri, tmp / "unxz.img")
        assert sha256_file(tmp / "unxz.img") == sha256_file(plain)
        # Write plaintext through luks and a writeback cache; rbd export + qemu decrypt it.
        other = random_file(tmp / "other.img", 4 * MiB, seed=15)
        with serve("--filter=luks", "--filter=cache", "rbd", f"image={luks_image}",
                   "passphrase=rbd secret", "cache=writeback") as srv:
            run(["nbdcopy", "--flush", str(other), srv.uri])
        ceph.rbd("export", "--no-progress", f"{ceph.pool}/{luks_image}", str(tmp / "export.img"))
    qemu_read_plain(tmp / "export.img", "rbd secret", tmp / "qemu-plain.img")
    assert sha256_file(tmp / "qemu-plain.img") == sha256_file(other)


def test_cluster_stops_answering_mid_copy(ceph: Ceph, tmp: Path) -> None:
    """The OSD freezes: requests fail after timeout= seconds, the server stays up and recovers."""
    data = random_file(tmp / "data.img", 8 * MiB, seed=16)
    with ceph.image(create=False) as name:
        ceph.rbd("import", "--no-progress", str(data), f"{ceph.pool}/{name}")
        with serve("rbd", f"image={name}", "timeout=2") as srv:
            h = connect(srv.uri)
            assert h.pread(4096, 0) == data.read_bytes()[:4096]
            with ceph.frozen("osd.0"):
                with pytest.raises(nbd.Error):
                    h.pread(MiB, 5 * MiB)
                with pytest.raises(nbd.Error):
                    h.pwrite(b"w" * 4096, 6 * MiB)
            assert srv.proc.poll() is None
            assert h.pread(MiB, 5 * MiB) == data.read_bytes()[5 * MiB:6 * MiB]
            h.shutdown()


def test_one_front_server_over_rbd_and_s3(ceph: Ceph, tmp: Path) -> None:
    """The mirror plugin in front: every write lands in an RBD image and in S3 objects; the nbd plugin relays."""
    data = random_file(tmp / "data.img", 4 * MiB, seed=17)
    with ceph.image("8M") as name, ceph.bucket() as bucket:
        s3_params = ceph.s3_params(bucket, "m", "size=8M", "object-size=1M")
        with serve("rbd", f"image={name}") as rbd_srv, serve("S3", *s3_params) as s3_srv, \
                serve("mirror", f"server={rbd_srv.uri}", f"server={s3_srv.uri}", "write-quorum=2") as front:
            run(["nbdcopy", str(data), front.uri])
            h = connect(front.uri)
            h.pwrite(b"both" * 256, 7 * MiB + 3)
            h.flush()
            h.shutdown()
            nbdcopy_to_file(s3_srv.uri, tmp / "s3.img")
            with serve("nbd", f"socket={rbd_srv.socket}") as relay:  # the nbd plugin in front of rbd
                nbdcopy_to_file(relay.uri, tmp / "relay.img")
        ceph.rbd("export", "--no-progress", f"{ceph.pool}/{name}", str(tmp / "rbd.img"))
    expected = bytearray(data.read_bytes() + bytes(4 * MiB))
    expected[7 * MiB + 3:7 * MiB + 1027] = b"both" * 256
    assert (tmp / "rbd.img").read_bytes() == bytes(expected)
    assert (tmp / "s3.img").read_bytes() == bytes(expected)
    assert (tmp / "relay.img").read_bytes() == bytes(expected)

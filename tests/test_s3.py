"""S3 plugin against a real radosgw (tests/ceph/up.sh starts a single-node Ceph).

Objects are put and checked with boto3 directly; disks are read and written through the server
with nbdcopy, nbdinfo and libnbd, and nbdkit's own S3 plugin reads what we wrote.
Needs: ceph-mon ceph-mgr ceph-osd radosgw (installed by up.sh), nbdkit-plugin-python and
python3-boto3 (nbdkit's S3 plugin), libnbd-bin, python3-libnbd, qemu-utils, xz-utils; boto3 in .venv.
"""

from __future__ import annotations

import re
import sys
import threading
from pathlib import Path

import nbd
import pytest

from conftest import NBDFORMATS, nbdcopy_to_file, nbdinfo_json, nbdsh, random_file, run, serve, serve_nbdkit, sha256_file
from fixtures.ceph import Ceph, ceph  # noqa: F401  (the session fixture)
from fixtures.filterchain import make_chain
from fixtures.luks import qemu_luks1, qemu_read_plain, qemu_write_plain
from nbdformats.api.chain import EXTENT_DATA, EXTENT_HOLE, EXTENT_ZERO, Extents
from nbdformats.api.errors import ConfigError

MiB = 1024 * 1024
HOLE = EXTENT_HOLE | EXTENT_ZERO


def object_keys(ceph: Ceph, bucket: str, prefix: str) -> dict[str, int]:
    listing = ceph.s3().list_objects_v2(Bucket=bucket, Prefix=prefix)
    return {o["Key"]: o["Size"] for o in listing.get("Contents", [])}


def s3_chain(ceph: Ceph, bucket: str, key: str, *extra: tuple[str, str]):
    params = [tuple(p.split("=", 1)) for p in ceph.s3_params(bucket, key)] + list(extra)
    chain = make_chain([], "S3", params)
    return chain, chain.open(readonly=False, export_name="")


def test_single_object_reads_back_byte_for_byte(ceph: Ceph, tmp: Path) -> None:
    source = random_file(tmp / "disk.img", 5 * MiB + 12345, seed=1)  # not a multiple of anything
    secret = tmp / "secret"
    secret.write_text(ceph.secret_key + "\n")
    with ceph.bucket() as bucket:
        ceph.s3().upload_file(str(source), bucket, "images/disk.img")
        with serve("S3", *ceph.s3_params(bucket, "images/disk.img", "addressing-style=path", secret_file=secret)) as srv:
            info = nbdinfo_json(srv.uri)["exports"][0]
            assert info["export-size"] == source.stat().st_size
            assert info["is_read_only"] is True
            nbdcopy_to_file(srv.uri, tmp / "copy.img")
            assert sha256_file(tmp / "copy.img") == sha256_file(source)
            # Unaligned small reads at the end, and a write refused.
            proc = nbdsh(srv.uri, f"print(h.pread(100, {source.stat().st_size - 100}).hex())\n"
                                  "try:\n    h.pwrite(b'x', 0)\nexcept nbd.Error as e:\n    print('refused', e.errno)\n")
            tail_hex, refused = proc.stdout.decode().split("\n")[:2]
            assert bytes.fromhex(tail_hex) == source.read_bytes()[-100:]
            assert refused.startswith("refused")
            assert ceph.secret_key not in srv.stderr()


def test_object_size_mode_write_read_objects_and_holes(ceph: Ceph, tmp: Path) -> None:
    size, object_size = 8 * MiB, MiB
    data = random_file(tmp / "data.img", 5 * MiB + 512 * 1024, seed=2)  # objects 0-5, the last half written
    with ceph.bucket() as bucket:
        params = ceph.s3_params(bucket, "vm/disk", f"size={size}", f"object-size={object_size}")
        with serve("S3", *params) as srv:
            run(["nbdcopy", "--destination-is-zero", str(data), srv.uri])
            nbdcopy_to_file(srv.uri, tmp / "back.img")
            back = (tmp / "back.img").read_bytes()
            assert back[:len(data.read_bytes())] == data.read_bytes()
            assert back[len(data.read_bytes()):] == bytes(size - data.stat().st_size)
            # The bucket: objects KEY/%016x of exactly object-size for what was written, none beyond.
            keys = object_keys(ceph, bucket, "vm/disk/")
            assert keys == {f"vm/disk/{i:016x}": object_size for i in range(6)}
            body = ceph.s3().get_object(Bucket=bucket, Key="vm/disk/0000000000000003")["Body"].read()
            assert body == data.read_bytes()[3 * MiB:4 * MiB]
            # The untouched range is a hole for clients.
            extents = nbdinfo_json(srv.uri, "--map")
            assert [(e["offset"], e["length"], e["type"]) for e in extents] == \
                [(0, 6 * MiB, 0), (6 * MiB, 2 * MiB, HOLE)]
            # Unaligned write across an object boundary (read-modify-write of two objects),
            # then zero and trim delete whole objects.
            nbdsh(srv.uri, f"h.pwrite(b'A' * 3000, {2 * MiB - 1000})\n"
                           f"h.zero({MiB}, {4 * MiB})\n"
                           f"h.trim({2 * MiB}, {5 * MiB - 4096})\n"  # deletes object 5 only
                           "h.flush()\n")
            keys = object_keys(ceph, bucket, "vm/disk/")
            assert sorted(keys) == [f"vm/disk/{i:016x}" for i in (0, 1, 2, 3)]
            expected = bytearray(back)
            expected[2 * MiB - 1000:2 * MiB + 2000] = b"A" * 3000
            expected[4 * MiB:] = bytes(4 * MiB)
            nbdcopy_to_file(srv.uri, tmp / "final.img")
            assert (tmp / "final.img").read_bytes() == bytes(expected)


def test_same_objects_as_nbdkit(ceph: Ceph, tmp: Path) -> None:
    """nbdkit's S3 plugin and ours read each other's disks (nbdkit 1.32 takes object-size <= 64K)."""
    data = random_file(tmp / "data.img", 3 * MiB, seed=3)
    with ceph.bucket() as bucket:
        params = ceph.s3_params(bucket, "d", "size=4M", "object-size=64K")
        with serve_nbdkit("S3", *params) as ref:
            run(["nbdcopy", str(data), ref.uri])
        with serve("s3", *params) as srv:
            nbdcopy_to_file(srv.uri, tmp / "back.img")
            assert (tmp / "back.img").read_bytes() == data.read_bytes() + bytes(MiB)
            nbdsh(srv.uri, f"h.pwrite(b'B' * 70000, {3 * MiB - 5000})\nh.zero(65536, 0)\n")
        with serve_nbdkit("S3", *params) as ref:
            nbdcopy_to_file(ref.uri, tmp / "nbdkit.img")
    expected = bytearray(data.read_bytes() + bytes(MiB))
    expected[3 * MiB - 5000:3 * MiB + 65000] = b"B" * 70000
    expected[:65536] = bytes(65536)
    assert (tmp / "nbdkit.img").read_bytes() == bytes(expected)


def test_zero_with_may_trim_zeroes_partial_objects(ceph: Ceph) -> None:
    """nbdkit 1.32 turns zero+MAY_TRIM into a trim that leaves partial objects unzeroed: not here."""
    with ceph.bucket() as bucket:
        chain, top = s3_chain(ceph, bucket, "z", ("size", "2M"), ("object-size", "1M"))
        try:
            top.pwrite(memoryview(b"\xff" * (2 * MiB)), 0, 0)
            top.zero(MiB + 4096, 4096, 1)  # FLAG_MAY_TRIM; covers no whole object but the second's start
            out = bytearray(2 * MiB)
            top.pread(memoryview(out), 0, 0)
            assert out == b"\xff" * 4096 + bytes(MiB + 4096) + b"\xff" * (MiB - 8192)
            extents = Extents(0, 2 * MiB)
            top.extents(2 * MiB, 0, 0, extents)
            assert list(extents) == [(0, 2 * MiB, EXTENT_DATA)]
            top.zero(2 * MiB, 0, 0)
            extents = Extents(0, 2 * MiB)
            top.extents(2 * MiB, 0, 0, extents)
            assert list(extents) == [(0, 2 * MiB, HOLE)]
            assert object_keys(ceph, bucket, "z/") == {}
        finally:
            top.close()
            chain.cleanup()


def test_concurrent_partial_writes_to_one_object_all_survive(ceph: Ceph) -> None:
    """Two connections' read-modify-writes of the same object must not lose each other's bytes."""
    with ceph.bucket() as bucket:
        chain, first = s3_chain(ceph, bucket, "c", ("size", "1M"), ("object-size", "1M"))
        second = chain.open(readonly=False, export_name="")
        try:
            def writer(top, index: int) -> None:
                for n in range(index, 32, 2):
                    top.pwrite(memoryview(bytes([n + 1]) * 1000), n * 4096, 0)

            threads = [threading.Thread(target=writer, args=(top, i)) for i, top in enumerate((first, second))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            out = bytearray(MiB)
            second.pread(memoryview(out), 0, 0)
            assert all(out[n * 4096:n * 4096 + 1000] == bytes([n + 1]) * 1000 for n in range(32))
        finally:
            first.close()
            second.close()
            chain.cleanup()


def test_readahead_turns_small_sequential_reads_into_few_gets(ceph: Ceph) -> None:
    data = bytes(range(256)) * (4 * 4096) * 2  # 8 MiB, position-dependent bytes
    with ceph.bucket() as bucket:
        ceph.s3().put_object(Bucket=bucket, Key="seq", Body=data)
        for readahead, most_gets in (("2M", 6), ("0", 128)):
            chain, top = s3_chain(ceph, bucket, "seq", ("readahead", readahead))
            gets = []
            chain.plugin.s3.meta.events.register("before-send.s3.GetObject", lambda **kw: gets.append(1))
            try:
                out = bytearray(len(data))
                for offset in range(0, len(data), 64 * 1024):
                    top.pread(memoryview(out)[offset:offset + 64 * 1024], offset, 0)
                assert out == data
                assert len(gets) <= most_gets, (readahead, len(gets))
                # Random small reads fetch only what they ask for.
                before = len(gets)
                piece = bytearray(100)
                top.pread(memoryview(piece), 12345, 0)
                assert piece == data[12345:12445] and len(gets) - before <= 1
            finally:
                top.close()
                chain.cleanup()


def test_xz_and_luks_filters_over_s3(ceph: Ceph, tmp: Path) -> None:
    plain = random_file(tmp / "plain.img", 4 * MiB, seed=4)
    compressed = tmp / "disk.img.xz"
    compressed.write_bytes(run(["xz", "-c", "-1", "--block-size=1MiB", str(plain)]).stdout)
    luks = qemu_luks1(tmp / "luks.img", "s3 secret", "4M")
    qemu_write_plain(luks, "s3 secret", plain)
    with ceph.bucket() as bucket:
        s3 = ceph.s3()
        s3.upload_file(str(compressed), bucket, "disk.img.xz")
        s3.upload_file(str(luks), bucket, "luks.img")
        with serve("--filter=xz", "S3", *ceph.s3_params(bucket, "disk.img.xz")) as srv:
            nbdcopy_to_file(srv.uri, tmp / "unxz.img")
        assert sha256_file(tmp / "unxz.img") == sha256_file(plain)
        with serve("--filter=luks", "S3", *ceph.s3_params(bucket, "luks.img"), "passphrase=s3 secret") as srv:
            nbdcopy_to_file(srv.uri, tmp / "decrypted.img")
        assert sha256_file(tmp / "decrypted.img") == sha256_file(plain)
        # Writable LUKS over object-size mode: copy the encrypted image in, write plaintext
        # through the filter, copy the encrypted disk out and let qemu decrypt it.
        # (A LUKS1 payload runs to the end of the device: the disk may be larger than the image.)
        params = ceph.s3_params(bucket, "luksdisk", f"size={6 * MiB}", "object-size=1M")
        with serve("S3", *params) as srv:
            run(["nbdcopy", str(luks), srv.uri])
            other = random_file(tmp / "other.img", 4 * MiB, seed=5)
            with serve("--filter=luks", "S3", *params, "passphrase=s3 secret") as plain_srv:
                run(["nbdcopy", str(other), plain_srv.uri])
            nbdcopy_to_file(srv.uri, tmp / "encrypted.img")
        qemu_read_plain(tmp / "encrypted.img", "s3 secret", tmp / "qemu-plain.img")
        assert (tmp / "qemu-plain.img").read_bytes()[:4 * MiB] == other.read_bytes()


def test_startup_errors_are_clear(ceph: Ceph, tmp: Path) -> None:
    with ceph.bucket() as bucket:
        ceph.s3().put_object(Bucket=bucket, Key="there", Body=b"x" * 4096)
        cases = [
            (ceph.s3_params(bucket, "missing"), f"object s3://{bucket}/missing does not exist"),
            (ceph.s3_params("no-such-bucket-here", "there"), "bucket 'no-such-bucket-here' does not exist"),
            (ceph.s3_params("no-such-bucket-here", "d", "size=1M", "object-size=1M"), "does not exist"),
            ([p.replace(ceph.secret_key, "wrong-secret") for p in ceph.s3_params(bucket, "there")], "denied"),
            (ceph.s3_params(bucket, "d", "size=3M", "object-size=2M"), "multiple of object-size"),
            (ceph.s3_params(bucket, "d", "size=3M"), "together"),
            ([p.replace(ceph.endpoint, "http://127.0.0.1:1") for p in ceph.s3_params(bucket, "there")] +
             ["retries=0", "timeout=2"], "127.0.0.1:1"),
        ]
        for params, message in cases:
            with pytest.raises(ConfigError, match=re.escape(message)):
                make_chain([], "S3", [tuple(p.split("=", 1)) for p in params])
        # Through the real server: exit status and message, and no secret in it.
        proc = run(["timeout", "60", *NBDFORMATS, "S3",
                    *[p.replace(ceph.secret_key, "Wr0ngSecretValue") for p in ceph.s3_params(bucket, "there")]],
                   check=False)
        assert proc.returncode != 0
        assert b"denied" in proc.stderr and b"Wr0ngSecretValue" not in proc.stderr


def test_replaced_object_and_unreachable_store_fail_requests_server_stays_up(ceph: Ceph) -> None:
    with ceph.bucket() as bucket:
        s3 = ceph.s3()
        s3.put_object(Bucket=bucket, Key="obj", Body=b"1" * MiB)
        with serve("S3", *ceph.s3_params(bucket, "obj", "readahead=0", "timeout=2", "retries=0")) as srv:
            h = nbd.NBD()
            h.connect_uri(srv.uri)
            assert h.pread(4096, 0) == b"1" * 4096
            # Replaced while this connection is open: its reads fail rather than mix versions.
            s3.put_object(Bucket=bucket, Key="obj", Body=b"2" * MiB)
            with pytest.raises(nbd.Error) as failure:
                h.pread(4096, 4096)
            assert failure.value.errno == "EIO"
            # A new connection sees the new object.
            fresh = nbd.NBD()
            fresh.connect_uri(srv.uri)
            assert fresh.pread(4096, 4096) == b"2" * 4096
            # radosgw stops answering mid-copy: the request fails, the server lives on.
            with ceph.frozen("client.rgw.a"):
                with pytest.raises(nbd.Error):
                    fresh.pread(65536, MiB - 65536)
            assert srv.proc.poll() is None
            assert fresh.pread(65536, MiB - 65536) == b"2" * 65536
            h.shutdown()
            fresh.shutdown()


def test_tar_over_gzip_over_s3(ceph: Ceph, tmp: Path) -> None:
    plain = random_file(tmp / "disk.img", 3 * MiB + 512, seed=6)
    run(["tar", "-C", str(tmp), "-czf", str(tmp / "vm.tar.gz"), "disk.img"])
    with ceph.bucket() as bucket:
        ceph.s3().upload_file(str(tmp / "vm.tar.gz"), bucket, "vm.tar.gz")
        with serve("--filter=tar", "--filter=gzip", "S3", *ceph.s3_params(bucket, "vm.tar.gz"),
                   "tar-entry=disk.img") as srv:
            nbdcopy_to_file(srv.uri, tmp / "out.img")
    assert sha256_file(tmp / "out.img") == sha256_file(plain)


def test_trim_and_zero_of_many_objects_list_then_delete(ceph: Ceph) -> None:
    """Ranges of more than 1000 objects are not deleted name by name but from a listing."""
    with ceph.bucket() as bucket:
        chain, top = s3_chain(ceph, bucket, "many", ("size", "8M"), ("object-size", "4K"))  # 2048 objects
        try:
            for index in (0, 5, 1500, 2047):
                top.pwrite(memoryview(bytes([index % 251 + 1]) * 4096), index * 4096, 0)
            ceph.s3().put_object(Bucket=bucket, Key="many/not-an-object", Body=b"x")  # left alone
            extents = Extents(0, 8 * MiB)
            top.extents(8 * MiB, 0, 0, extents)
            assert [e for e in extents if e[2] == EXTENT_DATA] == \
                [(0, 4096, 0), (5 * 4096, 4096, 0), (1500 * 4096, 4096, 0), (2047 * 4096, 4096, 0)]
            top.trim(8 * MiB - 4096, 0, 0)  # objects 0-2046
            assert set(object_keys(ceph, bucket, "many/")) == {"many/00000000000007ff", "many/not-an-object"}
            top.zero(100, 8 * MiB - 100, 0)  # the last object's edge is zeroed, the rest deleted
            assert set(object_keys(ceph, bucket, "many/")) == {"many/00000000000007ff", "many/not-an-object"}
            out = bytearray(4096)
            top.pread(memoryview(out), 2047 * 4096, 0)
            assert out == bytes([2047 % 251 + 1]) * (4096 - 100) + bytes(100)
        finally:
            top.close()
            chain.cleanup()


class MinimalS3Client:
    """Only what nbdkit's S3 plugin calls (as nbdkit's test double, tests/test-S3/boto3): no
    head_object, no ContentLength, no `exceptions`, bodies without readinto, and a missing object
    as botocore's ClientError NoSuchKey."""

    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects = objects

    def get_object(self, Bucket: str, Key: str, Range: str | None = None) -> dict:
        from botocore.exceptions import ClientError
        if Key not in self.objects:
            raise ClientError({"Error": {"Code": "NoSuchKey"}}, "GetObject")
        data = self.objects[Key]
        if Range is None:
            return {"ResponseMetadata": {"HTTPHeaders": {"content-length": str(len(data))}}}
        start, end = map(int, re.fullmatch(r"bytes=(\d+)-(\d+)", Range).groups())

        class Body:
            def read(self) -> bytes:
                return data[start:end + 1]

            def close(self) -> None:
                pass
        return {"Body": Body()}

    def put_object(self, Bucket: str, Key: str, Body: bytes) -> None:
        self.objects[Key] = bytes(Body)

    def delete_objects(self, Bucket: str, Delete: dict) -> dict:
        for item in Delete["Objects"]:
            self.objects.pop(item["Key"], None)
        return {}

    def list_objects_v2(self, Bucket: str, Prefix: str, StartAfter: str = "", **_: object) -> dict:
        keys = sorted(k for k in self.objects if k.startswith(Prefix) and k > StartAfter)
        return {"Contents": [{"Key": k} for k in keys], "IsTruncated": False}


def test_a_boto3_with_only_nbdkits_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """boto3.client() with nbdkit's arguments when boto3 has no session (nbdkit's test-S3.sh
    runs the plugin against such a module); both layouts work through get_object alone."""
    import types
    objects = {"disk.img": bytes(range(256)) * 40}
    made = []

    def client(service: str, **arguments: object) -> MinimalS3Client:
        made.append((service, arguments))
        return MinimalS3Client(objects)
    monkeypatch.setitem(sys.modules, "boto3", types.SimpleNamespace(client=client))

    chain = make_chain([], "S3", [("access-key", "A"), ("secret-key", "S"), ("bucket", "b"), ("key", "disk.img")])
    top = chain.open(readonly=True, export_name="")
    assert made == [("s3", {"endpoint_url": None, "aws_access_key_id": "A", "aws_secret_access_key": "S",
                            "aws_session_token": None})]
    assert top.get_size() == 10240
    buf = memoryview(bytearray(300))
    top.pread(buf, 5000, 0)
    assert bytes(buf) == objects["disk.img"][5000:5300]
    top.close()
    chain.cleanup()

    chain = make_chain([], "S3", [("bucket", "b"), ("key", "vm"), ("size", "4096"), ("object-size", "1024")])
    top = chain.open(readonly=False, export_name="")
    top.pwrite(memoryview(b"x" * 100), 1000, 0)  # across objects 0 and 1, read-patch-write
    assert sorted(objects) == ["disk.img", "vm/0000000000000000", "vm/0000000000000001"]
    buf = memoryview(bytearray(4096))
    top.pread(buf, 0, 0)  # objects 2 and 3 are missing: zeroes
    assert bytes(buf) == bytes(1000) + b"x" * 100 + bytes(2996)
    top.zero(1024, 1024, 0)
    assert sorted(objects) == ["disk.img", "vm/0000000000000000"]
    top.close()
    chain.cleanup()

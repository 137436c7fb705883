"""xva filter: XenServer/XCP-ng exports served as disks (issue 7).

Fixtures come from tests/fixtures/xva.py, which writes XVAs the way xapi does (keep-alive
chunks, left-out zero chunks, sha1/xxhash checksum members, several disks).  Unit tests go
through the chain in-process; interop tests serve with nbdformats and read with nbdcopy,
qemu-img, nbdinfo and libnbd.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import json
import logging
import random
import re
import tarfile
from pathlib import Path

import pytest
import xxhash

from conftest import NBDFORMATS, nbdinfo_json, nbdsh, run, serve, sha256_file
from fixtures.reads import filter_over_file, read_export
from fixtures.xva import CHUNK, XvaDisk, make_xva, ova_xml, sparse_image, write_tar, xva_members
from nbdformats.api.chain import EXTENT_DATA, EXTENT_HOLE, EXTENT_ZERO, FLAG_REQ_ONE, Extents
from nbdformats.api.errors import ConfigError, NBDError
from nbdformats.formats.xva import archive, ovaxml

HOLE = EXTENT_HOLE | EXTENT_ZERO

# A root disk of 5 MiB + 12345 bytes: data in chunks 0, 2 (partly) and the short last one;
# chunks 1, 3 and 4 are zero and left out.  Keep-alives take numbers 1 and 4.
ROOT_SIZE = 5 * CHUNK + 12345
ROOT_DATA = {0: CHUNK, 2: 1000, 5: 12345}


def root_disk(**kw) -> XvaDisk:
    return XvaDisk(sparse_image(ROOT_SIZE, ROOT_DATA), "root", 0, **kw)


def data_disk(**kw) -> XvaDisk:
    return XvaDisk(sparse_image(3 * CHUNK, {1: CHUNK}, seed=1), "data", 1, **kw)


def chain_for(path: Path, **params: str):
    return filter_over_file("xva", path, *((k.replace("_", "-"), v) for k, v in params.items()))


def index_bytes(blob: bytes, with_checksums: bool = True) -> archive.Archive:
    return archive.index(lambda offset, n: blob[offset:offset + n], len(blob), with_checksums)


def tar_bytes(tmp: Path, members: list[tuple[str, bytes]], **kw) -> bytes:
    return write_tar(tmp / "x.xva", members, **kw).read_bytes()


# --- ova.xml -----------------------------------------------------------------------------

def test_ovaxml_pretty_printed_with_typed_values():
    # Shaped like a XenServer 5.5 export: indentation, <boolean>, <struct/>, an empty <data/>.
    text = """<value>  <struct>
      <member><name>version</name><value><struct>
        <member><name>export_vsn</name><value>2</value></member></struct></value></member>
      <member><name>objects</name><value><array><data>
        <value><struct>
          <member><name>class</name><value>VM</value></member>
          <member><name>id</name><value>Ref:0</value></member>
          <member><name>snapshot</name><value><struct>
            <member><name>name_label</name><value>web &amp; db</value></member>
            <member><name>is_a_snapshot</name><value> <boolean>0</boolean> </value></member>
            <member><name>VCPUs_params</name><value><struct/></value></member>
            <member><name>tags</name><value><array><data/></array></value></member>
          </struct></value></member></struct></value>
        <value><struct>
          <member><name>class</name><value>VBD</value></member>
          <member><name>id</name><value>Ref:3</value></member>
          <member><name>snapshot</name><value><struct>
            <member><name>VM</name><value>Ref:0</value></member>
            <member><name>VDI</name><value>Ref:4</value></member>
            <member><name>type</name><value>Disk</value></member>
            <member><name>userdevice</name><value>2</value></member></struct></value></member></struct></value>
        <value><struct>
          <member><name>class</name><value>VDI</value></member>
          <member><name>id</name><value>Ref:4</value></member>
          <member><name>snapshot</name><value><struct>
            <member><name>name_label</name><value>boot</value></member>
            <member><name>virtual_size</name><value><string>10737418240</string></value></member>
          </struct></value></member></struct></value>
      </data></array></value></member></struct></value>"""
    description = ovaxml.parse(text.encode())
    assert description.vm_name == "web & db"
    assert description.export_version == "2"
    assert description.vdis["Ref:4"].name == "boot"
    assert description.vdis["Ref:4"].virtual_size == 10 << 30
    assert description.userdevices == {"Ref:4": 2}


def test_ovaxml_of_the_fixture():
    description = ovaxml.parse(ova_xml([root_disk(), data_disk()], vm_name="vm1"))
    assert description.vm_name == "vm1"
    assert [(v.ref, v.name, v.virtual_size) for v in description.vdis.values()] == [
        ("Ref:4", "root", ROOT_SIZE), ("Ref:7", "data", 3 * CHUNK)]
    assert description.userdevices == {"Ref:4": 0, "Ref:7": 1}


@pytest.mark.parametrize("text, message", [
    ('<?xml version="1.0"?><!DOCTYPE v [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;">]>'
     '<value>&b;</value>', "not valid \\(safe\\) XML"),
    ("<value><struct>", "not valid"),
    ("<ovf:Envelope xmlns:ovf='http://schemas.dmtf.org/ovf/envelope/1'/>", "expected an XML-RPC <value>"),
    ("<value><struct><member><name>version</name><value>1</value></member></struct></value>",
     "no 'objects' array"),
    ("<value><struct><member><name>objects</name><value><array><data><value><struct>"
     "<member><name>class</name><value>VDI</value></member><member><name>id</name><value>Ref:1</value></member>"
     "<member><name>snapshot</name><value><struct><member><name>virtual_size</name><value>big</value></member>"
     "</struct></value></member></struct></value></data></array></value></member></struct></value>",
     "VDI Ref:1 has no valid virtual_size"),
    ("<value><array><data>" * 100 + "</data></array></value>" * 100, "nested too deeply"),
])
def test_ovaxml_rejects(text, message):
    with pytest.raises(ovaxml.OvaXmlError, match=message):
        ovaxml.parse(text.encode())


# --- the archive index ---------------------------------------------------------------------

@pytest.mark.parametrize("checksum", ["sha1", "xxhash", None])
@pytest.mark.parametrize("keepalives", [set(), {1, 4}])
def test_reads_match_the_image(tmp, checksum, keepalives):
    disks = [root_disk(keepalives=keepalives), data_disk()]
    path = make_xva(tmp / "vm.xva", disks, checksum=checksum)
    chain = chain_for(path)
    assert read_export(chain) == disks[0].data
    assert read_export(chain, "data") == disks[1].data


def test_keepalive_members_are_written_as_xapi_does(tmp):
    names = [name for name, _ in xva_members([root_disk(keepalives={1, 4})], checksum="xxhash")]
    # 0: data at 0; 1: keep-alive; 2: offset 1 MiB, zero, left out; 3: data at 2 MiB; 4: keep-alive;
    # 5 and 6: zero MiBs at 3 and 4 MiB; 7: the short last chunk at 5 MiB.
    assert names == ["ova.xml", "Ref:4/00000000", "Ref:4/00000000.xxhash", "Ref:4/00000001",
                     "Ref:4/00000001.xxhash", "Ref:4/00000003", "Ref:4/00000003.xxhash", "Ref:4/00000004",
                     "Ref:4/00000004.xxhash", "Ref:4/00000007", "Ref:4/00000007.xxhash"]


def test_extents_report_left_out_chunks_as_holes(tmp):
    chain = chain_for(make_xva(tmp / "vm.xva", [root_disk(keepalives={3})]))
    top = chain.open(readonly=True, export_name="")
    extents = Extents(0, ROOT_SIZE)
    top.extents(ROOT_SIZE, 0, 0, extents)
    assert list(extents) == [(0, CHUNK, EXTENT_DATA), (CHUNK, CHUNK, HOLE), (2 * CHUNK, CHUNK, EXTENT_DATA),
                             (3 * CHUNK, 2 * CHUNK, HOLE), (5 * CHUNK, 12345, EXTENT_DATA)]
    # From the middle of a hole, and only one extent with REQ_ONE.
    extents = Extents(3 * CHUNK + 5, ROOT_SIZE)
    top.extents(ROOT_SIZE - 3 * CHUNK - 5, 3 * CHUNK + 5, FLAG_REQ_ONE, extents)
    assert list(extents) == [(3 * CHUNK + 5, 2 * CHUNK - 5, HOLE)]
    top.close()


def test_size_not_a_multiple_of_a_mib_and_tiny_disks(tmp):
    disks = [XvaDisk(sparse_image(2 * CHUNK + 7, {0: 10, 2: 7}), "odd", 0),
             XvaDisk(sparse_image(4096, {0: 100}, seed=3), "tiny", 1),
             XvaDisk(bytes(CHUNK + 1), "zeroes", 2)]
    chain = chain_for(make_xva(tmp / "vm.xva", disks))
    for disk in disks:
        assert read_export(chain, disk.name) == disk.data


@pytest.mark.parametrize("format", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_other_tar_flavours_and_dot_slash_names(tmp, format):
    disks = [root_disk()]
    members = [(f"./{name}", data) for name, data in xva_members(disks)]
    members.append(("./notes/" + "a-very-long-directory-name/" * 6 + "README", b"hello"))
    chain = chain_for(write_tar(tmp / "vm.xva", members, format=format))
    assert read_export(chain) == disks[0].data


def test_disk_order_names_and_selection(tmp):
    # Five disks make refs Ref:4, 7, 9, 11, 13: the tar holds Ref:11 and Ref:13 first.
    disks = [XvaDisk(sparse_image(CHUNK, {0: 10}, seed=i), name, device)
             for i, (name, device) in enumerate([("d3", 3), ("Ref:7", 4), ("same", 1), ("same", 0), ("boot", 2)])]
    found = index_bytes(make_xva(tmp / "vm.xva", disks).read_bytes())
    assert [(d.vdi.ref, d.export_name) for d in found.disks] == [
        ("Ref:11", "Ref:11"), ("Ref:9", "Ref:9"), ("Ref:13", "boot"), ("Ref:4", "d3"), ("Ref:7", "Ref:7")]
    assert found.select("boot").vdi.ref == "Ref:13"
    assert found.select("Ref:4").vdi.name == "d3"
    assert found.select("0").vdi.ref == "Ref:11"
    assert found.select("4").vdi.ref == "Ref:7"
    with pytest.raises(LookupError, match="ambiguous .*Ref:11, Ref:9"):
        found.select("same")
    with pytest.raises(LookupError, match=r"no disk 'nope'.*disk 0 'same' \(Ref:11\).*disk 2 'boot'"):
        found.select("nope")
    with pytest.raises(LookupError):
        found.select("5")


def test_exports_list_every_disk(tmp):
    chain = chain_for(make_xva(tmp / "vm.xva", [root_disk(), data_disk()], vm_name="web01"), xva_disk="data")
    exports = chain.list_exports(True, False)
    assert [e.name for e in exports] == ["root", "data"]
    assert "web01" in exports[1].description and "Ref:7" in exports[1].description
    assert chain.default_export(True, False) == "data"
    assert read_export(chain) == data_disk().data  # "" is xva-disk=
    assert read_export(chain, "Ref:4") == root_disk().data
    assert read_export(chain, "0") == root_disk().data
    with pytest.raises(NBDError) as e:
        chain.open(readonly=True, export_name="swap")
    assert e.value.errno == errno.ENOENT and "root" in str(e.value)


def _damage(kind: str, tmp: Path) -> bytes:
    disks = [root_disk(), data_disk()]
    members = xva_members(disks)
    if kind == "no ova.xml":
        members = members[1:]
    elif kind == "short chunk":
        members = [(n, d[:4096] if n == "Ref:4/00000000" else d) for n, d in members]
    elif kind == "virtual_size too small":
        members[0] = ("ova.xml", ova_xml([root_disk(virtual_size=2 * CHUNK), data_disk()]))
    elif kind == "duplicate chunk":
        members.insert(3, members[1])
    elif kind == "no VDI":
        members = [(n.replace("Ref:7/", "Ref:99/"), d) for n, d in members]
    elif kind == "metadata only":
        members = members[:1]
    blob = tar_bytes(tmp, members)
    if kind == "truncated in a chunk":
        blob = blob[:len(blob) // 2]
    elif kind == "truncated at a member":
        blob = blob[:blob.rindex(b"Ref:7/00000002.xxhash")]  # cut just before that member's header
    elif kind == "not a tar":
        blob = hashlib.shake_256(b"x").digest(4096)
    elif kind == "gzip":
        blob = gzip.compress(blob)
    elif kind == "empty":
        blob = b""
    return blob


@pytest.mark.parametrize("kind, message", [
    ("not a tar", "not an XVA: .*not a tar archive"),
    ("empty", "not an XVA: the file is empty"),
    ("gzip", r"gzip-compressed, not a tar \(put --filter=gzip after --filter=xva\)"),
    ("no ova.xml", "the archive has no ova.xml"),
    ("short chunk", "chunk Ref:4/00000000 is 4096 bytes: chunks must be 1 MiB"),
    ("virtual_size too small", r"chunk Ref:4/00000002 .* lies past the end of the disk \(virtual_size 2097152\)"),
    ("duplicate chunk", "duplicate chunk Ref:4/00000000"),
    ("no VDI", "chunks in Ref:99/ but ova.xml has no VDI Ref:99"),
    ("metadata only", "no disk data"),
    ("truncated in a chunk", "truncated"),
    ("truncated at a member", "truncated tar: no end-of-archive marker"),
])
def test_bad_archives(tmp, kind, message):
    with pytest.raises(archive.XvaError, match=message):
        index_bytes(_damage(kind, tmp))


# --- checksums ---------------------------------------------------------------------------------

@pytest.mark.parametrize("checksum", ["sha1", "xxhash"])
def test_lazy_verification_fails_only_the_corrupt_chunk(tmp, caplog, checksum):
    disk = root_disk(corrupt={2})  # chunk 2 holds offset 2 MiB
    chain = chain_for(make_xva(tmp / "vm.xva", [disk], checksum=checksum), xva_verify="lazy")
    top = chain.open(readonly=True, export_name="")
    good = bytearray(CHUNK)
    top.pread(memoryview(good), 0, 0)
    assert good == disk.data[:CHUNK]
    for _ in range(2):  # and again: a bad chunk stays bad
        with pytest.raises(NBDError) as e:
            top.pread(memoryview(bytearray(10)), 2 * CHUNK + 100, 0)
        assert e.value.errno == errno.EIO and "chunk 00000002" in str(e.value)
    tail = bytearray(12345)
    top.pread(memoryview(tail), 5 * CHUNK, 0)
    assert tail == disk.data[5 * CHUNK:]
    stored = disk.data[2 * CHUNK:3 * CHUNK]
    expected = hashlib.sha1(stored).hexdigest() if checksum == "sha1" else "%016x" % xxhash.xxh64_intdigest(stored)
    mismatches = [r.getMessage() for r in caplog.records if "fails its" in r.getMessage()]
    assert len(mismatches) == 1 and f"expected {expected}, actual " in mismatches[0]
    top.close()


def test_full_verification_refuses_to_start(tmp):
    path = make_xva(tmp / "vm.xva", [root_disk(), data_disk(corrupt={1})], checksum="sha1")
    with pytest.raises(ConfigError, match=r"1 chunk\(s\) failed checksum verification: disk 1 'data' \(Ref:7\) "
                                          r"chunk 00000001"):
        chain_for(path, xva_verify="full")
    chain = chain_for(make_xva(tmp / "ok.xva", [root_disk(), data_disk()]), xva_verify="full")
    assert read_export(chain, "data") == data_disk().data


def test_no_verification_serves_the_bytes_as_stored(tmp):
    disk = root_disk(corrupt={0})
    chain = chain_for(make_xva(tmp / "vm.xva", [disk]), xva_verify="none")
    served = read_export(chain)
    assert served[0] == disk.data[0] ^ 0xFF and served[1:] == disk.data[1:]


def test_verification_without_checksums_warns(tmp, caplog):
    caplog.set_level(logging.WARNING)
    disk = root_disk(corrupt={0})
    chain = chain_for(make_xva(tmp / "vm.xva", [disk], checksum=None), xva_verify="full")
    assert any("no checksums" in r.getMessage() for r in caplog.records)
    assert read_export(chain)[1:] == disk.data[1:]


# --- interop with real clients -------------------------------------------------------------------

@pytest.fixture(scope="module")
def vm_xva(tmp_path_factory) -> tuple[Path, list[XvaDisk]]:
    tmp = tmp_path_factory.mktemp("xva")
    disks = [root_disk(keepalives={1}), data_disk()]
    for disk in disks:
        (tmp / f"{disk.name}.raw").write_bytes(disk.data)
    return make_xva(tmp / "vm.xva", disks, checksum="sha1"), disks


def test_nbdcopy_and_qemu_img_compare(vm_xva, tmp):
    path, disks = vm_xva
    with serve("--filter=xva", "file", str(path)) as srv:
        listed = nbdinfo_json(srv.uri, "--list")
        assert [e["export-name"] for e in listed["exports"]] == ["root", "data"]
        for disk in disks:
            source = path.parent / f"{disk.name}.raw"
            run(["nbdcopy", srv.uri_for(disk.name), tmp / "out.raw"], timeout=60)
            assert sha256_file(tmp / "out.raw") == sha256_file(source)
            run(["qemu-img", "compare", "-f", "raw", "-F", "raw", srv.uri_for(disk.name), source], timeout=60)


def test_holes_over_nbd(vm_xva):
    path, _ = vm_xva
    with serve("--filter=xva", "file", str(path)) as srv:
        extents = json.loads(run(["nbdinfo", "--map", "--json", srv.uri]).stdout)
        assert [(e["offset"], e["length"], e["type"]) for e in extents] == [
            (0, CHUNK, 0), (CHUNK, CHUNK, 3), (2 * CHUNK, CHUNK, 0), (3 * CHUNK, 2 * CHUNK, 3),
            (5 * CHUNK, 12345, 0)]
        # A structured read over the left-out chunks comes back as OFFSET_HOLE, not as data.
        out = nbdsh(srv.uri, "kinds = []\n"
                             "def chunk(buf, offset, status, err):\n"
                             "    kinds.append((status, offset, len(buf)))\n"
                             "    return 0\n"
                             f"buf = h.pread_structured({2 * CHUNK}, {3 * CHUNK}, chunk)\n"
                             "assert buf == bytes(len(buf))\n"
                             "print(kinds)\n").stdout.decode()
        assert f"[(2, {3 * CHUNK}, {2 * CHUNK})]" in out  # 2 = LIBNBD_READ_HOLE


def test_lazy_checksum_error_over_nbd(tmp):
    disk = root_disk(corrupt={2})
    path = make_xva(tmp / "vm.xva", [disk], checksum="xxhash")
    with serve("--filter=xva", "file", str(path)) as srv:
        out = nbdsh(srv.uri, f"assert h.pread(4096, 0) == {disk.data[:4096]!r}\n"
                             "try:\n"
                             f"    h.pread(4096, {2 * CHUNK})\n"
                             "    print('no error')\n"
                             "except nbd.Error as e:\n"
                             "    print('errno', e.errno)\n").stdout.decode()
        assert f"errno {errno.errorcode[errno.EIO]}" in out
        assert re.search(r"chunk 00000002 .* fails its xxhash checksum: expected [0-9a-f]{16}, actual [0-9a-f]{16}",
                         srv.stderr())


def _start_fails(tmp: Path, *args: str) -> str:
    proc = run([*NBDFORMATS, "-f", "-U", tmp / "sock", *args, "--run", "true"], check=False, timeout=60)
    assert proc.returncode != 0
    return proc.stderr.decode()


def test_start_up_errors(tmp):
    path = make_xva(tmp / "vm.xva", [root_disk(), data_disk(corrupt={0})], checksum="sha1")
    assert "chunk 00000000" in _start_fails(tmp, "--filter=xva", "file", str(path), "xva-verify=full")
    assert "no disk 'swap'" in _start_fails(tmp, "--filter=xva", "file", str(path), "xva-disk=swap")
    (tmp / "cut.xva").write_bytes(path.read_bytes()[:3 * CHUNK])
    assert "truncated" in _start_fails(tmp, "--filter=xva", "file", str(tmp / "cut.xva"))


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_compressed_exports(tmp, compression):
    disks = [root_disk(keepalives={4}), data_disk()]
    path = make_xva(tmp / f"vm.xva.{compression}", disks, compress=compression)
    with serve("--filter=xva", f"--filter={compression}", "file", str(path)) as srv:
        for disk in disks:
            run(["nbdcopy", srv.uri_for(disk.name), tmp / "out.raw"], timeout=60)
            assert (tmp / "out.raw").read_bytes() == disk.data


def test_over_another_plugin(vm_xva, tmp):
    # nbdkit's example Python file plugin, run by our python plugin: the filter only needs preads.
    path, disks = vm_xva
    script = Path(__file__).parent / "fixtures" / "python_plugins" / "file.py"
    with serve("--filter=xva", "python", str(script), f"file={path}") as srv:
        run(["nbdcopy", srv.uri_for("data"), tmp / "out.raw"], timeout=60)
        assert (tmp / "out.raw").read_bytes() == disks[1].data


def test_writable_through_the_cow_filter(tmp):
    """XVA is read-only; the cow filter in front takes writes into an overlay, the archive never changes."""
    path = make_xva(tmp / "vm.xva", [root_disk()])
    before = sha256_file(path)
    with serve("--filter=cow", "--filter=xva", "file", str(path)) as srv:
        info = nbdinfo_json(srv.uri)["exports"][0]
        assert info["is_read_only"] is False
        out = nbdsh(srv.uri, "h.pwrite(b'overlay!' * 512, 4096)\nprint(h.pread(8, 4096 + 8).decode())")
        assert out.stdout.strip() == b"overlay!"
        # a second connection sees the same overlay, and unwritten bytes still come from the archive
        out = nbdsh(srv.uri, f"print(h.pread(8, 4096).decode())\nimport sys\n"
                             f"sys.stdout.buffer.write(h.pread(4096, {ROOT_SIZE} - 4096))")
        assert out.stdout[:9] == b"overlay!\n"
        assert out.stdout[9:] == root_disk().data[ROOT_SIZE - 4096:]
    assert sha256_file(path) == before


# --- an XVA built here from the format description, not by fixtures/xva.py ------------------

INDEPENDENT_OVA = """<?xml version="1.0"?>
<value><struct>
 <member><name>version</name><value><struct>
  <member><name>hostname</name><value><string>xcp-ng-1</string></value></member>
  <member><name>product_version</name><value><string>8.2.1</string></value></member>
  <member><name>export_vsn</name><value><string>2</string></value></member>
 </struct></value></member>
 <member><name>objects</name><value><array><data>
  <value><struct>
   <member><name>class</name><value><string>VM</string></value></member>
   <member><name>id</name><value><string>Ref:0</string></value></member>
   <member><name>snapshot</name><value><struct>
    <member><name>name_label</name><value><string>independent</string></value></member>
    <member><name>is_a_snapshot</name><value><boolean>0</boolean></value></member>
    <member><name>VBDs</name><value><array><data><value>Ref:1</value></data></array></value></member>
   </struct></value></member>
  </struct></value>
  <value><struct>
   <member><name>class</name><value><string>VBD</string></value></member>
   <member><name>id</name><value><string>Ref:1</string></value></member>
   <member><name>snapshot</name><value><struct>
    <member><name>VM</name><value>Ref:0</value></member>
    <member><name>VDI</name><value>Ref:2</value></member>
    <member><name>type</name><value>Disk</value></member>
    <member><name>userdevice</name><value>0</value></member>
   </struct></value></member>
  </struct></value>
  <value><struct>
   <member><name>class</name><value><string>VDI</string></value></member>
   <member><name>id</name><value><string>Ref:2</string></value></member>
   <member><name>snapshot</name><value><struct>
    <member><name>name_label</name><value><string>system</string></value></member>
    <member><name>uuid</name><value>4d2c3e1a-0b6f-4e7a-9c1d-2f3e4a5b6c7d</value></member>
    <member><name>virtual_size</name><value><i8>VIRTUAL_SIZE</i8></value></member>
   </struct></value></member>
  </struct></value>
 </data></array></value></member>
</struct></value>
"""


def test_an_xva_written_from_the_format_description(tmp):
    """Written with tarfile and hashlib here, as xen-api's stream_vdi.ml describes it (not with
    fixtures/xva.py): 1 MiB chunks `Ref:2/%08d` with SHA-1 `.checksum` members, all-zero chunks
    left out (2 and 3), a zero-length keep-alive taking number 5 without moving the offset, a
    short last chunk ending at virtual_size; typed XML-RPC values (<string>, <i8>, <boolean>)."""
    mib = 1 << 20
    rng = random.Random(7)
    image = bytearray(5 * mib + 4321)
    for start in (0, mib, 4 * mib):
        image[start:start + mib] = rng.randbytes(mib)[:len(image) - start]
    chunks = [(0, image[:mib]), (1, image[mib:2 * mib]), (4, image[4 * mib:5 * mib]), (5, b""),
              (6, image[5 * mib:])]  # 2 and 3 are zero: left out; 5 is a keep-alive
    path = tmp / "independent.xva"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1700000000
            tar.addfile(info, io.BytesIO(data))
        add("ova.xml", INDEPENDENT_OVA.replace("VIRTUAL_SIZE", str(len(image))).encode())
        for number, data in chunks:
            add(f"Ref:2/{number:08d}", bytes(data))
            add(f"Ref:2/{number:08d}.checksum", hashlib.sha1(data).hexdigest().encode())
    with serve("--filter=xva", "file", str(path), "xva-verify=full") as srv:
        listing = nbdinfo_json(srv.uri, "--list")["exports"]
        assert [(e["export-name"], e["export-size"]) for e in listing] == [("system", len(image))]
        run(["nbdcopy", srv.uri, str(tmp / "out.img")])
    assert sha256_file(tmp / "out.img") == hashlib.sha256(image).hexdigest()

"""The ova filter: an OVA built as VMware and VirtualBox build them (a ustar tar: the OVF first,
the manifest, streamOptimized VMDKs made by qemu-img), and the same unpacked in a directory.
Each disk must equal qemu's decode of the extracted VMDK; `nbdinfo --list` shows every disk."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from conftest import NBDFORMATS, run, serve
from fixtures.vdisks import MiB, OvaDisk, make_raw, ovf_text, qemu_convert, qemu_raw, write_ova

DISKS = {"testvm-disk1.vmdk": 24 * MiB + 2560, "testvm-disk2.vmdk": 6 * MiB}


@pytest.fixture(scope="module")
def ova(tmp_path_factory) -> dict:
    """vm.ova (disk2 gzip-compressed, as ovf:compression="gzip"), its unpacked directory, and what
    qemu reads from each VMDK."""
    work = tmp_path_factory.mktemp("ova")
    disks, expected = [], {}
    for seed, (href, size) in enumerate(DISKS.items(), 1):
        vmdk = qemu_convert(make_raw(work / f"{href}.raw", size, seed), "vmdk", work / href,
                            "subformat=streamOptimized")
        expected[href] = qemu_raw(vmdk, "vmdk", work / f"{href}.ref")
        data = vmdk.read_bytes()
        disks.append(OvaDisk(href, gzip.compress(data) if seed == 2 else data, size, "gzip" if seed == 2 else ""))
    unpacked = work / "unpacked"
    unpacked.mkdir()
    write_ova(work / "vm.ova", "testvm", disks)
    run(["tar", "-C", unpacked, "-xf", work / "vm.ova"])
    write_ova(work / "bad-manifest.ova", "testvm", disks, corrupt_manifest=True)
    write_ova(work / "sha1.ova", "testvm", disks, manifest="SHA1")
    return {"work": work, "ova": work / "vm.ova", "dir": unpacked, "disks": disks, "expected": expected}


def copy_out(uri: str, out: Path) -> bytes:
    out.unlink(missing_ok=True)
    run(["nbdcopy", uri, out])
    return out.read_bytes()


def test_list_shows_every_disk_with_its_description(ova):
    with serve("--filter=ova", "file", ova["ova"]) as srv:
        listed = json.loads(run(["nbdinfo", "--list", "--json", srv.uri]).stdout)["exports"]
    assert [e["export-name"] for e in listed] == list(DISKS)
    for number, export in enumerate(listed, 1):
        assert export["description"].startswith(f"vmdisk{number} of VM testvm, Debian GNU/Linux 10 (64-bit)")
        assert export["export-size"] == len(ova["expected"][export["export-name"]])


@pytest.mark.parametrize("source", ["ova", "dir"])
def test_each_disk_equals_qemus_decode(ova, source):
    args = ("file", ova["ova"]) if source == "ova" else ("file", f"dir={ova['dir']}", "ova-ovf=testvm.ovf")
    with serve("--filter=ova", *args, "ova-verify=true") as srv:
        for href, expected in ova["expected"].items():
            assert copy_out(srv.uri_for(href), ova["work"] / "out.raw") == expected, href
        assert copy_out(srv.uri, ova["work"] / "out.raw") == ova["expected"]["testvm-disk1.vmdk"]  # the default


def test_manifest_checked_with_sha1_and_sha256(ova):
    ok = run([*NBDFORMATS, "-U", "-", "--filter=ova", "file", ova["work"] / "sha1.ova", "ova-verify=true", "--run",
              "true"], check=False)
    assert ok.returncode == 0, ok.stderr.decode()
    bad = run([*NBDFORMATS, "-U", "-", "--filter=ova", "file", ova["work"] / "bad-manifest.ova", "ova-verify=true",
               "--run", "true"], check=False)
    err = bad.stderr.decode()
    assert bad.returncode != 0 and "the manifest's digests do not match: testvm-disk2.vmdk" in err, err
    unchecked = run([*NBDFORMATS, "-U", "-", "--filter=ova", "file", ova["work"] / "bad-manifest.ova", "--run",
                     "true"], check=False)
    assert unchecked.returncode == 0  # ova-verify defaults to false, as reading does not need the manifest


def test_writes_through_cow(ova):
    with serve("--filter=cow", "--filter=ova", "file", ova["ova"]) as srv:
        run(["nbdsh", "-u", srv.uri, "-c", "h.pwrite(b'y' * 4096, 0); assert h.pread(4096, 0) == b'y' * 4096"])


@pytest.mark.parametrize("ovf, message", [
    ('<?xml version="1.0"?><!DOCTYPE e [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;">]><Envelope>&b;</Envelope>',
     "not valid XML"),
    ('<?xml version="1.0"?><!DOCTYPE e [<!ENTITY x SYSTEM "file:///etc/passwd">]><Envelope>&x;</Envelope>',
     "not valid XML"),
    ("<Envelope><References/></Envelope>", "lists no disk"),
    (None, "'../escape.vmdk' leads outside"),
])
def test_hostile_descriptors(ova, tmp_path, ovf, message):
    disks = ova["disks"]
    if ovf is None:
        ovf = ovf_text("testvm", disks).replace('ovf:href="testvm-disk1.vmdk"', 'ovf:href="../escape.vmdk"')
    write_ova(tmp_path / "x.ova", "testvm", disks, ovf=ovf, manifest="")
    proc = run([*NBDFORMATS, "-U", "-", "--filter=ova", "file", tmp_path / "x.ova", "--run", "true"], check=False)
    err = proc.stderr.decode()
    assert proc.returncode != 0 and "Traceback" not in err and message in err, err

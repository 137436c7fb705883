"""The tmpdisk and ondemand plugins: disks made by a command (mkfs by default) for each client or
each export name, against nbdkit 1.32 where it applies."""

from __future__ import annotations

import os
import re
import subprocess
import time

import pytest

from conftest import NBDFORMATS, SYSTEM_PYTHON, nbdinfo_json, nbdsh, run, serve, serve_nbdkit

FLAGS = ("is_read_only", "can_flush", "can_fua", "can_multi_conn", "can_trim", "can_zero", "can_fast_zero",
         "export-size")


def facts(uri: str) -> dict:
    info = nbdinfo_json(uri)["exports"][0]
    return {k: info.get(k) for k in FLAGS}


def test_tmpdisk_flags_match_nbdkit_and_each_client_gets_a_fresh_ext4(tmp, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp))
    with serve_nbdkit("tmpdisk", "64M") as ref, serve("tmpdisk", "64M") as ours:
        assert facts(ours.uri) == facts(ref.uri)
        nbdsh(ours.uri, "h.pwrite(b'scribble', 1024 + 56); h.flush()")
        # The second client gets a new filesystem: the ext4 superblock's magic (at 1024 + 56) is intact.
        assert nbdsh(ours.uri, "print(h.pread(2, 1024 + 56).hex())").stdout == b"53ef\n"
    assert not [p for p in tmp.iterdir() if p.name.startswith("tmpdisk")]  # nothing left behind


def test_tmpdisk_command_variables_and_size(tmp, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp))
    command = 'truncate -s $((size * 2)) "$disk"; printf "%s" "$greeting" | dd of="$disk" conv=notrunc status=none'
    with serve("tmpdisk", "1M", f"command={command}", "greeting=it's me") as srv:
        assert nbdsh(srv.uri, "print(h.get_size(), h.pread(7, 0).decode())").stdout == b"2097152 it's me\n"


def test_tmpdisk_command_failure_refuses_the_client_not_the_server(tmp, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp))
    with serve("tmpdisk", "1M", "command=echo 'mkfs exploded' >&2; exit 7") as srv:
        assert nbdsh(srv.uri, "print(h.get_size())", check=False).returncode != 0
        assert nbdsh(srv.uri, "print(h.get_size())", check=False).returncode != 0
        assert srv.proc.poll() is None
        assert "exited with status 7: mkfs exploded" in srv.stderr()
    assert not list(tmp.iterdir())


@pytest.mark.parametrize("plugin", ["tmpdisk", "ondemand"])
@pytest.mark.parametrize("arg, message", [("disk=/etc/passwd", "'disk' parameter cannot be set"),
                                          ("bad-name=1", "not a shell variable name")])
def test_parameters_that_cannot_be_shell_variables(tmp, plugin, arg, message):
    extra = [f"dir={tmp}"] if plugin == "ondemand" else []
    result = run([*NBDFORMATS, "-U", "-", plugin, "1M", *extra, arg, "--run", "true"], check=False)
    assert result.returncode == 1 and message.encode() in result.stderr


def test_ondemand_flags_and_exports_match_nbdkit(tmp):
    ours_dir, ref_dir = tmp / "ours", tmp / "ref"
    ours_dir.mkdir()
    ref_dir.mkdir()
    for directory in (ours_dir, ref_dir):
        (directory / ".hidden").write_text("state")
        (directory / "with.dot").write_text("x")
    with serve_nbdkit("ondemand", f"dir={ref_dir}", "32M") as ref, serve("ondemand", f"dir={ours_dir}", "32M") as ours:
        assert facts(ours.uri) == facts(ref.uri)
        for srv in (ref, ours):
            nbdsh(srv.uri_for("alpha"), "h.pwrite(b'persist', 0x20000); h.flush()")
        # The list itself (qemu-nbd -L shows it as sent; nbdinfo --list shows each export's canonical name).
        lists = [sorted(re.findall(r"export: '(.*)'", run(["qemu-nbd", "-k", s.socket, "-L"]).stdout.decode()))
                 for s in (ours, ref)]
        assert lists[0] == lists[1] == ["", "alpha"]
        assert nbdsh(ours.uri_for("alpha"), "print(h.pread(7, 0x20000))").stdout == b"bytearray(b'persist')\n"
    assert sorted(os.listdir(ours_dir)) == sorted(os.listdir(ref_dir)) == [".hidden", "alpha", "default", "with.dot"]


@pytest.mark.parametrize("name", ["a.b", "a:b", "x" * 256])
def test_ondemand_refuses_bad_export_names(tmp, name):
    with serve("ondemand", f"dir={tmp}", "1M", "command=truncate -s $size \"$disk\"") as srv:
        assert nbdsh(srv.uri_for(name), "print(h.get_size())", check=False).returncode != 0
    assert os.listdir(tmp) == []


HOLD = """
import nbd, sys, time
h = nbd.NBD()
h.connect_uri(sys.argv[1])
print("open", flush=True)
time.sleep(float(sys.argv[2]))
h.shutdown()
"""


@pytest.mark.parametrize("wait", [False, True])
def test_ondemand_locks_a_filesystem_in_use(tmp, wait):
    with serve("ondemand", f"dir={tmp}", "1M", "command=truncate -s $size \"$disk\"", f"wait={str(wait).lower()}") as srv:
        holder = subprocess.Popen([SYSTEM_PYTHON, "-c", HOLD, srv.uri_for("busy"), "3"], stdout=subprocess.PIPE)
        try:
            assert holder.stdout.readline() == b"open\n"
            start = time.monotonic()
            second = nbdsh(srv.uri_for("busy"), "print(h.get_size())", check=False, timeout=60)
            if wait:
                assert second.returncode == 0 and time.monotonic() - start > 1
            else:
                assert second.returncode != 0
                assert "filesystem is locked by another client" in srv.stderr()
                assert nbdsh(srv.uri_for("other"), "print(h.get_size())").stdout == b"1048576\n"
        finally:
            holder.wait(30)

"""file dir=: every export is confined to the directory (issue 20, item 3).  A symbolic link
that leads outside, by an absolute path or by "..", serves nothing and takes no write, through
openat2(RESOLVE_BENEATH) and through the fallback that resolves the name itself; links that
stay inside still serve.  Before, `innocent.img -> /outside/victim.img` was read and written."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from conftest import SYSTEM_PYTHON, nbdinfo_json, run, serve
from fixtures.filterchain import make_chain
from nbdformats.api import syscalls
from nbdformats.api.errors import NBDError

VICTIM = b"outside the directory\n" * 100


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    """exports/ with a regular file, a link to it, links out, a FIFO; victim.img outside."""
    exports = tmp_path / "exports"
    (exports / "sub").mkdir(parents=True)
    (exports / "disk.img").write_bytes(b"d" * 8192)
    (exports / "sub" / "deep.img").write_bytes(b"e" * 4096)
    victim = tmp_path / "victim.img"
    victim.write_bytes(VICTIM)
    os.symlink("disk.img", exports / "alias.img")
    os.symlink("sub/deep.img", exports / "deep-alias.img")
    os.symlink(victim, exports / "innocent.img")  # absolute
    os.symlink("../victim.img", exports / "relative.img")
    os.symlink("sub/../../victim.img", exports / "winding.img")
    os.symlink("/etc/passwd", exports / "passwd")
    os.symlink("/proc/self/root/etc/passwd", exports / "magic")
    os.mkfifo(exports / "fifo")
    return exports, victim


OUTSIDE = ["innocent.img", "relative.img", "winding.img", "passwd", "magic"]


def open_export(exports: Path, name: str, readonly: bool):
    return make_chain([], "file", [("dir", str(exports))]).open(readonly=readonly, export_name=name)


@pytest.mark.parametrize("openat2", ["kernel", "fallback"])
def test_links_out_of_the_directory_are_refused(tree, monkeypatch, openat2):
    exports, victim = tree
    if openat2 == "fallback":
        def unavailable(*args):
            raise OSError(errno.ENOSYS, "openat2 unavailable")
        monkeypatch.setattr(syscalls, "openat2", unavailable)
    for name in OUTSIDE:
        for readonly in (True, False):
            with pytest.raises(NBDError, match=f"export '{name}': a symbolic link leading outside .*: refused") as e:
                open_export(exports, name, readonly)
            assert e.value.errno == errno.EPERM
    for name, content in (("disk.img", b"d"), ("alias.img", b"d"), ("deep-alias.img", b"e")):
        layer = open_export(exports, name, readonly=False)
        buf = bytearray(16)
        layer.pread(memoryview(buf), 0, 0)
        assert bytes(buf) == content * 16 and layer.can_write()
        layer.close()
    for name in ("fifo", "missing.img", "sub", "sub/deep.img", "..", ".", "a\nb", "a\0b"):
        with pytest.raises(NBDError) as e:
            open_export(exports, name, readonly=True)
        assert e.value.errno == errno.ENOENT, name
    assert victim.read_bytes() == VICTIM


def test_through_the_server_nothing_outside_is_read_or_written(tree):
    exports, victim = tree
    with serve("file", f"dir={exports}") as srv:
        listed = {e["export-name"] for e in nbdinfo_json(srv.uri, "--list")["exports"]}
        assert listed == {"alias.img", "deep-alias.img", "disk.img"}
        for name in OUTSIDE:
            script = ("import nbd, sys\nh = nbd.NBD()\nh.set_export_name(sys.argv[2])\n"
                      "try:\n    h.connect_unix(sys.argv[1])\nexcept nbd.Error:\n    print('refused')\n"
                      "else:\n    h.pwrite(b'X' * 512, 0)\n    print(h.pread(64, 0))\n")
            proc = run([SYSTEM_PYTHON, "-c", script, srv.socket, name], timeout=60, check=False)
            assert proc.stdout.strip() == b"refused", (name, proc.stdout, proc.stderr)
        assert "Traceback" not in srv.stderr()
        assert "a symbolic link leading outside" in srv.stderr()
        assert run(["nbdinfo", "--size", srv.uri_for("alias.img")]).stdout.strip() == b"8192"
    assert victim.read_bytes() == VICTIM

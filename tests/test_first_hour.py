"""A new user's first hour (issue 25), driven as a user drives it: scripts/setup and scripts/demo as
subprocesses, mistakes on the command line, help for filters, relative paths, nothing left behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from conftest import NBDFORMATS, ROOT, run

SETUP_LISTS = ("SERVE_PACKAGES", "TEST_PACKAGES")


def nbdformats(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*NBDFORMATS, *args], capture_output=True, text=True, timeout=60, cwd=cwd,
                          env=dict(os.environ, **(env or {})), stdin=subprocess.DEVNULL)


def test_mistakes_end_in_messages_not_tracebacks(tmp_path):
    (tmp_path / "disk.img").write_bytes(bytes(4096))
    for args, message in [
        (["disk.img"], "disk.img is not a plugin; did you mean 'file disk.img'?"),
        (["--filter=luks", "x.luks", "passphrase=pass"], "x.luks is not a plugin; did you mean 'file x.luks'?"),
        (["./nope.py"], "plugin ./nope.py: no such file"),
        (["--filter=./nope.py", "memory", "1M"], "--filter=./nope.py: no such file"),
        (["luks", "disk.img"], "luks is a filter, not a plugin: use --filter=luks before the plugin"),
        (["--filter=memory", "file", "disk.img"], "memory is a plugin, not a filter"),
        (["nosuch"], "unknown plugin 'nosuch'"),
    ]:
        proc = nbdformats(*args, cwd=tmp_path)
        assert proc.returncode == 1 and message in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


def test_setup_puts_nbdformats_on_path():
    """After scripts/setup the README's commands work as written: `nbdformats` is on a login PATH."""
    run([ROOT / "scripts" / "setup"], timeout=600)
    bin_dir = "/usr/local/bin" if os.getuid() == 0 else os.path.expanduser("~/.local/bin")
    assert os.readlink(f"{bin_dir}/nbdformats") == str(ROOT / ".venv" / "bin" / "nbdformats")
    login = ["env", "-i", f"HOME={os.environ['HOME']}", "bash", "-lc", "nbdformats -U - memory 1G --run 'nbdinfo --size $uri'"]
    assert run(login).stdout.strip() == str(1 << 30).encode()


def test_help_for_filters():
    for args in (["luks", "--help"], ["--filter=luks", "--help"], ["--filter=luks", "file", "--help"]):
        proc = nbdformats(*args)
        assert proc.returncode == 0 and "filter luks:" in proc.stdout and "passphrase=" in proc.stdout, args
    wrong = nbdformats("--filter=luks", "file", "disk.luks", "password=x")
    assert wrong.returncode == 1 and "'nbdformats --filter=luks file --help' lists them" in wrong.stderr
    assert "passphrase=" in nbdformats("--filter=luks", "file", "--help").stdout  # the hint shows the right key


def test_relative_tmpdir_is_the_callers(tmp_path):
    """TMPDIR=relative: the cache filter's file is under the caller's directory, not under / after
    the server detached (nbdkit's test-cache-max-size looks there)."""
    (tmp_path / "cachedir").mkdir()
    nbdformats("-P", "pid", "-U", "sock", "--filter=cache", "memory", "1M", cwd=tmp_path, env={"TMPDIR": "cachedir"})
    deadline = time.monotonic() + 20
    while not (tmp_path / "pid").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = int((tmp_path / "pid").read_text())
    try:
        run(["nbdsh", "-u", f"nbd+unix:///?socket={tmp_path / 'sock'}", "-c", "h.pwrite(b'x' * 512, 0)"])
        targets = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        assert any(t.startswith(str(tmp_path / "cachedir") + "/") for t in targets), targets
    finally:
        os.kill(pid, signal.SIGTERM)


def test_private_socket_directory_goes_even_when_start_up_fails(tmp_path):
    for args in (["--busy-poll", "99999"], ["-t", "abc"], ["--tls=require"], []):
        proc = nbdformats("-U", "-", *args, "memory", "1M", "--run", "true", env={"TMPDIR": str(tmp_path)})
        assert proc.returncode == (0 if not args else 1), proc.stderr
        assert list(tmp_path.iterdir()) == [], args


def setup_lists() -> dict[str, set[str]]:
    text = (ROOT / "scripts" / "setup").read_text()
    lists = {}
    for name in SETUP_LISTS:
        body = text.split(f"{name}=(", 1)[1].split(")", 1)[0]
        lists[name] = set(body.split())
    return lists


def test_demo_installs_only_what_serving_needs(tmp_path):
    """scripts/setup --serve, with apt-get and dpkg-query replaced by recorders on PATH: it asks for
    the serving packages only (no Ceph, qemu, nginx or fio) and says what it installs."""
    fake = tmp_path / "bin"
    fake.mkdir()
    installed = tmp_path / "installed"
    installed.touch()
    (fake / "dpkg-query").write_text(f'#!/bin/sh\nfor p; do :; done\ngrep -qx "$p" {installed} && '
                                     'printf "install ok installed"\n')
    (fake / "apt-get").write_text(f'#!/bin/sh\n[ "$1" = update ] && exit 0\necho "Setting up fake"\n'
                                  f'for p; do case "$p" in -*|install|DEBIAN*) ;; *) echo "$p" >> {installed};; esac; done\n')
    for tool in ("dpkg-query", "apt-get"):
        (fake / tool).chmod(0o755)
    proc = subprocess.run([ROOT / "scripts" / "setup", "--serve"], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}"))
    assert proc.returncode == 0, proc.stderr
    asked = set(installed.read_text().split())
    lists = setup_lists()
    assert asked == lists["SERVE_PACKAGES"]
    assert not asked & {"ceph-mon", "qemu-system-x86", "nginx-light", "fio", "nbdkit", "qemu-utils"}
    assert f"setup: installing {len(asked)} Debian packages" in proc.stderr and "Setting up" in proc.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def start_demo(port: int, tmpdir: Path) -> subprocess.Popen:
    return subprocess.Popen([ROOT / "scripts" / "demo"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PORT=str(port), TMPDIR=str(tmpdir)), start_new_session=True)


def test_demo_prints_its_uri_once_it_listens_and_leaves_nothing(tmp_path):
    port = free_port()
    demo = start_demo(port, tmp_path)
    try:
        for line in demo.stdout:
            if line.startswith("nbd://"):
                break
        assert line.strip() == f"nbd://localhost:{port}"
        # At once, no retry: the server listens when the URI appears.
        assert run(["nbdinfo", "--size", line.strip()]).stdout.strip() == str(8192 * 1024).encode()
        assert [p.name for p in tmp_path.iterdir()][0].startswith("nbdformats-demo.")
    finally:
        os.killpg(demo.pid, signal.SIGINT)  # Ctrl-C
        demo.wait(30)
    assert demo.returncode == 0 and list(tmp_path.iterdir()) == []


def test_demo_says_when_its_port_is_taken(tmp_path):
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        demo = start_demo(taken.getsockname()[1], tmp_path)
        _, err = demo.communicate(timeout=120)
    assert demo.returncode == 1
    assert "Address already in use" in err and "PORT=N scripts/demo picks another" in err
    assert list(tmp_path.iterdir()) == []

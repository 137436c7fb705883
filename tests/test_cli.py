"""The command line as nbdkit's users meet it: every option of cli.py's table has an effect or is
refused with a clear message (none is accepted and ignored), -u/-g drop privileges, relative
paths survive detaching, and mistakes end in messages, not tracebacks."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable

import pytest

from conftest import NBDFORMATS, nbdsh, run, serve
from fixtures.hardening import Raw
from nbdformats import cli
from nbdformats.protocol import wire as P
from test_limits import GATE, probe
from test_server import make_certificates

SIZE = "1048576"
SIZE_RUN = ["--run", 'nbdinfo --size "$uri"']


def nbdformats(*args: str, check: bool = True, env: dict[str, str] | None = None,
               cwd: Path | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([*NBDFORMATS, *args], capture_output=True, timeout=60, env=dict(os.environ, **(env or {})),
                          cwd=cwd, text=True, stdin=subprocess.DEVNULL)
    assert not check or proc.returncode == 0, f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    return proc


def refused(args: list[str], message: str) -> None:
    proc = nbdformats(*args, check=False)
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> str:
    return "ss -Hltn 'sport = :%d' | awk '{print $4}'" % port


def wait_for(predicate: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def daemon(args: list[str], cwd: Path) -> int:
    """Start nbdformats detached (no -f) in `cwd` with a relative `-P daemon.pid`; the daemon's pid."""
    pidfile = cwd / "daemon.pid"
    nbdformats("-P", "daemon.pid", *args, cwd=cwd)
    wait_for(lambda: pidfile.exists() and pidfile.read_text().strip() != "")
    return int(pidfile.read_text())


def stop(pid: int) -> None:
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not Path(f"/proc/{pid}").exists() or proc_status(pid).get("State", "").startswith("Z"))


# -- one check per option ------------------------------------------------------------------------
def check_family(tmp: Path) -> None:
    port = free_port()
    v4 = nbdformats("-4", "-p", str(port), "memory", SIZE, "--run", listening(port)).stdout.split()
    v6 = nbdformats("-6", "-p", str(port), "memory", SIZE, "--run", listening(port)).stdout.split()
    last = nbdformats("-6", "-4", "-p", str(port), "memory", SIZE, "--run", listening(port)).stdout.split()
    assert v4 == [f"0.0.0.0:{port}"] and v6 == [f"[::]:{port}"] and last == v4


def check_debug(tmp: Path) -> None:
    proc = nbdformats("-D", "memory.nosuch=1", "-U", "-", "memory", SIZE, *SIZE_RUN)
    assert "-D memory.nosuch: memory has no debug flag 'nosuch'" in proc.stderr
    refused(["-D", "memory", "-U", "-", "memory", SIZE, "--run", "true"], "must have the format NAME.FLAG=N")


def check_dump_config(tmp: Path) -> None:
    ours = dict(line.split("=", 1) for line in nbdformats("--dump-config").stdout.splitlines())
    theirs = dict(line.split("=", 1) for line in run(["nbdkit", "--dump-config"]).stdout.decode().splitlines())
    assert set(theirs) - set(ours) == {"root_tls_certificates_dir"}  # we have no built-in certificates
    assert ours["name"] == "nbdformats" and ours["host_os"] == "linux-gnu" and ours["version_major"] == "0"


def check_dump_plugin(tmp: Path) -> None:
    assert "name=memory" in nbdformats("--dump-plugin", "memory").stdout.splitlines()


def check_exit_with_parent(tmp: Path) -> None:
    sock = tmp / "sock"
    parent = subprocess.Popen(["sh", "-c", f'{" ".join(NBDFORMATS)} --exit-with-parent -U {sock} memory 1M & '
                               f'echo $!; while [ ! -S {sock} ]; do sleep 0.05; done'],
                              stdout=subprocess.PIPE, text=True)
    server = int(parent.stdout.readline())
    assert parent.wait(30) == 0  # the parent is gone ...
    wait_for(lambda: not Path(f"/proc/{server}").exists() or proc_status(server)["State"].startswith("Z"))


def check_exportname(tmp: Path) -> None:
    out = nbdformats("-e", "a b", "-U", "-", "memory", SIZE, "--run", 'echo "$exportname $uri"').stdout
    assert out.startswith("a b nbd+unix:///a%20b?socket=")


def check_filter(tmp: Path) -> None:
    out = nbdformats("--filter=offset", "-U", "-", "memory", SIZE, "offset=4096", *SIZE_RUN).stdout
    assert out.strip() == str(1048576 - 4096)


def check_foreground(tmp: Path) -> None:
    with serve("memory", SIZE) as srv:  # serve() passes -f: the process we started is the server
        assert srv.proc.poll() is None and proc_status(srv.proc.pid)["PPid"] == str(os.getpid())
    pid = daemon(["-U", "sock", "memory", SIZE], tmp)  # without -f: a detached daemon in a session of its own
    try:
        assert proc_status(pid)["PPid"] != str(os.getpid()) and os.getsid(pid) != os.getsid(0)
    finally:
        stop(pid)


def check_user_and_group(tmp: Path) -> None:
    """-u/-g as root: the serving process has given up root for good (after binding its socket)."""
    shared = Path(tempfile.mkdtemp(prefix="nbdf-test-", dir="/tmp"))  # pytest's tmp is root's only
    shared.chmod(0o777)  # the pid file is written as nobody, as nbdkit does
    pid = daemon(["-u", "nobody", "-g", "nogroup", "-U", "sock", "memory", SIZE], shared)
    try:
        status = proc_status(pid)
        nobody, nogroup = run(["id", "-u", "nobody"]).stdout.decode().strip(), \
            run(["getent", "group", "nogroup"]).stdout.decode().split(":")[2]
        assert status["Uid"].split() == [nobody] * 4 and status["Gid"].split() == [nogroup] * 4
        assert status["Groups"].split() == [nogroup]
        assert status["CapEff"] == "0000000000000000"
        assert nbdsh(f"nbd+unix:///?socket={shared / 'sock'}", "print(h.get_size())").stdout.strip() == SIZE.encode()
    finally:
        stop(pid)
        shutil.rmtree(shared)


def check_help(tmp: Path) -> None:
    out = nbdformats("--help").stdout
    assert all(f"--{option.names[0]}" in out for option in cli.OPTIONS) and "dump-config" in out


def check_ipaddr(tmp: Path) -> None:
    port = free_port()
    out = nbdformats("-i", "127.0.0.1", "-p", str(port), "memory", SIZE, "--run", listening(port)).stdout.split()
    assert out == [f"127.0.0.1:{port}"]


def check_log(tmp: Path) -> None:
    loud = nbdformats("-v", "--log=stderr", "-U", "-", "memory", SIZE, *SIZE_RUN).stderr
    quiet = nbdformats("-v", "--log=null", "-U", "-", "memory", SIZE, *SIZE_RUN).stderr
    assert "debug:" in loud and "debug:" not in quiet
    refused(["--log=file", "-U", "-", "memory", SIZE, "--run", "true"], "--log must be stderr, syslog or null")


def check_long_options(tmp: Path) -> None:
    ours = set(nbdformats("--long-options").stdout.split())
    theirs = set(run(["nbdkit", "--long-options"]).stdout.decode().split())
    assert theirs <= ours and {f"--{n}" for o in cli.OPTIONS for n in o.names} == ours


def check_short_options(tmp: Path) -> None:
    ours = set(nbdformats("--short-options").stdout.split())
    assert set(run(["nbdkit", "--short-options"]).stdout.decode().split()) <= ours


def check_mask_handshake(tmp: Path) -> None:
    info = nbdinfo_json_run("--mask-handshake=0")
    assert info["protocol"] == "newstyle"  # not fixed newstyle: the client falls back to EXPORT_NAME


def check_no_sr(tmp: Path) -> None:
    assert nbdinfo_json_run("--no-sr")["structured"] is False


def check_no_mc(tmp: Path) -> None:
    assert nbdinfo_json_run("--no-mc")["exports"][0].get("contexts", []) == []


def nbdinfo_json_run(option: str) -> dict:
    import json
    return json.loads(nbdformats(option, "-U", "-", "memory", SIZE, "--run", 'nbdinfo --json "$uri"').stdout)


def check_newstyle_and_oldstyle(tmp: Path) -> None:
    assert nbdinfo_json_run("-o")["protocol"] == "oldstyle"
    assert json_protocol("-o", "-n") == "newstyle-fixed" and json_protocol("-n", "-o") == "oldstyle"


def json_protocol(*options: str) -> str:
    import json
    out = nbdformats(*options, "-U", "-", "memory", SIZE, "--run", 'nbdinfo --json "$uri"').stdout
    return json.loads(out)["protocol"]


def check_pidfile(tmp: Path) -> None:
    """A relative -P is the caller's directory, not / (the daemon changes to / first); nbdkit's
    functions.sh waits for it. As nbdkit, the file stays when the server exits."""
    pid = daemon(["-U", "sock", "memory", SIZE], tmp)
    assert (tmp / "daemon.pid").read_text() == f"{pid}\n"
    stop(pid)
    assert (tmp / "daemon.pid").exists()


def check_port(tmp: Path) -> None:
    port = free_port()
    assert nbdformats("-p", str(port), "memory", SIZE, "--run", 'echo "$port $uri"').stdout.split() == \
        [str(port), f"nbd://localhost:{port}"]  # as nbdkit 1.32 writes it: no trailing slash


def check_readonly(tmp: Path) -> None:
    assert nbdinfo_json_run("-r")["exports"][0]["is_read_only"] is True


def check_run(tmp: Path) -> None:
    assert nbdformats("-U", "-", "memory", SIZE, "--run", "exit 7", check=False).returncode == 7


def check_selinux_label(tmp: Path) -> None:
    if os.path.exists("/sys/fs/selinux/enforce"):
        pytest.fail("SELinux is enabled here: this check needs one that labels a socket")
    refused(["--selinux-label=system_u:object_r:svirt_socket_t:s0", "-U", "-", "memory", SIZE, "--run", "true"],
            "--selinux-label: SELinux is not enabled on this machine")


def check_single(tmp: Path) -> None:
    script = f"h.connect_command({[*NBDFORMATS, '-s', 'memory', SIZE]!r})\nprint(h.get_size())"
    out = run(["/usr/bin/python3", "-c", "import nbd\nh = nbd.NBD()\n" + script]).stdout
    assert out.strip() == SIZE.encode()


def check_swap(tmp: Path) -> None:
    out = nbdformats("--swap", "-U", "-", "memory", SIZE, "--run", "grep VmLck /proc/$PPID/status").stdout.split()
    assert int(out[1]) > 0  # mlockall: the server's memory is locked


def check_threads(tmp: Path) -> None:
    for threads in (2, 3):
        with serve(GATE, options=("-t", str(threads))) as srv:
            client = Raw(srv.socket)
            client.go()
            for cookie in range(6):
                client.request(P.CMD_READ, cookie, 0, 512)  # below the gate: they wait there
            time.sleep(1)
            assert probe(srv.socket) == threads
    refused(["-t", "many", "memory", SIZE], "--threads needs a whole number from 1 to 1024")


def check_tls_psk(tmp: Path) -> None:
    keys = tmp / "keys.psk"
    run(["psktool", "-u", "alice", "-p", keys])
    with serve("memory", SIZE, options=("--tls=require", f"--tls-psk={keys}")) as srv:
        assert run(["nbdinfo", "--size", srv.uri], check=False).returncode != 0  # no TLS: refused
        tls_uri = f"nbds+unix://alice@/?socket={srv.socket}&tls-psk-file={keys}"
        assert run(["nbdinfo", "--size", tls_uri]).stdout.strip() == SIZE.encode()
    refused(["--tls=maybe", "memory", SIZE], "--tls must be off, on or require")


def make_client_certificate(directory: Path) -> None:
    def openssl(*args):
        run(["openssl", *args])
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=client", "-keyout", directory / "client-key.pem",
            "-out", directory / "client.csr")
    openssl("x509", "-req", "-in", directory / "client.csr", "-CA", directory / "ca-cert.pem", "-CAkey",
            directory / "ca-key.pem", "-CAcreateserial", "-days", "2", "-out", directory / "client-cert.pem")


def check_tls_certificates(tmp: Path) -> None:
    """--tls-certificates serves X.509; --tls-verify-peer then wants a client certificate."""
    certs = tmp / "pki"
    make_certificates(certs)
    anonymous = tmp / "anonymous"
    anonymous.mkdir()
    (anonymous / "ca-cert.pem").write_bytes((certs / "ca-cert.pem").read_bytes())
    for verify, without_certificate in ((False, 0), (True, 1)):
        options = ("--tls=require", f"--tls-certificates={certs}") + (("--tls-verify-peer",) if verify else ())
        with serve("memory", SIZE, options=options) as srv:
            uri = f"nbds+unix:///?socket={srv.socket}&tls-certificates="
            assert run(["nbdinfo", "--size", uri + str(anonymous)], check=False).returncode == without_certificate
            if verify:
                make_client_certificate(certs)
                assert run(["nbdinfo", "--size", uri + str(certs)]).stdout.strip() == SIZE.encode()


def check_unix(tmp: Path) -> None:
    """-U with a relative path: the socket is made where the caller is, and left at exit as nbdkit
    leaves it; -U - makes a private one, removed at exit."""
    pid = daemon(["-U", "rel.sock", "memory", SIZE], tmp)
    nbdsh(f"nbd+unix:///?socket={tmp / 'rel.sock'}", "print(h.get_size())")
    stop(pid)
    assert (tmp / "rel.sock").exists()
    private = nbdformats("-U", "-", "memory", SIZE, "--run", 'echo "$unixsocket"').stdout.strip()
    assert private.endswith("/socket") and not os.path.exists(os.path.dirname(private))


def check_verbose(tmp: Path) -> None:
    assert "debug:" in nbdformats("-v", "-U", "-", "memory", SIZE, *SIZE_RUN).stderr
    assert "debug:" not in nbdformats("-U", "-", "memory", SIZE, *SIZE_RUN).stderr


def check_version(tmp: Path) -> None:
    assert nbdformats("--filter=offset", "memory", "--version").stdout.splitlines() == \
        [f"nbdformats {cli.__version__}", f"offset {cli.__version__}", f"memory {cli.__version__}"]
    refused(["nosuch", "--version"], "unknown plugin 'nosuch'")  # nbdkit's tests probe plugins this way
    refused(["--filter=nosuch", "memory", "--version"], "unknown filter 'nosuch'")


def check_vsock(tmp: Path) -> None:
    """A vsock listener (no loopback transport here to connect through: a second server on the
    same port finds it taken)."""
    port = str(free_port())
    inner = f"{' '.join(NBDFORMATS)} --vsock -p {port} memory 1M"
    proc = nbdformats("--vsock", "-p", port, "memory", SIZE, "--run", inner, check=False)
    assert proc.returncode == 1 and f"cannot listen on vsock port {port}: Address already in use" in proc.stderr
    refused(["--vsock", "-U", "-", "memory", SIZE], "cannot be used in this combination")


def check_keepalive(tmp: Path) -> None:
    """TCP keepalive on client connections: ss shows the keepalive timer on the server's side."""
    for keepalive in (True, False):
        port = free_port()
        options = ("--keepalive",) if keepalive else ()
        script = f"import nbd, subprocess, time\nh = nbd.NBD()\nh.connect_uri('nbd://127.0.0.1:{port}/')\n" \
                 f"time.sleep(0.5)\n" \
                 f"print(subprocess.run(['ss', '-Htno', 'state', 'established', 'sport = :{port}'], " \
                 f"capture_output=True, text=True).stdout)"
        out = nbdformats(*options, "-p", str(port), "memory", SIZE, "--run",
                         f"exec /usr/bin/python3 -c \"{script}\"").stdout
        assert ("timer:(keepalive" in out) == keepalive, out


def check_print_uri(tmp: Path) -> None:
    assert nbdformats("--print-uri", "-U", "-", "memory", SIZE, "--run", "true").stdout.startswith(
        "nbd+unix://?socket=")  # nbdkit 1.32's form


def check_timeout(tmp: Path) -> None:
    with serve("memory", SIZE, options=("--timeout", "1")) as srv:
        silent = socket.socket(socket.AF_UNIX)
        silent.connect(srv.socket)
        silent.settimeout(10)
        start = time.monotonic()
        while silent.recv(4096):  # the greeting, then EOF when the handshake time is up
            pass
        assert time.monotonic() - start < 5
    refused(["--timeout", "0", "memory", SIZE], "--timeout needs seconds")


def check_list(tmp: Path) -> None:
    out = nbdformats("--list").stdout
    assert "plugins:" in out and "filters:" in out and "  memory " in out


def check_exit_last(tmp: Path) -> None:
    sock = tmp / "sock"
    proc = subprocess.Popen([*NBDFORMATS, "-f", "--exit-last", "-U", str(sock), "memory", SIZE])
    try:
        wait_for(sock.exists)
        nbdsh(f"nbd+unix:///?socket={sock}", "h.get_size()")
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def check_max_connections(tmp: Path) -> None:
    with serve("memory", SIZE, options=("--max-connections", "1")) as srv:
        first = Raw(srv.socket)
        first.go()
        with pytest.raises((EOFError, ConnectionResetError)):
            Raw(srv.socket).go()


def check_fd_and_no_handshake(tmp: Path) -> None:
    for extra in ([], ["--no-handshake"]):
        ours, theirs = socket.socketpair()
        proc = subprocess.Popen([*NBDFORMATS, "--fd", str(theirs.fileno()), *extra, "memory", SIZE],
                                pass_fds=[theirs.fileno()])
        theirs.close()
        ours.settimeout(20)
        if extra:  # no handshake: requests at once
            ours.sendall(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_READ, 7, 0, 512))
            assert struct.unpack(">IIQ", ours.recv(16)) == (P.SIMPLE_REPLY_MAGIC, 0, 7)
        else:
            assert ours.recv(8) == b"NBDMAGIC"
        ours.close()
        assert proc.wait(20) == 0
    refused(["--no-handshake", "memory", SIZE], "--no-handshake goes with --fd")


def check_description(tmp: Path) -> None:
    assert nbdinfo_json_run("--description=the disk")["exports"][0]["description"] == "the disk"


def check_stats(tmp: Path) -> None:
    stats = tmp / "stats.json"
    nbdformats("--stats-json", str(stats), "--stats-interval", "0.05", "-U", "-", "memory", SIZE, "--run",
               'for i in 1 2 3 4 5; do nbdcopy "$uri" null: && sleep 0.2; done')
    assert stats.read_text().count('"event":"interval"') >= 4
    refused(["--stats-interval", "1", "memory", SIZE], "--stats-interval goes with --stats-json")


def check_busy_poll(tmp: Path) -> None:
    """--busy-poll=0 leaves a connection asleep between requests 0.2 ms apart; --busy-poll=10000 spins."""
    times = {}
    for value in ("0", "10000"):
        script = ("import nbd, os, time\nh = nbd.NBD()\nh.connect_uri(os.environ['uri'])\n"
                  "end = time.monotonic() + 1\nwhile time.monotonic() < end: h.pread(512, 0); time.sleep(0.0002)\n"
                  "fields = open(f'/proc/{os.getppid()}/stat').read().rsplit(')', 1)[1].split()\n"
                  "print(int(fields[11]) + int(fields[12]))")
        out = nbdformats(f"--busy-poll={value}", "-U", "-", "memory", SIZE, "--run",
                         f'exec /usr/bin/python3 -c "{script}"').stdout
        times[value] = int(out)
    assert times["10000"] > 2 * times["0"], times
    refused(["--busy-poll=-1", "memory", SIZE], "--busy-poll needs microseconds from 0 (off) to 10000")


OPTION_CHECKS: dict[str, Callable[[Path], None]] = {
    "ipv4-only": check_family, "ipv6-only": check_family, "debug": check_debug, "dump-config": check_dump_config,
    "dump-plugin": check_dump_plugin, "exit-with-parent": check_exit_with_parent, "exportname": check_exportname,
    "filter": check_filter, "foreground": check_foreground, "group": check_user_and_group, "help": check_help,
    "ipaddr": check_ipaddr, "log": check_log, "long-options": check_long_options,
    "mask-handshake": check_mask_handshake, "newstyle": check_newstyle_and_oldstyle, "no-sr": check_no_sr,
    "oldstyle": check_newstyle_and_oldstyle, "pidfile": check_pidfile, "port": check_port,
    "readonly": check_readonly, "run": check_run, "selinux-label": check_selinux_label,
    "short-options": check_short_options, "single": check_single, "swap": check_swap, "threads": check_threads,
    "tls": check_tls_psk, "tls-certificates": check_tls_certificates, "tls-psk": check_tls_psk,
    "tls-verify-peer": check_tls_certificates, "unix": check_unix, "user": check_user_and_group,
    "verbose": check_verbose, "version": check_version, "vsock": check_vsock, "no-mc": check_no_mc,
    "keepalive": check_keepalive, "print-uri": check_print_uri, "timeout": check_timeout, "list": check_list,
    "exit-last": check_exit_last, "max-connections": check_max_connections, "fd": check_fd_and_no_handshake,
    "no-handshake": check_fd_and_no_handshake, "description": check_description, "stats-json": check_stats,
    "stats-interval": check_stats, "busy-poll": check_busy_poll,
}


def test_every_option_has_a_check():
    assert set(OPTION_CHECKS) == {option.names[0] for option in cli.OPTIONS}


@pytest.mark.parametrize("name", [option.names[0] for option in cli.OPTIONS])
def test_option_has_an_effect_or_a_clear_refusal(name: str, tmp_path: Path) -> None:
    OPTION_CHECKS[name](tmp_path)

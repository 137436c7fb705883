"""Operator features: -D debug flags and -v, progress bars,
connection details for python plugins (is_tls, peer_*), --dump-plugin of a python script, and
the sample service files."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from conftest import NBDFORMATS, ROOT, SYSTEM_PYTHON, nbdsh, run, serve
from fixtures.nbd_servers import make_certificates
from nbdformats.core.chain import Filter, Plugin
from nbdformats.core.debugflags import DebugFlag, apply_debug_flags, parse_debug_flag, parse_int
from nbdformats.core.errors import ConfigError

FIXTURES = ROOT / "tests" / "fixtures" / "operator_plugins"
FLAGDEMO = str(FIXTURES / "flagdemo.py")
CONNECTION_INFO = str(FIXTURES / "connection_info.py")

# -- progress bars -----------------------------------------------------------------------------

PROGRESS_SCRIPT = """
import sys, time
from nbdformats.core.progress import progress
seconds = float(sys.argv[1])
steps = 10
with progress(1 << 20, "demo: indexing") as bar:
    for _ in range(steps):
        time.sleep(seconds / steps)
        bar.update((1 << 20) // steps)
    bar.set(1 << 20)
print("done", file=sys.stderr)
"""


def stderr_on_a_terminal(seconds: float) -> str:
    """Run the progress demo with stderr on a pseudo-terminal; what the terminal showed."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal's size
    try:
        proc = subprocess.Popen([sys.executable, "-c", PROGRESS_SCRIPT, str(seconds)], stderr=slave,
                                stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL, cwd=ROOT)
        os.close(slave)
        slave = -1
        output = bytearray()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                output += chunk
            elif proc.poll() is not None:
                break
        assert proc.wait(10) == 0
        return output.decode(errors="replace")
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)


def test_progress_bar_shows_on_a_terminal_for_long_work():
    shown = stderr_on_a_terminal(1.8)
    assert "demo: indexing" in shown and "1.00M/1.00M" in shown and "done" in shown


def test_progress_bar_hidden_for_quick_work():
    shown = stderr_on_a_terminal(0.3)
    assert "demo: indexing" not in shown and "done" in shown


def test_progress_bar_hidden_when_stderr_is_not_a_terminal():
    proc = subprocess.run([sys.executable, "-c", PROGRESS_SCRIPT, "1.5"], capture_output=True, timeout=30, cwd=ROOT)
    assert proc.returncode == 0 and proc.stderr == b"done\n"


# -- -D debug flags and -v ---------------------------------------------------------------------

def test_parse_debug_flags_as_nbdkit():
    assert parse_debug_flag("luks.keyslots=1") == DebugFlag("luks", "keyslots", 1)
    assert parse_debug_flag("nbdkit.backend.datapath=0") == DebugFlag("nbdkit", "backend.datapath", 0)
    assert parse_debug_flag("blocksize-policy.x=0x10").value == 16
    assert [parse_int(t) for t in ("42", "-3", "0x2a", "052", "+7")] == [42, -3, 42, 42, 7]
    for bad in ("luks", "luks.keyslots", "keyslots=1", "luks.keyslots=one", ".x=1"):
        with pytest.raises(ConfigError, match="NAME.FLAG=N|not an integer"):
            parse_debug_flag(bad)


class _Luks(Filter):
    name = "luks"
    debug_flag_help = {"keyslots": "log keyslot tries"}


class _Policy(Filter):
    name = "blocksize-policy"
    debug_flag_help = {"show-limits": "log the limits"}


class _Memory(Plugin):
    name = "memory"


def test_apply_debug_flags_to_the_named_components_only():
    luks, policy, memory = _Luks(), _Policy(), _Memory()
    warnings = apply_debug_flags([luks, policy, memory], [
        parse_debug_flag("luks.keyslots=1"), parse_debug_flag("luks.keyslots=2"),  # the last one wins
        parse_debug_flag("blocksize_policy.show_limits=3"),  # nbdkit's underscore spelling
        parse_debug_flag("luks.nosuch=1"), parse_debug_flag("gzip.x=1"),
        parse_debug_flag("nbdkit.backend.datapath=0")])
    assert dict(luks.debug_flags) == {"keyslots": 2}
    assert dict(policy.debug_flags) == {"show-limits": 3}
    assert dict(memory.debug_flags) == {} and dict(_Luks.debug_flags) == {}  # the class default is untouched
    assert warnings == ["-D luks.nosuch: luks has no debug flag 'nosuch' (its flags: keyslots)",
                        "debug flag -D gzip.x was not used (no plugin or filter 'gzip' in this server)"]


def test_debug_flags_reach_the_plugin_before_configuration():
    with serve(FLAGDEMO, options=("-D", "flagdemo.fill=0x5a", "-D", "luks.keyslots=1")) as srv:
        out = nbdsh(srv.uri, "print(h.pread(4, 0).hex())").stdout
        assert out.strip() == b"5a5a5a5a"
        assert "debug flag -D luks.keyslots was not used" in srv.stderr()
    with serve(FLAGDEMO) as srv:
        assert nbdsh(srv.uri, "print(h.pread(4, 0).hex())").stdout.strip() == b"00000000"


def test_help_and_dump_plugin_list_debug_flags():
    help_text = run([*NBDFORMATS, FLAGDEMO, "--help"]).stdout.decode()
    assert "-D flagdemo.fill=N  the byte every read returns" in help_text
    dump = run([*NBDFORMATS, "--dump-plugin", FLAGDEMO]).stdout.decode().splitlines()
    assert "debug_flag=flagdemo.chatty" in dump and "debug_flag=flagdemo.fill" in dump


def test_bad_debug_flag_is_refused_before_listening():
    proc = run([*NBDFORMATS, "-f", "-D", "flagdemo.fill", "-U", "-", FLAGDEMO, "--run", "true"], check=False)
    assert proc.returncode == 1 and b"-D flagdemo.fill: a debug flag must have the format NAME.FLAG=N" in proc.stderr


def test_verbose_shows_debug_messages_with_their_component():
    with serve(FLAGDEMO, options=("-v", "-D", "flagdemo.chatty=1")) as srv:
        nbdsh(srv.uri, "h.pread(512, 4096)")
        log = srv.stderr()
    assert "nbdformats: flagdemo: debug: opened export ''" in log
    assert "nbdformats: flagdemo: debug: read of 512 bytes at 4096" in log
    with serve(FLAGDEMO, options=("-D", "flagdemo.chatty=1")) as srv:  # without -v: no debug lines
        nbdsh(srv.uri, "h.pread(512, 4096)")
        assert "debug:" not in srv.stderr()


def test_component_names_in_log_lines():
    from nbdformats.cli import component_of
    assert [component_of(n) for n in ("nbdformats", "nbdformats.luks", "nbdformats.filters.luks.header",
                                      "nbdformats.plugins.blocksize_policy", "nbdformats.filters._decompress",
                                      "nbdformats.core.server", "nbdformats.python", "other")] == \
        ["", "luks", "luks", "blocksize-policy", "", "", "python", ""]


# -- python plugin: connection details and --dump-plugin ---------------------------------------

CLIENT = """
import json, nbd, os, sys
h = nbd.NBD()
h.set_uri_allow_local_file(True)  # tls-certificates= in the URI
h.connect_uri(sys.argv[1])
print(json.dumps({"me": [os.getpid(), os.getuid(), os.getgid()], "seen": json.loads(h.pread(4096, 0).rstrip())}))
"""


def client_view(uri: str) -> dict:
    import json
    return json.loads(run([SYSTEM_PYTHON, "-c", CLIENT, uri], timeout=60).stdout)


@pytest.mark.parametrize("threads", ["serialize_all_requests", "parallel"])
def test_python_plugin_sees_the_peer_and_tls_state(tmp_path, threads):
    certs = make_certificates(tmp_path / "pki")
    with serve("python", CONNECTION_INFO, f"threads={threads}",
               options=("--tls=on", f"--tls-certificates={certs}")) as srv:
        plain = client_view(srv.uri)
        secure = client_view(f"nbds+unix:///?socket={srv.socket}&tls-certificates={certs}")
    for result, tls in ((plain, False), (secure, True)):
        for when in ("at_open", "at_pread"):
            seen = result["seen"][when]
            assert seen["tls"] is tls
            assert [seen["pid"], seen["uid"], seen["gid"]] == result["me"]  # SO_PEERCRED of the client
            assert seen["name"] == "''"  # an unnamed Unix socket


def test_dump_plugin_of_a_python_script_as_nbdkit():
    def dump(command):
        lines = run(command, timeout=30).stdout.decode().splitlines()
        return dict(line.split("=", 1) for line in lines), lines
    ours, our_lines = dump([*NBDFORMATS, "--dump-plugin", "python", CONNECTION_INFO, "threads=parallel", "a=b"])
    theirs, _ = dump(["timeout", "30", "nbdkit", "--dump-plugin", "python", CONNECTION_INFO, "threads=parallel",
                      "a=b"])
    for key in ("name", "api_version", "thread_model", "nbdkit_python_maximum_api_version",
                "python_pep_384_abi_version", "seen_config"):
        assert ours[key] == theirs[key], key
    assert ours["thread_model"] == "parallel" and ours["seen_config"] == "threads:parallel,a:b"
    assert our_lines[-1] == "seen_config=threads:parallel,a:b"  # the script's lines come last
    # Without a script: the plugin's own lines.
    bare, _ = dump([*NBDFORMATS, "--dump-plugin", "python"])
    assert bare["name"] == "python" and bare["nbdkit_python_maximum_api_version"] == "2"


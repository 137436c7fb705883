"""Operator features: --stats-json and nbdformats-stats, -D debug flags and -v, progress bars,
connection details for python plugins (is_tls, peer_*), --dump-plugin of a python script, and
the sample service files."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from conftest import NBDFORMATS, ROOT, SYSTEM_PYTHON, nbdsh, random_file, run, serve
from fixtures.nbd_servers import make_certificates
from nbdformats.api.chain import Filter, Plugin
from nbdformats.server.debugflags import DebugFlag, apply_debug_flags, parse_debug_flag, parse_int
from nbdformats.api.errors import ConfigError
from nbdformats.server.stats import StatsRecorder, bucket_bounds, bucket_of, percentile, reply_failed
from nbdformats.protocol.transmission import ReplyEncoder
from nbdformats.statsplot import load_runs, series

FIXTURES = ROOT / "tests" / "fixtures" / "operator_plugins"
FLAGDEMO = str(FIXTURES / "flagdemo.py")
CONNECTION_INFO = str(FIXTURES / "connection_info.py")

# -- progress bars -----------------------------------------------------------------------------

PROGRESS_SCRIPT = """
import sys, time
from nbdformats.api.progress import progress
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
    assert "demo: indexing" in shown and "done" in shown
    assert re.search(r"demo: indexing: +\d+%.*\d[\d.]*[kM]?/1\.00M", shown), shown  # done of total


def test_progress_bar_hidden_for_quick_work():
    shown = stderr_on_a_terminal(0.1)
    assert "demo: indexing" not in shown and "done" in shown


def test_progress_bar_hidden_when_stderr_is_not_a_terminal():
    proc = subprocess.run([sys.executable, "-c", PROGRESS_SCRIPT, "1.5"], capture_output=True, timeout=30, cwd=ROOT)
    assert proc.returncode == 0 and proc.stderr == b"done\n"


class RecordingProgress:
    """Stands in for api.progress.progress: records what a component reports."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.done = 0

    def __call__(self, total, description, unit="B"):
        self.calls.append((total, description, unit))
        return self

    def update(self, n: int) -> None:
        self.done += n

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.calls.append("closed")


def test_floppy_scan_reports_progress(tmp_path, monkeypatch):
    from nbdformats.plugins.floppy import tree
    (tmp_path / "sub").mkdir()
    for name in ("a.txt", "b.txt", "sub/c.txt"):
        (tmp_path / name).write_text(name)
    recorder = RecordingProgress()
    monkeypatch.setattr(tree, "progress", recorder)
    tree.scan([str(tmp_path)], print)
    assert recorder.calls == [(None, "floppy: scanning", "entries"), "closed"]
    assert recorder.done == 4  # a.txt, b.txt, sub, sub/c.txt


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
                        "debug flag -D gzip.x was not used (no plugin or filter 'gzip' in this server)",
                        "-D nbdkit.backend.datapath: a flag of nbdkit's own server; nbdformats has none, "
                        "so it changes nothing"]


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
                                      "nbdformats.server.listeners", "nbdformats.python", "other")] == \
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


# -- --stats-json and nbdformats-stats ---------------------------------------------------------

def test_latency_buckets_are_contiguous_and_tight():
    previous = -1
    for ns in [*range(0, 5000), *range(5000, 10**7, 997), 10**9, 10**11]:
        bucket = bucket_of(ns)
        low, high = bucket_bounds(bucket)
        assert low <= ns <= high and (high - low) <= max(low, 1) / 16
        assert bucket >= previous
        previous = bucket
    assert bucket_bounds(bucket_of(999))[1] + 1 == bucket_bounds(bucket_of(999) + 1)[0]


def test_percentiles_within_three_percent():
    values = [1000 * (i + 1) for i in range(1000)]  # 1 us .. 1 ms
    histogram: dict[int, int] = {}
    for v in values:
        histogram[bucket_of(v)] = histogram.get(bucket_of(v), 0) + 1
    for p, exact in ((50, 500_000), (90, 900_000), (99, 990_000), (100, 1_000_000)):
        assert abs(percentile(histogram, len(values), p) - exact) <= exact * 0.03


@pytest.mark.parametrize("structured,extended", [(False, False), (True, False), (True, True)])
def test_reply_failed_reads_the_last_reply_header(structured, extended):
    replies = ReplyEncoder(structured, extended)
    assert not reply_failed([replies.ok(7, 0)])
    assert reply_failed([replies.error(7, 0, 5, "EIO")])
    whole, _ = replies.read_data(7, 0, 0, 4096, done=True)
    assert not reply_failed([whole])
    if structured:  # a read that ends in an error chunk after its data
        assert reply_failed([whole, replies.error(7, 0, 22, "beyond the end", at=4096)])


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_recorder_lines(tmp_path):
    import io
    import json
    out = io.StringIO()
    clock = FakeClock()
    recorder = StatsRecorder(out, 1.0, connections=lambda: 3, clock=clock, wall_clock=lambda: 1.7e9)
    out.close = lambda: None  # keep the text readable after close()
    recorder.start(plugin="memory", filters=["cow"])
    for i in range(100):
        recorder.record(0, 4096, (i + 1) * 1000, failed=i == 99)  # reads of 1..100 us, the last failed
    recorder.record(1, 65536, 50_000, failed=False)
    clock.now = 101.0
    recorder.flush_interval()
    clock.now = 102.0
    recorder.flush_interval()  # idle: no line
    clock.now = 102.5
    recorder.record(3, 0, 2_000, failed=False)
    recorder.close()
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["event"] for line in lines] == ["start", "interval", "interval", "stop"]
    assert lines[0]["plugin"] == "memory" and lines[0]["filters"] == ["cow"] and lines[0]["interval"] == 1.0
    first = lines[1]
    assert first["elapsed"] == 1.0 and first["seconds"] == 1.0 and first["connections"] == 3
    read = first["ops"]["read"]
    assert (read["count"], read["bytes"], read["errors"]) == (100, 409600, 1)
    assert abs(read["latency_us"]["p50"] - 50) <= 1.5 and abs(read["latency_us"]["p99"] - 99) <= 3
    assert read["latency_us"]["max"] == 100.0
    assert first["ops"]["write"]["latency_us"] == {"p50": 50.0, "p90": 50.0, "p99": 50.0, "max": 50.0}
    assert lines[2]["seconds"] == 0.5 and list(lines[2]["ops"]) == ["flush"]
    runs = load_runs(out.getvalue().splitlines())
    assert len(runs) == 1 and runs[0].stopped
    drawn = series(runs[0])
    # The idle second between the two lines is drawn as zero throughput.
    assert drawn["read"].mib_per_s[0] == pytest.approx(409600 / 2**20)
    assert 0.0 in drawn["read"].mib_per_s[1:-1]


def read_stats(path: Path) -> list[dict]:
    import json
    return [json.loads(line) for line in path.read_text().splitlines()]


def totals(lines: list[dict]) -> dict[str, dict[str, int]]:
    result: dict[str, dict[str, int]] = {}
    for line in lines:
        for name, op in line.get("ops", {}).items():
            entry = result.setdefault(name, {"count": 0, "bytes": 0, "errors": 0, "refused": 0})
            for key in entry:
                entry[key] += op[key]
    return result


def test_stats_json_counts_every_request(tmp_path):
    stats = tmp_path / "stats.jsonl"
    script = ("import time\n"
              "for i in range(100): h.pwrite(b'x' * 4096, i * 4096)\n"
              "time.sleep(0.5)\n"
              "for i in range(50): h.pread(65536, 0)\n"
              "h.flush()\n"
              "for offset in (16 << 20, (16 << 20) - 512):  # refused; half done then an error\n"
              "    try:\n        h.pread(4096, offset)\n    except nbd.Error:\n        pass\n"
              "time.sleep(0.3)\n")
    with serve("memory", "16M", options=(f"--stats-json={stats}", "--stats-interval=0.1")) as srv:
        nbdsh(srv.uri, script)
        srv.proc.terminate()
        assert srv.proc.wait(10) == 0
    lines = read_stats(stats)
    assert lines[0]["event"] == "start" and lines[-1]["event"] == "stop"
    assert totals(lines) == {"write": {"count": 100, "bytes": 409600, "errors": 0, "refused": 0},
                             "read": {"count": 52, "bytes": 50 * 65536 + 2 * 4096, "errors": 2, "refused": 1},
                             "flush": {"count": 1, "bytes": 0, "errors": 0, "refused": 0}}
    intervals = [line for line in lines if line["event"] == "interval"]
    assert len(intervals) >= 2  # the writes and the reads were half a second apart
    assert all(line["connections"] in (0, 1) for line in intervals)
    assert all(0 < op["latency_us"]["p50"] <= op["latency_us"]["p99"] <= op["latency_us"]["max"] < 1e6
               for line in intervals for op in line["ops"].values() if op["refused"] < op["count"])


def test_stats_json_with_worker_threads_and_a_plot(tmp_path):
    disk = random_file(tmp_path / "disk.img", 8 << 20, seed=3)
    stats = tmp_path / "stats.jsonl"
    with serve("file", str(disk), options=(f"--stats-json={stats}", "--stats-interval=0.1", "-r")) as srv:
        run(["nbdcopy", "--connections=2", "--requests=16", srv.uri, "null:"])
        time.sleep(0.2)
    lines = read_stats(stats)
    assert totals(lines)["read"]["bytes"] == 8 << 20  # concurrent requests all counted
    plot = tmp_path / "plot.png"
    proc = run([sys.executable, "-m", "nbdformats.statsplot", stats, "-o", plot], timeout=60)
    assert b"requests over" in proc.stdout
    header = plot.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", header[16:24]) == (1000, 900)  # width, height
    assert plot.stat().st_size > 20_000  # axes, lines and labels, not a blank canvas


def test_stats_plot_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"event":"start","time":1,"interval":1}\n{"event":"stop","time":2}\n')
    proc = run([sys.executable, "-m", "nbdformats.statsplot", empty], check=False)
    assert proc.returncode == 1 and b"recorded no requests" in proc.stderr
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text("hello\n")
    proc = run([sys.executable, "-m", "nbdformats.statsplot", garbage], check=False)
    assert proc.returncode == 1 and b"line 1: not a line written by --stats-json" in proc.stderr


def test_stats_json_bad_options():
    proc = run([*NBDFORMATS, "-f", "--stats-json=/nonexistent/dir/s.jsonl", "-U", "-", "memory", "1M",
                "--run", "true"], check=False)
    assert proc.returncode == 1 and b"--stats-json: cannot write /nonexistent/dir/s.jsonl" in proc.stderr
    proc = run([*NBDFORMATS, "-f", "--stats-interval=1", "-U", "-", "memory", "1M", "--run", "true"], check=False)
    assert proc.returncode == 1 and b"--stats-interval goes with --stats-json" in proc.stderr


def test_luks_keyslots_debug_flag(tmp_path):
    from fixtures.luks import add_key, cryptsetup_format, fast_pbkdf
    first, second = tmp_path / "key0", tmp_path / "key1"
    first.write_bytes(b"first passphrase")
    second.write_bytes(b"second passphrase")
    image = cryptsetup_format(tmp_path / "disk.luks", first, "luks2", 20 << 20, *fast_pbkdf("argon2id"))
    add_key(image, first, second)  # keyslot 1, pbkdf2
    with serve("--filter=luks", "file", str(image), f"keyfile={second}",
               options=("-v", "-D", "luks.keyslots=1")) as srv:
        log = srv.stderr()
    assert re.search(r"nbdformats: luks: debug: keyslot 0 \(argon2id, 4 passes, 32768 KiB, 1 lanes\): "
                     r"no match in \d+\.\d{3} s", log), log
    assert re.search(r"nbdformats: luks: debug: keyslot 1 \(pbkdf2-sha256, 1000 iterations\): opened in", log), log
    with serve("--filter=luks", "file", str(image), f"keyfile={second}", options=("-v",)) as srv:
        assert "keyslot 0" not in srv.stderr()  # the flag is off by default


# -- sample service files (docs/examples) ------------------------------------------------------

EXAMPLES = ROOT / "docs" / "examples"


def sample_command(line: str, image: Path) -> list[str]:
    """A sample's command line with our interpreter for /usr/local/bin/nbdformats and `image`
    for /srv/disk.img."""
    import shlex
    words = shlex.split(line)
    assert words[0] == "/usr/local/bin/nbdformats" and "/srv/disk.img" in words, words
    return [*NBDFORMATS, *(str(image) if w == "/srv/disk.img" else w for w in words[1:])]


def active_lines(path: Path, key: str) -> list[str]:
    return [line.split("=", 1)[1].strip() for line in path.read_text().splitlines()
            if line.strip().startswith(key) and "=" in line and not line.lstrip().startswith("#")]


def test_systemd_units_are_valid(tmp_path):
    service = (EXAMPLES / "nbdformats.service").read_text()
    (tmp_path / "nbdformats.service").write_text(
        service.replace("/usr/local/bin/nbdformats", str(Path(sys.executable).parent / "nbdformats")))
    (tmp_path / "nbdformats.socket").write_text((EXAMPLES / "nbdformats.socket").read_text())
    proc = run(["systemd-analyze", "verify", "--man=no", tmp_path / "nbdformats.socket",
                tmp_path / "nbdformats.service"], timeout=60)
    assert proc.stderr == b"", proc.stderr  # unknown keys and bad values are only warnings


def test_systemd_service_command_under_socket_activation(tmp_path):
    image = random_file(tmp_path / "disk.img", 1 << 20, seed=5)
    (exec_start,) = active_lines(EXAMPLES / "nbdformats.service", "ExecStart")
    sock = tmp_path / "sock"
    with open(tmp_path / "log", "wb") as log:
        proc = subprocess.Popen(["systemd-socket-activate", "-l", str(sock), "--", *sample_command(exec_start, image)],
                                stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd=ROOT)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        uri = f"nbd+unix:///?socket={sock}"
        out = nbdsh(uri, "print(h.pread(4096, 8192).hex(), h.is_read_only())").stdout.split()
        assert out == [image.read_bytes()[8192:12288].hex().encode(), b"True"]
        proc.terminate()  # what systemctl stop sends
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.parametrize("verbose", [False, True])
def test_xinetd_sample_with_the_socket_on_stdin_stdout_and_stderr(tmp_path, verbose):
    import socket

    import nbd
    image = random_file(tmp_path / "disk.img", 1 << 20, seed=6)
    (server,) = active_lines(EXAMPLES / "xinetd.conf", "server ")
    (server_args,) = active_lines(EXAMPLES / "xinetd.conf", "server_args")
    command = sample_command(f"{server} {server_args}", image)
    if verbose:  # debug messages must not reach the client's socket
        command.insert(len(NBDFORMATS), "-v")
    ours, theirs = socket.socketpair()
    # As xinetd does: the connection is the server's stdin, stdout and stderr.
    proc = subprocess.Popen(command, stdin=theirs, stdout=theirs, stderr=theirs, cwd=ROOT)
    theirs.close()
    try:
        h = nbd.NBD()
        h.connect_socket(ours.detach())
        assert h.pread(4096, 4096) == image.read_bytes()[4096:8192]
        with pytest.raises(nbd.Error):
            h.pwrite(b"x" * 512, 0)  # -r
        h.shutdown()
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)

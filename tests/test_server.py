"""The server driven by real clients: qemu-img, qemu-io, nbdinfo, nbdcopy, libnbd (nbdsh's binding)."""

from __future__ import annotations

import json
import shutil
import tempfile
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import (NBDFORMATS, SYSTEM_PYTHON, nbdinfo_json, nbdsh, random_file, run, serve, serve_nbdkit,
                      sha256_file)
from nbdformats.protocol import wire as P


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_alive(srv) -> bool:
    return srv.proc.poll() is None


# -- What clients see --------------------------------------------------------------------------
def test_nbdinfo_reports_memory_export():
    with serve("memory", "size=1G") as srv:
        info = nbdinfo_json(srv.uri)
    assert info["protocol"] == "newstyle-fixed" and info["structured"] is True
    export = info["exports"][0]
    assert export["export-size"] == 1 << 30
    assert export["contexts"] == ["base:allocation"]
    for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn", "can_cache", "can_df"):
        assert export[flag] is True, flag
    assert export["is_read_only"] is False
    assert export["block_size_minimum"] == 1 and export["block_size_preferred"] == 4096


def test_readonly_option_and_agreement_with_nbdkit():
    fields = ("export-size", "is_read_only", "can_flush", "can_trim", "can_zero", "can_multi_conn", "can_df")
    with serve("memory", "1M", options=("-r",)) as srv:
        ours = nbdinfo_json(srv.uri)["exports"][0]
    with serve_nbdkit("memory", "1M", options=("-r",)) as ref:
        theirs = nbdinfo_json(ref.uri)["exports"][0]
    assert ours["is_read_only"] is True
    assert {f: ours[f] for f in fields} == {f: theirs[f] for f in fields}


def test_nbdcopy_round_trip_random_data(tmp_path):
    source = random_file(tmp_path / "src.img", 24 << 20, seed=1)
    with serve("memory", "24M") as srv:
        for connections in ("1", "4"):
            back = tmp_path / f"back{connections}.img"
            run(["nbdcopy", "-C", connections, source, srv.uri])
            run(["nbdcopy", "-C", connections, srv.uri, back])
            assert sha256_file(back) == sha256_file(source)


def test_qemu_img_info_convert_compare(tmp_path):
    disk = random_file(tmp_path / "disk.img", 8 << 20, seed=2)
    with serve("file", str(disk)) as srv:
        info = json.loads(run(["qemu-img", "info", "--output=json", srv.uri]).stdout)
        assert info["virtual-size"] == 8 << 20
        run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", srv.uri, tmp_path / "copy.qcow2"])
        run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", srv.uri, tmp_path / "copy.qcow2"])
        # and back the other way: qemu writes through us into the file
        other = random_file(tmp_path / "other.img", 8 << 20, seed=3)
        run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", other, srv.uri])
    assert sha256_file(disk) == sha256_file(other)


def test_qemu_io_fua_writes_reach_the_file(tmp_path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    with serve("file", str(disk)) as srv:
        out = run(["qemu-io", "-f", "raw", "-c", "write -f -P 0xab 4096 8192", "-c", "read -P 0xab 4096 8192",
                   "-c", "flush", srv.uri]).stdout.decode()
        assert "Pattern verification failed" not in out
        data = disk.read_bytes()
    assert data[4096:12288] == b"\xab" * 8192 and data[:4096] == bytes(4096)


def test_nbdinfo_map_shows_holes_of_sparse_memory_disk():
    with serve("memory", "1G") as srv:
        nbdsh(srv.uri, "h.pwrite(b'x' * 65536, 1 << 20)\nh.pwrite(b'y' * 4096, 512 << 20)")
        out = run(["nbdinfo", "--map", "--json", srv.uri]).stdout
    extents = json.loads(out)
    data = [(e["offset"], e["length"]) for e in extents if e["type"] == 0]
    assert data == [(1 << 20, 65536), (512 << 20, 32768)]
    assert sum(e["length"] for e in extents) == 1 << 30


def test_map_agrees_with_nbdkit_on_sparse_file(tmp_path):
    disk = tmp_path / "sparse.img"
    with open(disk, "wb") as f:
        f.truncate(16 << 20)
        f.seek(3 << 20)
        f.write(b"z" * (1 << 20))
    with serve("file", str(disk)) as srv:
        ours = run(["nbdinfo", "--map", srv.uri]).stdout
    with serve_nbdkit("file", str(disk)) as ref:
        theirs = run(["nbdinfo", "--map", ref.uri]).stdout
    assert ours == theirs and b"data" in ours


# -- Edge cases, through libnbd with strict mode off -------------------------------------------
EDGE_CASES = r"""
size = h.get_size()
assert h.pread(0, 4096) == b''
h.pwrite(b'', 4096)
h.trim(0, 4096)
h.zero(0, 4096)
seen = []
h.block_status(0, 4096, lambda ctx, off, ents, err: seen.append(ents) or 0)
assert seen and seen[0][0] >= 1, seen
h.pwrite(b'end!', size - 4)
for call in (lambda: h.pread(10, size - 4), lambda: h.pwrite(b'x' * 10, size - 4),
             lambda: h.block_status(4096, size - 512, lambda *a: 0), lambda: h.pread(1, size + 4096)):
    try:
        call()
        raise SystemExit('request past the end succeeded')
    except nbd.Error as e:
        assert e.errno == 'EINVAL', e
# the connection is still usable after every refusal
assert h.pread(4, size - 4) == b'end!'
print('ok')
"""


def test_edge_cases():
    with serve("memory", "128M") as srv:
        assert nbdsh(srv.uri, EDGE_CASES).stdout.strip() == b"ok"


def test_write_to_readonly_export_is_eperm():
    script = "try:\n    h.pwrite(b'x', 0)\nexcept nbd.Error as e:\n    print(e.errno)\n"
    with serve("memory", "1M", options=("-r",)) as srv:
        assert nbdsh(srv.uri, script).stdout.strip() == b"EPERM"


def test_oversized_write_is_drained_and_connection_survives():
    with serve("memory", "128M") as srv:
        conn = RawClient(srv.socket)
        conn.go()
        length = 65 << 20
        conn.send(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_WRITE, 1, 0, length))
        conn.send(bytes(length))
        conn.send(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_READ, 2, 0, length))  # oversized read
        conn.send(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_READ, 3, 0, 16))
        assert conn.simple_reply() == (1, P.NBD_EINVAL)
        assert conn.simple_reply() == (2, P.NBD_EINVAL)
        assert conn.simple_reply() == (3, 0) and conn.recv_exact(16) == bytes(16)


def test_parallel_writers_over_multi_conn(tmp_path):
    writer = ("import nbd, sys\nh = nbd.NBD()\nh.connect_uri(sys.argv[1])\nn = int(sys.argv[2])\n"
              "for i in range(64):\n    h.pwrite(bytes([n + 1]) * 65536, (n * 64 + i) * 65536)\nh.flush()\n")
    with serve("memory", "16M") as srv:
        procs = [subprocess.Popen([SYSTEM_PYTHON, "-c", writer, srv.uri, str(n)]) for n in range(4)]
        for p in procs:
            assert p.wait(60) == 0
        run(["nbdcopy", srv.uri, tmp_path / "out.img"])
    data = (tmp_path / "out.img").read_bytes()
    for n in range(4):
        assert data[n * (4 << 20):(n + 1) * (4 << 20)] == bytes([n + 1]) * (4 << 20)


# -- Bad input: the server stays up, other connections are unaffected --------------------------
class RawClient:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(20)
        self.sock.connect(path)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise EOFError(f"closed after {len(data)} of {n} bytes")
            data += chunk
        return data

    def go(self, name: bytes = b"") -> tuple[int, int]:
        assert struct.unpack(">QQH", self.recv_exact(18))[:2] == (P.NBDMAGIC, P.IHAVEOPT)
        self.send(struct.pack(">I", P.CLIENT_FLAG_FIXED_NEWSTYLE | P.CLIENT_FLAG_NO_ZEROES))
        self.send(P.OPTION_HEADER.pack(P.IHAVEOPT, P.OPT_EXPORT_NAME, len(name)) + name)
        size, flags = struct.unpack(">QH", self.recv_exact(10))
        return size, flags

    def simple_reply(self) -> tuple[int, int]:
        magic, error, cookie = P.SIMPLE_REPLY.unpack(self.recv_exact(16))
        assert magic == P.SIMPLE_REPLY_MAGIC
        return cookie, error

    def close(self) -> None:
        self.sock.close()


class GoodClient(threading.Thread):
    """Reads and checks known data in a loop while bad clients attack."""

    def __init__(self, uri: str) -> None:
        super().__init__(daemon=True)
        self.uri = uri
        self.stop = threading.Event()
        self.result: subprocess.CompletedProcess | None = None

    def run(self) -> None:
        script = ("import time\nend = time.time() + 6\nn = 0\nwhile time.time() < end:\n"
                  "    assert h.pread(4096, 8192) == b'G' * 4096\n    n += 1\nprint(n)\n")
        self.result = nbdsh(self.uri, script, check=False)


BAD_INPUTS = [
    b"",  # connect and hang up
    b"\xff" * 4,  # bad client flags
    struct.pack(">I", 1) + b"garbage" * 10,  # bad option magic
    struct.pack(">I", 1) + P.OPTION_HEADER.pack(P.IHAVEOPT, P.OPT_GO, 0xFFFFFFFF),  # huge option, truncated
    struct.pack(">I", 1) + P.OPTION_HEADER.pack(P.IHAVEOPT, P.OPT_GO, 3) + b"abc",  # malformed GO
    struct.pack(">I", 1) + P.OPTION_HEADER.pack(P.IHAVEOPT, 12345, 2) + b"zz",  # unknown option
    struct.pack(">I", 1) + P.OPTION_HEADER.pack(P.IHAVEOPT, P.OPT_EXPORT_NAME, 0)
    + P.REQUEST.pack(0xDEADBEEF, 0, 0, 0, 0, 0),  # bad request magic
    struct.pack(">I", 1) + P.OPTION_HEADER.pack(P.IHAVEOPT, P.OPT_EXPORT_NAME, 0)
    + P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_WRITE, 1, 0, 0xFFFFFFFF) + b"partial",  # truncated write
    struct.pack(">I", 1) + P.OPTION_HEADER.pack(P.IHAVEOPT, P.OPT_EXPORT_NAME, 0)
    + P.REQUEST.pack(P.REQUEST_MAGIC, 0, 77, 1, 0, 0) + P.REQUEST.pack(P.REQUEST_MAGIC, 0xFFFF, 0, 2, 1 << 62, 1 << 31),
]


def test_bad_input_does_not_disturb_other_clients():
    with serve("memory", "1M") as srv:
        nbdsh(srv.uri, "h.pwrite(b'G' * 4096, 8192)")
        good = GoodClient(srv.uri)
        good.start()
        for _ in range(5):
            for data in BAD_INPUTS:
                raw = RawClient(srv.socket)
                raw.recv_exact(18)
                if data:
                    raw.send(data)
                time.sleep(0.01)
                raw.close()
        good.join(60)
        assert good.result is not None and good.result.returncode == 0, good.result
        assert int(good.result.stdout) > 10
        assert server_alive(srv)
        # unknown commands and bad flags got EINVAL, not a dropped connection
        raw = RawClient(srv.socket)
        raw.go()
        raw.send(P.REQUEST.pack(P.REQUEST_MAGIC, 0, 77, 5, 0, 0))
        assert raw.simple_reply() == (5, P.NBD_EINVAL)


def test_abrupt_disconnect_keeps_acknowledged_writes(tmp_path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    with serve("file", str(disk)) as srv:
        raw = RawClient(srv.socket)
        raw.go()
        raw.send(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_WRITE, 1, 0, 5) + b"hello")
        assert raw.simple_reply() == (1, 0)
        raw.send(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_WRITE, 2, 4096, 100) + b"half")  # then vanish
        raw.close()
        assert nbdsh(srv.uri, "print(h.pread(5, 0).decode())").stdout.strip() == b"hello"
        assert server_alive(srv)


# -- Ways of serving ---------------------------------------------------------------------------
def test_run_sets_environment():
    out = run([*NBDFORMATS, "-U", "-", "-e", "disk", "memory", "1M", "--run",
               'echo "$uri|$nbd|$exportname|$unixsocket"; nbdinfo --size "$uri"']).stdout.decode()
    uri, nbd_uri, export, sock = out.splitlines()[0].split("|")
    assert uri == nbd_uri and uri.startswith("nbd+unix:///disk?socket=") and export == "disk"
    assert sock and uri.endswith(sock)
    assert out.splitlines()[1] == str(1 << 20)


def test_run_exit_status_is_the_commands():
    proc = run([*NBDFORMATS, "-U", "-", "memory", "1M", "--run", "exit 7"], check=False)
    assert proc.returncode == 7


def test_single_connection_on_stdin():
    script = (f"import nbd\nh = nbd.NBD()\nh.connect_command({[*NBDFORMATS, '-s', 'memory', '1M']!r})\n"
              "h.pwrite(b'abc', 0)\nprint(h.get_size(), h.pread(3, 0))\n")
    assert run([SYSTEM_PYTHON, "-c", script]).stdout.strip() == b"1048576 bytearray(b'abc')"


def test_single_from_a_file_and_into_a_pipe(tmp_path):
    """`-s` with a plain file as stdin (nbdkit's fuzzers do this: test-single-from-file.sh): the
    handshake and requests are read from the file, the replies written to stdout."""
    go = P.U32.pack(0) + P.U16.pack(0)  # export name "", no information requests
    stream = (P.CLIENT_FLAGS.pack(P.CLIENT_FLAG_FIXED_NEWSTYLE | P.CLIENT_FLAG_NO_ZEROES)
              + P.OPTION_HEADER.pack(P.IHAVEOPT, P.OPT_GO, len(go)) + go
              + P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_WRITE, 1, 512, 3) + b"abc"
              + P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_READ, 2, 510, 6)
              + P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_DISC, 3, 0, 0))
    (tmp_path / "requests").write_bytes(stream)
    with open(tmp_path / "requests", "rb") as stdin:
        proc = subprocess.run([*NBDFORMATS, "-f", "-s", "memory", "1M"], stdin=stdin, capture_output=True,
                              timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert P.GREETING.unpack_from(out)[:2] == (P.NBDMAGIC, P.IHAVEOPT)
    # The replies to the write and the read end the stream: simple replies, as negotiated.
    write_reply, read_reply = out[-32 - 6:-16 - 6], out[-16 - 6:]
    assert P.SIMPLE_REPLY.unpack(write_reply) == (P.SIMPLE_REPLY_MAGIC, 0, 1)
    assert P.SIMPLE_REPLY.unpack_from(read_reply) == (P.SIMPLE_REPLY_MAGIC, 0, 2)
    assert read_reply[16:] == b"\0\0abc\0"


def test_systemd_socket_activation():
    script = (f"import nbd\nh = nbd.NBD()\nh.connect_systemd_socket_activation({[*NBDFORMATS, '--exit-with-parent', 'memory', '2M']!r})\n"
              "print(h.get_size())\n")  # --exit-with-parent: the server goes with this script
    assert run([SYSTEM_PYTHON, "-c", script]).stdout.strip() == b"2097152"


@pytest.mark.parametrize("address", ["127.0.0.1", "::1"])
def test_tcp(address):
    port = free_port()
    opts = ("-p", str(port), "-i", address, *(("-6",) if ":" in address else ()))
    proc = subprocess.Popen([*NBDFORMATS, "-f", *opts, "memory", "3M"], stderr=subprocess.PIPE)
    try:
        host = f"[{address}]" if ":" in address else address
        deadline = time.time() + 30
        while True:
            r = run(["nbdinfo", "--size", f"nbd://{host}:{port}"], check=False)
            if r.returncode == 0 or time.time() > deadline:
                break
            time.sleep(0.1)
        assert r.stdout.strip() == str(3 << 20).encode()
    finally:
        proc.terminate()
        proc.wait(10)


def test_exit_last_and_max_connections(tmp_path):
    sock = str(tmp_path / "s")
    proc = subprocess.Popen([*NBDFORMATS, "-f", "--exit-last", "--max-connections", "1", "-U", sock, "memory", "1M"])
    try:
        for _ in range(200):
            if os.path.exists(sock):
                break
            time.sleep(0.02)
        first = RawClient(sock)
        first.go()
        second = RawClient(sock)  # refused: over the limit
        with pytest.raises((EOFError, ConnectionResetError)):
            second.go()
        first.send(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_DISC, 1, 0, 0))
        assert proc.wait(20) == 0  # the last client left: the server exits
    finally:
        if proc.poll() is None:
            proc.kill()


def test_oldstyle():
    with serve("memory", "1M", options=("-o",)) as srv:
        info = nbdinfo_json(srv.uri)
    assert info["protocol"] == "oldstyle" and info["exports"][0]["export-size"] == 1 << 20


def test_fd_with_and_without_handshake():
    for no_handshake in (False, True):
        ours, theirs = socket.socketpair()
        extra = ["--no-handshake"] if no_handshake else []
        proc = subprocess.Popen([*NBDFORMATS, "--fd", str(theirs.fileno()), *extra, "memory", "1M"],
                                pass_fds=[theirs.fileno()])
        theirs.close()
        client = RawClient.__new__(RawClient)
        client.sock = ours
        ours.settimeout(20)
        if not no_handshake:
            assert client.go()[0] == 1 << 20
        client.send(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_WRITE, 1, 0, 2) + b"ok")
        assert client.simple_reply() == (1, 0)
        client.send(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_READ, 2, 0, 2))
        assert client.simple_reply() == (2, 0) and client.recv_exact(2) == b"ok"
        client.send(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_DISC, 3, 0, 0))
        assert proc.wait(20) == 0
        ours.close()


def test_print_uri_and_list_exports_of_a_directory(tmp_path):
    (tmp_path / "exports").mkdir()
    for name, size in (("a.img", 4096), ("b.img", 8192)):
        (tmp_path / "exports" / name).write_bytes(bytes(size))
    with serve("file", f"dir={tmp_path / 'exports'}") as srv:
        listing = nbdinfo_json(srv.uri, "--list")
        sizes = {e["export-name"]: e["export-size"] for e in listing["exports"]}
        assert sizes == {"a.img": 4096, "b.img": 8192}
        assert run(["nbdinfo", "--size", srv.uri_for("b.img")]).stdout.strip() == b"8192"
        assert run(["nbdinfo", "--size", srv.uri_for("missing")], check=False).returncode != 0
    out = run([*NBDFORMATS, "--print-uri", "-U", "-", "memory", "1M", "--run", "true"]).stdout.decode()
    assert out.startswith("nbd+unix://?socket=")


# -- TLS ---------------------------------------------------------------------------------------
def make_certificates(directory: Path) -> None:
    directory.mkdir()
    def openssl(*args):
        run(["openssl", *args])
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test CA",
            "-keyout", directory / "ca-key.pem", "-out", directory / "ca-cert.pem")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
            "-keyout", directory / "server-key.pem", "-out", directory / "server.csr")
    (directory / "ext.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", directory / "server.csr", "-CA", directory / "ca-cert.pem",
            "-CAkey", directory / "ca-key.pem", "-CAcreateserial", "-days", "2",
            "-extfile", directory / "ext.cnf", "-out", directory / "server-cert.pem")


def test_tls_x509_required(tmp_path):
    certs = tmp_path / "pki"
    make_certificates(certs)
    with serve("memory", "1M", options=("--tls=require", f"--tls-certificates={certs}")) as srv:
        plain = run(["nbdinfo", "--size", srv.uri], check=False)
        assert plain.returncode != 0
        tls_uri = f"nbds+unix:///?socket={srv.socket}&tls-certificates={certs}"
        assert run(["nbdinfo", "--size", tls_uri]).stdout.strip() == b"1048576"
        script = ("import nbd, sys\nh = nbd.NBD()\nh.set_uri_allow_local_file(True)\nh.connect_uri(sys.argv[1])\n"
                  "h.pwrite(b'secret', 0)\nprint(h.pread(6, 0).decode(), h.get_tls_negotiated())\n")
        assert run([SYSTEM_PYTHON, "-c", script, tls_uri]).stdout.split() == [b"secret", b"True"]


# -- Parameters and messages -------------------------------------------------------------------
@pytest.mark.parametrize("args,message", [
    (["memory", "size=12Q"], b"could not parse size"),
    (["memory"], b"missing required parameter size="),
    (["memory", "1M", "colour=blue"], b"unknown parameter 'colour'"),
    (["file", "/nonexistent/disk.img"], b"no such file"),
    (["nosuchplugin"], b"unknown plugin"),
    (["--filter=nosuchfilter", "memory", "1M"], b"unknown filter"),
    (["luks", "file=x"], b"luks is a filter, not a plugin: use --filter=luks"),
])
def test_bad_parameters_fail_before_listening(args, message):
    proc = run([*NBDFORMATS, "-f", "-U", "-", *args, "--run", "true"], check=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr


def test_help_and_dump_plugin():
    out = run([*NBDFORMATS, "memory", "--help"]).stdout
    assert b"size=SIZE" in out
    out = run([*NBDFORMATS, "--dump-plugin", "file"]).stdout
    assert b"name=file" in out and b"param=file:PATH (magic)" in out
    out = run([*NBDFORMATS, "--list"]).stdout
    assert b"memory" in out and b"file" in out


def test_file_plugin_trim_zero_and_extents(tmp_path):
    disk = random_file(tmp_path / "disk.img", 4 << 20, seed=4)
    script = ("h.trim(1 << 20, 1 << 20)\nh.zero(65536, 3 << 20)\n"
              "assert h.pread(65536, 3 << 20) == bytes(65536)\n"
              "ext = []\nh.block_status(4 << 20, 0, lambda c, o, e, err: ext.extend(e) or 0)\nprint(ext)\n")
    with serve("file", str(disk)) as srv:
        extents = nbdsh(srv.uri, script).stdout.decode()
    pairs = eval(extents)
    # the trimmed MiB is a hole now, on a filesystem that punches holes
    offsets, offset = [], 0
    for length, flags in zip(pairs[::2], pairs[1::2]):
        offsets.append((offset, length, flags))
        offset += length
    assert any(o <= (1 << 20) and o + n >= (2 << 20) and f & 1 for o, n, f in offsets), offsets
    assert os.stat(disk).st_blocks * 512 < 4 << 20


# -- Online resize (the NBD resize extension; no common client sends it, so raw requests) -----
@pytest.mark.parametrize("plugin", ["memory", "file"])
def test_resize_grow_and_shrink(tmp_path, plugin):
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"A" * (1 << 20))
    args = ["file", str(disk)] if plugin == "file" else ["memory", "1M"]
    with serve(*args) as srv:
        raw = RawClient(srv.socket)
        size, flags = raw.go()
        assert size == 1 << 20 and flags & P.TF_SEND_RESIZE
        raw.send(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_WRITE, 1, 100, 4) + b"keep")
        assert raw.simple_reply() == (1, 0)
        raw.send(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_RESIZE, 2, 3 << 20, 0))
        assert raw.simple_reply() == (2, 0)
        assert nbdinfo_json(srv.uri)["exports"][0]["export-size"] == 3 << 20  # a second connection
        raw.send(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_READ, 3, (3 << 20) - 8, 8))
        assert raw.simple_reply() == (3, 0) and raw.recv_exact(8) == bytes(8)
        raw.send(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_RESIZE, 4, 4096, 0))
        assert raw.simple_reply() == (4, 0)
        raw.send(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_READ, 5, 4000, 200))  # past the new end
        assert raw.simple_reply() == (5, P.NBD_EINVAL)
        raw.send(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_READ, 6, 96, 12))
        around = b"AAAA" if plugin == "file" else bytes(4)  # the data kept inside the new size
        assert raw.simple_reply() == (6, 0) and raw.recv_exact(12) == around + b"keep" + around
        assert nbdinfo_json(srv.uri)["exports"][0]["export-size"] == 4096
    if plugin == "file":
        assert disk.stat().st_size == 4096


def test_resize_refused_by_readonly(tmp_path):
    with serve("memory", "1M", options=("-r",)) as srv:
        raw = RawClient(srv.socket)
        assert not raw.go()[1] & P.TF_SEND_RESIZE
        raw.send(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_RESIZE, 1, 2 << 20, 0))
        assert raw.simple_reply() == (1, P.NBD_EPERM)


def _sigterm_during_a_slow_write(tmp_path: Path, client_stays: bool) -> str:
    """A client sends a write that takes a second, hangs up or not, and SIGTERM arrives while the
    write runs; the log filter's lines once the server has exited."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    sock, logfile = str(tmp_path / "s"), tmp_path / "log"
    slow = Path(__file__).parent / "fixtures" / "slowdisk.py"
    proc = subprocess.Popen([*NBDFORMATS, "-f", "-U", sock, "--filter=log", str(slow), str(disk),
                             f"logfile={logfile}"])
    try:
        for _ in range(500):
            if os.path.exists(sock):
                break
            time.sleep(0.02)
        raw = RawClient(sock)
        raw.go()
        raw.send(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_WRITE, 1, 0, 4) + b"done")
        if not client_stays:
            raw.sock.close()
        time.sleep(0.3)
        proc.terminate()
        if client_stays:
            assert raw.simple_reply() == (1, 0)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert disk.read_bytes()[:4] == b"done"
    return logfile.read_text()


def test_sigterm_finishes_running_requests_and_flushes(tmp_path):
    """A slow write in flight when SIGTERM arrives is completed and answered, then the file is flushed."""
    assert "Flush" in _sigterm_during_a_slow_write(tmp_path, client_stays=True)


def test_sigterm_does_not_flush_for_a_client_that_hung_up(tmp_path):
    """A client that has closed its socket is not flushed for at SIGTERM, even when its connection
    has not read the end of stream yet (here: busy with a slow write): as at a disconnect while the
    server runs, and as nbdkit (which never flushes at exit).  Before, whether a --run command's
    connections got a flush at exit depended on a race (nbdkit's test-multi-conn.sh counts them)."""
    log = _sigterm_during_a_slow_write(tmp_path, client_stays=False)
    assert "Write" in log and "Flush" not in log


def test_serialize_connections_serves_one_client_at_a_time():
    plugin = str(Path(__file__).parent / "fixtures" / "serialconn.py")
    with serve(plugin, "1M") as srv:
        first = RawClient(srv.socket)
        first.go()
        second = RawClient(srv.socket)
        second.sock.settimeout(1)
        with pytest.raises(socket.timeout):
            second.recv_exact(18)  # no greeting while the first client is served
        first.send(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_DISC, 1, 0, 0))
        second.sock.settimeout(20)
        assert struct.unpack(">Q", second.recv_exact(18)[:8])[0] == P.NBDMAGIC


def test_file_reads_not_in_the_page_cache(tmp_path):
    """Reads that go to the disk (the page cache dropped) return the right data."""
    disk = random_file(tmp_path / "disk.img", 16 << 20, seed=9)
    with serve("file", str(disk)) as srv:
        fd = os.open(disk, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # evict: the next reads go to the disk
        finally:
            os.close(fd)
        run(["nbdcopy", srv.uri, tmp_path / "copy.img"])
    assert sha256_file(tmp_path / "copy.img") == sha256_file(disk)


def test_buffer_alignment_is_honoured(tmp_path):
    """A plugin that declares buffer_alignment (O_DIRECT) only ever gets aligned buffers."""
    source = random_file(tmp_path / "src.img", 4 << 20, seed=11)
    plugin = str(Path(__file__).parent / "fixtures" / "aligned.py")
    with serve(plugin, "4M") as srv:
        run(["nbdcopy", source, srv.uri])
        run(["nbdcopy", srv.uri, tmp_path / "back.img"])
        out = nbdsh(srv.uri, "h.pwrite(b'x' * 4096, 8192)\nprint(h.pread(4096, 8192) == b'x' * 4096)")
    assert sha256_file(tmp_path / "back.img") == sha256_file(source)  # misaligned buffers would be EIO
    assert out.stdout.strip() == b"True"


@pytest.mark.parametrize("plugin", ["memory", "file"])
def test_resize_with_our_own_client(tmp_path, plugin):
    """The resize extension through nbdformats.client (no common client sends NBD_CMD_RESIZE)."""
    from nbdformats.client import NBDClient
    from nbdformats.api.errors import NBDError

    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    args = ["file", str(disk)] if plugin == "file" else ["memory", "1M"]
    with serve(*args) as srv:
        with NBDClient.connect(srv.uri) as client:
            client.pwrite(b"kept", 1000)
            client.resize(8 << 20)  # grow
            assert client.size == 8 << 20
            assert bytes(client.pread(4, 1000)) == b"kept" and bytes(client.pread(16, (8 << 20) - 16)) == bytes(16)
            with NBDClient.connect(srv.uri) as second:  # a new connection sees the new size
                assert second.size == 8 << 20
            client.resize(2048)  # shrink
            with pytest.raises(NBDError):
                client.pread(4096, 0)  # past the new end
            assert bytes(client.pread(4, 1000)) == b"kept"
        assert nbdinfo_json(srv.uri)["exports"][0]["export-size"] == 2048


def test_swap_locks_memory():
    """--swap: mlockall and the OOM score, so a machine can swap to the export; what is not
    permitted (this sandbox refuses oom_score_adj below 0 even to root) is said clearly."""
    script = 'grep VmLck /proc/$PPID/status; cat /proc/$PPID/oom_score_adj; nbdinfo --size "$uri"'
    proc = run([*NBDFORMATS, "--swap", "-U", "-", "memory", "1M", "--run", script])
    out = proc.stdout.decode().split()
    assert out[0] == "VmLck:" and int(out[1]) > 1000  # kB locked: the whole process
    assert out[3] == "-1000" or b"--swap: cannot lower the OOM score" in proc.stderr
    assert out[4] == str(1 << 20)


def test_file_on_tmpfs_serves_reads_without_a_thread_per_request(tmp_path):
    """tmpfs refuses RWF_NOWAIT (EOPNOTSUPP) on many kernels: every read used to count as a
    page-cache miss, growing the connection to sixteen threads.  Reads of a file in memory never
    block, so they are served as they come; the data and the holes must still be right."""
    from nbdformats.protocol import wire as P
    from nbdformats.client import NBDClient
    shm = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        image = shm / "disk.img"
        data = os.urandom(8 << 20)
        with open(image, "wb") as f:
            f.write(data)
            f.truncate(64 << 20)  # 56 MiB of hole after the data
        with serve("file", str(image)) as srv:
            with NBDClient.connect(srv.uri) as client:
                assert bytes(client.pread(4096, 0)) == data[:4096]
                before = len(os.listdir(f"/proc/{srv.proc.pid}/task"))
                for round in range(4):
                    reads = [(i * 4096 * 37 % (8 << 20) // 4096 * 4096) for i in range(round * 64, round * 64 + 64)]
                    commands = [client.submit(P.CMD_READ, offset, 4096) for offset in reads]
                    for offset, command in zip(reads, commands):
                        assert bytes(command.result().buf) == data[offset:offset + 4096]
                added = len(os.listdir(f"/proc/{srv.proc.pid}/task")) - before
                # Extents: the data region, then the hole; a write into the hole is data at once.
                assert client.block_status(64 << 20, 0)[0] == (8 << 20, 0)
                assert client.block_status(32 << 20, 4 << 20)[0] == (4 << 20, 0)  # inside the region
                assert client.block_status(1 << 20, 16 << 20)[0][1] == 3  # hole, zero
                client.pwrite(b"x" * 4096, 16 << 20)
                assert client.block_status(4096, 16 << 20)[0] == (4096, 0)
        assert added < 4, f"{added} threads added for 256 reads from tmpfs"
    finally:
        shutil.rmtree(shm, ignore_errors=True)

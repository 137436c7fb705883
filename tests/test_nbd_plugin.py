"""The nbd plugin in front of nbdkit, qemu-nbd and nbdformats itself, driven by nbdcopy, nbdinfo and libnbd."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import (NBDFORMATS, nbdinfo_json, nbdsh, random_file, run, serve, serve_nbdkit, serve_qemu_nbd,
                      sha256_file)
from fixtures.nbd_servers import free_port, kill, make_certificates, serve_tcp
from nbdformats.client import NBDClient

MAP_FIELDS = ("offset", "length", "type")


def sparse_image(path: Path) -> Path:
    """6 MiB: random data, a 2 MiB hole, random data."""
    random_file(path, 6 << 20, seed=11)
    with open(path, "r+b") as f:
        os.posix_fallocate(f.fileno(), 0, 6 << 20)
    run(["fallocate", "--punch-hole", "--offset", str(2 << 20), "--length", str(2 << 20), path])
    return path


def extent_map(uri: str) -> list[tuple[int, int, int]]:
    return [tuple(e[k] for k in MAP_FIELDS) for e in json.loads(run(["nbdinfo", "--json", "--map", uri]).stdout)]


def upstream(kind: str, image: Path, *options: str):
    if kind == "nbdformats":
        return serve("file", str(image), options=options)
    if kind == "nbdkit":
        return serve_nbdkit("file", str(image), options=options)
    return serve_qemu_nbd(str(image), *options)


@pytest.mark.parametrize("kind", ["nbdformats", "nbdkit", "qemu-nbd"])
def test_round_trips_and_holes_through_the_plugin(tmp_path, kind):
    image = sparse_image(tmp_path / "disk.img")
    original = sha256_file(image)
    with upstream(kind, image) as up, serve("nbd", f"socket={up.socket}") as srv:
        # Holes stay holes: the map through the plugin is the upstream server's map.
        direct, through = extent_map(up.uri), extent_map(srv.uri)
        assert through == direct
        assert any(kind_ & 1 for _, _, kind_ in through), "the image has a hole"
        run(["nbdcopy", srv.uri, tmp_path / "out.img"])
        assert sha256_file(tmp_path / "out.img") == original
        new = random_file(tmp_path / "new.img", 6 << 20, seed=12)
        run(["nbdcopy", "--flush", new, srv.uri])
        run(["nbdcopy", srv.uri, tmp_path / "back.img"])
        assert sha256_file(tmp_path / "back.img") == sha256_file(new)
    assert sha256_file(image) == sha256_file(new)  # the writes reached the upstream file


def test_flags_and_limits_pass_through(tmp_path):
    image = random_file(tmp_path / "disk.img", 1 << 20, seed=1)
    fields = ("export-size", "is_read_only", "can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero",
              "can_cache", "can_multi_conn", "block_size_minimum", "block_size_preferred", "block_size_maximum")
    for up_kind, options in (("nbdkit", ()), ("qemu-nbd", ("-r", "-e", "2")), ("nbdformats", ("-r",))):
        with upstream(up_kind, image, *options) as up, serve("nbd", f"socket={up.socket}") as srv:
            theirs = nbdinfo_json(up.uri)["exports"][0]
            ours = nbdinfo_json(srv.uri)["exports"][0]
        write_only = ("can_fua", "can_trim", "can_zero", "can_fast_zero")  # meaningless on a read-only export
        for field in fields:
            # nbdkit 1.32 sends no block sizes: ours are then the spec's defaults.
            if field in theirs and not (theirs["is_read_only"] and field in write_only):
                assert ours[field] == theirs[field], (up_kind, field)
        assert ours["is_read_only"] == (up_kind != "nbdkit")
        assert ours["contexts"] == ["base:allocation"]


def test_agrees_with_nbdkits_nbd_plugin(tmp_path):
    image = sparse_image(tmp_path / "disk.img")
    fields = ("export-size", "is_read_only", "can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero",
              "can_cache", "can_multi_conn", "can_df", "contexts")
    with serve_qemu_nbd(str(image)) as up, serve("nbd", f"socket={up.socket}") as ours, \
            serve_nbdkit("nbd", f"socket={up.socket}") as theirs:
        mine, reference = nbdinfo_json(ours.uri)["exports"][0], nbdinfo_json(theirs.uri)["exports"][0]
        assert {f: mine[f] for f in fields} == {f: reference[f] for f in fields}
        assert extent_map(ours.uri) == extent_map(theirs.uri)


def test_requests_are_forwarded_with_their_flags(tmp_path):
    log = tmp_path / "upstream.log"
    with serve_nbdkit("--filter=log", "memory", "1M", f"logfile={log}") as up, \
            serve("nbd", f"socket={up.socket}") as srv:
        nbdsh(srv.uri, "h.pwrite(b'x' * 512, 0, nbd.CMD_FLAG_FUA)\n"
                       "h.trim(4096, 4096)\n"
                       "h.zero(4096, 8192, nbd.CMD_FLAG_NO_HOLE)\n"
                       "h.zero(4096, 12288, nbd.CMD_FLAG_FAST_ZERO)\n"
                       "h.flush()\n"
                       "h.cache(4096, 0)\n"
                       "h.block_status(65536, 0, lambda *a: 0)\n"
                       "assert h.pread(512, 0) == b'x' * 512\n")
        text = log.read_text()
    assert re.search(r"Write id=\d+ offset=0x0 count=0x200 fua=1", text)
    assert re.search(r"Trim id=\d+ offset=0x1000 count=0x1000 fua=0", text)
    assert re.search(r"Zero id=\d+ offset=0x2000 count=0x1000 trim=0 fua=0 fast=0", text)
    assert re.search(r"Zero id=\d+ offset=0x3000 count=0x1000 trim=1 fua=0 fast=1", text)
    assert re.search(r"Flush id=\d+", text) and re.search(r"Cache id=\d+ offset=0x0 count=0x1000", text)
    assert re.search(r"Extents id=\d+ offset=0x0 count=0x10000", text)
    assert re.search(r"Read id=\d+ offset=0x0 count=0x200", text)


def test_upstream_errors_reach_the_client(tmp_path):
    with serve_nbdkit("--filter=error", "memory", "1M", "error=ENOSPC", "error-pwrite-rate=100%") as up, \
            serve("nbd", f"socket={up.socket}") as srv:
        nbdsh(srv.uri, "try:\n    h.pwrite(b'x', 0)\nexcept nbd.Error as e:\n    assert e.errno == 'ENOSPC', e\n"
                       "else:\n    raise AssertionError('the write succeeded')\n"
                       "assert h.pread(4, 0) == bytes(4)\n")
        assert srv.proc.poll() is None


def test_requests_are_pipelined_on_one_shared_connection(tmp_path):
    log = tmp_path / "upstream.log"
    with serve_nbdkit("--filter=log", "--filter=delay", "memory", "1M", "rdelay=400ms",
                      f"logfile={log}") as up, serve("nbd", f"socket={up.socket}", "shared=true") as srv:
        clients = [NBDClient.connect(srv.uri) for _ in range(2)]  # two clients share the upstream connection
        start = time.monotonic()
        threads = [threading.Thread(target=clients[i % 2].pread, args=(4096, i * 4096)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        elapsed = time.monotonic() - start
        for client in clients:
            client.close()
        text = log.read_text()
    # One at a time, eight 400 ms reads would take 3.2 s.
    assert elapsed < 2.0, f"8 reads took {elapsed:.1f}s: not pipelined"
    assert len(re.findall(r"connection=1 Read id=", text)) == 8
    assert set(re.findall(r"connection=(\d+) Connect", text)) == {"1"}


def test_one_clients_requests_are_in_flight_together(tmp_path):
    """A client's pipelined requests reach the upstream server together, not one at a time:
    network plugins give each connection all their threads at once (latency_bound).  The
    upstream answers each read after 10 ms, too short for the watchdog that adds threads to
    other plugins' connections, so one thread would send them one by one."""
    from nbdformats.protocol import wire as P
    log = tmp_path / "upstream.log"
    with serve_nbdkit("--filter=log", "--filter=delay", "memory", "1M", "rdelay=10ms",
                      f"logfile={log}") as up, serve("nbd", f"socket={up.socket}") as srv:
        with NBDClient.connect(srv.uri) as client:
            reads = [client.submit(P.CMD_READ, i * 4096, 4096) for i in range(16)]
            for read in reads:
                read.result()
        time.sleep(0.2)  # the log's last lines
        lines = log.read_text().splitlines()
    running = most = 0  # reads the upstream had started and not yet answered, at most
    for line in lines:
        if re.search(r" Read id=\d+ ", line):
            running += 1
            most = max(most, running)
        elif re.search(r" \.\.\.Read id=\d+ ", line):
            running -= 1
    assert most >= 4, f"at most {most} reads were in flight upstream at once"


def test_each_client_gets_its_own_connection_unless_shared(tmp_path):
    log = tmp_path / "upstream.log"
    with serve_nbdkit("--filter=log", "memory", "1M", f"logfile={log}") as up, \
            serve("nbd", f"socket={up.socket}") as srv:
        with NBDClient.connect(srv.uri) as a, NBDClient.connect(srv.uri) as b:
            a.pwrite(b"a", 0)
            assert b.pread(1, 0) == b"a"
        time.sleep(0.2)
        text = log.read_text()
    assert len(re.findall(r"connection=\d+ Connect", text)) == 2


def test_tls_to_nbdkit_and_to_ourselves(tmp_path):
    pki = make_certificates(tmp_path / "pki")
    other_pki = make_certificates(tmp_path / "other")
    image = random_file(tmp_path / "disk.img", 2 << 20, seed=5)
    expected = sha256_file(image)
    tls = ("--tls=require", f"--tls-certificates={pki}")
    for start_upstream in (serve_nbdkit, serve):
        with start_upstream("file", str(image), options=tls) as up:
            with serve("nbd", f"socket={up.socket}", "tls=require", f"tls-certificates={pki}") as srv:
                run(["nbdcopy", srv.uri, tmp_path / "out.img"])
                assert sha256_file(tmp_path / "out.img") == expected
            with serve("nbd", f"nbds+unix:///?socket={up.socket}&tls-certificates={pki}") as srv:
                assert nbdinfo_json(srv.uri)["exports"][0]["export-size"] == 2 << 20
            # Plain text to a server that requires TLS, or a server certificate from another CA: refused.
            for params in ((f"socket={up.socket}",), (f"socket={up.socket}", "tls=on", f"tls-certificates={other_pki}")):
                with serve("nbd", *params) as srv:
                    assert run(["nbdinfo", srv.uri], check=False).returncode != 0
                    assert srv.proc.poll() is None
                    reason = "TLS is required" if len(params) == 1 else "CERTIFICATE_VERIFY_FAILED"
                    assert reason in srv.stderr()
            # tls-verify=false accepts any certificate (nbdkit's "simpler setup").
            with serve("nbd", f"socket={up.socket}", "tls=require", f"tls-certificates={other_pki}",
                       "tls-verify=false") as srv:
                assert nbdinfo_json(srv.uri)["exports"][0]["export-size"] == 2 << 20


def test_tls_client_certificate_for_servers_that_verify_peers(tmp_path):
    pki = make_certificates(tmp_path / "pki")
    no_client_cert = tmp_path / "ca-only"
    no_client_cert.mkdir()
    (no_client_cert / "ca-cert.pem").write_bytes((pki / "ca-cert.pem").read_bytes())
    tls = ("--tls=require", f"--tls-certificates={pki}", "--tls-verify-peer")
    for start_upstream in (serve_nbdkit, serve):
        with start_upstream("memory", "1M", options=tls) as up:
            with serve("nbd", f"socket={up.socket}", f"tls-certificates={pki}") as srv:
                nbdsh(srv.uri, "h.pwrite(b'peer', 0)\nassert h.pread(4, 0) == b'peer'\n")
            with serve("nbd", f"socket={up.socket}", f"tls-certificates={no_client_cert}") as srv:
                assert run(["nbdinfo", srv.uri], check=False).returncode != 0
                assert "cannot connect" in srv.stderr()


def test_tls_over_tcp_checks_the_host_name(tmp_path):
    pki = make_certificates(tmp_path / "pki")
    port = free_port()
    with serve_tcp(["nbdkit", "-f", "--tls=require", f"--tls-certificates={pki}", "-p", str(port), "memory", "1M"],
                   port):
        with serve("nbd", f"nbds://localhost:{port}/?tls-certificates={pki}") as srv:
            nbdsh(srv.uri, "h.pwrite(b'tls', 0)\nassert h.pread(3, 0) == b'tls'\n")
        with serve("nbd", "hostname=127.0.0.1", f"port={port}", f"tls-certificates={pki}") as srv:
            assert nbdinfo_json(srv.uri)["exports"][0]["export-size"] == 1 << 20
        # The certificate names localhost and 127.0.0.1, not this:
        with serve("nbd", f"nbds://localhost:{port}/?tls-certificates={pki}&tls-hostname=example.com") as srv:
            assert run(["nbdinfo", srv.uri], check=False).returncode != 0
            assert "CERTIFICATE_VERIFY_FAILED" in srv.stderr()


def test_command_runs_qemu_nbd_with_socket_activation(tmp_path):
    raw = random_file(tmp_path / "disk.raw", 3 << 20, seed=7)
    qcow2 = tmp_path / "disk.qcow2"
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow2])
    with serve("nbd", "command=qemu-nbd", "arg=-f", "arg=qcow2", f"arg={qcow2}") as srv:
        run(["nbdcopy", srv.uri, tmp_path / "out.raw"])
        assert sha256_file(tmp_path / "out.raw") == sha256_file(raw)
        # qemu-nbd holds the image's write lock while it runs ...
        assert run(["qemu-io", "-f", "qcow2", "-c", "write 0 512", qcow2], check=False).returncode != 0
    # ... and is stopped with the server.
    deadline = time.monotonic() + 10
    while run(["qemu-io", "-f", "qcow2", "-c", "write 0 512", qcow2], check=False).returncode != 0:
        assert time.monotonic() < deadline, "qemu-nbd still holds the image after the server stopped"
        time.sleep(0.2)


def test_command_that_fails_to_start_is_reported(tmp_path):
    proc = run([*NBDFORMATS, "-U", tmp_path / "sock", "nbd", "command=qemu-nbd", f"arg={tmp_path}/missing.img"],
               check=False, timeout=60)
    assert proc.returncode != 0
    assert "qemu-nbd exited with status" in proc.stderr.decode()


def test_socket_fd_uses_an_inherited_connection(tmp_path):
    sock = tmp_path / "front.sock"
    with serve("memory", "1M") as up, socket.socket(socket.AF_UNIX) as connection:
        connection.connect(up.socket)
        front = subprocess.Popen([*NBDFORMATS, "-f", "-U", str(sock), "nbd", f"socket-fd={connection.fileno()}"],
                                 pass_fds=(connection.fileno(),), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 start_new_session=True)
        try:
            deadline = time.monotonic() + 30
            while not sock.exists():
                assert front.poll() is None and time.monotonic() < deadline, front.stderr.read().decode()
                time.sleep(0.02)
            uri = f"nbd+unix:///?socket={sock}"
            nbdsh(uri, "h.pwrite(b'fd', 0)\n")
            nbdsh(uri, "assert h.pread(2, 0) == b'fd'\n")  # a second client: the same shared connection
        finally:
            front.terminate()
            front.wait(10)
        with NBDClient.connect(up.uri) as direct:
            assert direct.pread(2, 0) == b"fd"


def test_dynamic_export_lists_and_opens_upstream_exports(tmp_path):
    eval_plugin = ("eval", "list_exports=echo alpha; echo beta", "open=echo $3", "get_size=echo 4096",
                   "pread=yes \"$2\" | tr -d '\\n' | head -c $3")
    with serve_nbdkit(*eval_plugin) as up, serve("nbd", f"socket={up.socket}", "dynamic-export=true") as srv:
        listing = run(["nbdinfo", "--list", "--json", srv.uri]).stdout
        assert [e["export-name"] for e in json.loads(listing)["exports"]] == ["alpha", "beta"]
        nbdsh(srv.uri_for("beta"), "assert h.pread(8, 0) == b'betabeta', h.pread(8, 0)\n")
        nbdsh(srv.uri_for("alpha"), "assert h.pread(5, 0) == b'alpha'\n")
    # Without dynamic-export every client gets the configured export.
    with serve_nbdkit(*eval_plugin) as up, serve("nbd", f"socket={up.socket}", "export=beta") as srv:
        nbdsh(srv.uri_for("alpha"), "assert h.pread(4, 0) == b'beta'\n")


def test_retry_waits_for_a_late_server(tmp_path):
    sock = tmp_path / "late.sock"
    late = subprocess.Popen(["sh", "-c", f"sleep 1; exec nbdkit -f -U {sock} memory 1M"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        with serve("nbd", f"socket={sock}", "shared=true", "retry=10") as srv:
            assert nbdinfo_json(srv.uri)["exports"][0]["export-size"] == 1 << 20
    finally:
        late.kill()
        late.wait(10)


def test_lost_upstream_fails_requests_and_the_server_stays_up(tmp_path):
    with serve("memory", "1M") as up, serve("nbd", f"socket={up.socket}") as srv:
        with NBDClient.connect(srv.uri) as nbd:
            nbd.pwrite(b"x", 0)
            kill(up)
            time.sleep(0.2)
            command = nbd.send_request(0, 0, 10)  # READ
            assert command.error == 5 and "connection to the NBD server lost" in command.message
            # New connections fail at the handshake; the server keeps running.
            assert run(["nbdinfo", srv.uri], check=False).returncode != 0
            assert srv.proc.poll() is None


@pytest.mark.parametrize("params,message", [
    ((), "give exactly one of"),
    (("socket=/x", "uri=nbd://h/"), "give exactly one of"),
    (("uri=nbd+vsock:///2",), "vsock URIs are not supported"),
    (("socket=/x", "tls-username=alice"), "tls-username= goes with tls-psk="),
    (("socket=/x", "dynamic-export=true", "shared=true"), "cannot be combined with shared"),
    (("uri=nbd://h/e", "export=f"), "export name goes in the URI"),
    (("command=true", "shared=false"), "need shared=true"),
    (("hostname=h", "port=99999"), "not a TCP port"),
    (("uri=nbds://h/", "tls=off"), "requires TLS"),
])
def test_bad_parameters_are_refused(tmp_path, params, message):
    proc = run([*NBDFORMATS, "-U", tmp_path / "sock", "nbd", *params], check=False, timeout=30)
    assert proc.returncode != 0 and message in proc.stderr.decode(), proc.stderr.decode()


def test_tls_psk_upstream_nbdkit_and_ourselves(tmp_path):
    """tls-psk= as nbdkit's nbd plugin: our client's OpenSSL PSK against nbdkit's GnuTLS, and against us."""
    keys = tmp_path / "keys.psk"
    keys.write_text("alice:" + "a1" * 32 + "\n")
    disk = random_file(tmp_path / "disk.img", 2 << 20, seed=5)
    upstreams = (serve_nbdkit("--tls=require", f"--tls-psk={keys}", "file", str(disk)),
                 serve("file", str(disk), options=("--tls=require", f"--tls-psk={keys}")))
    for upstream in upstreams:
        with upstream as up:
            with serve("nbd", f"socket={up.socket}", f"tls-psk={keys}", "tls-username=alice") as front:
                run(["nbdcopy", front.uri, tmp_path / "copy.img"])
                assert sha256_file(tmp_path / "copy.img") == sha256_file(disk)
            wrong = tmp_path / "wrong.psk"
            wrong.write_text("alice:" + "00" * 32 + "\n")
            with serve("nbd", f"socket={up.socket}", f"tls-psk={wrong}", "tls-username=alice") as front:
                assert run(["nbdinfo", "--size", front.uri], check=False).returncode != 0

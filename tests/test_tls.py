"""TLS: --tls=require leaks nothing to plain clients, --tls=on serves both, --tls-verify-peer
needs a client certificate from the CA; certificates are made here with openssl."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest

from conftest import NBDFORMATS, SYSTEM_PYTHON, random_file, run, serve, sha256_file
from fixtures.hardening import Raw
from nbdformats.protocol import wire as P


def openssl(*args) -> None:
    run(["openssl", *args], timeout=60)


def make_ca(directory: Path, name: str) -> None:
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
            "-subj", f"/CN={name}", "-keyout", directory / "ca-key.pem", "-out", directory / "ca-cert.pem")


def sign(directory: Path, ca: Path, stem: str, cn: str, extensions: str) -> None:
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-subj", f"/CN={cn}",
            "-keyout", directory / f"{stem}-key.pem", "-out", directory / f"{stem}.csr")
    (directory / f"{stem}.cnf").write_text(extensions)
    openssl("x509", "-req", "-in", directory / f"{stem}.csr", "-CA", ca / "ca-cert.pem", "-CAkey",
            ca / "ca-key.pem", "-CAcreateserial", "-days", "2", "-extfile", directory / f"{stem}.cnf",
            "-out", directory / f"{stem}-cert.pem")


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """server/: CA + server cert; client/: CA + client cert; stranger/: client cert of another CA;
    anonymous/: only the CA (no client certificate)."""
    root = tmp_path_factory.mktemp("pki")
    dirs = {name: root / name for name in ("server", "client", "stranger", "anonymous", "other-ca")}
    for d in dirs.values():
        d.mkdir()
    make_ca(dirs["server"], "test CA")
    make_ca(dirs["other-ca"], "other CA")
    sign(dirs["server"], dirs["server"], "server", "localhost",
         "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    sign(dirs["client"], dirs["server"], "client", "alice", "extendedKeyUsage=clientAuth\n")
    sign(dirs["stranger"], dirs["other-ca"], "client", "mallory", "extendedKeyUsage=clientAuth\n")
    for name in ("client", "stranger", "anonymous"):
        shutil.copy(dirs["server"] / "ca-cert.pem", dirs[name] / "ca-cert.pem")
    return dirs


def tls_uri(srv, certs: Path, export: str = "") -> str:
    return f"nbds+unix:///{export}?socket={srv.socket}&tls-certificates={certs}"


CLIENT = ("import nbd, sys\nh = nbd.NBD()\nh.set_uri_allow_local_file(True)\nh.connect_uri(sys.argv[1])\n"
          "h.pwrite(b'over tls', 0)\nprint(h.pread(8, 0).decode(), h.get_tls_negotiated())\n")


def test_require_refuses_plain_clients_before_anything_leaks(pki):
    with serve("memory", "1M", options=("--tls=require", f"--tls-certificates={pki['server']}")) as srv:
        raw = Raw(srv.socket)
        raw.greeting()
        raw.send(struct.pack(">I", P.CLIENT_FLAG_FIXED_NEWSTYLE | P.CLIENT_FLAG_NO_ZEROES))
        name = b"disk"
        info = struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, P.INFO_NAME)
        meta = struct.pack(">II", 0, 1) + struct.pack(">I", 15) + b"base:allocation"
        for code, payload in [(P.OPT_LIST, b""), (P.OPT_INFO, info), (P.OPT_GO, info),
                              (P.OPT_STRUCTURED_REPLY, b""), (P.OPT_LIST_META_CONTEXT, meta)]:
            raw.send(P.OPTION_HEADER.pack(P.IHAVEOPT, code, len(payload)) + payload)
            magic, opt, reply, length = P.OPTION_REPLY.unpack(raw.recv_exact(P.OPTION_REPLY.size))
            assert (magic, opt, reply) == (P.OPTION_REPLY_MAGIC, code, P.REP_ERR_TLS_REQD)
            assert b"TLS" in raw.recv_exact(length)
        # NBD_OPT_EXPORT_NAME cannot be refused with an error: the server hangs up, no size sent.
        raw.send(P.OPTION_HEADER.pack(P.IHAVEOPT, P.OPT_EXPORT_NAME, 0))
        assert raw.closed_by_server(10)
        plain = run(["nbdinfo", "--list", srv.uri], check=False)
        assert plain.returncode != 0 and b"1048576" not in plain.stdout
        assert run(["nbdinfo", "--size", tls_uri(srv, pki["client"])]).stdout.strip() == b"1048576"


def test_tls_on_serves_plain_and_tls_clients(pki):
    with serve("memory", "1M", options=("--tls=on", f"--tls-certificates={pki['server']}")) as srv:
        assert run(["nbdinfo", "--size", srv.uri]).stdout.strip() == b"1048576"
        out = run([SYSTEM_PYTHON, "-c", CLIENT, tls_uri(srv, pki["anonymous"])]).stdout.split()
        assert out == [b"over", b"tls", b"True"]


def test_verify_peer_needs_a_client_certificate_from_the_ca(pki):
    opts = ("--tls=require", f"--tls-certificates={pki['server']}", "--tls-verify-peer")
    with serve("memory", "1M", options=opts) as srv:
        out = run([SYSTEM_PYTHON, "-c", CLIENT, tls_uri(srv, pki["client"])]).stdout.split()
        assert out == [b"over", b"tls", b"True"]
        for who in ("anonymous", "stranger"):  # no certificate; a certificate from another CA
            refused = run([SYSTEM_PYTHON, "-c", CLIENT, tls_uri(srv, pki[who])], check=False)
            assert refused.returncode != 0, who
            assert b"over tls" not in refused.stdout
        assert srv.proc.poll() is None
        # and the server still serves the good client afterwards
        assert run(["nbdinfo", "--size", tls_uri(srv, pki["client"])]).stdout.strip() == b"1048576"


def test_without_verify_peer_any_tls_client_is_served(pki):
    with serve("memory", "1M", options=("--tls=require", f"--tls-certificates={pki['server']}")) as srv:
        for who in ("anonymous", "stranger"):
            out = run([SYSTEM_PYTHON, "-c", CLIENT, tls_uri(srv, pki[who])]).stdout.split()
            assert out == [b"over", b"tls", b"True"], who


def test_garbage_instead_of_a_tls_handshake_does_not_hurt(pki):
    with serve("memory", "1M", options=("--tls=require", f"--tls-certificates={pki['server']}")) as srv:
        for junk in (b"\x16\x03\x01\x00\x05hello", b"\x00" * 64, b"GET / HTTP/1.0\r\n\r\n"):
            raw = Raw(srv.socket)
            raw.greeting()
            raw.send(struct.pack(">I", 3) + P.OPTION_HEADER.pack(P.IHAVEOPT, P.OPT_STARTTLS, 0))
            magic, opt, reply, length = P.OPTION_REPLY.unpack(raw.recv_exact(P.OPTION_REPLY.size))
            assert reply == P.REP_ACK
            raw.send(junk)
            assert raw.closed_by_server(15)
        assert run(["nbdinfo", "--size", tls_uri(srv, pki["client"])]).stdout.strip() == b"1048576"
        assert srv.proc.poll() is None


# -- TLS with pre-shared keys (nbdkit's --tls-psk, psktool's file format) ----------------------
PSK_SCRIPT = ("import nbd, sys\nh = nbd.NBD()\nh.set_uri_allow_local_file(True)\nh.connect_uri(sys.argv[1])\n"
              "h.pwrite(b'psk!', 0)\nprint(h.pread(4, 0).decode(), h.get_tls_negotiated())\n")


def test_tls_psk(tmp_path):
    keys = tmp_path / "keys.psk"
    keys.write_text("alice:" + "0123456789abcdef" * 4 + "\nbob:" + "fedcba9876543210" * 4 + "\n")
    wrong = tmp_path / "wrong.psk"
    wrong.write_text("alice:" + "00" * 32 + "\n")
    with serve("memory", "1M", options=("--tls=require", f"--tls-psk={keys}")) as srv:
        assert run(["nbdinfo", "--size", srv.uri], check=False).returncode != 0  # no TLS: refused
        for user in ("alice", "bob"):
            uri = f"nbds+unix://{user}@/?socket={srv.socket}&tls-psk-file={keys}"  # libnbd: user@ names the key
            assert run([SYSTEM_PYTHON, "-c", PSK_SCRIPT, uri]).stdout.split() == [b"psk!", b"True"]
        for keyfile, user in ((wrong, "alice"), (keys, "mallory")):
            uri = f"nbds+unix://{user}@/?socket={srv.socket}&tls-psk-file={keyfile}"
            assert run([SYSTEM_PYTHON, "-c", PSK_SCRIPT, uri], check=False).returncode != 0
        assert "0123456789abcdef" not in srv.stderr()  # keys never logged


def test_tls_psk_bad_file(tmp_path):
    bad = tmp_path / "bad.psk"
    bad.write_text("alice-without-a-key\n")
    proc = run([*NBDFORMATS, "-f", "--tls=on", f"--tls-psk={bad}", "-U", "-", "memory", "1M", "--run", "true"],
               check=False)
    assert proc.returncode != 0 and b"expected USERNAME:HEXKEY" in proc.stderr


def test_tls_with_a_file_plugin(tmp_path):
    """TLS through the same engine as plain sockets, with a plugin that reads from disk."""
    keys = tmp_path / "keys.psk"
    keys.write_text("alice:" + "5a" * 32 + "\n")
    disk = random_file(tmp_path / "disk.img", 8 << 20, seed=3)
    with serve("file", str(disk), options=("--tls=require", f"--tls-psk={keys}")) as srv:
        uri = f"nbds+unix://alice@/?socket={srv.socket}&tls-psk-file={keys}"
        run(["nbdcopy", uri, tmp_path / "copy.img"])
        run(["nbdcopy", tmp_path / "copy.img", uri])  # and writes back through TLS
    assert sha256_file(tmp_path / "copy.img") == sha256_file(disk)

"""The policy filter: rule parsing, decisions in-process, and refusals seen by real clients."""

from __future__ import annotations

import errno
import ipaddress
import socket
import subprocess
import time

import pytest

from conftest import NBDFORMATS, SYSTEM_PYTHON, nbdinfo_json, nbdsh, run, serve
from fixtures.filterchain import make_chain
from nbdformats.api.chain import FLAG_FUA, Extents
from nbdformats.api.errors import ConfigError, NBDError
from nbdformats.filters.policy import parse_policy

POLICY = """\
# the boot sector and partition table are read-only; no trims; reads up to 1 MiB
deny writes range=0-64K
deny trim
deny read size>1M
deny * client=10.0.0.0/8        # a whole network
deny write export=golden*
deny open export=secret*
readonly export=frozen
allow read,extents range=0-
allow write,zero,flush
default deny
"""


# -- Parsing -----------------------------------------------------------------------------------
def test_parse_rules():
    policy = parse_policy(POLICY)
    assert policy.default == "deny"
    first = policy.rules[0]
    assert (first.line, first.action, first.ranges) == (2, "deny", ((0, 65536),))
    assert first.operations == {"write", "zero", "trim", "resize"}
    assert policy.rules[2].size_checks == (((">", 1 << 20)),)
    assert policy.rules[3].clients == (ipaddress.ip_network("10.0.0.0/8"),)
    assert policy.rules[3].operations >= {"connect", "open", "read", "flush"}
    assert [r.exports for r in policy.readonly] == [("frozen",)]
    assert policy.rules[-1].operations == {"write", "zero", "flush"}


@pytest.mark.parametrize("text,message", [
    ("permit read", "rules.txt:1: unknown action 'permit'"),
    ("deny", "missing operations"),
    ("allow read\ndeny scribble", "rules.txt:2: unknown operation 'scribble'"),
    ("deny write range=5", "bad range '5'"),
    ("deny write range=8K-4K", "empty range"),
    ("deny write range=x-", "could not parse size"),
    ("deny read size=4", "bad size condition"),
    ("deny read colour=red", "unknown condition 'colour'"),
    ("deny read client=300.1.1.1", "does not appear to be an IPv4 or IPv6"),
    ("deny flush range=0-1M", "apply only to read"),
    ("deny connect export=x", "use open with export="),
    ("readonly range=0-1M", "readonly takes only export= and client="),
    ("default maybe", "expected 'default allow' or 'default deny'"),
])
def test_parse_errors_name_the_line(text, message):
    with pytest.raises(ConfigError) as info:
        parse_policy(text, "rules.txt")
    assert message in str(info.value) and "rules.txt:" in str(info.value)


# -- Decisions, in-process ---------------------------------------------------------------------
class FakeSocket:
    """What the filter asks of a client socket: its family and peer address."""

    def __init__(self, address: str | None) -> None:
        self.family = socket.AF_UNIX if address is None else (
            socket.AF_INET6 if ":" in address else socket.AF_INET)
        self.address = address

    def getpeername(self):
        return (self.address, 10809)


def policy_chain(tmp_path, text: str):
    rules = tmp_path / "policy.rules"
    rules.write_text(text)
    return make_chain([("policy", [("policy", str(rules))])], "memory", [("size", "4M")])


def expect_eperm(call, *args) -> None:
    with pytest.raises(NBDError) as info:
        call(*args)
    assert info.value.errno == errno.EPERM


def test_requests_are_judged_by_operation_range_and_size(tmp_path):
    chain = policy_chain(tmp_path, POLICY)
    top = chain.open(False, "", FakeSocket("192.0.2.1"))
    expect_eperm(top.pwrite, memoryview(b"x" * 512), 65536 - 256, 0)  # overlaps the protected range
    top.pwrite(memoryview(b"y" * 512), 65536, FLAG_FUA)  # just after it
    expect_eperm(top.zero, 4096, 0, 0)
    expect_eperm(top.trim, 4096, 1 << 20, 0)
    buf = bytearray(512)
    top.pread(memoryview(buf), 65536, 0)
    assert bytes(buf) == b"y" * 512
    top.pread(memoryview(bytearray(1 << 20)), 0, 0)  # exactly the cap
    expect_eperm(top.pread, memoryview(bytearray((1 << 20) + 1)), 0, 0)
    top.flush(0)
    top.extents(4096, 0, 0, Extents(0, 4096))
    expect_eperm(top.cache, 4096, 0, 0)  # not allowed by any rule: default deny
    top.close()


def test_clients_and_exports(tmp_path):
    chain = policy_chain(tmp_path, POLICY)
    with pytest.raises(NBDError):
        chain.preconnect(FakeSocket("10.1.2.3"), False)
    chain.preconnect(FakeSocket("192.0.2.1"), False)
    chain.preconnect(FakeSocket(None), False)  # a Unix-domain client
    with pytest.raises(NBDError) as info:
        chain.open(False, "secret-disk", FakeSocket("192.0.2.1"))
    assert info.value.errno == errno.EPERM
    golden = chain.open(False, "golden-1", FakeSocket(None))
    assert golden.can_write()  # writable, but plain writes are denied
    expect_eperm(golden.pwrite, memoryview(b"z"), 1 << 20, 0)
    golden.zero(4096, 1 << 20, 0)
    frozen = chain.open(False, "frozen", FakeSocket("::ffff:192.0.2.9"))
    assert not frozen.can_write()  # the readonly rule: clients see a read-only export
    for layer in (golden, frozen):
        layer.close()


def test_default_allow_and_client_rules_for_unix_and_ipv6(tmp_path):
    chain = policy_chain(tmp_path, "deny writes client=unix\ndeny read client=2001:db8::/32\n")
    local = chain.open(False, "", FakeSocket(None))
    expect_eperm(local.pwrite, memoryview(b"a"), 0, 0)
    local.pread(memoryview(bytearray(16)), 0, 0)
    remote = chain.open(False, "", FakeSocket("2001:db8::5"))
    remote.pwrite(memoryview(b"a"), 0, 0)
    expect_eperm(remote.pread, memoryview(bytearray(16)), 0, 0)
    remote.flush(0)  # default allow
    for layer in (local, remote):
        layer.close()


def test_refusal_log_lines_are_rate_limited(tmp_path, caplog):
    chain = policy_chain(tmp_path, "deny trim\n")
    top = chain.open(False, "disk", FakeSocket("192.0.2.1"))
    with caplog.at_level("WARNING", logger="nbdformats"):
        for _ in range(500):
            expect_eperm(top.trim, 512, 0, 0)
    lines = [r.getMessage() for r in caplog.records]
    assert 20 <= len(lines) <= 25, len(lines)
    assert lines[0] == ("policy: denied trim [0, +512) on export 'disk' to client 192.0.2.1 "
                        "(line 1: deny trim)")
    top.close()


# -- Through the server ------------------------------------------------------------------------
def test_clients_see_eperm_and_the_server_logs_it(tmp_path):
    rules = tmp_path / "policy.rules"
    rules.write_text(POLICY)
    with serve("--filter=policy", "memory", "4M", f"policy={rules}") as srv:
        script = ("try:\n    h.pwrite(b'mbr' * 100, 0)\nexcept nbd.Error as e:\n    print(e.errno)\n"
                  "h.pwrite(b'data' * 1024, 1 << 20)\nprint(bytes(h.pread(4096, 1 << 20))[:8].decode())\n")
        assert nbdsh(srv.uri, script).stdout.split() == [b"EPERM", b"datadata"]
        out = run(["qemu-io", "-f", "raw", "-c", "discard 1M 64k", srv.uri], check=False)
        assert b"Operation not permitted" in out.stdout + out.stderr
        assert nbdinfo_json(srv.uri_for("frozen"))["exports"][0]["is_read_only"] is True
        assert nbdinfo_json(srv.uri_for("golden"))["exports"][0]["is_read_only"] is False
        refused = run(["nbdinfo", "--size", srv.uri_for("secret")], check=False)
        assert refused.returncode != 0
        time.sleep(0.2)
        log = srv.stderr()
    assert "policy: denied write [0, +300) on export '' to client unix (line 2: deny writes range=0-64K)" in log
    assert "policy: denied trim" in log
    assert "policy: refused export 'secret' to client unix (line 7: deny open export=secret*)" in log


def test_tcp_client_address_rules(tmp_path):
    rules = tmp_path / "policy.rules"
    rules.write_text("deny connect client=127.0.0.2\ndeny writes client=127.0.0.0/8\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([*NBDFORMATS, "-f", "-p", str(port), "-i", "127.0.0.1", "--filter=policy",
                             "memory", "1M", f"policy={rules}"], stderr=subprocess.PIPE)
    try:
        uri = f"nbd://127.0.0.1:{port}"
        for _ in range(100):
            if run(["nbdinfo", "--size", uri], check=False).returncode == 0:
                break
            time.sleep(0.1)
        script = ("import nbd\nh = nbd.NBD()\nh.connect_uri(%r)\n"
                  "try:\n    h.pwrite(b'x', 0)\nexcept nbd.Error as e:\n    print(e.errno)\n" % uri)
        assert run([SYSTEM_PYTHON, "-c", script]).stdout.strip() == b"EPERM"
        with socket.socket() as other:  # from 127.0.0.2: closed before any greeting
            other.settimeout(10)
            other.bind(("127.0.0.2", 0))
            other.connect(("127.0.0.1", port))
            assert other.recv(100) == b""
    finally:
        proc.terminate()
        proc.wait(10)
    log = proc.stderr.read()
    assert b"policy: denied write [0, +1) on export '' to client 127.0.0.1" in log
    assert b"policy: refused a connection from client 127.0.0.2 (line 1: deny connect client=127.0.0.2)" in log


def test_bad_policy_file_fails_before_listening(tmp_path):
    rules = tmp_path / "policy.rules"
    rules.write_text("allow read\ndeny wrte\n")
    proc = run([*NBDFORMATS, "-U", "-", "--filter=policy", "memory", "1M", f"policy={rules}", "--run", "true"],
               check=False)
    assert proc.returncode != 0 and b"policy.rules:2: unknown operation 'wrte'" in proc.stderr
    missing = run([*NBDFORMATS, "-U", "-", "--filter=policy", "memory", "1M", "--run", "true"], check=False)
    assert missing.returncode != 0 and b"policy=" in missing.stderr

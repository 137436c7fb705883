"""curl plugin: HTTP parsing, read-ahead, and a real nginx (http, https, auth, redirects, no-Range,
a changed object, nginx stopped mid-copy) read through nbdcopy, alone and under the format filters."""

from __future__ import annotations

import errno
import hashlib
import http.server
import os
import random
import re
import shutil
import socketserver
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import pytest

from conftest import NBDFORMATS, nbdinfo_json, nbdsh, run, serve, serve_nbdkit, sha256_file
from fixtures.compressed import make_image
from fixtures.luks import KEYFILE_DATA, cryptsetup_encrypt_in_place
from fixtures.xva import XvaDisk, make_xva
from fixtures.nginx import COOKIE, PASSWORD, PROXY_PASSWORD, PROXY_USER, TOKEN, USER, Nginx
from nbdformats.api.chain import Chain, Layer
from nbdformats.api.errors import ConfigError, NBDError
from nbdformats.plugins.curl.messages import (ContentRange, Validators, parse_content_range, parse_header_option,
                                              redact_url, split_userinfo)
from nbdformats.plugins.curl.readahead import ReadAhead
from nbdformats.registry import load_plugin

MiB = 1 << 20
IMAGE_SIZE = 4 * MiB


# --- sans-IO pieces ----------------------------------------------------------------------------

def test_parse_content_range() -> None:
    assert parse_content_range("bytes 0-0/1234") == ContentRange(0, 0, 1234)
    assert parse_content_range("Bytes 10-19/*") == ContentRange(10, 19, None)
    assert parse_content_range("bytes */0") == ContentRange(None, None, 0)
    for bad in ("bytes 5-4/10", "bytes 0-10/10", "bytes */*", "items 0-1/2", "bytes 0-/10", "bytes -1-2/3", ""):
        with pytest.raises(ValueError):
            parse_content_range(bad)


def test_parse_header_option() -> None:
    assert parse_header_option("X-My-Name: John Doe") == ("X-My-Name", "John Doe")
    assert parse_header_option("User-Agent:") == ("User-Agent", None)  # remove
    assert parse_header_option("X-Empty;") == ("X-Empty", "")  # send empty
    assert parse_header_option("Cookie: a=1; b=2") == ("Cookie", "a=1; b=2")
    with pytest.raises(ValueError) as info:
        parse_header_option("Authorization Bearer SECRET-TOKEN")
    assert "SECRET-TOKEN" not in str(info.value)
    for bad in ("Bad Name: x", "X: a\r\nInjected: 1", "X; trailing"):
        with pytest.raises(ValueError):
            parse_header_option(bad)


def test_urls_in_messages_hide_credentials() -> None:
    url = "https://bob:pa%20ss@example.com:8443/d/disk.img?X-Amz-Signature=abc#frag"
    assert split_userinfo(url) == ("https://example.com:8443/d/disk.img?X-Amz-Signature=abc#frag", "bob", "pa ss")
    assert split_userinfo("http://example.com/x") == ("http://example.com/x", None, None)
    assert redact_url(url) == "https://example.com:8443/d/disk.img?…"


def test_validators() -> None:
    seen = Validators('"abc"', "Wed, 01 Jan 2025 00:00:00 GMT")
    assert seen.differs(Validators('"abc"', "Wed, 01 Jan 2025 00:00:00 GMT")) is None
    assert seen.differs(Validators(None, None)) is None  # nothing to compare
    assert "ETag" in (seen.differs(Validators('"abd"', None)) or "")
    assert "Last-Modified" in (seen.differs(Validators(None, "Thu, 02 Jan 2025 00:00:00 GMT")) or "")


# --- read-ahead over a fake source ---------------------------------------------------------------

class FakeSource:
    def __init__(self, size: int, fail_at: int | None = None) -> None:
        self.data = random.Random(size).randbytes(size)
        self.calls: list[tuple[int, int]] = []
        self.fail_at = fail_at
        self.lock = threading.Lock()

    def fetch(self, buf: memoryview, offset: int) -> None:
        with self.lock:
            self.calls.append((offset, len(buf)))
            if self.fail_at is not None and offset <= self.fail_at < offset + len(buf):
                self.fail_at = None  # fail once
                raise NBDError(errno.EIO, "injected")
        buf[:] = self.data[offset:offset + len(buf)]


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(4) as pool:
        yield pool


def test_readahead_turns_small_sequential_reads_into_windows(executor: ThreadPoolExecutor) -> None:
    size = 3 * MiB + 12345
    source = FakeSource(size)
    reader = ReadAhead(source.fetch, size, 256 * 1024, 4, executor)
    out = bytearray(size)
    for offset in range(0, size, 16 * 1024):
        n = min(16 * 1024, size - offset)
        reader.read(memoryview(out)[offset:offset + n], offset)
    assert out == source.data
    # Two direct reads start the stream; then whole windows only.
    assert len(source.calls) <= 2 + size // (256 * 1024) + 1
    assert all(n in (16 * 1024, 256 * 1024) or offset + n == size for offset, n in source.calls)
    assert len(reader.windows) == 0  # every window was consumed and dropped


def test_readahead_random_reads_go_direct(executor: ThreadPoolExecutor) -> None:
    size = 8 * MiB
    source = FakeSource(size)
    reader = ReadAhead(source.fetch, size, MiB, 4, executor)
    rng = random.Random(1)
    for _ in range(50):
        offset = rng.randrange(0, size - 4096) // 4096 * 4096 + 4096 * 3  # never continuing a read
        buf = bytearray(4096)
        reader.read(memoryview(buf), offset)
        assert buf == source.data[offset:offset + 4096]
    assert all(n == 4096 for _, n in source.calls), "random reads must not fetch whole windows"


def test_readahead_short_runs_waste_little(executor: ThreadPoolExecutor) -> None:
    """A filter reading one compressed block (two chunks), then jumping to a far one."""
    size = 64 * MiB
    source = FakeSource(size)
    reader = ReadAhead(source.fetch, size, MiB, 8, executor)
    wanted = 0
    for block in range(8):
        for chunk in range(2):
            offset = block * 8 * MiB + chunk * MiB
            buf = bytearray(MiB)
            reader.read(memoryview(buf), offset)
            assert buf == source.data[offset:offset + MiB]
            wanted += MiB
    executor.shutdown(wait=True)
    fetched = sum(n for _, n in source.calls)
    assert fetched <= 2 * wanted, (fetched, wanted)
    assert len(reader.windows) <= 3


def test_readahead_concurrent_out_of_order_reads(executor: ThreadPoolExecutor) -> None:
    """As nbdcopy: many requests in flight, served by worker threads in any order."""
    size = 6 * MiB
    source = FakeSource(size)
    reader = ReadAhead(source.fetch, size, 512 * 1024, 4, executor)
    out = bytearray(size)
    offsets = list(range(0, size, 64 * 1024))
    jittered = [offsets[i] for i in sorted(range(len(offsets)), key=lambda i: i + random.Random(i).uniform(0, 8))]
    with ThreadPoolExecutor(8) as clients:
        list(clients.map(lambda o: reader.read(memoryview(out)[o:o + 64 * 1024], o), jittered))
    assert out == source.data
    assert len(source.calls) < len(offsets) / 2


def test_readahead_error_is_reported_then_retried(executor: ThreadPoolExecutor) -> None:
    size = 2 * MiB
    source = FakeSource(size, fail_at=MiB + 10)
    reader = ReadAhead(source.fetch, size, 256 * 1024, 8, executor)
    out = bytearray(size)
    failed = []
    for offset in range(0, size, 64 * 1024):
        try:
            reader.read(memoryview(out)[offset:offset + 64 * 1024], offset)
        except NBDError as e:
            assert e.errno == errno.EIO
            failed.append(offset)
            reader.read(memoryview(out)[offset:offset + 64 * 1024], offset)  # the next try fetches again
    assert failed == [MiB]
    assert out == source.data


# --- nginx ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    """nginx serving disk.raw and its .xz, .gz, .tar.gz and .zip forms (and a copy to replace)."""
    base = tmp_path_factory.mktemp("curl")
    root = base / "root"
    root.mkdir()
    make_image(root / "disk.raw", IMAGE_SIZE)
    shutil.copy(root / "disk.raw", root / "changing.raw")
    (root / "empty.raw").write_bytes(b"")
    with open(root / "sparse.raw", "wb") as f:
        f.truncate(256 * MiB)  # costs no disk; more than socket buffers can hold
    run(["xz", "-1", "-T1", "--block-size=1MiB", "-k", root / "disk.raw"], timeout=60)
    (root / "disk.raw.gz").write_bytes(run(["gzip", "-1", "-c", root / "disk.raw"], timeout=60).stdout)
    run(["tar", "-C", root, "-cf", root / "disk.tar", "disk.raw"], timeout=60)
    (root / "disk.tar.gz").write_bytes(run(["gzip", "-1", "-c", root / "disk.tar"], timeout=60).stdout)
    run(["zip", "-q", "-j", root / "disk.zip", root / "disk.raw"], timeout=60)
    make_xva(root / "vm.xva", [XvaDisk((root / "disk.raw").read_bytes())])
    # LUKS2 made by cryptsetup from known plaintext: the 2 MiB added at the end make room for the header.
    (base / "keyfile").write_bytes(KEYFILE_DATA)
    (root / "disk.luks").write_bytes((root / "disk.raw").read_bytes() + bytes(2 * MiB))
    cryptsetup_encrypt_in_place(root / "disk.luks", base / "keyfile")
    with Nginx(root, base / "nginx") as server:
        yield server


def expected(site: Nginx) -> str:
    return sha256_file(site.root / "disk.raw")


def copy_sha(uri: str, tmp: Path, *extra: str) -> str:
    out = tmp / "copy.raw"
    run(["nbdcopy", *extra, uri, out], timeout=60)
    return sha256_file(out)


def make_curl(*params: tuple[str, str]) -> Chain:
    chain = Chain([], load_plugin("curl")())
    chain.configure({0: list(params)})
    chain.get_ready()
    return chain


@pytest.mark.parametrize("connections", ["1", "4"])
def test_raw_http_nbdcopy(site: Nginx, tmp: Path, connections: str) -> None:
    with serve("curl", f"{site.url}/disk.raw", f"connections={connections}") as srv:
        info = nbdinfo_json(srv.uri)["exports"][0]
        assert info["export-size"] == IMAGE_SIZE and info["is_read_only"] and info["can_multi_conn"]
        assert copy_sha(srv.uri, tmp) == expected(site)


def test_connection_pool_size_is_respected(site: Nginx, tmp: Path) -> None:
    before = len(site.requests())
    with serve("curl", f"url={site.url}/disk.raw", "connections=2", "readahead=0") as srv:
        assert copy_sha(srv.uri, tmp, "--connections=4", "--request-size=65536") == expected(site)
    lines = site.requests()[before:]
    connections = {line.split()[-1] for line in lines}
    assert len(lines) >= IMAGE_SIZE // 65536 and len(connections) <= 2, connections


def test_readahead_makes_large_requests(site: Nginx) -> None:
    chain = make_curl(("url", f"{site.url}/disk.raw"), ("readahead", "8M"))
    before = len(site.requests())
    top = chain.open(True, "")
    try:
        out = bytearray(IMAGE_SIZE)
        for offset in range(0, IMAGE_SIZE, 32 * 1024):
            top.pread(memoryview(out)[offset:offset + 32 * 1024], offset, 0)
    finally:
        top.close()
        chain.cleanup()
    assert hashlib.sha256(out).hexdigest() == expected(site)
    sizes = [int(line.split()[-2]) for line in site.requests()[before:]]
    assert len(sizes) <= 4, sizes  # 2 small reads start the stream, then 2 MiB windows
    assert sizes.count(2 * MiB) >= 1


def test_https_with_cainfo(site: Nginx, tmp: Path) -> None:
    with serve("curl", f"url={site.tls_url}/disk.raw", f"cainfo={site.ca_cert}") as srv:
        assert copy_sha(srv.uri, tmp) == expected(site)


def test_https_wrong_ca_is_a_clear_error(site: Nginx) -> None:
    with pytest.raises(AssertionError) as info:
        with serve("curl", f"url={site.tls_url}/disk.raw", f"cainfo={site.wrong_ca_cert}"):
            pass
    assert "certificate verification failed" in str(info.value)
    assert "cainfo=" in str(info.value)


def test_https_sslverify_false(site: Nginx) -> None:
    chain = make_curl(("url", f"{site.tls_url}/disk.raw"), ("sslverify", "false"))
    top = chain.open(True, "")
    buf = bytearray(4096)
    top.pread(memoryview(buf), 4096, 0)
    top.close()
    chain.cleanup()
    assert buf == (site.root / "disk.raw").read_bytes()[4096:8192]


def test_basic_auth(site: Nginx, tmp: Path) -> None:
    password_file = tmp / "pw"
    password_file.write_text(PASSWORD + "\n")
    with serve("curl", f"url={site.url}/private/disk.raw", f"user={USER}", f"password=+{password_file}") as srv:
        assert copy_sha(srv.uri, tmp) == expected(site)
    # user and password in the URL, as curl takes them
    chain = make_curl(("url", f"http://{USER}:{PASSWORD.replace(' ', '%20')}@127.0.0.1:{site.port}/private/disk.raw"))
    assert chain.plugin.size == IMAGE_SIZE
    chain.cleanup()


def test_wrong_password_fails_without_showing_it(site: Nginx) -> None:
    with pytest.raises(AssertionError) as info:
        with serve("curl", f"url={site.url}/private/disk.raw", f"user={USER}", "password=WrongHorse42",
                   options=("-v",)):
            pass
    assert "HTTP 401" in str(info.value)
    assert "WrongHorse42" not in str(info.value)
    # nor from the URL: user information and the query string (signed URLs) are not shown
    with pytest.raises(AssertionError) as info:
        with serve("curl", f"url=http://{USER}:WrongHorse43@127.0.0.1:{site.port}/private/disk.raw?sig=TopSecret",
                   options=("-v",)):
            pass
    assert "HTTP 401" in str(info.value) and "/private/disk.raw?…" in str(info.value)
    assert "WrongHorse43" not in str(info.value) and "TopSecret" not in str(info.value)


def test_header_script_and_cookie(site: Nginx, tmp: Path) -> None:
    script = f"printf 'Authorization: Bearer '; echo {TOKEN}"
    with serve("curl", f"url={site.url}/token/disk.raw", f"header-script={script}", options=("-v",)) as srv:
        assert copy_sha(srv.uri, tmp) == expected(site)
        assert TOKEN not in srv.stderr()
    cookie_file = tmp / "cookie"
    cookie_file.write_text(f"session={COOKIE}\n")
    chain = make_curl(("url", f"{site.url}/cookie/disk.raw"), ("cookie", f"+{cookie_file}"))
    assert chain.plugin.size == IMAGE_SIZE
    chain.cleanup()
    with pytest.raises(ConfigError, match="HTTP 403"):
        make_curl(("url", f"{site.url}/token/disk.raw"), ("header", "Authorization: Bearer nope"))


def test_cookie_engine_keeps_cookies_the_server_sets(site: Nginx, tmp: Path) -> None:
    """cookiefile=/cookiejar= turn on libcurl's cookie engine, as in nbdkit: /login/ sets the
    session cookie while redirecting to /cookie/, which wants it back."""
    login = f"{site.url}/login/disk.raw"
    with pytest.raises(ConfigError, match="HTTP 403"):  # without the engine the cookie is lost
        make_curl(("url", login), ("followlocation", "true"))
    jar = tmp / "jar.txt"
    with serve("curl", f"url={login}", "followlocation=true", "cookiefile=", f"cookiejar={jar}") as srv:
        assert copy_sha(srv.uri, tmp) == expected(site)
    saved = jar.read_text()  # written at exit, in the Netscape format curl reads
    assert saved.startswith("# Netscape HTTP Cookie File") and f"\tsession\t{COOKIE}" in saved
    # Loaded from that file, the cookie opens /cookie/ directly.
    chain = make_curl(("url", f"{site.url}/cookie/disk.raw"), ("cookiefile", str(jar)))
    assert chain.plugin.size == IMAGE_SIZE
    chain.cleanup()
    (tmp / "bad.txt").write_text("not a cookie file\n")
    with pytest.raises(ConfigError, match="cookiefile="):
        make_curl(("url", f"{site.url}/disk.raw"), ("cookiefile", str(tmp / "bad.txt")))


def test_header_script_renews(site: Nginx, tmp: Path) -> None:
    counter = tmp / "runs"
    script = f"echo $iteration >> {counter}; echo 'Authorization: Bearer {TOKEN}'"
    chain = make_curl(("url", f"{site.url}/token/disk.raw"), ("header-script", script),
                      ("header-script-renew", "1"), ("readahead", "0"))
    top = chain.open(True, "")
    buf = bytearray(512)
    top.pread(memoryview(buf), 0, 0)
    time.sleep(1.1)
    top.pread(memoryview(buf), 512, 0)
    top.close()
    chain.cleanup()
    assert counter.read_text().split() == ["0", "1"]


def test_redirects_followed_only_when_asked(site: Nginx, tmp: Path) -> None:
    with serve("curl", f"url={site.url}/moved/disk.raw", "followlocation=true") as srv:
        assert copy_sha(srv.uri, tmp) == expected(site)
    for asked in ((), (("followlocation", "false"),)):
        with pytest.raises(ConfigError, match="add followlocation=true"):
            make_curl(("url", f"{site.url}/moved/disk.raw"), *asked)


def test_server_ignoring_range_is_a_startup_error(site: Nginx) -> None:
    before = len(site.requests())
    with pytest.raises(AssertionError) as info:
        with serve("curl", f"url={site.url}/norange/sparse.raw"):
            pass
    assert "ignores Range requests" in str(info.value)
    # The whole object was not downloaded: the connection was dropped after the headers.
    sent = sum(int(line.split()[-2]) for line in site.requests()[before:])
    assert sent < 128 * MiB


def test_unix_socket_path(site: Nginx, tmp: Path) -> None:
    with serve("curl", "url=http://localhost/disk.raw", f"unix-socket-path={site.socket}") as srv:
        assert copy_sha(srv.uri, tmp) == expected(site)


def test_http_proxy_with_credentials(site: Nginx, tmp: Path) -> None:
    with serve("curl", f"url={site.url}/disk.raw", f"proxy=http://127.0.0.1:{site.proxy_port}",
               f"proxy-user={PROXY_USER}", f"proxy-password={PROXY_PASSWORD}") as srv:
        assert copy_sha(srv.uri, tmp) == expected(site)
    assert any("206" in line for line in site.proxy_log.read_text().splitlines())
    with pytest.raises(ConfigError, match="HTTP 407"):
        make_curl(("url", f"{site.url}/disk.raw"), ("proxy", f"http://127.0.0.1:{site.proxy_port}"))


def test_empty_object_and_missing_one(site: Nginx) -> None:
    chain = make_curl(("url", f"{site.url}/empty.raw"))
    assert chain.open(True, "").get_size() == 0
    chain.cleanup()
    with pytest.raises(ConfigError, match="HTTP 404"):
        make_curl(("url", f"{site.url}/missing.raw"))


@pytest.mark.parametrize("filters, name, entry", [
    (["--filter=xz"], "disk.raw.xz", []),
    (["--filter=gzip"], "disk.raw.gz", []),
    (["--filter=tar", "--filter=gzip"], "disk.tar.gz", ["tar-entry=disk.raw"]),
    (["--filter=tar"], "disk.tar", ["tar-entry=disk.raw"]),
    (["--filter=zip"], "disk.zip", ["zip-entry=disk.raw"]),
])
def test_format_filters_over_curl(site: Nginx, tmp: Path, filters: list[str], name: str, entry: list[str]) -> None:
    with serve(*filters, "curl", f"url={site.url}/{name}", *entry) as srv:
        assert copy_sha(srv.uri, tmp) == expected(site)


def test_qemu_img_convert_over_gzip_and_curl(site: Nginx, tmp: Path) -> None:
    with serve("--filter=gzip", "curl", f"url={site.url}/disk.raw.gz") as srv:
        run(["qemu-img", "convert", "-f", "raw", "-O", "raw", srv.uri, tmp / "converted.raw"], timeout=60)
    assert sha256_file(tmp / "converted.raw") == expected(site)


def test_luks_and_xva_over_curl(site: Nginx, tmp: Path) -> None:
    keyfile = site.workdir.parent / "keyfile"
    with serve("--filter=luks", "curl", f"url={site.url}/disk.luks", f"keyfile={keyfile}") as srv:
        run(["nbdcopy", srv.uri, tmp / "plain.raw"], timeout=60)
    # cryptsetup's header took 1 MiB of the 2 added: the payload is the image and 1 MiB more.
    assert (tmp / "plain.raw").read_bytes()[:IMAGE_SIZE] == (site.root / "disk.raw").read_bytes()
    with serve("--filter=xva", "curl", f"url={site.url}/vm.xva") as srv:
        assert copy_sha(srv.uri, tmp) == expected(site)


def test_random_access_into_remote_gzip_uses_the_index(site: Nginx) -> None:
    """A read near the end of a remote .gz costs a few ranged requests, not the file up to there."""
    offset = IMAGE_SIZE - 3 * 4096
    with serve("--filter=gzip", "curl", f"url={site.url}/disk.raw.gz", "gzip-span=64K", "readahead=0") as srv:
        before = len(site.requests())
        nbdsh(srv.uri, f"assert h.pread(4096, {offset}) == open({str(site.root / 'disk.raw')!r}, 'rb')"
                       f".read()[{offset}:{offset + 4096}]")
    sent = sum(int(line.split()[-2]) for line in site.requests()[before:])
    compressed = (site.root / "disk.raw.gz").stat().st_size
    assert 0 < sent < compressed // 2, (sent, compressed)


def test_documented_cache_stacks(site: Nginx, tmp: Path) -> None:
    """docs/plugins/curl.md: cache-on-read keeps what was read; a second copy does not reach nginx."""
    with serve("--filter=cache", "curl", f"url={site.url}/disk.raw", "cache-on-read=true") as srv:
        assert copy_sha(srv.uri, tmp) == expected(site)
        before = len(site.requests())
        assert copy_sha(srv.uri, tmp) == expected(site)
        assert site.requests()[before:] == []
    with serve("--filter=readahead", "--filter=cache", "--filter=xz", "curl", f"url={site.url}/disk.raw.xz",
               "cache-on-read=true") as srv:
        assert copy_sha(srv.uri, tmp) == expected(site)


def test_agrees_with_nbdkit_curl(site: Nginx, tmp: Path) -> None:
    with serve_nbdkit("-r", "--filter=xz", "curl", f"url={site.url}/disk.raw.xz") as srv:
        assert copy_sha(srv.uri, tmp) == expected(site)
    with serve("--filter=xz", "curl", f"url={site.url}/disk.raw.xz") as srv:
        assert copy_sha(srv.uri, tmp) == expected(site)


def test_object_replaced_mid_run_is_refused(site: Nginx) -> None:
    path = site.root / "changing.raw"
    original = path.read_bytes()
    try:
        with serve("curl", f"url={site.url}/changing.raw") as srv:
            nbdsh(srv.uri, "assert h.pread(4096, 0) == open(%r, 'rb').read(4096)" % str(site.root / "disk.raw"))
            replacement = path.with_suffix(".new")
            replacement.write_bytes(bytes(IMAGE_SIZE))  # same size, other bytes
            os.utime(replacement, (time.time() + 100, time.time() + 100))  # nginx's ETag has 1 s resolution
            os.replace(replacement, path)
            proc = nbdsh(srv.uri, "try:\n    h.pread(4096, 2 * 1024 * 1024)\nexcept nbd.Error as e:\n"
                                  "    print('errno', errno.errorcode.get(e.errno, e.errno))\nelse:\n    print('served')",
                         check=False)
            assert proc.stdout.decode().strip() == "errno EIO"
            assert "changed on the server" in srv.stderr()
            assert srv.proc.poll() is None
    finally:
        path.write_bytes(original)


def test_nginx_stopped_mid_copy(site: Nginx, tmp: Path) -> None:
    """EIO for the copy in flight, the server stays up, and serves again once nginx is back."""
    with serve("curl", f"url={site.url}/slow/disk.raw", "retries=1", "retry-delay=0.1") as srv:
        stopper = threading.Timer(0.5, site.stop)
        stopper.start()
        started = time.monotonic()
        try:
            proc = run(["nbdcopy", srv.uri, tmp / "copy.raw"], check=False, timeout=60)
        finally:
            elapsed = time.monotonic() - started
            stopper.join()
            site.start()
        assert elapsed > 0.5  # it was copying (4 MiB at 1 MB/s per connection) when nginx stopped
        assert proc.returncode != 0
        assert b"Input/output error" in proc.stderr or b"EIO" in proc.stderr, proc.stderr
        assert srv.proc.poll() is None
        assert copy_sha(srv.uri, tmp) == expected(site)


def test_retry_rides_out_a_restart(site: Nginx) -> None:
    chain = make_curl(("url", f"{site.url}/disk.raw"), ("retries", "6"), ("retry-delay", "0.1"),
                      ("readahead", "0"))
    top = chain.open(True, "")
    site.stop()
    restarter = threading.Timer(0.5, site.start)
    restarter.start()
    try:
        buf = bytearray(65536)
        top.pread(memoryview(buf), MiB, 0)  # fails until nginx is back, retried with backoff
    finally:
        restarter.join()
        if site.proc is None:
            site.start()
        top.close()
        chain.cleanup()
    assert buf == (site.root / "disk.raw").read_bytes()[MiB:MiB + 65536]


# --- a deliberately broken server ------------------------------------------------------------------

class Misbehaving(http.server.BaseHTTPRequestHandler):
    """Answers the start-up probe properly, then misbehaves as `self.server.mode` says."""

    protocol_version = "HTTP/1.1"
    data = bytes(range(256)) * 256  # 64 KiB

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        first, last = map(int, re.match(r"bytes=(\d+)-(\d+)", self.headers["Range"]).groups())
        mode = self.server.mode if (first, last) != (0, 0) else "good"  # type: ignore[attr-defined]
        self.server.hits += 1  # type: ignore[attr-defined]
        if mode == "503-once" and self.server.hits == 2:  # type: ignore[attr-defined]
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = self.data[first:last + 1]
        sent_first, sent_last = first, last
        if mode == "shifted":
            sent_first, sent_last = first + 1, last + 1
            body = self.data[sent_first:sent_last + 1]
        elif mode == "short-range":
            sent_last = last - 1
            body = body[:-1]
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {sent_first}-{sent_last}/{len(self.data)}")
        if mode == "short-body":
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[:len(body) // 2])
            self.close_connection = True
            return
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def misbehaving() -> Iterator[socketserver.TCPServer]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Misbehaving)
    server.mode, server.hits = "good", 0  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("mode", ["shifted", "short-range", "short-body"])
def test_wrong_or_short_replies_are_eio(misbehaving: socketserver.TCPServer, mode: str) -> None:
    chain = make_curl(("url", f"http://127.0.0.1:{misbehaving.server_address[1]}/x"), ("retries", "1"),
                      ("retry-delay", "0"), ("readahead", "0"))
    misbehaving.mode = mode  # type: ignore[attr-defined]
    top = chain.open(True, "")
    buf = bytearray(b"\xee" * 1000)
    with pytest.raises(NBDError) as info:
        top.pread(memoryview(buf), 100, 0)
    top.close()
    chain.cleanup()
    assert info.value.errno == errno.EIO
    assert "sent bytes" in str(info.value) or "after" in str(info.value)


def test_transient_503_is_retried(misbehaving: socketserver.TCPServer) -> None:
    chain = make_curl(("url", f"http://127.0.0.1:{misbehaving.server_address[1]}/x"), ("retry-delay", "0"),
                      ("readahead", "0"))
    misbehaving.mode = "503-once"  # type: ignore[attr-defined]
    top: Layer = chain.open(True, "")
    buf = bytearray(1000)
    top.pread(memoryview(buf), 100, 0)
    top.close()
    chain.cleanup()
    assert buf == Misbehaving.data[100:1100]
    assert misbehaving.hits == 3  # type: ignore[attr-defined]  # probe, 503, the retry


def test_file_url_reads_the_local_file_as_libcurl_does(tmp: Path) -> None:
    """As nbdkit (libcurl): file:/PATH and file:///PATH serve the file; a failing header-script
    still stops start-up with its message; HTTP-only parameters draw a warning, not silence."""
    disk = tmp / "disk.img"
    disk.write_bytes(os.urandom(256 * 1024))
    for url in (f"file:{disk}", f"file://{disk}"):
        proc = run([*NBDFORMATS, "-U", "-", "curl", url, "protocols=file", "proxy=http://proxy.invalid/",
                    "--run", f"nbdcopy \"$uri\" {tmp / 'out.img'}"])
        assert sha256_file(tmp / "out.img") == sha256_file(disk)
        assert b"proxy= does not apply to file: URLs" in proc.stderr
    script = tmp / "headers.sh"
    script.write_text("#!/bin/sh\necho TEST MESSAGE >&2\nexit 1\n")
    script.chmod(0o755)
    proc = run([*NBDFORMATS, "-U", "-", "curl", f"file://{disk}", f"header-script={script}", "--run", "true"],
               check=False)
    assert proc.returncode == 1 and b"header-script failed: TEST MESSAGE" in proc.stderr


def test_bad_parameters() -> None:
    for params, message in [
        ([("url", "ftp://example.com/x")], "only http"),
        ([("url", "file:///x"), ("protocols", "http,https")], "not in protocols"),
        ([("url", "http://example.com/x"), ("protocols", "https")], "not in protocols"),
        ([("url", "http://example.com/x"), ("header", "X: 1"), ("header-script", "true")], "header-script"),
        ([("url", "http://example.com/x"), ("tls13-ciphers", "TLS_AES_128_GCM_SHA256")], "tls13-ciphers"),
        ([("url", "http://example.com/x"), ("header", "Range: bytes=0-1")], "Range"),
        ([("url", "http://example.com/x"), ("cookie", "a=1\r\nX-Injected: 1")], "line break"),
        ([("url", "http://example.com/x"), ("header", "X-Token secret-value")], "Name: value"),
    ]:
        with pytest.raises(ConfigError, match=message) as info:
            Chain([], load_plugin("curl")()).configure({0: params})
        assert "secret-value" not in str(info.value)

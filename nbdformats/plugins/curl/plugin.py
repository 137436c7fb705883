"""curl plugin: serve a disk image from an http:// or https:// URL, read-only, by ranged GETs
(and a local file: URL, as libcurl reads those).

nbdkit's parameter names, so `nbdkit curl url=...` command lines port.  One keep-alive pool of
`connections=` HTTP connections is shared by all NBD connections (nbdkit >= 1.34's pool); a
sequential reader gets read-ahead (see readahead.py), so format filters stacked on top
(`--filter=xz`, `--filter=tar --filter=gzip`) stream at network speed.
"""

from __future__ import annotations

import errno
import http.cookiejar
import logging
import os
import socket
import ssl
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

from ...api.chain import ThreadModel, Plugin, PluginHandle
from ...api.errors import ConfigError, NBDError
from ...api.params import Bool, Enum, Float, Int, Param, Path, Secret, SecretValue, Size, String
import urllib3

from .client import FileClient, Headers, ObjectChanged, RangeClient, RequestError, make_pool
from .messages import basic_auth, parse_header_option, redact_url, split_userinfo
from .readahead import ReadAhead

log = logging.getLogger("nbdformats.curl")

READAHEAD_WINDOW = 2 << 20  # bytes per read-ahead request
SSL_VERSIONS = {"tlsv1": ssl.TLSVersion.TLSv1, "tlsv1.0": ssl.TLSVersion.TLSv1,
                "tlsv1.1": ssl.TLSVersion.TLSv1_1, "tlsv1.2": ssl.TLSVersion.TLSv1_2,
                "tlsv1.3": ssl.TLSVersion.TLSv1_3}


def _text(secret: SecretValue) -> str:
    return secret.reveal().decode("utf-8", errors="surrogateescape")


SCHEMES = ("http", "https", "file")
# Parameters of HTTP(S) requests, which a file: URL does not make (a warning, not silence).
HTTP_ONLY = {"user", "password", "header", "header_script_renew", "cookie", "cookie_script_renew", "cookiefile",
             "cookiejar", "user_agent", "cainfo", "capath", "sslverify", "ssl_version", "ssl_cipher_list",
             "followlocation", "proxy", "proxy_user", "proxy_password", "tcp_keepalive", "tcp_nodelay",
             "unix_socket_path"}


class CurlPlugin(Plugin):
    """Serve a disk image from an HTTP or HTTPS URL (read-only, ranged GETs, read-ahead)."""

    name = "curl"
    latency_bound = True
    thread_model = ThreadModel.PARALLEL

    url = Param(String(), required=True, magic=True, help="The URL of the disk image (http://, https:// or file:)")
    user = Param(String(), help="User name for HTTP Basic authentication (or user@ in the URL)")
    password = Param(Secret(), help="Password: literal, +FILE, - (prompt) or -FD")
    header = Param(String(), repeat=True,
                   help="'Name: value' adds a header, 'Name:' removes one, 'Name;' sends it empty")
    header_script = Param(String(), help="Shell script printing headers (one per line) for every request")
    header_script_renew = Param(Int(minimum=0), default=0, help="Run header-script again after this many seconds")
    cookie = Param(Secret(), help="Cookie header value 'a=1; b=2': literal, +FILE, - or -FD")
    cookie_script = Param(String(), help="Shell script printing the cookie (one line)")
    cookie_script_renew = Param(Int(minimum=0), default=0, help="Run cookie-script again after this many seconds")
    cookiefile = Param(String(), help="Turn on the cookie engine (cookies the server sets are sent back), "
                                      "first loading cookies from this Netscape-format file (empty: none)")
    cookiejar = Param(String(), help="Turn on the cookie engine and save its cookies to this file at exit")
    user_agent = Param(String(), help="User-Agent header (default: none, as nbdkit)")
    cainfo = Param(String(), help="CA certificates file to trust; empty: not the system's default store")
    capath = Param(Path("any"), help="Directory of CA certificates (hashed names, c_rehash)")
    sslverify = Param(Bool(), default=True, help="false: do not verify the server's certificate or name")
    ssl_version = Param(Enum(*SSL_VERSIONS, "sslv2", "sslv3"), help="Lowest TLS version to accept")
    ssl_cipher_list = Param(String(), help="OpenSSL cipher list for TLS 1.2 and older")
    tls13_ciphers = Param(String(), help="Not supported: Python's ssl module cannot choose TLS 1.3 suites")
    followlocation = Param(Bool(), default=False,
                           help="Follow redirects (default false: a redirect is reported; nbdkit follows by default)")
    protocols = Param(String(), help="Comma-separated protocols allowed in the URL and redirects")
    proxy = Param(String(), help="Proxy URL: http://, https://, socks5:// (socks needs PySocks)")
    proxy_user = Param(String(), help="Proxy user name")
    proxy_password = Param(Secret(), help="Proxy password: literal, +FILE, - or -FD")
    timeout = Param(Int(minimum=0), default=0,
                    help="Seconds to connect and to wait for data; 0: 30 s to connect, 60 s for data")
    tcp_keepalive = Param(Bool(), default=False, help="Enable TCP keepalive probes")
    tcp_nodelay = Param(Bool(), default=True, help="false: enable Nagle's algorithm")
    unix_socket_path = Param(Path(None), help="Connect through this Unix socket instead of TCP")
    connections = Param(Int(minimum=1, maximum=256), default=4,
                        help="HTTP connections in the pool, shared by all clients (parallel requests)")
    retry = Param(Int(minimum=0), help="Alias of retries= (the number of retries)")
    retries = Param(Int(minimum=0), default=3,
                    help="Retry a failed request this many times (connection errors, timeouts, 408/429/5xx)")
    retry_delay = Param(Float(minimum=0), default=0.5, help="Seconds before the first retry")
    retry_exponential = Param(Bool(), default=True, help="Double the delay after each retry")
    readahead = Param(Size(), default=16 << 20,
                      help="How far ahead of a sequential reader to fetch, per connection (0: off)")

    def config_complete(self) -> None:
        if int(urllib3.__version__.split(".")[0]) < 2:
            raise ConfigError("curl: needs urllib3 >= 2 (pip install 'urllib3>=2,<3')")
        if self.retry is not None:
            self.retries = self.retry
        self.scheme = scheme = urlsplit(self.url).scheme.lower()
        allowed = {p.strip().lower() for p in self.protocols.split(",")} if self.protocols else set(SCHEMES)
        if scheme not in SCHEMES:
            raise ConfigError(f"curl: {redact_url(self.url)}: only http://, https:// and file: URLs are supported")
        if scheme not in allowed:
            raise ConfigError(f"curl: the URL's protocol {scheme} is not in protocols={self.protocols}")
        if scheme != "file" and not urlsplit(self.url).hostname:
            raise ConfigError(f"curl: {redact_url(self.url)}: the URL has no host")
        self.allowed_protocols = allowed
        if self.header_script and self.header:
            raise ConfigError("curl: header-script cannot be used with header= (as in nbdkit)")
        if self.cookie_script and self.cookie is not None:
            raise ConfigError("curl: cookie-script cannot be used with cookie= (as in nbdkit)")
        if self.tls13_ciphers is not None:
            raise ConfigError("curl: tls13-ciphers= is not supported (Python's ssl module cannot choose "
                              "TLS 1.3 cipher suites); leave it out to use OpenSSL's defaults")
        if self.ssl_version in ("sslv2", "sslv3"):
            raise ConfigError(f"curl: ssl-version={self.ssl_version} is not supported (insecure, and "
                              f"OpenSSL 3 has no SSLv2/SSLv3)")
        if self.cainfo and not os.path.exists(self.cainfo):
            raise ConfigError(f"curl: cainfo={self.cainfo}: no such file")
        if self.proxy and self.unix_socket_path:
            raise ConfigError("curl: proxy= and unix-socket-path= cannot be used together")
        if self.proxy and urlsplit(self.proxy).scheme.lower().startswith("socks"):
            try:
                import socks  # noqa: F401  (PySocks, which urllib3.contrib.socks needs)
            except ImportError:
                raise ConfigError("curl: a socks proxy needs the PySocks package (pip install PySocks)") from None
        self.fixed_headers: list[tuple[str, str | None]] = self._fixed_headers()
        if scheme == "file":
            for key in self._http_only_given():
                log.warning("curl: %s= does not apply to file: URLs (as in libcurl)", key)

    def _http_only_given(self) -> list[str]:
        """The parameters given that only HTTP(S) requests use."""
        from ...api.params import params_of

        return [p.key for p in params_of(type(self))
                if p.attr in HTTP_ONLY and getattr(self, p.attr) not in (p.default, None, [])]

    def _fixed_headers(self) -> list[tuple[str, str | None]]:
        url, url_user, url_password = split_userinfo(self.url)
        self.request_url = url
        headers: list[tuple[str, str | None]] = []
        for number, text in enumerate(self.header, 1):
            try:
                name, value = parse_header_option(text)
            except ValueError as e:
                raise ConfigError(f"curl: header= #{number}: {e}") from None
            if name.lower() == "range":
                raise ConfigError("curl: header= cannot set Range (the plugin sends it)")
            headers.append((name, value))
        user = self.user if self.user is not None else url_user
        password = _text(self.password) if self.password is not None else url_password
        if user is not None or password is not None:
            headers.insert(0, ("Authorization", basic_auth(user or "", (password or "").encode())))
        for key, text in (("cookie", None if self.cookie is None else _text(self.cookie)),
                          ("user-agent", self.user_agent)):
            if text is not None and any(c in text for c in "\r\n\0"):
                raise ConfigError(f"curl: {key}= contains a line break or NUL")
        if self.cookie is not None:
            headers.insert(0, ("Cookie", _text(self.cookie)))
        if self.user_agent is not None:
            headers.insert(0, ("User-Agent", self.user_agent))
        return headers

    def _ssl_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies certificate and host name
        if not self.sslverify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
            log.warning("curl: sslverify=false: the server's certificate is not checked")
        try:
            if self.cainfo is None:
                context.load_default_certs()
            elif self.cainfo:
                context.load_verify_locations(cafile=self.cainfo)
            if self.capath:
                context.load_verify_locations(capath=self.capath)
            if self.ssl_version:
                context.minimum_version = SSL_VERSIONS[self.ssl_version]
            if self.ssl_cipher_list:
                context.set_ciphers(self.ssl_cipher_list)
        except (ssl.SSLError, ValueError, OSError) as e:
            raise ConfigError(f"curl: TLS set-up failed: {e}") from None
        return context

    def get_ready(self) -> None:
        self.client: FileClient | RangeClient
        if self.scheme == "file":
            self.client = FileClient(self.request_url, Headers([], self.url, self.header_script, 0,
                                                                self.cookie_script, 0))
            self.readahead = 0  # a local file: the page cache reads ahead
            self._probe()
            return
        socket_options = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1 if self.tcp_nodelay else 0)]
        if self.tcp_keepalive:
            socket_options.append((socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1))
        self.pool = make_pool(connections=self.connections, ssl_context=self._ssl_context(),
                              socket_options=socket_options, proxy=self.proxy, proxy_user=self.proxy_user,
                              proxy_password=None if self.proxy_password is None else _text(self.proxy_password),
                              unix_socket_path=self.unix_socket_path)
        timeout = urllib3.Timeout(connect=self.timeout or 30, read=self.timeout or 60)
        headers = Headers(self.fixed_headers, self.url, self.header_script, self.header_script_renew,
                          self.cookie_script, self.cookie_script_renew)
        self.cookies = self._cookie_engine()
        self.client = RangeClient(self.request_url, self.pool, headers, timeout=timeout,
                                  followlocation=self.followlocation, protocols=self.allowed_protocols,
                                  retries=self.retries, retry_delay=self.retry_delay,
                                  retry_exponential=self.retry_exponential, cookies=self.cookies)
        self._probe()
        self.prefetcher = ThreadPoolExecutor(self.connections, thread_name_prefix="curl-readahead")
        log.debug("curl: %s: %d bytes, %s", redact_url(self.request_url), self.size, self.client.validators)

    def _probe(self) -> None:
        try:
            self.client.probe()
        except RequestError as e:
            raise ConfigError(f"curl: {e}") from None
        self.size = self.client.size
        self.changed_reported = False

    def _cookie_engine(self) -> http.cookiejar.MozillaCookieJar | None:
        """libcurl's cookie engine, as nbdkit turns it on: with cookiefile= or cookiejar=."""
        if self.cookiefile is None and self.cookiejar is None:
            return None
        jar = http.cookiejar.MozillaCookieJar()
        if self.cookiefile:
            try:
                jar.load(self.cookiefile, ignore_discard=True, ignore_expires=True)
            except (OSError, http.cookiejar.LoadError) as e:
                raise ConfigError(f"curl: cookiefile={self.cookiefile}: {getattr(e, 'strerror', None) or e}") from None
        return jar

    def cleanup(self) -> None:
        cookies = getattr(self, "cookies", None)
        if cookies is not None and self.cookiejar:
            try:
                cookies.save(self.cookiejar, ignore_discard=True, ignore_expires=True)
            except OSError as e:
                log.error("curl: cookiejar=%s: cannot save the cookies: %s", self.cookiejar, e.strerror)
        prefetcher = getattr(self, "prefetcher", None)
        if prefetcher is not None:
            prefetcher.shutdown(wait=False, cancel_futures=True)
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.clear()
        client = getattr(self, "client", None)
        if isinstance(client, FileClient):
            client.close()

    def fetch(self, buf: memoryview, offset: int) -> None:
        """Fill buf from the object at offset (one ranged GET, retried); NBDError(EIO) on failure."""
        try:
            self.client.read_into(buf, offset)
        except ObjectChanged as e:
            if not self.changed_reported:  # every later read fails the same way: say it once
                self.changed_reported = True
                log.error("curl: %s", e)
            raise NBDError(errno.EIO, f"curl: {e}") from None
        except RequestError as e:
            log.warning("curl: %s", e)
            raise NBDError(errno.EIO, f"curl: {e}") from None

    class Handle(PluginHandle):
        def __init__(self, plugin: "CurlPlugin", readonly: bool, export_name: str) -> None:
            self.plugin = plugin
            self.readahead = None
            if plugin.readahead > 0 and plugin.size > 0:
                window = min(READAHEAD_WINDOW, plugin.readahead)
                self.readahead = ReadAhead(plugin.fetch, plugin.size, window,
                                           max(1, plugin.readahead // window), plugin.prefetcher)

        def get_size(self) -> int:
            return self.plugin.size

        def can_multi_conn(self) -> bool:
            return True  # read-only: every connection sees the same bytes

        def pread(self, buf: memoryview, offset: int, flags: int) -> None:
            if not len(buf):
                return
            if self.readahead is not None:
                self.readahead.read(buf, offset)
            else:
                self.plugin.fetch(buf, offset)

        def close(self) -> None:
            if self.readahead is not None:
                self.readahead.close()

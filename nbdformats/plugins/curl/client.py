"""Ranged GETs over a urllib3 connection pool, checked so that wrong bytes are never served.

`RangeClient.probe()` learns the object's size and validators (ETag, Last-Modified) with a
one-byte ranged GET; `read_into(buf, offset)` then fills `buf` with one `Range:` request.
Every 206 reply is checked: the Content-Range must be exactly the range asked for, the total
length and the validators those seen at start-up, so a short, shifted or changed object is an
error (EIO), never wrong data.  Connection errors, timeouts and 408/429/5xx answers are
retried with backoff; redirects are followed when allowed and the target is remembered (and
forgotten again on an error, since redirect targets such as signed URLs expire).
"""

from __future__ import annotations

import http.client
import http.cookiejar
import logging
import os
import socket
import ssl
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar
from urllib.parse import unquote, urljoin, urlsplit

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import HTTPError, LocationValueError, NewConnectionError, SSLError
from urllib3.util import SKIP_HEADER

from .messages import (ContentRange, Validators, basic_auth, parse_content_range, parse_header_lines,
                       redact_url)

log = logging.getLogger("nbdformats.curl")

REDIRECT_STATUSES = {301, 302, 303, 307, 308}
TRANSIENT_STATUSES = {408, 425, 429, 500, 502, 503, 504}
MAX_REDIRECTS = 20
DRAIN_LIMIT = 64 * 1024  # error bodies up to this size are read to keep the connection alive
SCRIPT_TIMEOUT = 60.0
# Removed from a redirected request that leaves the original host (as urllib3 and browsers do).
CREDENTIAL_HEADERS = {"authorization", "cookie", "proxy-authorization"}
# Headers http.client/urllib3 add on their own; `header='Name:'` suppresses them with SKIP_HEADER.
SKIPPABLE_HEADERS = {"host": "Host", "user-agent": "User-Agent", "accept-encoding": "Accept-Encoding"}

T = TypeVar("T")


class RequestError(Exception):
    """A request failed in a way that retrying will not fix (HTTP 404, a wrong Content-Range)."""


class TransientError(RequestError):
    """A failure worth retrying: connection refused or reset, timeout, HTTP 5xx/429/408."""


class ObjectChanged(RequestError):
    """The object on the server is not the one seen at start-up: never mix two versions."""


@dataclass
class _Script:
    """A header-script or cookie-script and what its last run printed."""

    kind: str  # "header" or "cookie"
    command: str
    renew: int  # seconds; 0: run once
    iteration: int = 0
    last_run: float | None = None
    lines: list[tuple[str, str | None]] = field(default_factory=list)

    def due(self, now: float) -> bool:
        return self.last_run is None or (self.renew > 0 and now - self.last_run >= self.renew)


class Headers:
    """The headers sent with every request: fixed ones plus header-script/cookie-script output.

    Scripts run on first use and again when their renew interval has passed (nbdkit's
    `header-script-renew=`/`cookie-script-renew=`), with $iteration and $url set.
    """

    def __init__(self, fixed: list[tuple[str, str | None]], url: str, header_script: str | None = None,
                 header_renew: int = 0, cookie_script: str | None = None, cookie_renew: int = 0) -> None:
        self.fixed = fixed
        self.url = url
        self.scripts = [_Script(kind, command, renew) for kind, command, renew in
                        (("header", header_script, header_renew), ("cookie", cookie_script, cookie_renew))
                        if command]
        self.lock = threading.Lock()

    def _run(self, script: _Script) -> list[tuple[str, str | None]]:
        env = dict(os.environ, iteration=str(script.iteration), url=self.url)
        try:
            proc = subprocess.run(["/bin/sh", "-c", script.command], env=env, capture_output=True,
                                  stdin=subprocess.DEVNULL, timeout=SCRIPT_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise RequestError(f"{script.kind}-script did not finish within {SCRIPT_TIMEOUT:.0f} s") from None
        if proc.returncode != 0:
            # Only the script's last stderr line (its standard output holds credentials), as nbdkit says it.
            lines = proc.stderr.decode(errors="replace").strip().splitlines()
            detail = f": {lines[-1][:200]}" if lines else ""
            raise RequestError(f"{script.kind}-script failed{detail} (exit status {proc.returncode})")
        output = proc.stdout.decode(errors="replace")
        try:
            if script.kind == "cookie":  # one line, the value of a Cookie header
                cookie = output.strip().splitlines()[0].strip() if output.strip() else ""
                if "\0" in cookie:
                    raise ValueError("the cookie contains a NUL byte")
                return [("Cookie", cookie)] if cookie else []
            return parse_header_lines(output)
        except ValueError as e:
            raise RequestError(f"{script.kind}-script printed an unusable line: {e}") from None

    def current(self) -> dict[str, str]:
        with self.lock:
            lines = list(self.fixed)
            for script in self.scripts:
                if script.due(time.monotonic()):
                    script.lines = self._run(script)
                    script.iteration += 1
                    script.last_run = time.monotonic()
                lines += script.lines
        headers: dict[str, str] = {"User-Agent": SKIP_HEADER}  # nbdkit sends no User-Agent by default
        for name, value in lines:
            for existing in [k for k in headers if k.lower() == name.lower()]:
                del headers[existing]
            if value is not None:
                headers[name] = value
            elif name.lower() in SKIPPABLE_HEADERS:
                headers[SKIPPABLE_HEADERS[name.lower()]] = SKIP_HEADER
        return headers


def _unix_connection(base: type[HTTPConnection], path: str) -> type[HTTPConnection]:
    """A urllib3 connection class that reaches the server through a Unix socket (curl's
    CURLOPT_UNIX_SOCKET_PATH): the URL still gives the scheme, Host header and path."""

    class UnixConnection(base):  # type: ignore[valid-type, misc]
        def _new_conn(self) -> socket.socket:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            timeout = self.timeout if isinstance(self.timeout, (int, float)) else None
            sock.settimeout(timeout)
            try:
                sock.connect(path)
            except OSError as e:
                sock.close()
                raise NewConnectionError(self, f"cannot connect to Unix socket {path}: {e}") from e
            return sock

    return UnixConnection


def make_pool(*, connections: int, ssl_context: ssl.SSLContext, socket_options: list[tuple[int, int, int]],
              proxy: str | None = None, proxy_user: str | None = None, proxy_password: str | None = None,
              unix_socket_path: str | None = None) -> urllib3.PoolManager:
    """The keep-alive pool: at most `connections` connections per host, requests wait for one."""
    kw: dict[str, Any] = dict(num_pools=4, maxsize=connections, block=True, ssl_context=ssl_context,
                              socket_options=socket_options)
    if proxy and urlsplit(proxy).scheme.lower().startswith("socks"):
        from urllib3.contrib.socks import SOCKSProxyManager  # needs PySocks; the plugin checks
        return SOCKSProxyManager(proxy, username=proxy_user, password=proxy_password, **kw)
    if proxy:
        headers = None
        if proxy_user is not None or proxy_password is not None:
            headers = {"Proxy-Authorization": basic_auth(proxy_user or "", (proxy_password or "").encode())}
        return urllib3.ProxyManager(proxy, proxy_headers=headers, **kw)
    pool = urllib3.PoolManager(**kw)
    if unix_socket_path:
        http_conn = _unix_connection(HTTPConnection, unix_socket_path)
        https_conn = _unix_connection(HTTPSConnection, unix_socket_path)
        pool.pool_classes_by_scheme = {
            "http": type("UnixHTTPPool", (HTTPConnectionPool,), {"ConnectionCls": http_conn}),
            "https": type("UnixHTTPSPool", (HTTPSConnectionPool,), {"ConnectionCls": https_conn}),
        }
        # Connections to a Unix socket take no TCP options.
        pool.connection_pool_kw["socket_options"] = []
    return pool


def _discard(response: urllib3.BaseHTTPResponse, body_untouched: bool = True) -> None:
    """Give the connection back: drained when its body is small and unread, else closed."""
    length = response.headers.get("Content-Length", "")
    if body_untouched and length.isdigit() and int(length) <= DRAIN_LIMIT:
        try:
            response.drain_conn()
        except (HTTPError, OSError, http.client.HTTPException):
            response.close()
    else:
        response.close()  # an unread body (a whole object, perhaps): the connection cannot be reused
    response.release_conn()


class _CookieResponse:
    """What http.cookiejar reads from a response: its Set-Cookie headers."""

    def __init__(self, response: urllib3.BaseHTTPResponse) -> None:
        self.headers = response.headers

    def info(self) -> "_CookieResponse":
        return self

    def get_all(self, name: str, default: list[str] | None = None) -> list[str] | None:
        return self.headers.getlist(name) or default


class RangeClient:
    def __init__(self, url: str, pool: urllib3.PoolManager, headers: Headers, *, timeout: urllib3.Timeout,
                 followlocation: bool = True, protocols: set[str] | None = None, retries: int = 3,
                 retry_delay: float = 0.5, retry_exponential: bool = True,
                 cookies: http.cookiejar.CookieJar | None = None) -> None:
        self.url = self.effective_url = url
        self.cookies = cookies  # the cookie engine (cookiefile=/cookiejar=): sent, and kept when set
        self.shown = redact_url(url)
        self.pool, self.headers, self.timeout = pool, headers, timeout
        self.followlocation, self.protocols = followlocation, protocols or {"http", "https"}
        self.retries, self.retry_delay, self.retry_exponential = retries, retry_delay, retry_exponential
        self.size = -1
        self.validators = Validators(None, None)

    # --- one request --------------------------------------------------------------------------
    def _get(self, first: int, last: int) -> urllib3.BaseHTTPResponse:
        """GET bytes first..last, following redirects if allowed; the response is not a redirect."""
        headers = self.headers.current()
        headers["Range"] = f"bytes={first}-{last}"
        url = self.effective_url
        for _ in range(MAX_REDIRECTS + 1):
            sent, cookie_request = headers, None
            if self.cookies is not None:
                cookie_request = urllib.request.Request(url)
                self.cookies.add_cookie_header(cookie_request)
                stored = cookie_request.get_header("Cookie")
                if stored:
                    given = next((k for k in headers if k.lower() == "cookie"), None)
                    sent = {k: v for k, v in headers.items() if k != given}
                    sent["Cookie"] = f"{headers[given]}; {stored}" if given else stored
            try:
                response = self.pool.urlopen("GET", url, headers=sent, redirect=False, retries=False,
                                             preload_content=False, decode_content=False, timeout=self.timeout)
            except LocationValueError as e:
                raise RequestError(f"{redact_url(url)}: bad URL: {e}") from None
            except SSLError as e:
                raise RequestError(f"{redact_url(url)}: TLS failed: {_tls_reason(e)} (trust a private CA "
                                   f"with cainfo= or capath=, or skip the check with sslverify=false)") from None
            except (HTTPError, OSError, http.client.HTTPException) as e:
                raise TransientError(f"{redact_url(url)}: {_reason(e)}") from None
            if cookie_request is not None:
                self.cookies.extract_cookies(_CookieResponse(response), cookie_request)  # type: ignore[union-attr, arg-type]
            if response.status not in REDIRECT_STATUSES:
                self.effective_url = url
                return response
            location = response.headers.get("Location")
            _discard(response)
            if not location:
                raise RequestError(f"{redact_url(url)}: redirect (HTTP {response.status}) without a Location")
            target = urljoin(url, location)
            if not self.followlocation:
                raise RequestError(f"{redact_url(url)} redirects (HTTP {response.status}) to "
                                   f"{redact_url(target)}; add followlocation=true to follow it")
            scheme = urlsplit(target).scheme.lower()
            if scheme not in self.protocols or scheme not in ("http", "https"):
                raise RequestError(f"{redact_url(url)} redirects to a {scheme}: URL, which is not allowed")
            if _origin(target) != _origin(url):
                headers = {k: v for k, v in headers.items() if k.lower() not in CREDENTIAL_HEADERS}
            url = target
        raise RequestError(f"{self.shown}: more than {MAX_REDIRECTS} redirects")

    def _check_partial(self, response: urllib3.BaseHTTPResponse, first: int, last: int) -> ContentRange:
        where = f"{self.shown} bytes {first}-{last}"
        status = response.status
        if status == 200:
            raise RequestError(f"{where}: the server ignores Range requests (it answered 200 OK with the "
                               f"whole object); the curl plugin needs byte-range support")
        if status == 416 and self.size >= 0:
            raise ObjectChanged(f"{where}: range not satisfiable (HTTP 416); the object shrank on the server")
        if status in TRANSIENT_STATUSES:
            raise TransientError(f"{where}: HTTP {status} {response.reason or ''}".rstrip())
        if status != 206:
            hint = " (check user=/password= or the headers)" if status in (401, 403) else ""
            raise RequestError(f"{where}: HTTP {status} {response.reason or ''}".rstrip() + hint)
        value = response.headers.get("Content-Range")
        if value is None:
            raise RequestError(f"{where}: 206 reply without a Content-Range header")
        try:
            got = parse_content_range(value)
        except ValueError as e:
            raise RequestError(f"{where}: {e}") from None
        if self.size >= 0:
            changed = self.validators.differs(Validators.from_headers(response.headers))
            if got.total is not None and got.total != self.size:
                changed = f"its size {self.size} became {got.total}"
            if changed:
                raise ObjectChanged(f"{self.shown} changed on the server since start-up ({changed}); "
                                    f"refusing to mix two versions of it")
        if (got.first, got.last) != (first, last):
            raise RequestError(f"{where}: the server sent bytes {got.first}-{got.last} instead")
        length = response.headers.get("Content-Length")
        if length is not None and length.strip() != str(last - first + 1):
            raise RequestError(f"{where}: Content-Length {length} does not match the range")
        return got

    def _read_once(self, buf: memoryview, offset: int) -> None:
        last = offset + len(buf) - 1
        response = self._get(offset, last)
        try:
            self._check_partial(response, offset, last)
        except BaseException:
            _discard(response)
            raise
        try:
            _read_body(response, buf, f"{self.shown} bytes {offset}-{last}")
        except BaseException:
            _discard(response, body_untouched=False)
            raise
        response.release_conn()

    # --- with retries -------------------------------------------------------------------------
    def _retrying(self, operation: Callable[[], T]) -> T:
        attempt = 0
        while True:
            try:
                return operation()
            except ObjectChanged:
                raise
            except RequestError as e:
                redirected = self.effective_url != self.url
                if not (isinstance(e, TransientError) or redirected) or attempt >= self.retries:
                    if attempt:
                        raise type(e)(f"{e} (gave up after {attempt + 1} attempts)") from None
                    raise
                self.effective_url = self.url  # the redirect target may have expired: ask again
                delay = self.retry_delay * (2 ** attempt if self.retry_exponential else 1)
                log.info("curl: %s; retry %d of %d in %.1f s", e, attempt + 1, self.retries, delay)
                time.sleep(delay)
                attempt += 1

    def read_into(self, buf: memoryview, offset: int) -> None:
        """Fill buf with the object's bytes at offset; RequestError (ObjectChanged) when impossible."""
        self._retrying(lambda: self._read_once(buf, offset))

    def probe(self) -> None:
        """Learn size and validators with `Range: bytes=0-0` (this also proves ranges work)."""
        self._retrying(self._probe_once)

    def _probe_once(self) -> None:
        response = self._get(0, 0)
        try:
            if response.status == 200 and response.headers.get("Content-Length") == "0":
                got = ContentRange(None, None, 0)  # an empty object: nginx answers 200, nothing to range
            elif response.status == 416:  # an empty object: "Content-Range: bytes */0"
                try:
                    got = parse_content_range(response.headers.get("Content-Range", ""))
                except ValueError:
                    got = ContentRange(None, None, None)
                if got.total != 0:
                    raise RequestError(f"{self.shown}: the server refused the range 0-0 (HTTP 416)")
            else:
                got = self._check_partial(response, 0, 0)
                if got.total is None:
                    raise RequestError(f"{self.shown}: the server does not tell the object's size "
                                       f"(Content-Range: {response.headers.get('Content-Range')})")
        except BaseException:
            _discard(response)
            raise
        if response.status == 206:
            try:
                _read_body(response, memoryview(bytearray(1)), f"{self.shown} byte 0")
            except BaseException:
                _discard(response, body_untouched=False)
                raise
            response.release_conn()
        else:
            _discard(response)
        assert got.total is not None
        self.size = got.total
        self.validators = Validators.from_headers(response.headers)


class FileClient:
    """A file: URL, read as libcurl reads one: the local file (read-only, no headers, cookies or
    TLS).  header-script and cookie-script still run once, when the URL is opened, as in nbdkit."""

    def __init__(self, url: str, headers: Headers) -> None:
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise RequestError(f"{url}: a file: URL must name a local file (file:/PATH or file:///PATH)")
        self.path = unquote(parts.path)
        self.headers = headers
        self.size = -1
        self.fd = -1

    def probe(self) -> None:
        self.headers.current()
        try:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            self.size = os.fstat(self.fd).st_size
        except OSError as e:
            raise RequestError(f"file://{self.path}: {e.strerror}") from None

    def read_into(self, buf: memoryview, offset: int) -> None:
        done = 0
        while done < len(buf):
            try:
                n = os.preadv(self.fd, [buf[done:]], offset + done)
            except OSError as e:
                raise RequestError(f"file://{self.path}: {e.strerror}") from None
            if n == 0:
                raise ObjectChanged(f"file://{self.path} is shorter than at start-up ({offset + done} bytes)")
            done += n

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _read_body(response: urllib3.BaseHTTPResponse, buf: memoryview, what: str) -> None:
    """Read exactly len(buf) body bytes into buf.

    urllib3's own readinto reads into a new bytes object and copies; the http.client response
    it wraps (`_fp`) reads from the socket straight into our buffer, which doubles HTTPS
    throughput here.  The plugin asks for no content coding, so nothing is decoded on the way.
    """
    raw = getattr(response, "_fp", None)
    readinto = raw.readinto if isinstance(raw, http.client.HTTPResponse) else response.readinto
    done, length = 0, len(buf)
    try:
        while done < length:
            n = readinto(buf[done:])
            if not n:
                raise TransientError(f"{what}: the connection closed after {done} of {length} bytes")
            done += n
    except (HTTPError, OSError, http.client.HTTPException) as e:
        raise TransientError(f"{what}: {_reason(e)} after {done} of {length} bytes") from None


def _origin(url: str) -> tuple[str, str | None, int | None]:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.hostname, parts.port


def _reason(e: BaseException) -> str:
    """A short description of a network error (urllib3's messages name host and port only)."""
    if isinstance(e, http.client.IncompleteRead):
        return "the connection closed early"
    text = str(e) or type(e).__name__
    return text if len(text) < 300 else text[:300] + "…"


def _tls_reason(e: SSLError) -> str:
    inner = e.args[0] if e.args else e
    if isinstance(inner, ssl.SSLCertVerificationError):
        return f"certificate verification failed: {inner.verify_message}"
    return _reason(e)


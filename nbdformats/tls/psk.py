"""TLS with pre-shared keys (`--tls-psk=FILE`, nbdkit's psktool format) on Python's ssl module,
for the server and for our client (the nbd plugin's tls-psk=).

Python's ssl module gains PSK only in 3.13.  OpenSSL itself has had it for years, and Python's
`_ssl` uses the system libssl, so we install OpenSSL's server PSK callback on the context's own
SSL_CTX through ctypes.  The SSL_CTX pointer is the first field of CPython's PySSLContext; before
using it we check that it is right (OpenSSL must report the same options the ssl module set), and
refuse PSK with a clear message otherwise, so a different interpreter layout cannot corrupt memory.

The PSK file has one `username:hexkey` line per client (psktool -u alice -p keys.psk).
Clients: `nbds+unix:///?socket=S&tls-psk-file=keys.psk&tls-username=alice` (libnbd).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import ssl
import sys

from ..api.errors import ConfigError

log = logging.getLogger("nbdformats")

# unsigned int (*)(SSL *ssl, const char *identity, unsigned char *psk, unsigned int max_psk_len)
_PSK_SERVER_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_uint, ctypes.c_void_p, ctypes.c_char_p,
                                        ctypes.POINTER(ctypes.c_ubyte), ctypes.c_uint)
# unsigned int (*)(SSL *ssl, const char *hint, char *identity, unsigned int max_identity_len,
#                  unsigned char *psk, unsigned int max_psk_len)
_PSK_CLIENT_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_uint, ctypes.c_void_p, ctypes.c_char_p,
                                        ctypes.POINTER(ctypes.c_char), ctypes.c_uint,
                                        ctypes.POINTER(ctypes.c_ubyte), ctypes.c_uint)
_keep_alive: list = []  # the callbacks must outlive every handshake


def read_psk_file(path: str) -> dict[bytes, bytes]:
    """username -> key from a psktool file; errors name the line, never the key."""
    keys: dict[bytes, bytes] = {}
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise ConfigError(f"--tls-psk: cannot read {path}: {e.strerror}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.startswith(b"#"):
            continue
        user, colon, hexkey = line.partition(b":")
        try:
            if not colon or not user:
                raise ValueError
            key = bytes.fromhex(hexkey.decode("ascii").strip())
            if not key:
                raise ValueError
        except ValueError:
            raise ConfigError(f"--tls-psk: {path}:{number}: expected USERNAME:HEXKEY") from None
        keys[user] = key
    if not keys:
        raise ConfigError(f"--tls-psk: {path} holds no keys")
    return keys


def _libssl() -> ctypes.CDLL:
    # The libssl that Python's _ssl module is linked with is already loaded: look it up by soname.
    for name in ("libssl.so.3", ctypes.util.find_library("ssl")):
        if name:
            try:
                return ctypes.CDLL(name)
            except OSError:
                continue
    raise ConfigError("--tls-psk: cannot find OpenSSL's libssl")


def _ssl_ctx_pointer(context: ssl.SSLContext, libssl: ctypes.CDLL) -> int:
    """The SSL_CTX* inside `context`, checked against what OpenSSL reports for it."""
    libssl.SSL_CTX_get_options.restype = ctypes.c_uint64
    libssl.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
    header = object.__basicsize__  # PyObject_HEAD: the SSL_CTX* follows it in PySSLContext
    pointer = ctypes.c_void_p.from_address(id(context) + header).value
    if not pointer:
        raise ConfigError("--tls-psk: cannot reach OpenSSL's context from Python's ssl module")
    marker = ssl.OP_NO_TICKET if hasattr(ssl, "OP_NO_TICKET") else ssl.OP_NO_COMPRESSION
    before = libssl.SSL_CTX_get_options(pointer)
    context.options ^= marker
    after = libssl.SSL_CTX_get_options(pointer)
    context.options ^= marker
    if (before ^ after) != int(marker) or libssl.SSL_CTX_get_options(pointer) != before:
        raise ConfigError(f"--tls-psk: this Python ({sys.version.split()[0]}) lays out its ssl objects "
                          "differently; PSK is not available")
    return pointer


def _prepare(context: ssl.SSLContext) -> tuple[ctypes.CDLL, int]:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # TLS 1.2 PSK suites, and TLS 1.3's own (OpenSSL uses the callbacks for 1.3 too, with SHA-256).
    context.set_ciphers("PSK:DHE-PSK:ECDHE-PSK:!aNULL:!eNULL")
    libssl = _libssl()
    return libssl, _ssl_ctx_pointer(context, libssl)


def _install(setter, pointer: int, callback, context: ssl.SSLContext) -> None:
    """SSL_CTX_set_psk_{server,client}_callback(pointer, callback), keeping the callback alive."""
    _keep_alive.append((context, callback))
    setter.restype = None
    setter.argtypes = [ctypes.c_void_p, type(callback)]
    setter(pointer, callback)


def psk_context(path: str) -> ssl.SSLContext:
    """A server context that authenticates clients by the keys in a psktool file."""
    keys = read_psk_file(path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    libssl, pointer = _prepare(context)

    def find_key(ssl_ptr, identity, psk, max_len):  # called by OpenSSL during each handshake
        key = keys.get(identity or b"")
        if key is None or len(key) > max_len:
            log.info("TLS-PSK: refused unknown user %r", (identity or b"").decode(errors="replace"))
            return 0
        ctypes.memmove(psk, key, len(key))
        return len(key)

    _install(libssl.SSL_CTX_set_psk_server_callback, pointer, _PSK_SERVER_CALLBACK(find_key), context)
    return context


def psk_client_context(path: str, username: str) -> ssl.SSLContext:
    """A client context that proves itself with `username`'s key from a psktool file."""
    keys = read_psk_file(path)
    identity = username.encode()
    key = keys.get(identity)
    if key is None:
        raise ConfigError(f"tls-psk: {path} has no key for user {username!r}")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # the key authenticates the server: it must know it too
    context.verify_mode = ssl.CERT_NONE
    libssl, pointer = _prepare(context)

    def give_key(ssl_ptr, hint, identity_out, max_identity, psk, max_len):
        if len(identity) + 1 > max_identity or len(key) > max_len:
            return 0
        ctypes.memmove(identity_out, identity + b"\0", len(identity) + 1)
        ctypes.memmove(psk, key, len(key))
        return len(key)

    # CPython gives every context the session id context "Python"; the session OpenSSL builds from a
    # TLS 1.3 PSK has none, and OpenSSL refuses the mismatch ("attempt to reuse session in different
    # context").  A client context needs no session id context: clear it.
    libssl.SSL_CTX_set_session_id_context.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint]
    libssl.SSL_CTX_set_session_id_context(pointer, b"", 0)
    _install(libssl.SSL_CTX_set_psk_client_callback, pointer, _PSK_CLIENT_CALLBACK(give_key), context)
    return context

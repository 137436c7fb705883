"""Where an NBD server is: nbd:// URIs (libnbd's syntax) parsed into an `Address`, and the client's TLS context."""

from __future__ import annotations

import os
import ssl
import urllib.parse
from dataclasses import dataclass
from typing import Any

DEFAULT_PORT = 10809
# "a client desiring maximum interoperability SHOULD ... limit NBD_CMD_READ and NBD_CMD_WRITE commands
# to a maximum block size of 2^25 (33,554,432)" when the server advertises no block size constraints.
DEFAULT_MAXIMUM = 32 * 1024 * 1024


class HandshakeError(ConnectionError):
    """The server could not be reached, refused the export, or does not speak NBD as expected."""


# -- Addresses ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Address:
    """Where a server is and how to talk to it (what an NBD URI says)."""

    unix: str | None = None  # Unix socket path
    host: str | None = None  # TCP host name or address
    port: int = DEFAULT_PORT
    fd: int | None = None  # an already connected socket (nbdkit's socket-fd=)
    export: str = ""
    tls: str = "off"  # off, on (if the server offers it), require
    tls_certificates: str | None = None  # directory with ca-cert.pem [client-cert.pem client-key.pem]
    tls_verify: bool = True
    tls_hostname: str | None = None  # name checked in the server certificate (default: host)
    tls_psk_file: str | None = None  # pre-shared keys (psktool's format) instead of certificates
    tls_username: str | None = None  # whose key from tls_psk_file (default: the login name)

    def describe(self) -> str:
        where = self.unix or (f"fd {self.fd}" if self.fd is not None else f"{self.host}:{self.port}")
        return f"{where} export {self.export!r}" if self.export else where


_SCHEMES = {"nbd": ("tcp", "off"), "nbds": ("tcp", "require"), "nbd+unix": ("unix", "off"),
            "nbds+unix": ("unix", "require")}


def parse_uri(uri: str) -> Address:
    """An NBD URI as libnbd reads it (https://github.com/NetworkBlockDevice/nbd/blob/master/doc/uri.md).

    nbd[s]://HOST[:PORT][/EXPORT] and nbd[s]+unix:///[EXPORT]?socket=PATH; query parameters
    tls-certificates=DIR, tls-verify-peer=BOOL, tls-hostname=NAME.  The export is the path
    after its first "/", percent-decoded.
    """
    parts = urllib.parse.urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        if scheme.endswith("+vsock"):
            raise ValueError(f"{uri}: vsock URIs are not supported")
        raise ValueError(f"{uri}: not an NBD URI (use nbd://, nbds://, nbd+unix:// or nbds+unix://)")
    transport, tls = _SCHEMES[scheme]
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
    unknown = set(query) - {"socket", "tls-certificates", "tls-verify-peer", "tls-hostname", "tls-username",
                            "tls-psk-file"}
    if unknown:
        raise ValueError(f"{uri}: unknown URI query parameter {sorted(unknown)[0]!r}")

    def one(key: str) -> str | None:
        values = query.get(key)
        return values[-1] if values else None

    path = urllib.parse.unquote(parts.path)
    export = path[1:] if path.startswith("/") else path
    verify = one("tls-verify-peer")
    fields: dict[str, Any] = dict(export=export, tls=tls, tls_certificates=one("tls-certificates"),
                                  tls_hostname=one("tls-hostname"), tls_psk_file=one("tls-psk-file"),
                                  tls_username=one("tls-username") or parts.username)
    if verify is not None:
        fields["tls_verify"] = verify.lower() not in ("0", "false", "no", "off")
    if transport == "unix":
        socket_path = one("socket")
        if not socket_path:
            raise ValueError(f"{uri}: a Unix socket URI needs ?socket=PATH")
        if parts.hostname:
            raise ValueError(f"{uri}: a Unix socket URI has no host (write {scheme}:///EXPORT?socket=...)")
        return Address(unix=socket_path, **fields)
    if one("socket") is not None:
        raise ValueError(f"{uri}: socket= needs the nbd+unix:// scheme")
    if not parts.hostname:
        raise ValueError(f"{uri}: no host name")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise ValueError(f"{uri}: bad port") from None
    return Address(host=parts.hostname, port=port, **fields)


def tls_context(certificates_dir: str | None, verify: bool) -> ssl.SSLContext:
    """A client context with nbdkit/libnbd's file layout: DIR/ca-cert.pem, DIR/client-cert.pem, client-key.pem.

    Without a directory the system's trusted CAs verify the server.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if certificates_dir:
        ca = os.path.join(certificates_dir, "ca-cert.pem")
        if verify or os.path.exists(ca):
            context.load_verify_locations(ca)
        cert = os.path.join(certificates_dir, "client-cert.pem")
        if os.path.exists(cert):
            context.load_cert_chain(cert, os.path.join(certificates_dir, "client-key.pem"))
    elif verify:
        context.load_default_certs()
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context

